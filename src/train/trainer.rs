//! One optimizer step, the same for every caller (the training loop in `run`, `prefalign bench`): for each
//! micro-batch of the step the reference's log-probs and the policy's forward and backward pass, the loss scaled
//! by 1/micro-batches; then gradient clipping, AdamW and zeroing the gradients, as transformers' Trainer runs them.

use crate::data::batches::Examples;
use crate::data::batches::MicroBatch;
use crate::data::collate::SamplingStrategy;
use crate::data::pack::Batching;
use crate::model::lora::mix_seeds;
use crate::model::LoadedModel;
use crate::objective::metrics::MetricLog;
use crate::objective::Objective;
use crate::train::distributed::{broadcast_all, sum_across, OverlappedAverage, ProcessGroup};
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::reference::{reference_logps, ReferenceLogps};
use crate::train::schedule::Schedule;
use crate::train::step::{forward_backward, given, StepOptions};
use std::path::PathBuf;
use std::time::Instant;
use tch::Tensor;

/// When something happens during training: transformers' `*_strategy` (`no`, `steps`, `epoch`) with its `*_steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Interval {
    No,
    /// Every N optimizer steps; below 1, that fraction of the total steps (rounded up), as transformers reads it.
    Steps(f64),
    /// At the end of each epoch (and where training stops mid-epoch, as transformers' epoch-end event fires there).
    Epoch,
}

impl Interval {
    /// The strategy's name and its steps as transformers' `TrainingArguments` take them.
    pub fn parse(strategy: &str, steps: f64) -> anyhow::Result<Self> {
        Ok(match strategy {
            "no" => Interval::No,
            "steps" if steps > 0.0 => Interval::Steps(steps),
            "steps" => Interval::No,
            "epoch" => Interval::Epoch,
            other => anyhow::bail!("\"{other}\" is no strategy: expected no, steps or epoch"),
        })
    }

    /// Whether it is due after optimizer step `step` of `total`, `epoch_ended` when that step finished an epoch.
    pub fn due(self, step: usize, total: usize, epoch_ended: bool) -> bool {
        match self {
            Interval::No => false,
            Interval::Steps(every) => {
                let every = if every < 1.0 { (every * total as f64).ceil() } else { every } as usize;
                step.is_multiple_of(every.max(1))
            }
            Interval::Epoch => epoch_ended || step == total,
        }
    }
}

/// The trainer's settings, named as in transformers' `TrainingArguments` / TRL's configs. The defaults are TRL's
/// (those of its preference trainers where they differ from transformers'), except prefalign's own choices:
/// `output_dir` and `batching.layout` sharing prompts and packing (`PackOptions::TRL` gives TRL's layout).
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub output_dir: PathBuf,
    pub learning_rate: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub optimizer: AdamWConfig,
    /// 0: no clipping
    pub max_grad_norm: f64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    /// > 0 overrides `num_train_epochs`
    pub max_steps: i64,
    /// `logging_strategy` / `logging_steps`: a metrics row (the last step always gets one)
    pub logging: Interval,
    /// a metrics row after the first step too
    pub logging_first_step: bool,
    /// `save_strategy` / `save_steps`: a checkpoint (with `Steps`, also after the last step, as transformers saves)
    pub save: Interval,
    /// checkpoints without the optimizer state (they cannot be resumed from)
    pub save_only_model: bool,
    /// keep only the newest N checkpoints
    pub save_total_limit: Option<usize>,
    /// `eval_strategy` / `eval_steps`: an evaluation row (with `Steps`, also after the last step)
    pub eval: Interval,
    /// evaluate after training when the last step had no evaluation (the handbook's `do_eval`)
    pub eval_at_end: bool,
    pub per_device_eval_batch_size: usize,
    pub seed: u64,
    /// the data order's seed (`data_seed`); `None`: `seed`
    pub data_seed: Option<u64>,
    pub sampling: SamplingStrategy,
    /// How pairs become batches: pad id (the tokenizer's), DPO's truncation, prefix sharing and packing.
    pub batching: Batching,
    /// Autocast dtype and gradient checkpointing.
    pub step: StepOptions,
    /// Skip (and count) steps with a non-finite loss or gradient instead of stopping.
    pub skip_nonfinite: bool,
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Data-parallel: the size of a gradient bucket in MiB (`ddp_bucket_cap_mb`, DDP's default 25)
    pub ddp_bucket_cap_mb: f64,
    /// Data-parallel: each rank keeps the optimizer state of a share of the parameters and updates those (ZeRO-1)
    pub shard_optimizer_state: bool,
}

