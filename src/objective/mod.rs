//! Objectives over per-token scores: DPO (`dpo`), ORPO (`orpo`), CPO/SimPO (`cpo`), their shared log-prob machinery (`logps`),
//! TRL's metric averaging (`metrics`) and scoring a model on a dataset (`evaluate`).

pub mod cpo;
pub mod dpo;
pub mod evaluate;
pub mod logps;
pub mod metrics;
pub mod orpo;
pub mod reference;

use crate::objective::dpo::{DpoLoss, LossInputs, LossParams, PairLogps};
use crate::objective::logps::{Needed, TokenScores};
use crate::objective::metrics::MetricLog;
use tch::Tensor;

/// What a training step optimizes.
#[derive(Debug, Clone)]
pub enum Objective {
    /// DPO with one or more weighted loss types; `reference_free` scores against a zero reference.
    Dpo { losses: Vec<(DpoLoss, f64)>, params: LossParams, reference_free: bool },
    /// ORPO with λ = `beta`.
    Orpo { beta: f64 },
    /// CPO / SimPO (reference-free).
    Cpo(cpo::CpoParams),
}

impl Objective {
    /// β of DPO, λ of ORPO: the scale of the implicit rewards.
    pub fn beta(&self) -> f64 {
        match self {
            Objective::Dpo { params, .. } => params.beta,
            Objective::Orpo { beta } => *beta,
            Objective::Cpo(p) => p.beta,
        }
    }

    /// The positions whose log-probs the loss reads.
    pub fn needed(&self) -> Needed {
        match self {
            Objective::Orpo { .. } => Needed::CompletionsAndChosenRows,
            _ => Needed::Completions,
        }
    }

    pub fn needs_reference(&self) -> bool {
        matches!(self, Objective::Dpo { reference_free: false, .. })
    }

    /// The (differentiable) loss of one batch; its metrics are appended to `log`. `reference` holds the
    /// reference model's summed completion log-probs when the objective needs them.
    pub fn batch_loss(&self, scores: &TokenScores, reference: Option<&PairLogps>, log: &mut MetricLog) -> Tensor {
        match self {
            Objective::Dpo { losses, params, .. } => {
                let policy = PairLogps::from_sequences(&scores.summed_logps());
                let reference = reference.map_or_else(|| PairLogps::zeros_like(&policy), |r| PairLogps {
                    chosen: r.chosen.shallow_clone(),
                    rejected: r.rejected.shallow_clone(),
                });
                let tokens = PairLogps::from_sequences(&scores.completion_tokens());
                let batch = policy.chosen.size()[0];
                let chosen_token_logps = scores.logps.narrow(0, 0, batch);
                let chosen_token_mask = scores.completion_mask.narrow(0, 0, batch);
                let inputs = LossInputs {
                    policy: &policy,
                    reference: &reference,
                    chosen_tokens: &tokens.chosen,
                    rejected_tokens: &tokens.rejected,
                    chosen_token_logps: &chosen_token_logps,
                    chosen_token_mask: &chosen_token_mask,
                };
                let loss = dpo::combined_loss(losses, &inputs, *params);
                let detached = PairLogps { chosen: policy.chosen.detach(), rejected: policy.rejected.detach() };
                dpo::log_batch_metrics(log, scores, &detached, &reference, params.beta);
                loss
            }
            Objective::Orpo { beta } => {
                let terms = orpo::orpo_terms(scores, *beta);
                orpo::log_batch_metrics(log, scores, &terms, *beta);
                terms.loss
            }
            Objective::Cpo(params) => cpo::batch_loss(scores, params, log),
        }
    }
}
