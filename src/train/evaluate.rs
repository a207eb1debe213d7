//! Scoring a model on preference pairs: per-example log-probs (of the policy and of a reference), and the
//! objective's loss and metrics over sequential batches, averaged per batch as TRL's `evaluate()` does (the
//! loss weighted by batch size, like transformers' eval loop).

use crate::data::batches::Examples;
use crate::data::pack::Batching;
use crate::data::tokenize::TokenizedPair;
use crate::model::decoder::CausalLm;
use crate::model::lm_head::{score_tokens, Precision};
use crate::objective::cpo::CpoLoss;
use crate::objective::dpo::PairLogps;
use crate::objective::metrics::MetricLog;
use crate::objective::{Given, Objective};
use crate::train::distributed::{sum_across, ProcessGroup};
use crate::train::reference::{reference_logps, ReferenceLogps};
use crate::train::step::given;
use serde::Serialize;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// Where evaluation takes the reference's log-probs from.
#[derive(Clone, Copy)]
pub enum EvalReference<'a> {
    Model(&'a CausalLm),
    /// precomputed for exactly the evaluated pairs, in order
    Logps(&'a ReferenceLogps),
}

pub struct EvalOptions {
    pub batch_size: usize,
    pub batching: Batching,
    pub precision: Precision,
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

pub fn evaluate(
    policy: &CausalLm,
    reference: Option<EvalReference>,
    pairs: &[TokenizedPair],
    objective: &Objective,
    options: &EvalOptions,
) -> EvalResult {
    let positions: Vec<usize> = (0..pairs.len()).collect();
    let mut scored = score_batches(policy, reference, pairs, &positions, objective, options);
    let mut metrics = scored.log.drain_means("eval_");
    let loss_sum: f64 =
        scored.batch_losses.iter().zip(pairs.chunks(options.batch_size.max(1))).map(|(l, c)| l * c.len() as f64).sum();
    let preferred = scored.preferred.iter().filter(|&&p| p).count();
    metrics.insert("eval_loss".into(), loss_sum / pairs.len().max(1) as f64);
    metrics.insert("eval_preference_accuracy".into(), preferred as f64 / pairs.len().max(1) as f64);
    EvalResult { examples: scored.examples, metrics }
}

/// [`evaluate`]'s metrics on the ranks of `group`, each scoring its share as accelerate shards TRL's evaluation: the
/// pairs in order, in global batches of `batch_size` per rank, the last completed with the first pairs; each
/// global batch's metrics combined as in training. The loss counts each real pair once (as transformers' gather
/// drops the completion); the other metrics of the last global batch include the completing pairs.
pub fn evaluate_on(
    group: &ProcessGroup,
    policy: &CausalLm,
    reference: Option<EvalReference>,
    pairs: &[TokenizedPair],
    objective: &Objective,
    options: &EvalOptions,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let (per_rank, world) = (options.batch_size.max(1), group.world_size);
    let global = per_rank * world;
    // this rank's places in the padded order: its slice of each global batch; the places past the set's end hold
    // its first pairs again
    let padded = pairs.len().div_ceil(global) * global;
    let first = group.rank * per_rank;
    let places: Vec<usize> =
        (0..padded).step_by(global).flat_map(|start| start + first..start + first + per_rank).collect();
    let mine: Vec<usize> = places.iter().map(|&place| place % pairs.len()).collect();
    let real: Vec<bool> = places.iter().map(|&place| place < pairs.len()).collect();
    let my_pairs: Vec<TokenizedPair> = mine.iter().map(|&i| pairs[i].clone()).collect();
    let mut scored = score_batches(policy, reference, &my_pairs, &mine, objective, options);
    scored.log.combine_ranks(world, |values| sum_across(group, values, "the evaluation's metrics"))?;
    let real_in_batch = real.chunks(per_rank).map(|b| b.iter().filter(|&&r| r).count() as f64);
    let loss_sum: f64 = scored.batch_losses.iter().zip(real_in_batch).map(|(l, n)| l * n).sum();
    let preferred = scored.preferred.iter().zip(&real).filter(|&(&p, &r)| p && r).count() as f64;
    let totals = sum_across(group, &[loss_sum, preferred], "the evaluation's loss")?;
    let mut metrics = scored.log.drain_means("eval_");
    metrics.insert("eval_loss".into(), totals[0] / pairs.len().max(1) as f64);
    metrics.insert("eval_preference_accuracy".into(), totals[1] / pairs.len().max(1) as f64);
    Ok(metrics)
}

/// What scoring `pairs` in batches gives: per-pair scores, the objective's metrics per batch, each batch's loss,
/// and whether the objective prefers each chosen completion. `positions`: each pair's index among the pairs that
/// precomputed reference log-probs cover.
struct Scored {
    examples: Vec<ExampleScores>,
    log: MetricLog,
    batch_losses: Vec<f64>,
    preferred: Vec<bool>,
}

fn score_batches(
    policy: &CausalLm,
    reference: Option<EvalReference>,
    pairs: &[TokenizedPair],
    positions: &[usize],
    objective: &Objective,
    options: &EvalOptions,
) -> Scored {
    let mut log = MetricLog::default();
    let mut examples = Vec::with_capacity(pairs.len());
    let (mut batch_losses, mut preferred) = (Vec::new(), Vec::new());
    let beta = objective.beta();
    tch::no_grad(|| {
        let batch_size = options.batch_size.max(1);
        for (chunk, chunk_positions) in pairs.chunks(batch_size).zip(positions.chunks(batch_size)) {
            let refs: Vec<&TokenizedPair> = chunk.iter().collect();
            let batch = options.batching.pack(&refs);
            let scores = score_tokens(policy, &batch, objective.needed(), options.precision);
            let summed = PairLogps::from_sequences(&scores.summed_logps());
            let averaged = PairLogps::from_sequences(&scores.averaged_logps());
            let tokens = PairLogps::from_sequences(&scores.completion_tokens());
            let reference_logps = reference.as_ref().map(|r| match r {
                EvalReference::Model(model) => reference_logps(model, &batch, options.precision),
                EvalReference::Logps(logps) => logps.batch(chunk_positions, summed.chosen.device()),
            });
            let given = Given { reference: reference_logps, kl_logps: None };
            let loss = objective.batch_loss(&scores, &batch, &given, &mut log);
            batch_losses.push(loss.double_value(&[]));
            let reference_logps = given.reference;
            // The log-probs the objective compares: summed for DPO, averaged for ORPO.
            let (compared, rewards) = match objective {
                Objective::Dpo(_) | Objective::Kto(_) | Objective::Sft(_) => {
                    let zero = PairLogps::zeros_like(&summed);
                    let r = reference_logps.as_ref().unwrap_or(&zero);
                    (&summed, ((&summed.chosen - &r.chosen) * beta, (&summed.rejected - &r.rejected) * beta))
                }
                Objective::Orpo(_) => (&averaged, (&averaged.chosen * beta, &averaged.rejected * beta)),
                Objective::Cpo(p) => {
                    let logps = if matches!(p.loss, CpoLoss::Ipo | CpoLoss::Simpo) { &averaged } else { &summed };
                    (logps, (&logps.chosen * beta, &logps.rejected * beta))
                }
            };
            let (c, r) = (values(&compared.chosen), values(&compared.rejected));
            preferred.extend(c.iter().zip(&r).map(|(c, r)| c > r));
            let columns = [
                values(&summed.chosen),
                values(&summed.rejected),
                values(&averaged.chosen),
                values(&averaged.rejected),
                values(&tokens.chosen),
                values(&tokens.rejected),
                values(&rewards.0),
                values(&rewards.1),
            ];
            let reference_columns = reference_logps.as_ref().map(|r| (values(&r.chosen), values(&r.rejected)));
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
    Scored { examples, log, batch_losses, preferred }
}

/// The loss and metrics of SFT or KTO over `examples`, in sequential batches, as transformers' eval loop averages
/// them: the loss (SFT: each batch's mean over its label tokens) weighted by batch size, each metric per batch.
/// Names with the `eval_` prefix.
pub fn evaluate_examples(
    policy: &CausalLm,
    reference: Option<EvalReference>,
    examples: Examples,
    objective: &Objective,
    options: &EvalOptions,
) -> BTreeMap<String, f64> {
    let mut log = MetricLog::default();
    let mut loss_sum = 0.0;
    let indices: Vec<usize> = (0..examples.len()).collect();
    tch::no_grad(|| {
        for chunk in indices.chunks(options.batch_size.max(1)) {
            let micro = examples.micro_batch(chunk, &options.batching);
            let batch = &micro.batch;
            let scores = score_tokens(policy, batch, objective.needed(), options.precision);
            let reference_logps = reference.as_ref().map(|r| match r {
                EvalReference::Model(model) => reference_logps(model, micro.reference_input(), options.precision),
                EvalReference::Logps(logps) => logps.batch(chunk, scores.logps.device()),
            });
            let given = given(policy, &micro, reference_logps, options.precision);
            let loss = objective.batch_loss(&scores, batch, &given, &mut log);
            let mut loss = loss.double_value(&[]);
            if objective.sums_over_tokens() {
                loss /= batch.label_tokens().max(1) as f64;
            }
            loss_sum += loss * chunk.len() as f64;
        }
    });
    let mut metrics = log.drain_means("eval_");
    metrics.insert("eval_loss".into(), loss_sum / examples.len().max(1) as f64);
    metrics
}
