//! The training loop, step for step like transformers' Trainer driving TRL's losses: batches in a seeded order,
//! `Trainer::optimizer_step` on each step's micro-batches, the schedule, a `metrics.jsonl` line per logging step
//! with TRL's keys, evaluation and checkpoints by transformers' strategies, that resume bit for bit.

use crate::data::batches::Examples;
use crate::data::collate::{epoch_order, SamplingStrategy};
use crate::files;
use crate::model::LoadedModel;
use crate::objective::metrics::MetricLog;
use crate::objective::Objective;
use crate::runtime;
use crate::train::checkpoint::{restore, save_checkpoint};
use crate::train::distributed::{mean_across, ProcessGroup};
use crate::train::evaluate::{evaluate, evaluate_examples, evaluate_on, EvalOptions, EvalReference};
use crate::train::history::{progress_bar, write_summary, History};
use crate::train::schedule::warmup_steps;
use crate::train::trainer::{Interval, NonFinite, Reference, StepError, StepOutcome, Trainer, TrainerConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub struct TrainInputs<'a> {
    pub policy: &'a LoadedModel,
    pub reference: Reference<'a>,
    pub train: Examples<'a>,
    pub eval: Option<Examples<'a>>,
    pub objective: &'a Objective,
}

/// Where training stands; saved in every checkpoint (`trainer_state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub global_step: usize,
    /// data position: epoch and index into that epoch's order
    epoch: u64,
    position: usize,
    pub num_tokens: i64,
    loss_since_log: f64,
    steps_since_log: usize,
    /// metrics of the steps since the last log line
    pending: MetricLog,
    skipped_nonfinite: usize,
    /// the processes of the run that wrote it (its data position counts global batches of theirs)
    #[serde(default = "one")]
    world_size: usize,
}

fn one() -> usize {
    1
}

/// The examples in a seeded order per epoch, consumed (global) batch by batch. With several processes a global
/// batch is each rank's batch in turn, and the epoch's order is padded with its first indices to whole global
/// batches: what accelerate's `BatchSamplerShard` (`even_batches`) gives each rank of TRL's sampler order.
struct BatchCursor {
    /// the length of an epoch's order (padded)
    examples: usize,
    batch_size: usize,
    sampling: SamplingStrategy,
    seed: u64,
    order: Vec<usize>,
    /// the dataset's size
    len: usize,
}

impl BatchCursor {
    fn new(len: usize, per_device: usize, world_size: usize, sampling: SamplingStrategy, seed: u64) -> Self {
        let batch_size = per_device * world_size;
        let examples = if world_size > 1 { len.div_ceil(batch_size) * batch_size } else { len };
        BatchCursor { examples, batch_size, sampling, seed, order: Vec::new(), len }
    }

    fn batches_per_epoch(&self) -> usize {
        self.examples.div_ceil(self.batch_size)
    }

