//! Losses over per-token scores (`model::lm_head::TokenScores`): DPO and its loss variants (`dpo`), ORPO
//! (`orpo`), CPO/SimPO (`cpo`), SFT (`sft`), KTO (`kto`), and TRL's metric averaging (`metrics`).

pub mod cpo;
pub mod dpo;
pub mod kto;
pub mod metrics;
pub mod orpo;
pub mod sft;

use crate::data::pack::PackedBatch;
use crate::model::lm_head::{Needed, TokenScores};
use crate::objective::dpo::PairLogps;
use crate::objective::metrics::MetricLog;
use tch::Tensor;

pub use cpo::CpoParams;
pub use dpo::DpoParams;
pub use kto::KtoParams;
pub use orpo::OrpoParams;
pub use sft::SftParams;

/// What a training step optimizes.
#[derive(Debug, Clone)]
pub enum Objective {
    Dpo(DpoParams),
    Orpo(OrpoParams),
    /// CPO / SimPO (reference-free).
    Cpo(CpoParams),
    /// Supervised fine-tuning on single sequences.
    Sft(SftParams),
    /// KTO on unpaired examples.
    Kto(KtoParams),
}

impl Objective {
    /// β of DPO and KTO, λ of ORPO: the scale of the implicit rewards (SFT has none: 0).
    pub fn beta(&self) -> f64 {
        match self {
            Objective::Dpo(p) => p.loss.beta,
            Objective::Orpo(p) => p.beta,
            Objective::Cpo(p) => p.beta,
            Objective::Kto(p) => p.beta,
            Objective::Sft(_) => 0.0,
        }
    }

    /// The command that trains it, as TRL names its trainer.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Dpo(_) => "dpo",
            Objective::Orpo(_) => "orpo",
            Objective::Cpo(_) => "cpo",
            Objective::Sft(_) => "sft",
            Objective::Kto(_) => "kto",
        }
    }

    /// Whether `batch_loss` is a sum over label tokens that the step divides by the label tokens of all its
    /// micro-batches (transformers' `num_items_in_batch`, SFT), rather than a mean the step averages over them.
    pub fn sums_over_tokens(&self) -> bool {
        matches!(self, Objective::Sft(_))
    }

    /// Whether training keeps the model's dropout (LoRA's `lora_dropout`): TRL's SFTTrainer does; its preference
    /// trainers switch every dropout off (`disable_dropout`, true by default).
    pub fn trains_with_dropout(&self) -> bool {
        matches!(self, Objective::Sft(_))
    }

    /// The positions whose log-probs the loss reads.
    pub fn needed(&self) -> Needed {
        match self {
            Objective::Orpo(_) => Needed::CompletionsAndChosenRows,
            _ => Needed::Completions,
        }
    }

    pub fn needs_reference(&self) -> bool {
        matches!(self, Objective::Dpo(DpoParams { reference_free: false, .. }) | Objective::Kto(_))
    }

    /// The (differentiable) loss of `batch`, scored in `scores`; its metrics are appended to `log`.
    pub fn batch_loss(&self, scores: &TokenScores, batch: &PackedBatch, given: &Given, log: &mut MetricLog) -> Tensor {
        match self {
            Objective::Dpo(params) => dpo::batch_loss(scores, given.reference.as_ref(), params, log),
            Objective::Orpo(params) => orpo::batch_loss(scores, params, log),
            Objective::Cpo(params) => cpo::batch_loss(scores, params, log),
            Objective::Sft(params) => sft::batch_loss(scores, params, log),
            Objective::Kto(params) => kto::batch_loss(scores, batch, given, params, log),
        }
    }
}

/// What a loss takes as constants, computed without gradient before the policy's pass.
#[derive(Default)]
pub struct Given {
    /// The reference model's summed completion log-probs, when the objective needs them (KTO's: of the matched
    /// sequences as `chosen`, of the KL sequences as `rejected`).
    pub reference: Option<PairLogps>,
    /// KTO: the policy's own summed completion log-probs of the KL sequences, [B].
    pub kl_logps: Option<Tensor>,
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
