//! The training loop, step for step like transformers' Trainer driving TRL's DPO/ORPO losses: batches in a
//! seeded order, gradient accumulation, clipping, AdamW, the schedule, a `metrics.jsonl` line per logging step
//! with TRL's keys, evaluation every `eval_steps`, and checkpoints that resume bit for bit.

use crate::data::collate::{epoch_order, SamplingStrategy, TruncationMode};
use crate::data::pack::{pack, PackOptions};
use crate::data::tokenize::TokenizedPair;
use crate::model::save::{save_hf, DEFAULT_MAX_SHARD_BYTES};
use crate::model::weights::{load_into, save_safetensors_file, SafetensorsFiles, WeightSource};
use crate::model::LoadedModel;
use crate::objective::evaluate::{evaluate, EvalOptions, EvalReference};
use crate::objective::metrics::MetricLog;
use crate::objective::reference::{reference_logps, ReferenceLogps};
use crate::objective::Objective;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::schedule::{warmup_steps, Schedule};
use crate::train::step::{forward_backward, StepOptions};
use crate::train::tensorboard::TensorBoardWriter;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// 0: no checkpoints
    pub save_steps: usize,
    /// keep only the newest N checkpoints
    pub save_total_limit: Option<usize>,
    /// 0: no evaluation during training
    pub eval_steps: usize,
    pub per_device_eval_batch_size: usize,
    pub seed: u64,
    pub sampling: SamplingStrategy,
    pub pad_id: i64,
    /// DPO truncates at collation; ORPO pairs arrive truncated.
    pub truncation: Option<(usize, TruncationMode)>,
    /// How batches are laid out for the model (prefix sharing, packing).
    pub layout: PackOptions,
    /// Autocast dtype and gradient checkpointing.
    pub step: StepOptions,
    /// Skip (and count) batches with a non-finite loss or gradient instead of stopping.
    pub skip_nonfinite: bool,
    pub resume_from_checkpoint: Option<PathBuf>,
}

/// Where training stands; saved in every checkpoint (`trainer_state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Progress {
    global_step: usize,
    /// data position: epoch and index into that epoch's order
    epoch: u64,
    position: usize,
    num_tokens: i64,
    loss_since_log: f64,
    steps_since_log: usize,
    pending: MetricLog,
    skipped_nonfinite: usize,
}

/// The pairs in a seeded order per epoch, consumed batch by batch.
struct BatchCursor<'a> {
    pairs: &'a [TokenizedPair],
    batch_size: usize,
    sampling: SamplingStrategy,
    seed: u64,
    order: Vec<usize>,
}

impl<'a> BatchCursor<'a> {
    fn batches_per_epoch(&self) -> usize {
        self.pairs.len().div_ceil(self.batch_size)
    }

    /// Indices of the next batch from `progress`'s position (the last of an epoch may be smaller), advancing it.
    fn next(&mut self, progress: &mut Progress) -> Vec<usize> {
        if progress.position >= self.pairs.len() {
            progress.epoch += 1;
            progress.position = 0;
        }
        if progress.position == 0 || self.order.is_empty() {
            self.order = epoch_order(self.pairs.len(), self.sampling, self.seed, progress.epoch);
        }
        let end = (progress.position + self.batch_size).min(self.order.len());
        let batch = self.order[progress.position..end].to_vec();
        progress.position = end;
        batch
    }

    /// Epochs done as a fraction, as transformers logs `epoch`.
    fn epoch_progress(&self, progress: &Progress) -> f64 {
        progress.epoch as f64 + progress.position.div_ceil(self.batch_size) as f64 / self.batches_per_epoch() as f64
    }
}

/// The reference of a DPO run: a model run alongside the policy, or its log-probs computed beforehand (for the
/// training pairs, and for the evaluation pairs when there are any).
pub enum Reference<'a> {
    None,
    Model(&'a LoadedModel),
    Precomputed { train: &'a ReferenceLogps, eval: Option<&'a ReferenceLogps> },
}

pub struct TrainInputs<'a> {
    pub policy: &'a LoadedModel,
    pub reference: Reference<'a>,
    pub train: &'a [TokenizedPair],
    pub eval: Option<&'a [TokenizedPair]>,
    pub objective: &'a Objective,
}

