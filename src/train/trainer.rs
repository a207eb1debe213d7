//! The training loop, step for step like transformers' Trainer driving TRL's DPO/ORPO losses: batches in a
//! seeded order, gradient accumulation, clipping, AdamW, the schedule, and a `metrics.jsonl` line per logging
//! step with TRL's keys.

use crate::data::collate::{collate, epoch_order, SamplingStrategy, TruncationMode};
use crate::data::tokenize::TokenizedPair;
use crate::model::decoder::CausalLm;
use crate::objective::dpo::PairLogps;
use crate::objective::logps::score_tokens;
use crate::objective::metrics::MetricLog;
use crate::objective::Objective;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::schedule::{warmup_steps, Schedule};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use tch::nn::VarStore;
use tch::Kind;

/// The trainer's settings, named as in transformers' TrainingArguments / TRL's configs.
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub output_dir: PathBuf,
    pub learning_rate: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub optimizer: AdamWConfig,
    pub max_grad_norm: f64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    /// > 0 overrides `num_train_epochs`
    pub max_steps: i64,
    pub logging_steps: usize,
    pub seed: u64,
    pub sampling: SamplingStrategy,
    pub pad_id: i64,
    /// DPO truncates at collation; ORPO pairs arrive truncated.
    pub truncation: Option<(usize, TruncationMode)>,
}

/// Where the batches come from: the pairs in a seeded order per epoch.
struct BatchCursor<'a> {
    pairs: &'a [TokenizedPair],
    batch_size: usize,
    sampling: SamplingStrategy,
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
    position: usize,
}

impl<'a> BatchCursor<'a> {
    fn new(pairs: &'a [TokenizedPair], batch_size: usize, sampling: SamplingStrategy, seed: u64) -> Self {
        Self { pairs, batch_size, sampling, seed, epoch: 0, order: epoch_order(pairs.len(), sampling, seed, 0), position: 0 }
    }

    fn batches_per_epoch(&self) -> usize {
        self.pairs.len().div_ceil(self.batch_size)
    }

    /// The next batch (the last of an epoch may be smaller); moves to the next epoch at the end.
    fn next(&mut self) -> Vec<&'a TokenizedPair> {
        if self.position >= self.order.len() {
            self.epoch += 1;
            self.order = epoch_order(self.pairs.len(), self.sampling, self.seed, self.epoch);
            self.position = 0;
        }
        let end = (self.position + self.batch_size).min(self.order.len());
        let batch = self.order[self.position..end].iter().map(|&i| &self.pairs[i]).collect();
        self.position = end;
        batch
    }

    /// Epochs done as a fraction, as transformers logs `epoch`.
    fn epoch_progress(&self) -> f64 {
        self.epoch as f64 + self.position.div_ceil(self.batch_size) as f64 / self.batches_per_epoch() as f64
    }
}

/// Trains `policy` (whose parameters live in `vs`) on `pairs`; returns the logged rows.
pub fn train(
    vs: &VarStore,
    policy: &CausalLm,
    reference: Option<&CausalLm>,
    pairs: &[TokenizedPair],
    objective: &Objective,
    config: &TrainerConfig,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    if pairs.is_empty() {
        bail!("no training pairs");
    }
    if objective.needs_reference() && reference.is_none() {
        bail!("this objective needs a reference model");
    }
    tch::manual_seed(config.seed as i64);
    std::fs::create_dir_all(&config.output_dir).with_context(|| format!("cannot create {}", config.output_dir.display()))?;
    let metrics_path = config.output_dir.join("metrics.jsonl");
    let mut metrics_file = std::io::BufWriter::new(
        std::fs::File::create(&metrics_path).with_context(|| format!("cannot create {}", metrics_path.display()))?,
    );

    let mut cursor = BatchCursor::new(pairs, config.per_device_train_batch_size, config.sampling, config.seed);
    let updates_per_epoch = cursor.batches_per_epoch().div_ceil(config.gradient_accumulation_steps).max(1);
    let total_steps = if config.max_steps > 0 {
        config.max_steps as usize
    } else {
        (config.num_train_epochs * updates_per_epoch as f64).ceil() as usize
    };
    let warmup = warmup_steps(config.warmup_steps, config.warmup_ratio, total_steps);
    let lr_at = |step: usize| config.learning_rate * config.schedule.factor(step, warmup, total_steps);

    let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), config.optimizer);
    let mut log = MetricLog::default();
    let mut rows = Vec::new();
    let (mut loss_since_log, mut steps_since_log, mut num_tokens) = (0.0, 0usize, 0i64);
    for step in 0..total_steps {
        let mut step_loss = 0.0;
        for _ in 0..config.gradient_accumulation_steps {
            let batch = collate(&cursor.next(), config.pad_id, config.truncation);
            num_tokens += batch.attention_mask.sum(Kind::Int64).int64_value(&[]);
            let reference_logps = reference.map(|r| tch::no_grad(|| PairLogps::from_sequences(&score_tokens(r, &batch).summed_logps())));
            let scores = score_tokens(policy, &batch);
            let loss = objective.batch_loss(&scores, reference_logps.as_ref(), &mut log) / config.gradient_accumulation_steps as f64;
            loss.backward();
            step_loss += loss.double_value(&[]);
        }
        let grad_norm = if config.max_grad_norm > 0.0 { Some(optimizer.clip_grad_norm(config.max_grad_norm)) } else { None };
        optimizer.step(lr_at(step));
        optimizer.zero_grad();
        loss_since_log += step_loss;
        steps_since_log += 1;

        let global_step = step + 1;
        if global_step % config.logging_steps.max(1) == 0 || global_step == total_steps {
            let mut row = serde_json::Map::new();
            row.insert("loss".into(), (loss_since_log / steps_since_log as f64).into());
            if let Some(norm) = grad_norm {
                row.insert("grad_norm".into(), norm.into());
            }
            row.insert("learning_rate".into(), lr_at(global_step).into());
            for (name, value) in log.drain_means("") {
                row.insert(name, value.into());
            }
            row.insert("num_tokens".into(), (num_tokens as f64).into());
            row.insert("epoch".into(), cursor.epoch_progress().into());
            row.insert("step".into(), global_step.into());
            writeln!(metrics_file, "{}", serde_json::Value::Object(row.clone()))?;
            metrics_file.flush()?;
            tracing::info!("step {global_step}/{total_steps}: {}", serde_json::Value::Object(row.clone()));
            rows.push(row);
            (loss_since_log, steps_since_log) = (0.0, 0);
        }
    }
    Ok(rows)
}
