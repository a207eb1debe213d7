//! DPO over summed completion log-probs (TRL's `DPOTrainer._compute_loss`): the loss and the metrics it logs.

use crate::objective::logps::TokenScores;
use crate::objective::metrics::MetricLog;
use tch::{Kind, Tensor};

/// Summed completion log-probs of a batch's chosen and rejected sequences, each [B].
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
}

impl PairLogps {
    /// Splits [2B] per-sequence values (chosen rows first) into halves.
    pub fn from_sequences(values: &Tensor) -> Self {
        let halves = values.chunk(2, 0);
        Self { chosen: halves[0].shallow_clone(), rejected: halves[1].shallow_clone() }
    }

    /// Zeros: the reference-free case (no reference model).
    pub fn zeros_like(other: &PairLogps) -> Self {
        Self { chosen: other.chosen.zeros_like(), rejected: other.rejected.zeros_like() }
    }
}

/// The sigmoid DPO loss per pair, [B]: -log σ(β · ((πc - refc) - (πr - refr))).
pub fn sigmoid_loss(policy: &PairLogps, reference: &PairLogps, beta: f64) -> Tensor {
    let delta = (&policy.chosen - &reference.chosen) - (&policy.rejected - &reference.rejected);
    -(delta * beta).log_sigmoid()
}

/// Appends one batch's values of TRL's DPO metrics (`entropy`, `logits/*`, `mean_token_accuracy`, `rewards/*`,
/// `logps/*`) to `log`.
pub fn log_batch_metrics(log: &mut MetricLog, scores: &TokenScores, policy: &PairLogps, reference: &PairLogps, beta: f64) {
    let mask = &scores.completion_mask;
    let scalar = |t: Tensor| t.double_value(&[]);
    let total = scalar(mask.sum(Kind::Float));
    log.push("entropy", if total > 0.0 { scalar((&scores.entropy * mask).sum(Kind::Float)) / total } else { 0.0 });
    let halves = |t: &Tensor| {
        let h = t.chunk(2, 0);
        (h[0].shallow_clone(), h[1].shallow_clone())
    };
    let (chosen_mask, rejected_mask) = halves(mask);
    let (chosen_logits, rejected_logits) = halves(&scores.mean_logits);
    for (name, logits, side_mask) in [("logits/chosen", chosen_logits, &chosen_mask), ("logits/rejected", rejected_logits, &rejected_mask)] {
        let tokens = scalar(side_mask.sum(Kind::Float));
        log.push(name, if tokens > 0.0 { scalar((logits * side_mask).sum(Kind::Float)) / tokens } else { 0.0 });
    }
    let (chosen_top1, _) = halves(&scores.is_top1.to_kind(Kind::Float));
    let chosen_tokens = scalar(chosen_mask.sum(Kind::Float));
    log.push("mean_token_accuracy", if chosen_tokens > 0.0 { scalar((chosen_top1 * &chosen_mask).sum(Kind::Float)) / chosen_tokens } else { 0.0 });
    let chosen_rewards = (&policy.chosen - &reference.chosen) * beta;
    let rejected_rewards = (&policy.rejected - &reference.rejected) * beta;
    log.push("rewards/chosen", scalar(chosen_rewards.mean(Kind::Float)));
    log.push("rewards/rejected", scalar(rejected_rewards.mean(Kind::Float)));
    log.push("rewards/accuracies", scalar(chosen_rewards.gt_tensor(&rejected_rewards).to_kind(Kind::Float).mean(Kind::Float)));
    log.push("rewards/margins", scalar((&chosen_rewards - &rejected_rewards).mean(Kind::Float)));
    log.push("logps/chosen", scalar(policy.chosen.mean(Kind::Float)));
    log.push("logps/rejected", scalar(policy.rejected.mean(Kind::Float)));
}
