//! `prefalign dpo`, `orpo`, `cpo`, `sft` and `kto`: train a model with TRL's parameter names, and save it as a
//! Hugging Face folder in --output-dir.

use crate::cli::data::DatasetArgs;
use crate::cli::push::HubPushArgs;
use crate::cli::{values, ComputeArgs, ModelArgs};
use crate::data::batches::{Examples, KtoExamples};
use crate::data::collate::{SamplingStrategy, TruncationMode};
use crate::data::pack::Batching;
use crate::data::prepare::Rules;
use crate::data::sft::{PackingStrategy, SftOptions, SftRow};
use crate::data::tokenize::TokenizedPair;
use crate::files;
use crate::model::lora::LoraConfig;
use crate::model::save::{save_hf, save_trained, DEFAULT_MAX_SHARD_BYTES};
use crate::model::LoadedModel;
use crate::objective::cpo::CpoParams;
use crate::objective::dpo::{DpoLoss, DpoParams, LossParams};
use crate::objective::kto::KtoLoss;
use crate::objective::orpo::OrpoParams;
use crate::objective::sft::SftLoss;
use crate::objective::{KtoParams, Objective, SftParams};
use crate::runtime;
use crate::train::checkpoint::list_checkpoints;
use crate::train::distributed::{Backend, Launch, ProcessGroup};
use crate::train::optimizer::AdamWConfig;
use crate::train::reference::{cache_dir, precompute as precompute_reference};
use crate::train::run::{train_on, Stopped};
use crate::train::schedule::Schedule;
use crate::train::{Interval, Reference, TrainInputs, TrainerConfig};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SamplingArg {
    Sequential,
    Random,
}