/// Trains the policy; returns every row written to `metrics.jsonl` by this run.
pub fn train(inputs: &TrainInputs, config: &TrainerConfig) -> Result<Vec<Map<String, Value>>> {
    let TrainInputs { policy, objective, .. } = *inputs;
    let pairs = inputs.train;
    if pairs.is_empty() {
        bail!("no training pairs");
    }
    if objective.needs_reference() && matches!(inputs.reference, Reference::None) {
        bail!("this objective needs a reference model");
    }
    let eval_reference = match inputs.reference {
        Reference::None => None,
        Reference::Model(model) => Some(EvalReference::Model(&model.model)),
        Reference::Precomputed { eval, .. } => match (eval, inputs.eval) {
            (Some(logps), Some(pairs)) if logps.chosen.size()[0] as usize != pairs.len() => {
                bail!("precomputed reference log-probs cover {} evaluation pairs, not {}", logps.chosen.size()[0], pairs.len())
            }
            (Some(logps), _) => Some(EvalReference::Logps(logps)),
            (None, Some(_)) => bail!("evaluation with precomputed reference log-probs needs them for the evaluation pairs too"),
            (None, None) => None,
        },
    };
    std::fs::create_dir_all(&config.output_dir).with_context(|| format!("cannot create {}", config.output_dir.display()))?;
    tch::manual_seed(config.seed as i64);

    let mut cursor = BatchCursor {
        pairs,
        batch_size: config.per_device_train_batch_size.max(1),
        sampling: config.sampling,
        seed: config.seed,
        order: Vec::new(),
    };
    let updates_per_epoch = cursor.batches_per_epoch().div_ceil(config.gradient_accumulation_steps).max(1);
    let total_steps = if config.max_steps > 0 {
        config.max_steps as usize
    } else {
        (config.num_train_epochs * updates_per_epoch as f64).ceil() as usize
    };
    let warmup = warmup_steps(config.warmup_steps, config.warmup_ratio, total_steps);
    let lr_at = |step: usize| config.learning_rate * config.schedule.factor(step, warmup, total_steps);

    let mut optimizer = AdamW::new(policy.vs.variables().into_iter().collect(), config.optimizer);
    let mut progress = Progress::default();
    let mut last_checkpoint: Option<PathBuf> = None;
    if let Some(checkpoint) = &config.resume_from_checkpoint {
        progress = restore(checkpoint, policy, &mut optimizer)?;
        last_checkpoint = Some(checkpoint.clone());
        eprintln!("resuming from {} at step {}", checkpoint.display(), progress.global_step);
    }
    let mut metrics = MetricsFile::open(&config.output_dir, progress.global_step)?;
    let bar = progress_bar(total_steps, progress.global_step);
    let started = std::time::Instant::now();
    let tokens_at_start = progress.num_tokens;
    let mut rows = Vec::new();

    while progress.global_step < total_steps {
        let step = progress.global_step;
        let mut step_loss = 0.0;
        let mut nonfinite: Option<String> = None;
        let mut batch_rows = Vec::new();
        for _ in 0..config.gradient_accumulation_steps {
            let indices = cursor.next(&mut progress);
            let batch_pairs: Vec<&TokenizedPair> = indices.iter().map(|&i| &pairs[i]).collect();
            batch_rows.extend(batch_pairs.iter().map(|p| p.location.clone()));
            let batch = pack(&batch_pairs, config.pad_id, config.truncation, config.layout);
            // TRL's count: the tokens of its padded layout that are not padding.
            progress.num_tokens += batch.logical.attention_mask.sum(Kind::Int64).int64_value(&[]);
            let reference_logps = match inputs.reference {
                Reference::None => None,
                Reference::Model(r) => Some(reference_logps(&r.model, &batch, config.step.precision)),
                Reference::Precomputed { train, .. } => Some(train.batch(&indices, policy.vs.device())),
            };
            let scale = 1.0 / config.gradient_accumulation_steps as f64;
            let value = forward_backward(&policy.model, &batch, objective, reference_logps.as_ref(), scale, config.step, &mut progress.pending);
            if !value.is_finite() {
                nonfinite = Some(format!("loss {value}"));
                break;
            }
            step_loss += value;
        }
        let grad_norm = match (&nonfinite, config.max_grad_norm > 0.0) {
            (None, true) => Some(optimizer.clip_grad_norm(config.max_grad_norm)),
            _ => None,
        };
        if nonfinite.is_none() && grad_norm.is_some_and(|n| !n.is_finite()) {
            nonfinite = Some(format!("gradient norm {}", grad_norm.unwrap_or(f64::NAN)));
        }
        if let Some(what) = nonfinite {
            optimizer.zero_grad();
            if !config.skip_nonfinite {
                bail!(
                    "non-finite {what} at step {} (batch rows: {}); last good checkpoint: {}; pass --skip-nonfinite to skip such batches",
                    step + 1,
                    batch_rows.join(", "),
                    last_checkpoint.as_ref().map_or("none".to_string(), |p| p.display().to_string())
                );
            }
            progress.skipped_nonfinite += 1;
            eprintln!("warning: skipped a batch with a non-finite {what} at step {} ({})", step + 1, batch_rows.join(", "));
            continue;
        }
        optimizer.step(lr_at(step));
        optimizer.zero_grad();
        crate::runtime::release_free_memory();
        progress.loss_since_log += step_loss;
        progress.steps_since_log += 1;
        progress.global_step += 1;
        let global_step = progress.global_step;

        if global_step % config.logging_steps.max(1) == 0 || global_step == total_steps {
            let mut row = Map::new();
            row.insert("loss".into(), (progress.loss_since_log / progress.steps_since_log as f64).into());
            if let Some(norm) = grad_norm {
                row.insert("grad_norm".into(), norm.into());
            }
            row.insert("learning_rate".into(), lr_at(step).into());
            for (name, value) in progress.pending.drain_means("") {
                row.insert(name, value.into());
            }
            row.insert("num_tokens".into(), (progress.num_tokens as f64).into());
            if progress.skipped_nonfinite > 0 {
                row.insert("skipped_nonfinite".into(), progress.skipped_nonfinite.into());
            }
            (progress.loss_since_log, progress.steps_since_log) = (0.0, 0);
            let tokens_per_second = (progress.num_tokens - tokens_at_start) as f64 / started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4}  reward acc {}  {tokens_per_second:.0} tok/s",
                row["loss"].as_f64().unwrap_or(f64::NAN),
                row.get("rewards/accuracies").and_then(Value::as_f64).map_or("-".into(), |a| format!("{a:.2}")),
            ));
            rows.push(metrics.write(row, cursor.epoch_progress(&progress), global_step)?);
        }
        if let Some(eval_pairs) = inputs.eval.filter(|_| config.eval_steps > 0 && global_step % config.eval_steps == 0) {
            let options = EvalOptions {
                batch_size: config.per_device_eval_batch_size,
                pad_id: config.pad_id,
                truncation: config.truncation,
                layout: config.layout,
                precision: config.step.precision,
            };
            let result = evaluate(&policy.model, eval_reference, eval_pairs, objective, &options);
            let row = result.metrics.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
            rows.push(metrics.write(row, cursor.epoch_progress(&progress), global_step)?);
        }
        bar.set_position(global_step as u64);
        if config.save_steps > 0 && global_step % config.save_steps == 0 && global_step < total_steps {
            last_checkpoint = Some(save_checkpoint(&config.output_dir, policy, &optimizer, &progress, config.save_total_limit)?);
        }
    }
    bar.finish();
    write_summary(&config.output_dir, &rows, started.elapsed().as_secs_f64(), progress.num_tokens - tokens_at_start)?;
    Ok(rows)
}