    /// Indices of the next batch from `progress`'s position (the last of an epoch may be smaller), advancing it.
    fn next(&mut self, progress: &mut Progress) -> Vec<usize> {
        if progress.position >= self.examples {
            progress.epoch += 1;
            progress.position = 0;
        }
        if progress.position == 0 || self.order.is_empty() {
            self.order = epoch_order(self.len, self.sampling, self.seed, progress.epoch);
            let first = self.order.clone();
            self.order.extend(first.iter().cycle().take(self.examples - self.len));
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

/// Trains the policy; returns every row written to `metrics.jsonl` by this run.
pub fn train(inputs: &TrainInputs, config: &TrainerConfig) -> Result<Vec<Map<String, Value>>> {
    train_with_hook(inputs, config, &mut |_, _| Ok(()))
}

/// [`train`], calling `on_checkpoint(folder, global_step)` after each checkpoint it saves at `save_steps` (the
/// Hub pushes of `--hub-strategy every_save`).
pub fn train_with_hook(
    inputs: &TrainInputs,
    config: &TrainerConfig,
    on_checkpoint: &mut dyn FnMut(&Path, usize) -> Result<()>,
) -> Result<Vec<Map<String, Value>>> {
    train_on(inputs, config, None, on_checkpoint)
}

/// [`train_with_hook`] as one rank of `group` (data-parallel), or alone. Each rank runs its share of every
/// global batch; rank 0 alone writes metrics, TensorBoard, checkpoints and the summary, and returns the rows.
pub fn train_on(
    inputs: &TrainInputs,
    config: &TrainerConfig,
    group: Option<&ProcessGroup>,
    on_checkpoint: &mut dyn FnMut(&Path, usize) -> Result<()>,
) -> Result<Vec<Map<String, Value>>> {
    let main = group.is_none_or(|g| g.rank == 0);
    let (rank, world_size) = group.map_or((0, 1), |g| (g.rank, g.world_size));
    if inputs.train.is_empty() {
        bail!("no training examples");
    }
    if inputs.objective.needs_reference() && matches!(inputs.reference, Reference::None) {
        bail!("this objective needs a reference model");
    }
    config.check_counts()?;
    let eval_reference = eval_reference(inputs)?;
    std::fs::create_dir_all(&config.output_dir)
        .with_context(|| format!("cannot create {}", config.output_dir.display()))?;
    let leftovers = if main { files::remove_partials(&config.output_dir)? } else { 0 };
    if leftovers > 0 {
        eprintln!(
            "removed {leftovers} half-written file(s) an interrupted run left in {}",
            config.output_dir.display()
        );
    }
    tch::manual_seed(config.seed as i64);

    let seed = config.data_seed.unwrap_or(config.seed);
    let mut cursor =
        BatchCursor::new(inputs.train.len(), config.per_device_train_batch_size, world_size, config.sampling, seed);
    let share = config.per_device_train_batch_size;
    let accumulation = config.gradient_accumulation_steps;
    let updates_per_epoch = cursor.batches_per_epoch().div_ceil(accumulation).max(1);
    let total_steps = if config.max_steps > 0 {
        config.max_steps as usize
    } else {
        (config.num_train_epochs * updates_per_epoch as f64).ceil() as usize
    };
    if total_steps == 0 {
        bail!(
            "--num-train-epochs {} gives 0 training steps ({updates_per_epoch} per epoch): nothing would be trained; \
             raise it or set --max-steps",
            config.num_train_epochs
        );
    }
    let warmup = warmup_steps(config.warmup_steps, config.warmup_ratio, total_steps);
    let lr_at = |step: usize| config.learning_rate * config.schedule.factor(step, warmup, total_steps);

    let mut trainer = Trainer::new(inputs.policy, inputs.reference, inputs.objective, inputs.train, config);
    if let Some(group) = group {
        trainer = trainer.data_parallel(group, config.ddp_bucket_cap_mb, config.shard_optimizer_state)?;
    }
    let mut progress = Progress { world_size, ..Progress::default() };
    let mut last_checkpoint: Option<PathBuf> = None;
    if let Some(checkpoint) = &config.resume_from_checkpoint {
        progress = restore(checkpoint, inputs.policy, &mut trainer.optimizer)?;
        if progress.world_size != world_size {
            bail!(
                "{} was written by a run of {} process(es); resume it with as many (this run has {world_size}): \
                 its data position counts their global batches",
                checkpoint.display(),
                progress.world_size
            );
        }
        last_checkpoint = Some(checkpoint.clone());
        eprintln!("resuming from {} at step {}", checkpoint.display(), progress.global_step);
    }
    let mut history = if main { Some(History::open(&config.output_dir, progress.global_step)?) } else { None };
    let bar = if main { progress_bar(total_steps, progress.global_step) } else { indicatif::ProgressBar::hidden() };
    let started = std::time::Instant::now();
    let tokens_at_start = progress.num_tokens;
    let mut rows = Vec::new();
    let mut all_reduce = (0.0, 0u64, 0usize); // seconds, bytes, steps

    while progress.global_step < total_steps {
        let step = progress.global_step;
        // As transformers 5: an epoch's last update takes the batches left in the epoch, fewer when the epoch's
        // batches are no multiple of the accumulation steps (its loss is then scaled by 1/that many).
        let mut micro_batches: Vec<Vec<usize>> = Vec::with_capacity(accumulation);
        while micro_batches.len() < accumulation {
            let global = cursor.next(&mut progress);
            // this rank's share: the r-th per-device batch of the global one
            micro_batches.push(global.chunks(share).nth(rank).map_or_else(Vec::new, <[usize]>::to_vec));
            if progress.position >= cursor.examples {
                break;
            }
        }
        if let Some(group) = group {
            group.mark_step(step);
        }
        let outcome = match trainer.optimizer_step(step, &micro_batches, lr_at(step), &mut progress.pending) {
            Ok(outcome) => outcome,
            Err(StepError::Group(error)) => return Err(error),
            Err(StepError::NonFinite(nonfinite)) => {
                progress.num_tokens += nonfinite.tokens;
                skip_or_stop(&trainer, &nonfinite, step + 1, config.skip_nonfinite, last_checkpoint.as_ref())?;
                progress.skipped_nonfinite += 1;
                continue;
            }
        };
        all_reduce.0 += outcome.seconds.all_reduce;
        all_reduce.1 += outcome.seconds.all_reduce_bytes;
        all_reduce.2 += 1;
        progress.num_tokens += outcome.tokens;
        progress.loss_since_log += outcome.loss;
        progress.steps_since_log += 1;
        progress.global_step += 1;
        let global_step = progress.global_step;
        let epoch = cursor.epoch_progress(&progress);
        let epoch_ended = progress.position >= cursor.examples;
        let last = global_step == total_steps;
        let log_due = config.logging.due(global_step, total_steps, epoch_ended)
            || (config.logging_first_step && global_step == 1)
            || (last && config.logging != Interval::No);
        if log_due {
            let row = training_row(&mut progress, &outcome, lr_at(step));
            let tokens_per_second = (progress.num_tokens - tokens_at_start) as f64 / started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.4}  reward acc {}  {tokens_per_second:.0} tok/s",
                row["loss"].as_f64().unwrap_or(f64::NAN),
                row.get("rewards/accuracies").and_then(Value::as_f64).map_or("-".into(), |a| format!("{a:.2}")),
            ));
            rows.push(write_row(history.as_mut(), row, epoch, global_step)?);
        }
        // transformers evaluates and saves after the last step too under the `steps` strategies
        let at_end = |interval: Interval| last && matches!(interval, Interval::Steps(_));
        let eval_due = config.eval.due(global_step, total_steps, epoch_ended)
            || at_end(config.eval)
            || (last && config.eval_at_end);
        if let Some(eval) = inputs.eval.filter(|_| eval_due) {
            let row = evaluation_row(&trainer, eval_reference, eval, config, group)?;
            rows.push(write_row(history.as_mut(), row, epoch, global_step)?);
        }
        bar.set_position(global_step as u64);
        let stop = runtime::stop_requested().filter(|_| !last);
        // every rank stops after the same step (a signal may reach them at different moments)
        let stop = match group {
            Some(group) if !last => {
                let stopping = mean_across(group, &[f64::from(stop.is_some())], "the stop check")?[0] > 0.0;
                stopping.then(|| stop.unwrap_or(libc::SIGTERM))
            }
            _ => stop,
        };
        let save_due = config.save.due(global_step, total_steps, epoch_ended) || at_end(config.save);
        // a checkpoint written because of a stop signal keeps the optimizer, so that the run can continue; with the
        // optimizer state sharded every rank takes part in gathering it
        let keep_optimizer = !config.save_only_model || stop.is_some();
        let moments =
            (keep_optimizer && (save_due || stop.is_some())).then(|| trainer.optimizer_state()).transpose()?;
        if (save_due || stop.is_some()) && main {
            let history = history.as_mut().expect("rank 0 keeps the history");
            history.sync()?;
            let optimizer = moments.as_deref().map(|m| (m, trainer.optimizer.step));
            let checkpoint =
                save_checkpoint(&config.output_dir, inputs.policy, optimizer, &progress, config.save_total_limit)?;
            if stop.is_none() {
                on_checkpoint(&checkpoint, global_step)?;
            }
            last_checkpoint = Some(checkpoint);
        }
        if let (Some(signal), false) = (stop, main) {
            let message = format!("rank {rank} stopped by {} after step {global_step}", runtime::signal_name(signal));
            return Err(Stopped { signal, message }.into());
        }
        if let (Some(signal), Some(checkpoint)) = (stop, &last_checkpoint) {
            bar.abandon();
            let message = format!(
                "stopped by {} after step {global_step}; its checkpoint is {checkpoint}; continue with \
                 --resume-from-checkpoint {checkpoint} (or `last`)",
                runtime::signal_name(signal),
                checkpoint = checkpoint.display()
            );
            return Err(Stopped { signal, message }.into());
        }
    }
    bar.finish();
    if let (Some(group), true, (seconds, bytes, steps @ 1..)) = (group, main, all_reduce) {
        eprintln!(
            "{} ranks: {:.1} MB of gradients all-reduced per step, {:.3} s per step in combining them ({steps} steps)",
            group.world_size,
            bytes as f64 / steps as f64 / 1e6,
            seconds / steps as f64
        );
    }
    let Some(history) = history else { return Ok(Vec::new()) };
    // A run resumed at its last step logged nothing itself: its summary takes the last row it kept.
    let summary_rows = match (rows.iter().any(|r| r.contains_key("loss")), history.last_kept_training_row()) {
        (false, Some(row)) => std::slice::from_ref(row),
        _ => &rows[..],
    };
    write_summary(
        &config.output_dir,
        summary_rows,
        started.elapsed().as_secs_f64(),
        progress.num_tokens - tokens_at_start,
    )?;
    Ok(rows)
}

