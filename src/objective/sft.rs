//! SFT (TRL's `SFTTrainer`): the negative log-likelihood of the label tokens, summed here and divided by the label
//! tokens of the whole optimizer step by the step (transformers' `num_items_in_batch`); the metrics TRL logs.

use crate::model::lm_head::TokenScores;
use crate::objective::metrics::MetricLog;
use tch::{Kind, Tensor};

/// SFTConfig's `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SftLoss {
    /// negative log-likelihood
    #[default]
    Nll,
    /// Dynamic Fine-Tuning (arXiv 2508.05629): each token's NLL weighted by its (detached) probability
    Dft,
}

impl SftLoss {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "nll" => Ok(SftLoss::Nll),
            "dft" => Ok(SftLoss::Dft),
            other => anyhow::bail!("unknown SFT loss_type \"{other}\": expected nll or dft"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SftParams {
    pub loss: SftLoss,
}

/// The summed loss of the label tokens of one micro-batch; `entropy` and `mean_token_accuracy` over its label
/// tokens go to `log`.
pub fn batch_loss(scores: &TokenScores, params: &SftParams, log: &mut MetricLog) -> Tensor {
    let labels = &scores.completion_mask; // 1 where the next token is a label, [rows, T-1]
    let nll = -&scores.logps * labels;
    let per_token = match params.loss {
        SftLoss::Nll => nll,
        SftLoss::Dft => nll * scores.logps.detach().exp(),
    };
    let count = labels.sum(Kind::Float).double_value(&[]);
    let mean_over_labels =
        |t: Tensor| if count > 0.0 { (t * labels).sum(Kind::Float).double_value(&[]) / count } else { 0.0 };
    log.push("entropy", mean_over_labels(scores.entropy.shallow_clone()));
    log.push("mean_token_accuracy", mean_over_labels(scores.is_top1.to_kind(Kind::Float)));
    per_token.sum(Kind::Float)
}