/// The trainer flags shared by every objective (transformers' TrainingArguments names).
#[derive(Args, Debug)]
pub struct TrainerArgs {
    #[arg(long, default_value = "prefalign-output")]
    output_dir: PathBuf,
    /// Default: TRL's for the command (1e-6; sft: 2e-5)
    #[arg(long, value_parser = values::non_negative)]
    learning_rate: Option<f64>,
    /// constant, constant_with_warmup, linear, cosine, cosine_with_min_lr
    #[arg(long, default_value = "linear")]
    lr_scheduler_type: String,
    /// cosine_with_min_lr: the final rate as a fraction of --learning-rate
    #[arg(long, value_parser = values::fraction, default_value_t = 0.0)]
    min_lr_rate: f64,
    /// Steps of linear warmup; below 1, a fraction of the total steps (transformers 5)
    #[arg(long, value_parser = values::steps, default_value_t = 0.0)]
    warmup_steps: f64,
    #[arg(long, value_parser = values::fraction, default_value_t = TrainerConfig::default().warmup_ratio)]
    warmup_ratio: f64,
    /// The optimizer: AdamW (adamw_torch, adamw_torch_fused, paged_adamw_32bit and the other 32-bit AdamW names
    /// run the same arithmetic); 8-bit and other optimizers are refused
    #[arg(long, default_value = "adamw_torch_fused")]
    optim: String,
    #[arg(long, value_parser = values::non_negative, default_value_t = AdamWConfig::default().weight_decay)]
    weight_decay: f64,
    #[arg(long, value_parser = values::adam_beta, default_value_t = AdamWConfig::default().beta1)]
    adam_beta1: f64,
    #[arg(long, value_parser = values::adam_beta, default_value_t = AdamWConfig::default().beta2)]
    adam_beta2: f64,
    #[arg(long, value_parser = values::non_negative, default_value_t = AdamWConfig::default().eps)]
    adam_epsilon: f64,
    /// Clip gradients to this global L2 norm (0: no clipping)
    #[arg(long, value_parser = values::non_negative, default_value_t = TrainerConfig::default().max_grad_norm)]
    max_grad_norm: f64,
    #[arg(long, value_parser = values::at_least_one, default_value_t = TrainerConfig::default().per_device_train_batch_size)]
    per_device_train_batch_size: usize,
    #[arg(long, value_parser = values::at_least_one, default_value_t = TrainerConfig::default().gradient_accumulation_steps)]
    gradient_accumulation_steps: usize,
    #[arg(long, value_parser = values::non_negative, default_value_t = TrainerConfig::default().num_train_epochs)]
    num_train_epochs: f64,
    /// Total optimizer steps; overrides --num-train-epochs when > 0
    #[arg(long, default_value_t = TrainerConfig::default().max_steps, allow_negative_numbers = true)]
    max_steps: i64,
    /// When to log a metrics row: no, steps (every --logging-steps) or epoch
    #[arg(long, default_value = "steps")]
    logging_strategy: String,
    /// Log every N optimizer steps (below 1: that fraction of the total steps)
    #[arg(long, value_parser = values::positive_steps, default_value_t = 10.0)]
    logging_steps: f64,
    /// Also log after the first step
    #[arg(long)]
    logging_first_step: bool,
    /// When to write a checkpoint: no, steps (every --save-steps, and after the last step) or epoch
    #[arg(long, default_value = "steps")]
    save_strategy: String,
    /// Write a checkpoint every N optimizer steps (below 1: that fraction of the total; 0: none)
    #[arg(long, value_parser = values::steps, default_value_t = 500.0)]
    save_steps: f64,
    /// Checkpoints hold the model only, not the optimizer state (they cannot be resumed from)
    #[arg(long)]
    save_only_model: bool,
    /// Keep only the newest N checkpoints
    #[arg(long, value_parser = values::at_least_one)]
    save_total_limit: Option<usize>,
    /// Continue from a checkpoint folder, or "last" for the newest in --output-dir
    #[arg(long)]
    resume_from_checkpoint: Option<String>,
    /// When to evaluate: no, steps (every --eval-steps, and after the last step) or epoch. Default: no, as in
    /// transformers, except that --eval-dataset with --eval-steps evaluates every --eval-steps
    #[arg(long, alias = "evaluation-strategy")]
    eval_strategy: Option<String>,
    /// Evaluate every N optimizer steps (below 1: that fraction of the total; 0: never); default --logging-steps
    #[arg(long, value_parser = values::steps)]
    eval_steps: Option<f64>,
    /// Evaluate once more after training (the alignment-handbook's do_eval) unless the last step was evaluated
    #[arg(long)]
    do_eval: bool,
    #[arg(long, value_parser = values::at_least_one, default_value_t = TrainerConfig::default().per_device_eval_batch_size)]
    per_device_eval_batch_size: usize,
    /// Skip (and count) batches whose loss or gradient is not finite, instead of stopping
    #[arg(long)]
    skip_nonfinite: bool,
    #[arg(long, default_value_t = TrainerConfig::default().seed)]
    seed: u64,
    /// The seed of the data order (default --seed)
    #[arg(long)]
    data_seed: Option<u64>,
    /// Where metrics go besides metrics.jsonl and TensorBoard (always written): tensorboard, all, none; other
    /// integrations (wandb, trackio, ...) are not built in and only warned about
    #[arg(long, value_delimiter = ',', default_value = "none")]
    report_to: Vec<String>,
    /// Default: random (kto: sequential, which its KL estimate needs)
    #[arg(long, value_enum)]
    train_sampling_strategy: Option<SamplingArg>,
    /// Several processes (torchrun's RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment, or SLURM's): the
    /// c10d backend, gloo (CPU; CUDA tensors through host memory) or nccl (CUDA). Default: nccl on CUDA where
    /// this build has it, else gloo
    #[arg(long)]
    ddp_backend: Option<String>,
    /// Several processes: seconds a rank waits for the others (to join, or in a collective) before it stops with an
    /// error naming the rank(s) that did not arrive
    #[arg(long, default_value_t = 1800)]
    ddp_timeout: u64,
    /// Several processes: gradients are averaged in buckets of this many MiB, each as soon as the backward pass
    /// has finished it
    #[arg(long, value_parser = values::non_negative, default_value_t = TrainerConfig::default().ddp_bucket_cap_mb)]
    ddp_bucket_cap_mb: f64,
    /// Several processes: each keeps AdamW's moments of a share of the parameters only and updates those (ZeRO-1:
    /// the moments' memory divided by the number of processes, for one broadcast of the weights per step)
    #[arg(long)]
    shard_optimizer_state: bool,
}

/// transformers' optimizer names that run AdamW's arithmetic in 32 bits (paged: the same update, paging is a
/// CUDA memory manager's concern).
const ADAMW_NAMES: [&str; 6] =
    ["adamw_torch", "adamw_torch_fused", "adamw_hf", "paged_adamw_32bit", "paged_adamw", "adamw_apex_fused"];