/// Writes `row` to the history where this rank keeps one (rank 0); returns it as written.
fn write_row(
    history: Option<&mut History>,
    row: Map<String, Value>,
    epoch: f64,
    step: usize,
) -> Result<Map<String, Value>> {
    match history {
        Some(history) => history.write(row, epoch, step),
        None => Ok(row),
    }
}

/// The reference evaluation uses, checked against the evaluation pairs.
fn eval_reference<'a>(inputs: &TrainInputs<'a>) -> Result<Option<EvalReference<'a>>> {
    Ok(match inputs.reference {
        Reference::None => None,
        Reference::Model(model) => Some(EvalReference::Model(&model.model)),
        Reference::Precomputed { eval, .. } => match (eval, inputs.eval) {
            (Some(logps), Some(eval)) if logps.chosen.size()[0] as usize != eval.len() => {
                bail!(
                    "precomputed reference log-probs cover {} evaluation pairs, not {}",
                    logps.chosen.size()[0],
                    eval.len()
                )
            }
            (Some(logps), _) => Some(EvalReference::Logps(logps)),
            (None, Some(_)) => {
                bail!("evaluation with precomputed reference log-probs needs them for the evaluation pairs too")
            }
            (None, None) => None,
        },
    })
}

/// A run stopped by SIGINT or SIGTERM; the message says what was saved and how to continue.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Stopped {
    pub signal: i32,
    pub message: String,
}

