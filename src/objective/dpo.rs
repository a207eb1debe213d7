//! DPO over summed completion log-probs (TRL's `DPOTrainer._compute_loss`): the loss and the metrics it logs.

use crate::model::lm_head::TokenScores;
use crate::objective::metrics::{log_rewards, MetricLog};
use crate::objective::{smoothed_sigmoid_loss, split_pairs};
use tch::{Kind, Tensor};

/// Summed completion log-probs of a batch's chosen and rejected sequences, each [B].
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
}

impl PairLogps {
    /// Splits [2B] per-sequence values (chosen rows first) into halves.
    pub fn from_sequences(values: &Tensor) -> Self {
        let (chosen, rejected) = split_pairs(values);
        Self { chosen, rejected }
    }

    /// Zeros: the reference-free case (no reference model).
    pub fn zeros_like(other: &PairLogps) -> Self {
        Self { chosen: other.chosen.zeros_like(), rejected: other.rejected.zeros_like() }
    }
}

/// TRL's DPO `loss_type`s: one table of per-pair losses over the same inputs (`LossInputs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
    ExoPair,
    NcaPair,
    Robust,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    Sft,
    SigmoidNorm,
}

impl DpoLoss {
    pub const ALL: [(&'static str, DpoLoss); 15] = [
        ("sigmoid", Self::Sigmoid),
        ("hinge", Self::Hinge),
        ("ipo", Self::Ipo),
        ("exo_pair", Self::ExoPair),
        ("nca_pair", Self::NcaPair),
        ("robust", Self::Robust),
        ("bco_pair", Self::BcoPair),
        ("sppo_hard", Self::SppoHard),
        ("aot", Self::Aot),
        ("aot_unpaired", Self::AotUnpaired),
        ("apo_zero", Self::ApoZero),
        ("apo_down", Self::ApoDown),
        ("discopop", Self::Discopop),
        ("sft", Self::Sft),
        ("sigmoid_norm", Self::SigmoidNorm),
    ];

    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, l)| *l).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
            anyhow::anyhow!("unknown loss_type \"{name}\" (expected one of: {})", names.join(", "))
        })
    }
}

/// Everything the DPO losses read, for a batch of B pairs.
pub struct LossInputs<'a> {
    pub policy: &'a PairLogps,
    pub reference: &'a PairLogps,
    /// Completion tokens of each chosen / rejected sequence, [B] each (unshifted, as TRL's ipo/sigmoid_norm use).
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
    /// Per-token log-probs of the chosen rows and their (shifted) completion mask, [B, T-1] each, for `sft`.
    pub chosen_token_logps: &'a Tensor,
    pub chosen_token_mask: &'a Tensor,
}

/// The scalars the DPO losses read, with TRL's `DPOConfig` defaults.
#[derive(Debug, Clone, Copy)]
pub struct LossParams {
    pub beta: f64,
    pub label_smoothing: f64,
    pub discopop_tau: f64,
}

impl Default for LossParams {
    fn default() -> Self {
        Self { beta: 0.1, label_smoothing: 0.0, discopop_tau: 0.05 }
    }
}

/// DPO's settings, with TRL's `DPOConfig` defaults (`loss_type` sigmoid, a reference model).
#[derive(Debug, Clone)]
pub struct DpoParams {
    /// TRL's `loss_type`s, each with its `loss_weights` entry
    pub losses: Vec<(DpoLoss, f64)>,
    pub loss: LossParams,
    /// Score against a zero reference (no reference model).
    pub reference_free: bool,
}

impl Default for DpoParams {
    fn default() -> Self {
        Self { losses: vec![(DpoLoss::Sigmoid, 1.0)], loss: LossParams::default(), reference_free: false }
    }
}