impl TrainerArgs {
    /// The trainer's settings from the flags for `objective` (whose TRL config has its own defaults), every one
    /// checked before anything is loaded; `batching` is set once the tokenizer is known.
    fn config(&self, eval_dataset_given: bool, compute: &ComputeArgs, objective: &Objective) -> Result<TrainerConfig> {
        if !ADAMW_NAMES.contains(&self.optim.as_str()) {
            let why = if self.optim.contains("8bit") {
                "8-bit optimizer states are not implemented"
            } else {
                "prefalign implements AdamW"
            };
            bail!("--optim {}: {why}; use adamw_torch (or one of {})", self.optim, ADAMW_NAMES[1..].join(", "));
        }
        for target in &self.report_to {
            match target.as_str() {
                "none" | "all" | "tensorboard" => {}
                other => eprintln!(
                    "warning: --report-to {other}: not built into prefalign; metrics go to metrics.jsonl and \
                     TensorBoard event files (runs/) in --output-dir"
                ),
            }
        }
        let strategy = |flag: &str, name: &str, steps: f64| {
            Interval::parse(name, steps).with_context(|| format!("--{flag} {name}"))
        };
        let logging = strategy("logging-strategy", &self.logging_strategy, self.logging_steps)?;
        let eval = match (&self.eval_strategy, self.eval_steps) {
            (Some(name), steps) => strategy("eval-strategy", name, steps.unwrap_or(self.logging_steps))?,
            (None, Some(steps)) if eval_dataset_given && steps > 0.0 => Interval::Steps(steps),
            (None, _) => Interval::No,
        };
        if self.save_strategy == "best" {
            bail!("--save-strategy best: needs metric_for_best_model / load_best_model_at_end, which prefalign does not implement");
        }
        let save = strategy("save-strategy", &self.save_strategy, self.save_steps)?;
        let (warmup_steps, warmup_ratio) = match self.warmup_steps {
            // transformers 5 reads a warmup_steps below 1 as a ratio
            w if w > 0.0 && w < 1.0 && self.warmup_ratio > 0.0 => {
                bail!("--warmup-steps {w} (a ratio) and --warmup-ratio {} both set the warmup", self.warmup_ratio)
            }
            w if w > 0.0 && w < 1.0 => (0, w),
            w => (w as usize, self.warmup_ratio),
        };
        let resume_from_checkpoint = match self.resume_from_checkpoint.as_deref() {
            None => None,
            Some("last" | "true") => {
                Some(list_checkpoints(&self.output_dir)?.pop().map(|(_, path)| path).with_context(|| {
                    format!("no checkpoint-* folder in {} to resume from", self.output_dir.display())
                })?)
            }
            Some(path) => Some(PathBuf::from(path)),
        };
        let config = TrainerConfig {
            output_dir: self.output_dir.clone(),
            learning_rate: self.learning_rate.unwrap_or(match objective {
                Objective::Sft(_) => 2e-5, // SFTConfig's default
                _ => TrainerConfig::default().learning_rate,
            }),
            schedule: Schedule::parse(&self.lr_scheduler_type, self.min_lr_rate)?,
            warmup_steps,
            warmup_ratio,
            optimizer: AdamWConfig {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
            max_grad_norm: self.max_grad_norm,
            per_device_train_batch_size: self.per_device_train_batch_size,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            num_train_epochs: self.num_train_epochs,
            max_steps: self.max_steps,
            logging,
            logging_first_step: self.logging_first_step,
            save,
            save_only_model: self.save_only_model,
            ddp_bucket_cap_mb: self.ddp_bucket_cap_mb,
            shard_optimizer_state: self.shard_optimizer_state,
            save_total_limit: self.save_total_limit,
            eval,
            eval_at_end: self.do_eval,
            per_device_eval_batch_size: self.per_device_eval_batch_size,
            skip_nonfinite: self.skip_nonfinite,
            resume_from_checkpoint,
            seed: self.seed,
            data_seed: self.data_seed,
            sampling: match (self.train_sampling_strategy, objective) {
                (Some(SamplingArg::Sequential), _) | (None, Objective::Kto(_)) => SamplingStrategy::Sequential,
                (Some(SamplingArg::Random), _) | (None, _) => SamplingStrategy::Random,
            },
            batching: Default::default(),
            step: compute.step(),
        };
        config.check_counts()?;
        Ok(config)
    }
}

/// Held-out preference data for evaluation during training.
#[derive(Args, Debug)]
pub struct EvalDataArgs {
    /// Evaluation data (file, folder or Hub id), read with the same column and format flags as --dataset
    #[arg(long)]
    eval_dataset: Option<String>,
    /// The Hub split of --eval-dataset
    #[arg(long, default_value = "test")]
    dataset_test_split: String,
}

/// LoRA, with the names of TRL's `ModelConfig` (PEFT's defaults).
#[derive(Args, Debug)]
pub struct LoraArgs {
    /// Train LoRA adapters on the frozen model instead of every weight (on by itself with --adapter)
    #[arg(long)]
    pub use_peft: bool,
    #[arg(long, value_parser = values::at_least_one, default_value_t = LoraConfig::default().r)]
    lora_r: usize,
    #[arg(long, value_parser = values::positive, default_value_t = LoraConfig::default().alpha)]
    lora_alpha: f64,
    /// Dropout on the adapters' input: applied by sft, as TRL's SFTTrainer does; the preference trainers switch it
    /// off, as TRL's do (disable_dropout, true by default)
    #[arg(long, value_parser = values::fraction, default_value_t = LoraConfig::default().dropout)]
    lora_dropout: f64,
    /// Module names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or all-linear; default: PEFT's for
    /// the architecture (q_proj v_proj)
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    lora_target_modules: Vec<String>,
    /// Scale the update by alpha/√r instead of alpha/r (rank-stabilized LoRA)
    #[arg(long)]
    use_rslora: bool,
    /// Modules trained whole beside the adapters: embed_tokens and/or lm_head (the reference uses the originals)
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    lora_modules_to_save: Vec<String>,
    #[arg(long, default_value = "CAUSAL_LM")]
    lora_task_type: String,
    /// Not supported (DoRA)
    #[arg(long)]
    use_dora: bool,
    /// Not supported (LoRA on parameters rather than modules)
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    lora_target_parameters: Vec<String>,
}

impl LoraArgs {
    /// Adds fresh adapters to `policy` (named `name` in their config) with --use-peft, unless it has some from
    /// --adapter; under autocast to `cast` its frozen projections are then stored in that dtype, as a reference
    /// model's are.
    pub fn apply(&self, policy: &mut LoadedModel, name: &str, cast: Option<tch::Kind>) -> Result<()> {
        if !self.use_peft && policy.adapter.is_none() {
            if policy.quantized_summary().is_some() {
                bail!("quantized weights cannot be trained: --load-in-4bit trains LoRA adapters, add --use-peft");
            }
            return Ok(());
        }
        for (flag, given) in
            [("--use-dora", self.use_dora), ("--lora-target-parameters", !self.lora_target_parameters.is_empty())]
        {
            if given {
                bail!("{flag} is not supported: prefalign trains LoRA adapters on modules only");
            }
        }
        if self.lora_task_type != "CAUSAL_LM" {
            bail!("--lora-task-type {}: prefalign trains causal LMs (CAUSAL_LM)", self.lora_task_type);
        }
        if policy.adapter.is_none() {
            let config = LoraConfig {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                target_modules: (!self.lora_target_modules.is_empty()).then(|| self.lora_target_modules.clone()),
                use_rslora: self.use_rslora,
                modules_to_save: self.lora_modules_to_save.clone(),
            };
            policy.add_lora(config, name)?;
        }
        if let Some(kind) = cast {
            policy.model.store_matmul_weights_in(kind);
        }
        Ok(())
    }
}

/// What every training command takes: the model, the data (and held-out data) and the trainer's settings.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: LoraArgs,
    /// With LoRA: after training, also write the base model with the adapter merged into it to <output-dir>/merged
    #[arg(long)]
    merge: bool,
    #[command(flatten)]
    data: DatasetArgs,
    #[command(flatten)]
    eval_data: EvalDataArgs,
    #[command(flatten)]
    trainer: TrainerArgs,
    #[command(flatten)]
    compute: ComputeArgs,
    #[command(flatten)]
    hub: HubPushArgs,
}

