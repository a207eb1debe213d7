//! Scoring a model on preference pairs: per-example log-probs (of the policy and of a reference), and TRL's
//! evaluation metrics over sequential batches, averaged per batch as `Trainer.evaluate()` does (the loss is
//! weighted by batch size, like transformers' eval loop).

use crate::data::collate::{collate, TruncationMode};
use crate::data::tokenize::TokenizedPair;
use crate::model::decoder::CausalLm;
use crate::objective::dpo::{self, PairLogps};
use crate::objective::logps::score_tokens;
use crate::objective::metrics::MetricLog;
use crate::objective::orpo;
use serde::Serialize;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalObjective {
    /// summed log-probs, sigmoid DPO loss and metrics
    Dpo,
    /// averaged log-probs, ORPO loss and metrics (no reference)
    Orpo,
}

pub struct EvalOptions {
    pub objective: EvalObjective,
    pub beta: f64,
    pub batch_size: usize,
    pub pad_id: i64,
    /// DPO truncates at collation; ORPO pairs arrive truncated.
    pub truncation: Option<(usize, TruncationMode)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExampleScores {
    pub location: String,
    pub chosen_logps: f64,
    pub rejected_logps: f64,
    pub chosen_logps_avg: f64,
    pub rejected_logps_avg: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_chosen_logps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_rejected_logps: Option<f64>,
    pub chosen_tokens: i64,
    pub rejected_tokens: i64,
    /// β·(logp - ref logp) for DPO (β·logp without a reference), β·avg logp for ORPO
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

pub struct EvalResult {
    pub examples: Vec<ExampleScores>,
    /// TRL's names with the `eval_` prefix, plus `eval_preference_accuracy`
    pub metrics: BTreeMap<String, f64>,
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu)).expect("1-d tensor")
}

pub fn evaluate(policy: &CausalLm, reference: Option<&CausalLm>, pairs: &[TokenizedPair], options: &EvalOptions) -> EvalResult {
    let mut log = MetricLog::default();
    let mut examples = Vec::with_capacity(pairs.len());
    let (mut loss_sum, mut preferred) = (0.0, 0usize);
    tch::no_grad(|| {
        for chunk in pairs.chunks(options.batch_size.max(1)) {
            let refs: Vec<&TokenizedPair> = chunk.iter().collect();
            let batch = collate(&refs, options.pad_id, options.truncation);
            let scores = score_tokens(policy, &batch);
            let summed = PairLogps::from_sequences(&scores.summed_logps());
            let averaged = PairLogps::from_sequences(&scores.averaged_logps());
            let tokens = PairLogps::from_sequences(&scores.completion_tokens());
            // Without a reference model the reference log-probs are zero (reference-free rewards).
            let reference_logps = match reference {
                Some(r) => PairLogps::from_sequences(&score_tokens(r, &batch).summed_logps()),
                None => PairLogps::zeros_like(&summed),
            };
            let (loss, chosen_rewards, rejected_rewards) = match options.objective {
                EvalObjective::Dpo => {
                    let loss = dpo::sigmoid_loss(&summed, &reference_logps, options.beta).mean(Kind::Float);
                    dpo::log_batch_metrics(&mut log, &scores, &summed, &reference_logps, options.beta);
                    (loss, (&summed.chosen - &reference_logps.chosen) * options.beta, (&summed.rejected - &reference_logps.rejected) * options.beta)
                }
                EvalObjective::Orpo => {
                    let terms = orpo::orpo_terms(&scores, options.beta);
                    orpo::log_batch_metrics(&mut log, &scores, &terms, options.beta);
                    (terms.loss.shallow_clone(), &terms.chosen_logps * options.beta, &terms.rejected_logps * options.beta)
                }
            };
            loss_sum += loss.double_value(&[]) * chunk.len() as f64;
            let (c, r) = match options.objective {
                EvalObjective::Dpo => (values(&summed.chosen), values(&summed.rejected)),
                EvalObjective::Orpo => (values(&averaged.chosen), values(&averaged.rejected)),
            };
            preferred += c.iter().zip(&r).filter(|(c, r)| c > r).count();
            let columns = [
                values(&summed.chosen),
                values(&summed.rejected),
                values(&averaged.chosen),
                values(&averaged.rejected),
                values(&tokens.chosen),
                values(&tokens.rejected),
                values(&chosen_rewards),
                values(&rejected_rewards),
            ];
            let reference_columns = reference.map(|_| (values(&reference_logps.chosen), values(&reference_logps.rejected)));
            for (i, pair) in chunk.iter().enumerate() {
                examples.push(ExampleScores {
                    location: pair.location.clone(),
                    chosen_logps: columns[0][i],
                    rejected_logps: columns[1][i],
                    chosen_logps_avg: columns[2][i],
                    rejected_logps_avg: columns[3][i],
                    ref_chosen_logps: reference_columns.as_ref().map(|(c, _)| c[i]),
                    ref_rejected_logps: reference_columns.as_ref().map(|(_, r)| r[i]),
                    chosen_tokens: columns[4][i] as i64,
                    rejected_tokens: columns[5][i] as i64,
                    chosen_reward: columns[6][i],
                    rejected_reward: columns[7][i],
                });
            }
        }
    });
    let mut metrics = log.drain_means("eval_");
    metrics.insert("eval_loss".into(), loss_sum / pairs.len().max(1) as f64);
    metrics.insert("eval_preference_accuracy".into(), preferred as f64 / pairs.len().max(1) as f64);
    EvalResult { examples, metrics }
}