impl TrainerConfig {
    /// Refuses counts that would be coerced or train nothing, naming the flag.
    pub fn check_counts(&self) -> anyhow::Result<()> {
        for (flag, value) in [
            ("--per-device-train-batch-size", self.per_device_train_batch_size),
            ("--gradient-accumulation-steps", self.gradient_accumulation_steps),
            ("--per-device-eval-batch-size", self.per_device_eval_batch_size),
        ] {
            if value == 0 {
                anyhow::bail!("{flag} is 0; it must be at least 1");
            }
        }
        if self.save_total_limit == Some(0) {
            anyhow::bail!("--save-total-limit is 0; it must be at least 1 (leave it out to keep every checkpoint)");
        }
        Ok(())
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("prefalign-output"),
            learning_rate: 1e-6,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            optimizer: AdamWConfig::default(),
            max_grad_norm: 1.0,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: -1,
            logging: Interval::Steps(10.0),
            logging_first_step: false,
            save: Interval::Steps(500.0),
            save_only_model: false,
            save_total_limit: None,
            eval: Interval::No,
            eval_at_end: false,
            per_device_eval_batch_size: 8,
            seed: 42,
            data_seed: None,
            sampling: SamplingStrategy::Random,
            batching: Batching::default(),
            step: StepOptions::default(),
            skip_nonfinite: false,
            resume_from_checkpoint: None,
            ddp_bucket_cap_mb: 25.0,
            shard_optimizer_state: false,
        }
    }
}

/// The reference of a DPO run: a model run alongside the policy, or its log-probs computed beforehand (for the
/// training pairs, and for the evaluation pairs when there are any).
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    None,
    Model(&'a LoadedModel),
    Precomputed { train: &'a ReferenceLogps, eval: Option<&'a ReferenceLogps> },
}

/// The policy, what it learns from and how, and the optimizer's state.
pub struct Trainer<'a> {
    pub policy: &'a LoadedModel,
    pub reference: Reference<'a>,
    pub objective: &'a Objective,
    /// The training examples; micro-batches are indices into them.
    pub examples: Examples<'a>,
    pub batching: Batching,
    pub step: StepOptions,
    pub max_grad_norm: f64,
    pub optimizer: AdamW,
    /// Where the objective trains with dropout (SFT), the run's seed, from which each step's masks derive.
    dropout_seed: Option<u64>,
    /// Data-parallel: this rank's part.
    parallel: Option<DataParallel<'a>>,
}

/// A rank's part in data-parallel training.
struct DataParallel<'a> {
    group: &'a ProcessGroup,
    /// the buckets that average the gradients during the last backward pass of a step
    overlap: OverlappedAverage<'a>,
    /// with the optimizer state sharded: the parameters each rank updates, by rank
    owners: Option<Vec<Vec<(String, Tensor)>>>,
}

/// What an optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// The step's loss: the sum of its micro-batches' scaled losses.
    pub loss: f64,
    /// Before clipping; `None` when clipping is off.
    pub grad_norm: Option<f64>,
    /// Tokens of TRL's padded layout that are not padding (transformers' `num_tokens`).
    pub tokens: i64,
    pub seconds: PhaseSeconds,
}

/// Host time of a step's first two parts (on CUDA the kernels may still run after their part returns); the rest of
/// a step is the optimizer's.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseSeconds {
    /// packing the batches and the reference's log-probs
    pub reference: f64,
    /// the policy's forward and backward passes
    pub policy: f64,
    /// data-parallel: combining the ranks' gradients, loss and metrics
    pub all_reduce: f64,
    /// data-parallel: the gradient bytes each rank all-reduced
    pub all_reduce_bytes: u64,
}

/// Why an optimizer step did not update the weights.
#[derive(Debug)]
pub enum StepError {
    NonFinite(NonFinite),
    /// A collective across the ranks failed (a rank died, stalled or lost its connection).
    Group(anyhow::Error),
}