#[derive(Args, Debug)]
pub struct DpoArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The reference model; default: a frozen copy of the policy (with LoRA: the policy with its adapters off, or
    /// as --adapter was)
    #[arg(long)]
    ref_model: Option<String>,
    /// Score against a zero reference (no reference model)
    #[arg(long)]
    reference_free: bool,
    /// Compute the reference log-probs once before training (cached on disk across runs) instead of running the
    /// reference model at every step
    #[arg(long)]
    precompute_ref_log_probs: bool,
    #[arg(long, value_parser = values::positive, default_value_t = LossParams::default().beta)]
    beta: f64,
    /// One or more of TRL's loss types, comma-separated (sigmoid, hinge, ipo, robust, …)
    #[arg(long, default_value = "sigmoid", value_delimiter = ',')]
    loss_type: Vec<String>,
    /// One weight per loss type (default: 1 each)
    #[arg(long, value_delimiter = ',', value_parser = values::non_negative)]
    loss_weights: Vec<f64>,
    #[arg(long, value_parser = values::label_smoothing, default_value_t = LossParams::default().label_smoothing)]
    label_smoothing: f64,
    #[arg(long, value_parser = values::positive, default_value_t = LossParams::default().discopop_tau)]
    discopop_tau: f64,
}

#[derive(Args, Debug)]
pub struct OrpoArgs {
    #[command(flatten)]
    run: RunArgs,
    /// λ, the weight of the odds-ratio term
    #[arg(long, value_parser = values::non_negative, default_value_t = OrpoParams::default().beta)]
    beta: f64,
}

