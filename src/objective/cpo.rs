//! CPO and SimPO (TRL's `CPOTrainer`, docs/TRL_DATA_SPEC.md §11): a reference-free preference loss over summed
//! (sigmoid, hinge) or averaged (ipo, simpo) completion log-probs, plus `cpo_alpha` times the NLL of the
//! chosen completions.

use crate::model::lm_head::TokenScores;
use crate::objective::metrics::{log_rewards, MetricLog};
use crate::objective::{smoothed_sigmoid_loss, split_pairs};
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
}

/// CPO's settings, with TRL's `CPOConfig` defaults.
#[derive(Debug, Clone, Copy)]
pub struct CpoParams {
    pub loss: CpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    /// weight of the NLL term on the chosen completions
    pub cpo_alpha: f64,
    /// SimPO's target reward margin γ
    pub simpo_gamma: f64,
}

impl Default for CpoParams {
    fn default() -> Self {
        Self { loss: CpoLoss::Sigmoid, beta: 0.1, label_smoothing: 0.0, cpo_alpha: 1.0, simpo_gamma: 0.5 }
    }
}

impl CpoParams {
    /// TRL's `loss_type` names; "alphapo" is SimPO without the NLL term, as TRL rewrites it.
    pub fn with_loss_type(mut self, name: &str) -> Result<Self> {
        self.loss = match name {
            "sigmoid" => CpoLoss::Sigmoid,
            "hinge" => CpoLoss::Hinge,
            "ipo" => CpoLoss::Ipo,
            "simpo" => CpoLoss::Simpo,
            "alphapo" => {
                self.cpo_alpha = 0.0;
                CpoLoss::Simpo
            }
            other => bail!("unknown CPO loss_type \"{other}\" (expected sigmoid, hinge, ipo, simpo or alphapo)"),
        };
        Ok(self)
    }
}

/// The loss of one batch; TRL's CPO metrics are appended to `log`.
pub fn batch_loss(scores: &TokenScores, p: &CpoParams, log: &mut MetricLog) -> Tensor {
    let logps = match p.loss {
        CpoLoss::Ipo | CpoLoss::Simpo => scores.averaged_logps(),
        CpoLoss::Sigmoid | CpoLoss::Hinge => scores.summed_logps(),
    };
    let batch = logps.size()[0] / 2;
    let (chosen, rejected) = split_pairs(&logps);
    let delta = &chosen - &rejected;
    let smoothed = |logits: &Tensor| smoothed_sigmoid_loss(logits, p.beta, p.label_smoothing);
    let losses = match p.loss {
        CpoLoss::Sigmoid => smoothed(&delta),
        // β·(Δ - γ/β), in TRL's order of operations
        CpoLoss::Simpo => smoothed(&(&delta - p.simpo_gamma / p.beta)),
        CpoLoss::Hinge => (-(&delta * p.beta) + 1.0).relu(),
        CpoLoss::Ipo => (&delta - 1.0 / (2.0 * p.beta)).square(),
    };
    let nll_loss = if p.cpo_alpha != 0.0 {
        let (mask, _) = split_pairs(&scores.completion_mask);
        let (chosen_token_logps, _) = split_pairs(&scores.logps);
        -(chosen_token_logps * &mask).sum(Kind::Float) / mask.sum(Kind::Float)
    } else {
        Tensor::zeros([], (Kind::Float, logps.device()))
    };
    let loss = losses.mean(Kind::Float) + &nll_loss * p.cpo_alpha;

    let scalar = |t: Tensor| t.double_value(&[]);
    let rewards = (chosen.detach() * p.beta, rejected.detach() * p.beta);
    log_rewards(log, (&rewards.0, &rewards.1), (&chosen.detach(), &rejected.detach()));
    // CPO averages the logits of every position of each half, the last one included.
    for (name, start) in [("logits/chosen", 0), ("logits/rejected", batch)] {
        log.push(name, scores.mean_logit_of_rows(start, batch, true));
    }
    log.push("nll_loss", scalar(nll_loss.detach()));
    loss
}