/// A step whose loss or gradient norm was not finite: nothing was updated and the gradients are zeroed.
#[derive(Debug, Clone)]
pub struct NonFinite {
    /// "loss NaN", "gradient norm inf"
    pub what: String,
    /// The data rows of the micro-batches that ran (the last of them had the non-finite loss), or of the whole step
    /// for the gradient norm.
    pub rows: Vec<String>,
    /// Tokens of the micro-batches that ran.
    pub tokens: i64,
}

impl<'a> Trainer<'a> {
    /// A trainer over `examples` with a fresh optimizer for the policy's trainable parameters.
    pub fn new(
        policy: &'a LoadedModel,
        reference: Reference<'a>,
        objective: &'a Objective,
        examples: Examples<'a>,
        config: &TrainerConfig,
    ) -> Self {
        Trainer {
            optimizer: AdamW::new(policy.trainable_variables(), config.optimizer),
            policy,
            reference,
            objective,
            examples,
            batching: config.batching,
            step: config.step,
            max_grad_norm: config.max_grad_norm,
            dropout_seed: objective.trains_with_dropout().then_some(config.seed),
            parallel: None,
        }
    }

    /// The trainer of one rank of `group`: it starts from rank 0's trainable weights (as DDP broadcasts them) and
    /// averages gradients in buckets of `bucket_mb` MiB. With `shard_optimizer_state` each rank keeps the moments
    /// of a share of the parameters (balanced by size) and updates those, then each share goes to every rank.
    pub fn data_parallel(
        mut self,
        group: &'a ProcessGroup,
        bucket_mb: f64,
        shard_optimizer_state: bool,
    ) -> anyhow::Result<Self> {
        let weights: Vec<Tensor> = self.policy.trainable_variables().into_values().collect();
        broadcast_all(group, &weights, 0, "the initial weights' broadcast")?;
        let bucket_bytes = (bucket_mb * (1 << 20) as f64).max(1.0) as usize;
        let overlap = OverlappedAverage::new(group, &self.gradient_order(), bucket_bytes)?;
        let mut owners = None;
        if shard_optimizer_state {
            let mut shares: Vec<Vec<(String, Tensor)>> = (0..group.world_size).map(|_| Vec::new()).collect();
            let mut bytes = vec![0usize; group.world_size];
            for (name, param) in self.optimizer.parameters() {
                let least = (0..group.world_size).min_by_key(|&r| bytes[r]).expect("a rank");
                bytes[least] += param.numel() * param.kind().elt_size_in_bytes();
                shares[least].push((name.clone(), param.shallow_clone()));
            }
            let mine: std::collections::BTreeSet<String> = shares[group.rank].iter().map(|(n, _)| n.clone()).collect();
            self.optimizer.shard(|name| mine.contains(name));
            owners = Some(shares);
        }
        self.parallel = Some(DataParallel { group, overlap, owners });
        Ok(self)
    }

    /// The optimizer's moments of every parameter, for a checkpoint. With the state sharded, every rank must call
    /// it: rank 0 gathers the others' moments (the other ranks return theirs only).
    pub fn optimizer_state(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let mut state = self.optimizer.state_tensors();
        let Some(DataParallel { group, owners: Some(owners), .. }) = &self.parallel else { return Ok(state) };
        let moments: std::collections::BTreeMap<String, Tensor> =
            state.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let mut tag = 0;
        for (owner, params) in owners.iter().enumerate().filter(|(owner, _)| *owner != 0) {
            for (name, param) in params {
                for suffix in ["exp_avg", "exp_avg_sq"] {
                    let key = format!("{name}.{suffix}");
                    if group.rank == owner {
                        group.send(&moments[&key], 0, tag, "sending optimizer moments to rank 0")?;
                    } else if group.rank == 0 {
                        let received = param.zeros_like();
                        group.recv(&received, owner, tag, "gathering optimizer moments")?;
                        state.push((key, received));
                    }
                    tag += 1;
                }
            }
        }
        Ok(state)
    }