#[derive(Args, Debug)]
pub struct CpoArgs {
    #[command(flatten)]
    run: RunArgs,
    #[arg(long, value_parser = values::positive, default_value_t = CpoParams::default().beta)]
    beta: f64,
    /// sigmoid, hinge, ipo, simpo, or alphapo (SimPO without the NLL term)
    #[arg(long, default_value = "sigmoid")]
    loss_type: String,
    #[arg(long, value_parser = values::label_smoothing, default_value_t = CpoParams::default().label_smoothing)]
    label_smoothing: f64,
    /// Weight of the NLL term on the chosen completions
    #[arg(long, value_parser = values::non_negative, default_value_t = CpoParams::default().cpo_alpha)]
    cpo_alpha: f64,
    /// SimPO's target reward margin γ
    #[arg(long, value_parser = values::finite, default_value_t = CpoParams::default().simpo_gamma)]
    simpo_gamma: f64,
}

#[derive(Args, Debug)]
pub struct SftArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The column of language-modeling text (rows with `messages`, or `prompt` and `completion`, need none)
    #[arg(long, default_value = "text")]
    dataset_text_field: String,
    /// Loss on the completion only (prompt-completion rows); default: on for prompt-completion data, as TRL's
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    completion_only_loss: Option<bool>,
    /// Loss on the assistant's turns only (`messages` rows): the text in the chat template's {% generation %}
    /// blocks (--chat-template-path can give a template that has them)
    #[arg(long)]
    assistant_only_loss: bool,
    /// Pack the tokenized sequences into rows of --max-length tokens (TRL's dataset packing: fewer, fuller rows
    /// per batch)
    #[arg(long)]
    packing: bool,
    /// bfd (whole sequences, each attending only to itself) or wrapped (cut every --max-length tokens)
    #[arg(long, default_value = "bfd")]
    packing_strategy: String,
    /// Accepted: prefalign runs a batch's sequences without padding by default (--no-packing: padded rows); the
    /// result is the same
    #[arg(long)]
    padding_free: bool,
    /// Shuffle the tokenized rows (and again after packing) with --seed, as TRL's shuffle_dataset
    #[arg(long)]
    shuffle_dataset: bool,
    /// nll, or dft (each token's NLL weighted by its probability, arXiv 2508.05629)
    #[arg(long, default_value = "nll")]
    loss_type: String,
}

#[derive(Args, Debug)]
pub struct KtoArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The reference model; default: a frozen copy of the policy (with LoRA: the policy with its adapters off)
    #[arg(long)]
    ref_model: Option<String>,
    /// Compute the reference log-probs once before training (cached on disk across runs)
    #[arg(long)]
    precompute_ref_log_probs: bool,
    #[arg(long, value_parser = values::positive, default_value_t = KtoParams::default().beta)]
    beta: f64,
    /// kto, or apo_zero_unpaired (no KL term)
    #[arg(long, default_value = "kto")]
    loss_type: String,
    /// Weight of the desirable examples' losses
    #[arg(long, value_parser = values::non_negative, default_value_t = KtoParams::default().desirable_weight)]
    desirable_weight: f64,
    /// Weight of the undesirable examples' losses
    #[arg(long, value_parser = values::non_negative, default_value_t = KtoParams::default().undesirable_weight)]
    undesirable_weight: f64,
}

pub fn run_sft(args: SftArgs) -> Result<()> {
    let options = SftOptions {
        dataset_text_field: args.dataset_text_field.clone(),
        completion_only_loss: args.completion_only_loss,
        max_length: Some(args.run.data.max_length),
        truncation_mode: args.run.data.truncation_mode(),
        assistant_only_loss: args.assistant_only_loss,
        packing: args.packing,
        packing_strategy: PackingStrategy::parse(&args.packing_strategy)?,
        shuffle_seed: args.shuffle_dataset.then_some(args.run.trainer.seed),
    };
    let objective = Objective::Sft(SftParams { loss: SftLoss::parse(&args.loss_type)? });
    run(&args.run, ReferenceArg::None, false, Task::Sft(options), &objective)
}

pub fn run_kto(args: KtoArgs) -> Result<()> {
    let objective = Objective::Kto(KtoParams {
        beta: args.beta,
        loss: KtoLoss::parse(&args.loss_type)?,
        desirable_weight: args.desirable_weight,
        undesirable_weight: args.undesirable_weight,
    });
    // TRL's KL estimate pairs each prompt with the previous completion of its batch: it needs the batches in
    // dataset order and more than one example in each
    let sequential = !matches!(args.run.trainer.train_sampling_strategy, Some(SamplingArg::Random));
    if args.loss_type == "kto" && (!sequential || args.run.trainer.per_device_train_batch_size < 2) {
        bail!(
            "KTO's KL estimate pairs each prompt with another completion of its batch: it needs \
             --train-sampling-strategy sequential (the default for kto) and --per-device-train-batch-size of at \
             least 2"
        );
    }
    let reference = reference_arg(&args.run, args.ref_model.as_ref(), false);
    run(&args.run, reference, args.precompute_ref_log_probs, Task::Kto, &objective)
}

