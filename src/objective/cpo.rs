//! CPO and SimPO (TRL's `CPOTrainer`, docs/TRL_DATA_SPEC.md §11): a reference-free preference loss over summed
//! (sigmoid, hinge) or averaged (ipo, simpo) completion log-probs, plus `cpo_alpha` times the NLL of the
//! chosen completions.

use crate::objective::logps::TokenScores;
use crate::objective::metrics::{log_rewards, MetricLog};
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
}

#[derive(Debug, Clone, Copy)]
pub struct CpoParams {
    pub loss: CpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    pub cpo_alpha: f64,
    pub simpo_gamma: f64,
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
    let (chosen, rejected) = (logps.narrow(0, 0, batch), logps.narrow(0, batch, batch));
    let delta = &chosen - &rejected;
    let smoothed = |logits: &Tensor| {
        -(logits * p.beta).log_sigmoid() * (1.0 - p.label_smoothing) - (logits * -p.beta).log_sigmoid() * p.label_smoothing
    };
    let losses = match p.loss {
        CpoLoss::Sigmoid => smoothed(&delta),
        // β·(Δ - γ/β), in TRL's order of operations
        CpoLoss::Simpo => smoothed(&(&delta - p.simpo_gamma / p.beta)),
        CpoLoss::Hinge => (-(&delta * p.beta) + 1.0).relu(),
        CpoLoss::Ipo => (&delta - 1.0 / (2.0 * p.beta)).square(),
    };
    let nll_loss = if p.cpo_alpha != 0.0 {
        let mask = scores.completion_mask.narrow(0, 0, batch);
        -(scores.logps.narrow(0, 0, batch) * &mask).sum(Kind::Float) / mask.sum(Kind::Float)
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