    /// The trainable parameters in the order the backward pass finishes their gradients (the norm and LM head,
    /// the layers from the last, the embeddings), each with the times it accumulates one (2 for an embedding
    /// tied to the LM head, once through the head and once through the lookup).
    fn gradient_order(&self) -> Vec<(Tensor, i32)> {
        let layer = |name: &str| {
            name.split("layers.").nth(1).and_then(|rest| rest.split('.').next()).and_then(|n| n.parse::<usize>().ok())
        };
        let head = self.policy.model.lm_head_weight().data_ptr();
        let mut params: Vec<(String, Tensor)> = self.policy.trainable_variables().into_iter().collect();
        params.sort_by_key(|(name, _)| match layer(name) {
            _ if name.contains("embed_tokens") => (2, 0),
            Some(i) => (1, usize::MAX - i),
            None => (0, 0),
        });
        params
            .into_iter()
            .map(|(name, t)| {
                let tied = name.contains("embed_tokens") && t.data_ptr() == head;
                (t, if tied { 2 } else { 1 })
            })
            .collect()
    }

    /// The first weight of the policy (or of the reference model) holding a NaN or an infinity, named.
    pub fn nonfinite_weight(&self) -> Option<String> {
        let reference = match self.reference {
            Reference::Model(model) => Some(("the reference model's", model)),
            _ => None,
        };
        for (whose, model) in std::iter::once(("the policy's", self.policy)).chain(reference) {
            let mut variables: Vec<(String, tch::Tensor)> = model.vs.variables().into_iter().collect();
            variables.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, tensor) in variables {
                let finite = tch::no_grad(|| tensor.isfinite().all().int64_value(&[]) != 0);
                if !finite {
                    return Some(format!("{whose} weight {name} holds NaN or infinite values"));
                }
            }
        }
        None
    }

    /// Optimizer step `step` (0-based, which seeds its dropout masks) at learning rate `lr` over `micro_batches`
    /// (indices into `pairs`); the metrics of its batches are appended to `log` when the step succeeds. A
    /// non-finite loss stops the step at that micro-batch (the later ones are not run) and, like a non-finite
    /// gradient norm, leaves the weights as they were.
    pub fn optimizer_step(
        &mut self,
        step: usize,
        micro_batches: &[Vec<usize>],
        lr: f64,
        log: &mut MetricLog,
    ) -> Result<StepOutcome, StepError> {
        let mut seconds = PhaseSeconds::default();
        let (mut loss, mut tokens) = (0.0, 0);
        let mut rows = Vec::new();
        let mut step_log = MetricLog::default();
        let started = Instant::now();
        let batches: Vec<MicroBatch> =
            micro_batches.iter().map(|indices| self.examples.micro_batch(indices, &self.batching)).collect();
        // A mean loss per micro-batch is averaged over them; SFT's summed loss is divided by every label token of
        // the step (the tokens after the first of each row whose label is kept: transformers' num_items_in_batch).
        let scale = if self.objective.sums_over_tokens() {
            let labels: i64 = batches.iter().map(|b| b.batch.label_tokens()).sum();
            1.0 / labels.max(1) as f64
        } else {
            1.0 / micro_batches.len() as f64
        };
        seconds.reference += started.elapsed().as_secs_f64();
        let device = self.policy.vs.device();
        for (i, (indices, batch)) in micro_batches.iter().zip(&batches).enumerate() {
            let started = Instant::now();
            if let (Some(parallel), true) = (&self.parallel, i + 1 == micro_batches.len()) {
                parallel.overlap.arm(); // the step's gradients are final after this backward pass
            }
            rows.extend(self.examples.locations(indices));
            tokens += batch.num_tokens();
            let reference = match self.reference {
                Reference::None => None,
                Reference::Model(r) => Some(reference_logps(&r.model, batch.reference_input(), self.step.precision)),
                Reference::Precomputed { train, .. } => Some(train.batch(indices, device)),
            };
            let reference_done = Instant::now();
            seconds.reference += (reference_done - started).as_secs_f64();
            let given = given(&self.policy.model, batch, reference, self.step.precision);
            let lora_dropout = self.dropout_seed.map(|seed| mix_seeds(mix_seeds(seed, step as u64), i as u64));
            let options = StepOptions { lora_dropout, ..self.step };
            let value = forward_backward(
                &self.policy.model,
                &batch.batch,
                self.objective,
                &given,
                scale,
                options,
                &mut step_log,
            );
            seconds.policy += reference_done.elapsed().as_secs_f64();
            loss += value;
            if !value.is_finite() {
                break;
            }
        }
        let local_loss = loss;
        let mut nonfinite_ranks = Vec::new();
        if let Some(parallel) = &self.parallel {
            let started = Instant::now();
            (seconds.all_reduce_bytes, nonfinite_ranks) =
                parallel.reduce(&mut loss, &mut tokens, &mut step_log).map_err(StepError::Group)?;
            seconds.all_reduce = started.elapsed().as_secs_f64();
        }
        if !loss.is_finite() {
            self.optimizer.zero_grad();
            // a rank whose own loss was finite names the rank(s) that had the non-finite one, not its own rows
            let (what, rows) = match local_loss.is_finite() {
                true => (
                    format!("loss on rank(s) {nonfinite_ranks:?} (their batch rows are in their messages)"),
                    Vec::new(),
                ),
                false => (format!("loss {local_loss}"), rows),
            };
            return Err(StepError::NonFinite(NonFinite { what, rows, tokens }));
        }
        let grad_norm = (self.max_grad_norm > 0.0).then(|| self.optimizer.clip_grad_norm(self.max_grad_norm));
        if let Some(norm) = grad_norm.filter(|n| !n.is_finite()) {
            self.optimizer.zero_grad();
            return Err(StepError::NonFinite(NonFinite { what: format!("gradient norm {norm}"), rows, tokens }));
        }
        self.optimizer.step(lr);
        if let Some(DataParallel { group, owners: Some(owners), .. }) = &self.parallel {
            for (owner, params) in owners.iter().enumerate() {
                let params: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
                broadcast_all(group, &params, owner, "the updated weights' broadcast").map_err(StepError::Group)?;
            }
        }
        self.optimizer.zero_grad();
        crate::runtime::release_free_memory();
        log.append(step_log);
        Ok(StepOutcome { loss, grad_norm, tokens, seconds })
    }
}