/// The reference of a command that has one: --ref-model, else as TRL makes it.
fn reference_arg(run: &RunArgs, ref_model: Option<&String>, reference_free: bool) -> ReferenceArg {
    match (ref_model, reference_free) {
        (_, true) => ReferenceArg::None,
        (Some(path), false) => ReferenceArg::Model(path.clone()),
        // TRL with PEFT and no reference model: the policy with its adapters off (or as an existing one was)
        (None, false) if run.lora.use_peft || run.model.adapter.is_some() => ReferenceArg::PolicyAdapters,
        (None, false) => ReferenceArg::Model(run.model.model.clone()), // a frozen copy, as TRL makes
    }
}

pub fn run_cpo(args: CpoArgs) -> Result<()> {
    let params = CpoParams {
        beta: args.beta,
        label_smoothing: args.label_smoothing,
        cpo_alpha: args.cpo_alpha,
        simpo_gamma: args.simpo_gamma,
        ..CpoParams::default()
    }
    .with_loss_type(&args.loss_type)?;
    // CPOTrainer shares ORPOTrainer's data path.
    run(&args.run, ReferenceArg::None, false, Task::Pairs(Rules::Orpo), &Objective::Cpo(params))
}

pub fn run_dpo(args: DpoArgs) -> Result<()> {
    let losses: Vec<DpoLoss> = args.loss_type.iter().map(|n| DpoLoss::parse(n)).collect::<Result<_>>()?;
    let weights = if args.loss_weights.is_empty() { vec![1.0; losses.len()] } else { args.loss_weights.clone() };
    if weights.len() != losses.len() {
        bail!("--loss-weights has {} values for {} loss types", weights.len(), losses.len());
    }
    let objective = Objective::Dpo(DpoParams {
        losses: losses.into_iter().zip(weights).collect(),
        loss: LossParams { beta: args.beta, label_smoothing: args.label_smoothing, discopop_tau: args.discopop_tau },
        reference_free: args.reference_free,
    });
    let reference = reference_arg(&args.run, args.ref_model.as_ref(), args.reference_free);
    run(&args.run, reference, args.precompute_ref_log_probs, Task::Pairs(Rules::Dpo), &objective)
}

pub fn run_orpo(args: OrpoArgs) -> Result<()> {
    let objective = Objective::Orpo(OrpoParams { beta: args.beta });
    run(&args.run, ReferenceArg::None, false, Task::Pairs(Rules::Orpo), &objective)
}

/// What a command trains on, and how its rows become examples.
enum Task {
    /// preference pairs, tokenized by DPO's or ORPO's (and CPO's) rules
    Pairs(Rules),
    /// SFT sequences
    Sft(SftOptions),
    /// KTO's unpaired examples
    Kto,
}

/// The prepared training examples of a task.
enum TrainingData {
    Pairs(Vec<TokenizedPair>),
    Sft(Vec<SftRow>),
    Kto(KtoExamples),
}

impl TrainingData {
    fn examples(&self) -> Examples<'_> {
        match self {
            TrainingData::Pairs(pairs) => Examples::Pairs(pairs),
            TrainingData::Sft(rows) => Examples::Sft(rows),
            TrainingData::Kto(examples) => Examples::Kto(examples),
        }
    }
}

/// Where a run's reference comes from.
enum ReferenceArg {
    None,
    /// a model folder, GGUF file or Hub id
    Model(String),
    /// the policy's own LoRA adapters, off or as they started (`CausalLm::as_reference`)
    PolicyAdapters,
}

/// Joins the process group of a launch of several processes, as `--ddp-backend` and `--ddp-timeout` say.
fn join_group(launch: &Launch, t: &TrainerArgs, objective: &Objective, cuda: bool) -> Result<ProcessGroup> {
    let backend = Backend::choose(t.ddp_backend.as_deref(), cuda)?;
    if matches!(objective, Objective::Sft(_) | Objective::Kto(_)) {
        bail!(
            "prefalign {} runs in one process so far (WORLD_SIZE is {}): dpo, orpo and cpo run on several",
            objective.name(),
            launch.world_size
        );
    }
    let group = ProcessGroup::join(launch, std::time::Duration::from_secs(t.ddp_timeout), backend)?;
    if group.rank == 0 {
        eprintln!(
            "{} processes ({backend:?}, rendezvous at {}:{}); rank 0 writes the output",
            group.world_size, launch.master_addr, launch.master_port
        );
    }
    Ok(group)
}