impl DpoLoss {
    /// The loss of each pair, [B] (TRL's `per_sequence_loss`).
    pub fn per_pair(self, x: &LossInputs, p: LossParams) -> Tensor {
        let beta = p.beta;
        let chosen_ratio = &x.policy.chosen - &x.reference.chosen; // log πθ(c)/πref(c)
        let rejected_ratio = &x.policy.rejected - &x.reference.rejected;
        let delta = &chosen_ratio - &rejected_ratio;
        let eps = p.label_smoothing;
        let smoothed = |d: &Tensor| smoothed_sigmoid_loss(d, beta, eps);
        let per_token = |ratio: &Tensor, tokens: &Tensor| ratio / tokens.clamp_min(1.0);
        let one_minus = |t: Tensor| -t + 1.0;
        match self {
            Self::Sigmoid => -(&delta * beta).log_sigmoid(),
            Self::Hinge => one_minus(&delta * beta).relu(),
            Self::Ipo => {
                let d = per_token(&chosen_ratio, x.chosen_tokens) - per_token(&rejected_ratio, x.rejected_tokens);
                (d - 1.0 / (2.0 * beta)).square()
            }
            Self::ExoPair => {
                let z = &delta * beta;
                let (log_pw, log_pl) = ((-eps).ln_1p(), eps.ln());
                z.sigmoid() * (z.log_sigmoid() - log_pw) + (-&z).sigmoid() * ((-&z).log_sigmoid() - log_pl)
            }
            Self::NcaPair => {
                let (c, r) = (&chosen_ratio * beta, &rejected_ratio * beta);
                -c.log_sigmoid() - (-&c).log_sigmoid() * 0.5 - (-r).log_sigmoid() * 0.5
            }
            Self::Robust => {
                let clean = -(&delta * beta).log_sigmoid() * (1.0 - eps);
                let flipped = -(&delta * -beta).log_sigmoid() * eps;
                (clean - flipped) / (1.0 - 2.0 * eps)
            }
            Self::BcoPair => -(&chosen_ratio * beta).log_sigmoid() - (&rejected_ratio * -beta).log_sigmoid(),
            Self::SppoHard => (&chosen_ratio - 0.5 / beta).square() + (&rejected_ratio + 0.5 / beta).square(),
            Self::Aot => {
                let (policy, _) = (&x.policy.chosen - &x.policy.rejected).sort(0, false);
                let (reference, _) = (&x.reference.chosen - &x.reference.rejected).sort(0, false);
                smoothed(&(policy - reference))
            }
            Self::AotUnpaired => {
                let (chosen, _) = chosen_ratio.sort(0, false);
                let (rejected, _) = rejected_ratio.sort(0, false);
                smoothed(&(chosen - rejected))
            }
            Self::ApoZero => one_minus((&chosen_ratio * beta).sigmoid()) + (&rejected_ratio * beta).sigmoid(),
            Self::ApoDown => (&chosen_ratio * beta).sigmoid() + one_minus((&delta * beta).sigmoid()),
            Self::Discopop => {
                let z = &delta * beta;
                let modulation = (&z / p.discopop_tau).sigmoid();
                -z.log_sigmoid() * one_minus(modulation.shallow_clone()) + (-&z).exp() * modulation
            }
            Self::Sft => {
                let mask = x.chosen_token_mask;
                let nll = -(x.chosen_token_logps * mask).sum(None) / mask.sum(None);
                nll.expand([x.policy.chosen.size()[0]], false)
            }
            Self::SigmoidNorm => {
                let d = per_token(&chosen_ratio, x.chosen_tokens) - per_token(&rejected_ratio, x.rejected_tokens);
                -(d * beta).log_sigmoid()
            }
        }
    }
}

/// Σ_k weight_k · mean(loss_k) over the configured `loss_type`s (TRL's `loss_weights`).
pub fn combined_loss(losses: &[(DpoLoss, f64)], x: &LossInputs, p: LossParams) -> Tensor {
    losses
        .iter()
        .map(|(loss, weight)| loss.per_pair(x, p).mean(None) * *weight)
        .reduce(|a, b| a + b)
        .expect("at least one loss type")
}

/// The loss of one batch, from the policy's token scores and the reference's summed completion log-probs (zero
/// when reference-free or absent); its metrics are appended to `log`.
pub fn batch_loss(
    scores: &TokenScores,
    reference: Option<&PairLogps>,
    params: &DpoParams,
    log: &mut MetricLog,
) -> Tensor {
    let policy = PairLogps::from_sequences(&scores.summed_logps());
    let reference = reference.map_or_else(
        || PairLogps::zeros_like(&policy),
        |r| PairLogps { chosen: r.chosen.shallow_clone(), rejected: r.rejected.shallow_clone() },
    );
    let tokens = PairLogps::from_sequences(&scores.completion_tokens());
    let (chosen_token_logps, _) = split_pairs(&scores.logps);
    let (chosen_token_mask, _) = split_pairs(&scores.completion_mask);
    let inputs = LossInputs {
        policy: &policy,
        reference: &reference,
        chosen_tokens: &tokens.chosen,
        rejected_tokens: &tokens.rejected,
        chosen_token_logps: &chosen_token_logps,
        chosen_token_mask: &chosen_token_mask,
    };
    let loss = combined_loss(&params.losses, &inputs, params.loss);
    let detached = PairLogps { chosen: policy.chosen.detach(), rejected: policy.rejected.detach() };
    log_batch_metrics(log, scores, &detached, &reference, params.loss.beta);
    loss
}

/// Appends one batch's values of TRL's DPO metrics (`entropy`, `logits/*`, `mean_token_accuracy`, `rewards/*`,
/// `logps/*`) to `log`.
fn log_batch_metrics(log: &mut MetricLog, scores: &TokenScores, policy: &PairLogps, reference: &PairLogps, beta: f64) {
    let mask = &scores.completion_mask;
    let scalar = |t: Tensor| t.double_value(&[]);
    // token-weighted: across the ranks of a data-parallel run too (TRL gathers sums and counts)
    log.push_ratio("entropy", scalar((&scores.entropy * mask).sum(Kind::Float)), scalar(mask.sum(Kind::Float)));
    let (chosen_mask, rejected_mask) = split_pairs(mask);
    let (chosen_logits, rejected_logits) = split_pairs(&scores.mean_logits);
    for (name, logits, side_mask) in
        [("logits/chosen", chosen_logits, &chosen_mask), ("logits/rejected", rejected_logits, &rejected_mask)]
    {
        log.push_ratio(name, scalar((logits * side_mask).sum(Kind::Float)), scalar(side_mask.sum(Kind::Float)));
    }
    let (chosen_top1, _) = split_pairs(&scores.is_top1.to_kind(Kind::Float));
    let correct = scalar((chosen_top1 * &chosen_mask).sum(Kind::Float));
    log.push_ratio("mean_token_accuracy", correct, scalar(chosen_mask.sum(Kind::Float)));
    let chosen_rewards = (&policy.chosen - &reference.chosen) * beta;
    let rejected_rewards = (&policy.rejected - &reference.rejected) * beta;
    log_rewards(log, (&chosen_rewards, &rejected_rewards), (&policy.chosen, &policy.rejected));
}
