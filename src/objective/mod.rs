//! Losses over per-token scores (`model::lm_head::TokenScores`): DPO and its loss variants (`dpo`), ORPO
//! (`orpo`), CPO/SimPO (`cpo`), and TRL's metric averaging (`metrics`).

pub mod cpo;
pub mod dpo;
pub mod metrics;
pub mod orpo;

use crate::model::lm_head::{Needed, TokenScores};
use crate::objective::dpo::PairLogps;
use crate::objective::metrics::MetricLog;
use tch::Tensor;

pub use cpo::CpoParams;
pub use dpo::DpoParams;
pub use orpo::OrpoParams;

/// What a training step optimizes.
#[derive(Debug, Clone)]
pub enum Objective {
    Dpo(DpoParams),
    Orpo(OrpoParams),
    /// CPO / SimPO (reference-free).
    Cpo(CpoParams),
}

impl Objective {
    /// β of DPO, λ of ORPO: the scale of the implicit rewards.
    pub fn beta(&self) -> f64 {
        match self {
            Objective::Dpo(p) => p.loss.beta,
            Objective::Orpo(p) => p.beta,
            Objective::Cpo(p) => p.beta,
        }
    }

    /// The positions whose log-probs the loss reads.
    pub fn needed(&self) -> Needed {
        match self {
            Objective::Orpo(_) => Needed::CompletionsAndChosenRows,
            _ => Needed::Completions,
        }
    }

    pub fn needs_reference(&self) -> bool {
        matches!(self, Objective::Dpo(DpoParams { reference_free: false, .. }))
    }

    /// The (differentiable) loss of one batch; its metrics are appended to `log`. `reference` holds the
    /// reference model's summed completion log-probs when the objective needs them.
    pub fn batch_loss(&self, scores: &TokenScores, reference: Option<&PairLogps>, log: &mut MetricLog) -> Tensor {
        match self {
            Objective::Dpo(params) => dpo::batch_loss(scores, reference, params, log),
            Objective::Orpo(params) => orpo::batch_loss(scores, params, log),
            Objective::Cpo(params) => cpo::batch_loss(scores, params, log),
        }
    }
}

/// The chosen and the rejected halves of a batch's per-sequence values ([2B, ...], chosen rows first), [B, ...] each.
pub fn split_pairs(values: &Tensor) -> (Tensor, Tensor) {
    let batch = values.size()[0] / 2;
    (values.narrow(0, 0, batch), values.narrow(0, batch, batch))
}

/// The label-smoothed sigmoid loss of preference logits, per pair: -log σ(β·x)·(1 - ε) - log σ(-β·x)·ε (cDPO;
/// ε = 0 is DPO's own).
pub fn smoothed_sigmoid_loss(logits: &Tensor, beta: f64, label_smoothing: f64) -> Tensor {
    -(logits * beta).log_sigmoid() * (1.0 - label_smoothing) - (logits * -beta).log_sigmoid() * label_smoothing
}