/// `train_summary.json`: wall time, throughput, peak memory and the last logged values of this run.
fn write_summary(out: &Path, rows: &[Map<String, Value>], seconds: f64, tokens: i64) -> Result<()> {
    let last_train = rows.iter().rev().find(|r| r.contains_key("loss"));
    let summary = serde_json::json!({
        "train_runtime": seconds,
        "train_tokens_per_second": tokens as f64 / seconds.max(1e-9),
        "peak_rss_bytes": peak_rss_bytes(),
        "final_loss": last_train.and_then(|r| r.get("loss")),
        "global_step": rows.last().and_then(|r| r.get("step")),
    });
    std::fs::write(out.join("train_summary.json"), serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", out.join("train_summary.json").display()))
}

/// The process's peak resident memory (VmHWM), where /proc provides it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Step, loss, reward accuracy, tokens/s and ETA on stderr (hidden when stderr is not a terminal).
fn progress_bar(total: usize, done: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  eta {eta}").expect("valid template"),
    );
    bar.set_position(done as u64);
    bar
}

/// `metrics.jsonl` (truncated to the rows up to the resumed step and appended to from there) and TensorBoard
/// event files under `runs/`.
struct MetricsFile {
    file: std::io::BufWriter<std::fs::File>,
    tensorboard: TensorBoardWriter,
}