/// Counts a skipped step, or fails naming the step, the rows and the last good checkpoint. Non-finite weights are
/// named first: no data row is to blame then, and skipping would not help.
fn skip_or_stop(
    trainer: &Trainer,
    nonfinite: &NonFinite,
    step: usize,
    skip: bool,
    last_checkpoint: Option<&PathBuf>,
) -> Result<()> {
    let NonFinite { what, rows, .. } = nonfinite;
    if let Some(weight) = trainer.nonfinite_weight() {
        bail!("non-finite {what} at step {step}: {weight}, so no data row is to blame");
    }
    // (a rank of a data-parallel run whose own rows were fine names the rank that had them instead)
    let rows = if rows.is_empty() { String::new() } else { format!(" (batch rows: {})", rows.join(", ")) };
    if !skip {
        bail!(
            "non-finite {what} at step {step}{rows}; last good checkpoint: {}; pass --skip-nonfinite to skip such batches",
            last_checkpoint.map_or("none".to_string(), |p| p.display().to_string())
        );
    }
    eprintln!("warning: skipped a batch with a non-finite {what} at step {step}{rows}");
    Ok(())
}

/// The logged row of a training step: the loss averaged since the last row, the step's gradient norm and learning
/// rate, the objective's metrics averaged since the last row, and the tokens seen.
fn training_row(progress: &mut Progress, outcome: &StepOutcome, learning_rate: f64) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("loss".into(), (progress.loss_since_log / progress.steps_since_log as f64).into());
    if let Some(norm) = outcome.grad_norm {
        row.insert("grad_norm".into(), norm.into());
    }
    row.insert("learning_rate".into(), learning_rate.into());
    for (name, value) in progress.pending.drain_means("") {
        row.insert(name, value.into());
    }
    row.insert("num_tokens".into(), (progress.num_tokens as f64).into());
    if progress.skipped_nonfinite > 0 {
        row.insert("skipped_nonfinite".into(), progress.skipped_nonfinite.into());
    }
    (progress.loss_since_log, progress.steps_since_log) = (0.0, 0);
    row
}

/// The `eval_*` row of the policy as it is now.
fn evaluation_row(
    trainer: &Trainer,
    reference: Option<EvalReference>,
    eval: Examples,
    config: &TrainerConfig,
    group: Option<&ProcessGroup>,
) -> Result<Map<String, Value>> {
    let options = EvalOptions {
        batch_size: config.per_device_eval_batch_size,
        batching: config.batching,
        precision: config.step.precision,
    };
    let policy = &trainer.policy.model;
    let metrics = match (eval, group) {
        (Examples::Pairs(pairs), Some(group)) => {
            evaluate_on(group, policy, reference, pairs, trainer.objective, &options)?
        }
        (Examples::Pairs(pairs), None) => evaluate(policy, reference, pairs, trainer.objective, &options).metrics,
        (other, _) => evaluate_examples(policy, reference, other, trainer.objective, &options),
    };
    Ok(metrics.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
}