/// `precompute`: compute the reference's log-probs before training.
fn run(args: &RunArgs, reference: ReferenceArg, precompute: bool, task: Task, objective: &Objective) -> Result<()> {
    let RunArgs { model, lora, merge, data, eval_data, trainer: t, compute, hub } = args;
    let mut config = t.config(eval_data.eval_dataset.is_some(), compute, objective)?;
    let launch = Launch::from_env()?;
    let cuda = model.device.starts_with("cuda") || (model.device == "auto" && tch::Cuda::is_available());
    let group = match &launch {
        Some(launch) => Some(join_group(launch, t, objective, cuda)?),
        None => None,
    };
    let main = group.as_ref().is_none_or(|g| g.rank == 0);
    // several processes on CUDA: each on its own device, cuda:LOCAL_RANK
    let model = &match &launch {
        Some(l) if cuda => ModelArgs { device: format!("cuda:{}", l.local_rank), ..model.clone() },
        _ => model.clone(),
    };
    let rules = match &task {
        Task::Pairs(rules) => Some(*rules),
        _ => {
            data.check_no_pair_flags(objective.name())?;
            None
        }
    };
    // One run per output folder, from before anything is read until the model is saved.
    // (rank 0's, for all ranks of a data-parallel run)
    let _lock = if main { Some(files::RunLock::acquire(&t.output_dir)?) } else { None };
    // before anything is loaded: a missing token or right fails at once
    let hub = if main { hub.connect(&t.output_dir)? } else { None };
    let use_lora = lora.use_peft || model.adapter.is_some();
    let mut policy = model.load_for_training(use_lora).with_context(|| format!("the policy model {}", model.model))?;
    tch::manual_seed(t.seed as i64); // PEFT draws the adapters' A after TRL's set_seed(seed)
    lora.apply(&mut policy, &model.model, compute.step().precision.cast)?;
    if *merge && policy.adapter.is_none() {
        bail!("--merge merges LoRA adapters: it needs --use-peft or --adapter");
    }
    // TRL's SFTTrainer keeps the model's own dropout (its preference trainers switch it off); prefalign has none
    let attention_dropout = policy.config().attention_dropout.unwrap_or(0.0);
    if objective.trains_with_dropout() && attention_dropout > 0.0 && main {
        eprintln!(
            "warning: the model's attention_dropout ({attention_dropout}) is not applied; TRL's SFTTrainer trains \
             with it, so this run differs from TRL's (set it to 0 in config.json to match exactly)"
        );
    }
    let reference_path = match &reference {
        ReferenceArg::Model(path) => Some(path.clone()),
        _ => None,
    };
    let mut reference_model = reference_path
        .as_ref()
        .map(|r| model.with_model(r).load().with_context(|| format!("the reference model {r}")))
        .transpose()?;
    if let (Some(loaded), Some(path)) = (&reference_model, &reference_path) {
        let (theirs, ours) = (loaded.config().vocab_size, policy.config().vocab_size);
        if theirs != ours {
            bail!(
                "the reference model {path} has a vocabulary of {theirs} tokens and the policy {} one of {ours}: \
                 they must share the policy's tokenizer",
                model.model
            );
        }
    }
    if let Some(reference) = reference_model.as_mut() {
        reference.vs.freeze();
        if let Some(kind) = compute.step().precision.cast {
            reference.model.store_matmul_weights_in(kind);
        }
    }
    let tokenizer = policy.tokenizer()?;
    let training = match &task {
        Task::Pairs(rules) => {
            let prepared = data.prepare(tokenizer, *rules)?;
            eprintln!("{} pairs ({})", prepared.pairs.len(), prepared.report.counts(*rules));
            TrainingData::Pairs(prepared.pairs)
        }
        Task::Sft(options) => TrainingData::Sft(data.prepare_sft(tokenizer, options)?),
        Task::Kto => TrainingData::Kto(data.prepare_kto(tokenizer, t.per_device_train_batch_size)?),
    };
    let eval_prepared = if config.eval != Interval::No || config.eval_at_end {
        let (eval_args, source) = match &eval_data.eval_dataset {
            Some(dataset) => (
                DatasetArgs {
                    dataset: Some(dataset.clone()),
                    dataset_mixture: None,
                    dataset_mixer: None,
                    ..data.clone()
                },
                dataset.clone(),
            ),
            // TRL's scripts: the test split of the training dataset
            None => (data.clone(), data.describe()),
        };
        let eval_args = DatasetArgs { dataset_split: eval_data.dataset_test_split.clone(), limit: None, ..eval_args };
        eval_args.check_has_split(eval_data.eval_dataset.is_none())?;
        let eval = match &task {
            Task::Pairs(rules) => TrainingData::Pairs(eval_args.prepare(tokenizer, *rules)?.pairs),
            Task::Sft(options) => TrainingData::Sft(eval_args.prepare_sft(tokenizer, options)?),
            // TRL rotates the evaluation rows' KL completions by training batches too
            Task::Kto => TrainingData::Kto(eval_args.prepare_kto(tokenizer, t.per_device_train_batch_size)?),
        };
        let what = if rules.is_some() { "pairs" } else { "rows" };
        eprintln!("{} evaluation {what} from {source} (split {})", eval.examples().len(), eval_args.dataset_split);
        Some(eval)
    } else {
        if eval_data.eval_dataset.is_some() {
            eprintln!("warning: --eval-dataset is not used: --eval-strategy is no (give --eval-strategy steps)");
        }
        None
    };
    let eval_pairs = eval_prepared.as_ref().and_then(|e| e.examples().pairs());
    config.batching = match task {
        Task::Pairs(rules) => data.batching(rules, tokenizer.pad_id()?, compute.layout()),
        Task::Sft(_) => Batching { pad_id: tokenizer.pad_id()?, truncation: None, layout: compute.layout() },
        // TRL's KTO collator cuts prompt + completion (and prompt + KL completion) to max_length, keeping the start
        Task::Kto => Batching {
            pad_id: tokenizer.pad_id()?,
            truncation: Some((data.max_length, TruncationMode::KeepStart)),
            layout: compute.layout(),
        },
    };
    // Precomputed (and cached) for the training pairs and the evaluation pairs, as TRL does; the reference model
    // is then released.
    let precompute_for = |r: &LoadedModel, pairs: &[TokenizedPair]| {
        let (batching, precision, batch_size) = (&config.batching, config.step.precision, t.per_device_eval_batch_size);
        precompute_reference(r, pairs, batching, precision, batch_size, &cache_dir(), group.as_ref())
    };
    let reference_source = match reference {
        ReferenceArg::PolicyAdapters => Some(&policy),
        _ => reference_model.as_ref(),
    };
    let precomputed = match (reference_source, precompute, training.examples().pairs()) {
        (Some(r), true, Some(pairs)) => {
            Some((precompute_for(r, pairs)?, eval_pairs.map(|pairs| precompute_for(r, pairs)).transpose()?))
        }
        _ => None,
    };
    if precomputed.is_some() {
        reference_model = None;
    }
    let inputs = TrainInputs {
        policy: &policy,
        reference: match (&precomputed, &reference, &reference_model) {
            (Some((train, eval)), _, _) => Reference::Precomputed { train, eval: eval.as_ref() },
            (None, ReferenceArg::PolicyAdapters, _) => Reference::Model(&policy),
            (None, _, Some(model)) => Reference::Model(model),
            (None, _, None) => Reference::None,
        },
        train: training.examples(),
        eval: eval_prepared.as_ref().map(TrainingData::examples),
        objective,
    };
    let stop_at_step_end = runtime::StopAtStepEnd::new();
    let lora_config = policy.adapter.as_ref().map(|a| &a.config);
    let hub = hub.map(|h| h.describing(&model.model, &data.describe(), objective, &config, lora_config));
    let mut on_checkpoint = |dir: &Path, step| hub.as_ref().map_or(Ok(()), |h| h.checkpoint_saved(dir, step));
    train_on(&inputs, &config, group.as_ref(), &mut on_checkpoint)?;
    if !main {
        return Ok(()); // rank 0 saves the model (the same weights on every rank)
    }
    save_trained(&policy, &t.output_dir)?;
    let what = if policy.adapter.is_some() { "adapter" } else { "model" };
    eprintln!("saved the trained {what} to {}", t.output_dir.display());
    if *merge {
        // From the base as loaded (under --bf16 the policy's frozen projections are stored in bf16), in full
        // precision when it was trained quantized.
        drop(policy);
        let base = ModelArgs { adapter: Some(t.output_dir.clone()), load_in_4bit: false, ..model.clone() };
        let mut merged = base.load()?;
        merged.merge_adapter()?;
        let dir = t.output_dir.join("merged");
        save_hf(&merged, &dir, DEFAULT_MAX_SHARD_BYTES)?;
        eprintln!("saved the base model with the adapter merged to {}", dir.display());
    }
    drop(stop_at_step_end);
    if let Some(signal) = runtime::stop_requested() {
        let message = format!(
            "{} came after the last step; the trained model is saved in {}",
            runtime::signal_name(signal),
            t.output_dir.display()
        );
        return Err(Stopped { signal, message }.into());
    }
    if let Some(hub) = &hub {
        hub.finish()?;
    }
    Ok(())
}