impl MetricsFile {
    fn open(out: &Path, resume_step: usize) -> Result<Self> {
        let path = &out.join("metrics.jsonl");
        let kept: Vec<String> = match std::fs::read_to_string(path) {
            Ok(text) if resume_step > 0 => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<Value>(line).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= resume_step)
                })
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
        for line in kept {
            writeln!(file, "{line}")?;
        }
        Ok(Self { file, tensorboard: TensorBoardWriter::create(&out.join("runs"))? })
    }

    fn write(&mut self, mut row: Map<String, Value>, epoch: f64, step: usize) -> Result<Map<String, Value>> {
        row.insert("epoch".into(), epoch.into());
        row.insert("step".into(), step.into());
        writeln!(self.file, "{}", Value::Object(row.clone()))?;
        self.file.flush()?;
        self.tensorboard.add_metrics(&row, step as i64)?;
        tracing::info!("{}", serde_json::Value::Object(row.clone()));
        Ok(row)
    }
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    progress: Progress,
    optimizer_step: i64,
}

/// Writes `checkpoint-<step>` (a loadable model folder plus optimizer and trainer state) atomically: into a
/// temporary folder renamed at the end, so a crash never leaves a half-written checkpoint.
fn save_checkpoint(out: &Path, policy: &LoadedModel, optimizer: &AdamW, progress: &Progress, keep: Option<usize>) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", progress.global_step);
    let final_dir = out.join(&name);
    let tmp = out.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    save_hf(policy, &tmp, DEFAULT_MAX_SHARD_BYTES)?;
    save_safetensors_file(&tmp.join(OPTIMIZER_FILE), &optimizer.state_tensors())?;
    let state = CheckpointState { progress: progress.clone(), optimizer_step: optimizer.step };
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&state)?)?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move {} into place", final_dir.display()))?;
    if let Some(keep) = keep {
        let mut checkpoints = list_checkpoints(out)?;
        while checkpoints.len() > keep.max(1) {
            let (_, oldest) = checkpoints.remove(0);
            std::fs::remove_dir_all(&oldest).with_context(|| format!("cannot remove {}", oldest.display()))?;
        }
    }
    Ok(final_dir)
}

/// `checkpoint-<step>` folders of `out`, oldest first.
pub fn list_checkpoints(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .with_context(|| format!("cannot list {}", out.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("checkpoint-").and_then(|s| s.parse().ok()).map(|step| (step, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

fn restore(checkpoint: &Path, policy: &LoadedModel, optimizer: &mut AdamW) -> Result<Progress> {
    let state_path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("{} is not a prefalign checkpoint (no {STATE_FILE})", checkpoint.display()))?;
    let state: CheckpointState = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", state_path.display()))?;
    let weights = SafetensorsFiles::open_dir(checkpoint)?;
    load_into(&policy.vs, &weights)?;
    let moments_file = SafetensorsFiles::open_dir_file(&checkpoint.join(OPTIMIZER_FILE))?;
    let moments = moments_file
        .names()
        .into_iter()
        .map(|n| Ok((n.clone(), moments_file.tensor(&n)?.expect("listed"))))
        .collect::<Result<_>>()?;
    optimizer.load_state(&moments, state.optimizer_step)?;
    Ok(state.progress)
}