impl DataParallel<'_> {
    /// What DDP and TRL under accelerate make of the ranks' steps: the gradients averaged (in buckets), the loss
    /// and each metric averaged (the ranks' batches have the same size), the tokens summed. A non-finite loss on any
    /// rank makes the step's loss non-finite on all, which then skip it together. Returns the gradient bytes sent
    /// and the ranks whose loss was not finite.
    fn reduce(&self, loss: &mut f64, tokens: &mut i64, log: &mut MetricLog) -> anyhow::Result<(u64, Vec<usize>)> {
        // the buckets first (every rank issues the same collectives in the same order), then the scalars
        let group = self.group;
        let bytes = self.overlap.finish()?;
        let finite = loss.is_finite();
        // [loss, tokens, one flag per rank: its loss was not finite]
        let mut values = vec![if finite { *loss } else { 0.0 }, *tokens as f64];
        values.extend((0..group.world_size).map(|r| f64::from(r == group.rank && !finite)));
        let summed = sum_across(group, &values, "the step's loss")?;
        *tokens = summed[1].round() as i64;
        let nonfinite: Vec<usize> = (0..group.world_size).filter(|&r| summed[2 + r] > 0.0).collect();
        if !nonfinite.is_empty() {
            *loss = if finite { f64::NAN } else { *loss };
            return Ok((0, nonfinite));
        }
        *loss = summed[0] / group.world_size as f64;
        log.combine_ranks(group.world_size, |values| sum_across(group, values, "the step's metrics"))?;
        Ok((bytes, nonfinite))
    }
}

#[cfg(test)]
mod tests {
    use super::Interval;

    #[test]
    fn intervals_fire_as_transformers_strategies() {
        let fired = |interval: Interval, total: usize, epoch_every: usize| -> Vec<usize> {
            (1..=total).filter(|&s| interval.due(s, total, s % epoch_every == 0)).collect()
        };
        assert_eq!(fired(Interval::Steps(3.0), 10, 100), [3, 6, 9]);
        // below 1: a fraction of the total steps, rounded up (0.25 * 10 -> every 3)
        assert_eq!(fired(Interval::Steps(0.25), 10, 100), [3, 6, 9]);
        // epoch: each epoch's end, and where training stops mid-epoch
        assert_eq!(fired(Interval::Epoch, 10, 4), [4, 8, 10]);
        assert!(fired(Interval::No, 10, 4).is_empty());
        assert_eq!(Interval::parse("steps", 0.0).unwrap(), Interval::No);
        assert!(Interval::parse("best", 1.0).is_err());
    }
}
