//! One optimizer step, the same for every caller (the training loop in `run`, `prefalign bench`): for each
//! micro-batch of the step the reference's log-probs and the policy's forward and backward pass, the loss scaled
//! by 1/micro-batches; then gradient clipping, AdamW and zeroing the gradients, as transformers' Trainer runs them.

use crate::data::collate::SamplingStrategy;
use crate::data::pack::Batching;
use crate::data::tokenize::TokenizedPair;
use crate::model::LoadedModel;
use crate::objective::metrics::MetricLog;
use crate::objective::Objective;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::reference::{reference_logps, ReferenceLogps};
use crate::train::schedule::Schedule;
use crate::train::step::{forward_backward, StepOptions};
use std::path::PathBuf;
use std::time::Instant;
use tch::Kind;

/// The trainer's settings, named as in transformers' `TrainingArguments` / TRL's configs. The defaults are TRL's
/// (those of its preference trainers where they differ from transformers'), except prefalign's own choices:
/// `output_dir`, no checkpoints unless `save_steps` is set, and `batching.layout` sharing prompts and packing
/// (`PackOptions::TRL` gives TRL's layout).
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
    /// How pairs become batches: pad id (the tokenizer's), DPO's truncation, prefix sharing and packing.
    pub batching: Batching,
    /// Autocast dtype and gradient checkpointing.
    pub step: StepOptions,
    /// Skip (and count) steps with a non-finite loss or gradient instead of stopping.
    pub skip_nonfinite: bool,
    pub resume_from_checkpoint: Option<PathBuf>,
}

impl TrainerConfig {
    /// Refuses counts that would be coerced or train nothing, naming the flag.
    pub fn check_counts(&self) -> anyhow::Result<()> {
        for (flag, value) in [
            ("--per-device-train-batch-size", self.per_device_train_batch_size),
            ("--gradient-accumulation-steps", self.gradient_accumulation_steps),
            ("--logging-steps", self.logging_steps),
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
            logging_steps: 10,
            save_steps: 0,
            save_total_limit: None,
            eval_steps: 0,
            per_device_eval_batch_size: 8,
            seed: 42,
            sampling: SamplingStrategy::Random,
            batching: Batching::default(),
            step: StepOptions::default(),
            skip_nonfinite: false,
            resume_from_checkpoint: None,
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
    /// The training pairs; micro-batches are indices into them.
    pub pairs: &'a [TokenizedPair],
    pub batching: Batching,
    pub step: StepOptions,
    pub max_grad_norm: f64,
    pub optimizer: AdamW,
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
    /// A trainer over `pairs` with a fresh optimizer for the policy's trainable parameters.
    pub fn new(
        policy: &'a LoadedModel,
        reference: Reference<'a>,
        objective: &'a Objective,
        pairs: &'a [TokenizedPair],
        config: &TrainerConfig,
    ) -> Self {
        Trainer {
            optimizer: AdamW::new(policy.trainable_variables(), config.optimizer),
            policy,
            reference,
            objective,
            pairs,
            batching: config.batching,
            step: config.step,
            max_grad_norm: config.max_grad_norm,
        }
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

    /// One optimizer step at learning rate `lr` over `micro_batches` (indices into `pairs`); the metrics of its
    /// batches are appended to `log` when the step succeeds. A non-finite loss stops the step at that micro-batch
    /// (the later ones are not run) and, like a non-finite gradient norm, leaves the weights as they were.
    pub fn optimizer_step(
        &mut self,
        micro_batches: &[Vec<usize>],
        lr: f64,
        log: &mut MetricLog,
    ) -> Result<StepOutcome, NonFinite> {
        let mut seconds = PhaseSeconds::default();
        let (mut loss, mut tokens) = (0.0, 0);
        let mut rows = Vec::new();
        let mut step_log = MetricLog::default();
        let scale = 1.0 / micro_batches.len() as f64;
        let device = self.policy.vs.device();
        for indices in micro_batches {
            let started = Instant::now();
            let pairs: Vec<&TokenizedPair> = indices.iter().map(|&i| &self.pairs[i]).collect();
            rows.extend(pairs.iter().map(|p| p.location.clone()));
            let batch = self.batching.pack(&pairs);
            tokens += batch.logical.attention_mask.sum(Kind::Int64).int64_value(&[]);
            let reference = match self.reference {
                Reference::None => None,
                Reference::Model(r) => Some(reference_logps(&r.model, &batch, self.step.precision)),
                Reference::Precomputed { train, .. } => Some(train.batch(indices, device)),
            };
            let reference_done = Instant::now();
            seconds.reference += (reference_done - started).as_secs_f64();
            let value = forward_backward(
                &self.policy.model,
                &batch,
                self.objective,
                reference.as_ref(),
                scale,
                self.step,
                &mut step_log,
            );
            seconds.policy += reference_done.elapsed().as_secs_f64();
            if !value.is_finite() {
                self.optimizer.zero_grad();
                return Err(NonFinite { what: format!("loss {value}"), rows, tokens });
            }
            loss += value;
        }
        let grad_norm = (self.max_grad_norm > 0.0).then(|| self.optimizer.clip_grad_norm(self.max_grad_norm));
        if let Some(norm) = grad_norm.filter(|n| !n.is_finite()) {
            self.optimizer.zero_grad();
            return Err(NonFinite { what: format!("gradient norm {norm}"), rows, tokens });
        }
        self.optimizer.step(lr);
        self.optimizer.zero_grad();
        crate::runtime::release_free_memory();
        log.append(step_log);
        Ok(StepOutcome { loss, grad_norm, tokens, seconds })
    }
}
