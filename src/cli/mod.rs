//! The `prefalign` command line: one file per subcommand.

mod bench;
mod compare;
mod config;
mod convert;
mod data;
mod demo;
mod eval;
mod generate;
mod launch;
mod push;
mod recipe_keys;
pub mod train;
pub mod values;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "prefalign",
    version,
    about = "Align causal language models with human preferences (SFT, DPO, ORPO, SimPO, KTO)",
    after_help = "Training commands also take --config recipe.yaml with TRL / alignment-handbook keys; flags override it, \
                  and may be spelled as TRL's (--learning_rate 1e-5, --bf16 false, --no-bf16).",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// DPO on SmolLM2-135M-Instruct with built-in preference data: accuracy and answers before and after
    Demo(demo::DemoArgs),
    /// Generate text with a model (chat template applied unless --raw)
    Generate(generate::GenerateArgs),
    /// Convert a model (e.g. a GGUF file) into a Hugging Face folder or a GGUF file (--output x.gguf), merging a
    /// LoRA --adapter into it
    Convert(convert::ConvertArgs),
    /// Merge a LoRA adapter into its base model: a Hugging Face folder (convert with --adapter required)
    Merge(convert::ConvertArgs),
    /// Train with DPO (or one of TRL's DPO loss variants)
    Dpo(train::DpoArgs),
    /// Train with ORPO (odds-ratio preference optimization, no reference model)
    Orpo(train::OrpoArgs),
    /// Train with CPO or SimPO (reference-free; --loss-type simpo)
    Cpo(train::CpoArgs),
    /// Supervised fine-tuning (TRL's SFTTrainer): text, prompt-completion or messages rows
    Sft(train::SftArgs),
    /// Train with KTO on unpaired desirable/undesirable examples (or preference pairs, unpaired)
    Kto(train::KtoArgs),
    /// Run a training command on several processes (torchrun's environment; data-parallel over c10d: Gloo, or
    /// NCCL on CUDA)
    Launch(launch::LaunchArgs),
    /// Score a model (and a reference) on preference data: log-probs, rewards, TRL's eval metrics
    Eval(eval::EvalArgs),
    /// Train several recipes (or one over a grid of a parameter) and compare them: a Markdown report with a table
    /// and plots
    Compare(compare::CompareArgs),
    /// Time DPO, ORPO, SFT or KTO steps on a model shape with synthetic examples: median step time, examples/s,
    /// peak memory
    Bench(bench::BenchArgs),
    /// Look at preference data as a trainer will see it, or export it for TRL
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Rows read, format, drops, token-length percentiles and examples through the chat template
    Inspect(data::InspectArgs),
    /// Write the pairs as prefalign reads them (after format conversion, e.g. HH-RLHF transcripts) to JSONL with
    /// TRL's column names, so that TRL trains on exactly the same rows
    Export(data::ExportArgs),
}

/// Where a model comes from and how it is placed, shared by every subcommand that loads one.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder, a .gguf file, or a Hub model "org/name"
    #[arg(long, visible_alias = "model-name-or-path")]
    pub model: String,
    /// cpu, cuda, cuda:N or auto
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The weights' dtype: float32 (f32), bfloat16 (bf16), or auto (the checkpoint's own: its config.json's
    /// dtype / torch_dtype; a GGUF file's blocks load as float32); float16 is refused
    #[arg(long, visible_alias = "torch-dtype", default_value = "f32")]
    pub dtype: String,
    /// A branch, tag or commit of a Hub --model (TRL's model_revision)
    #[arg(long, default_value = "main")]
    pub model_revision: String,
    /// Accepted for recipes (eager, sdpa, flash_attention_2, ...): prefalign runs its own attention, which equals
    /// eager's within rounding and confines packed sequences as flash-attention's varlen kernels do
    #[arg(long)]
    pub attn_implementation: Option<String>,
    /// A chat template (Jinja text) replacing the tokenizer's, as the alignment-handbook's chat_template; saved
    /// with the trained model
    #[arg(long, conflicts_with = "chat_template_path")]
    pub chat_template: Option<String>,
    /// The chat template from a .jinja file or a tokenizer folder (TRL's chat_template_path)
    #[arg(long)]
    pub chat_template_path: Option<PathBuf>,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to apply to --model; training
    /// continues it, taking its rank, alpha and target modules, with the reference as it is now (TRL's "ref" adapter)
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// Keep the projections frozen in 4 bits (bitsandbytes' NF4, blocks of 64), for LoRA training (QLoRA). A GGUF
    /// model trained with LoRA keeps its own quantized blocks without this
    #[arg(long)]
    pub load_in_4bit: bool,
    /// Not supported (bitsandbytes' LLM.int8): use --load-in-4bit, or a Q8_0 GGUF with --use-peft
    #[arg(long)]
    pub load_in_8bit: bool,
    /// The 4-bit type: nf4 (bitsandbytes' fp4 is not supported)
    #[arg(long, default_value = "nf4")]
    pub bnb_4bit_quant_type: String,
    /// With --load-in-4bit: quantize the blocks' scales again, to 8 bits in blocks of 256 (double quantization)
    #[arg(long, visible_alias = "bnb-4bit-use-double-quant")]
    pub use_bnb_nested_quant: bool,
}

impl ModelArgs {
    /// `model` on `device` in f32, as stored.
    pub fn plain(model: &str, device: &str) -> Self {
        ModelArgs {
            model: model.to_string(),
            device: device.to_string(),
            dtype: "f32".into(),
            model_revision: "main".into(),
            attn_implementation: None,
            chat_template: None,
            chat_template_path: None,
            adapter: None,
            load_in_4bit: false,
            load_in_8bit: false,
            bnb_4bit_quant_type: "nf4".into(),
            use_bnb_nested_quant: false,
        }
    }

    /// The model as given, for scoring, generating or converting: with --load-in-4bit its projections in NF4,
    /// else as stored (a GGUF file's dequantized).
    pub fn load(&self) -> anyhow::Result<crate::model::LoadedModel> {
        self.load_with(self.quantization()?)
    }

    /// The model to train: with LoRA (`lora`) a GGUF file's projections stay in their quantized blocks.
    pub fn load_for_training(&self, lora: bool) -> anyhow::Result<crate::model::LoadedModel> {
        let quantization = match self.quantization()? {
            crate::model::BaseQuantization::None if lora => crate::model::BaseQuantization::KeepGguf,
            other => other,
        };
        let loaded = self.load_with(quantization)?;
        if let Some(summary) = loaded.quantized_summary() {
            eprintln!("{}: {summary}", self.model);
        }
        Ok(loaded)
    }

    fn load_with(&self, quantization: crate::model::BaseQuantization) -> anyhow::Result<crate::model::LoadedModel> {
        let device = crate::model::device::parse_device(&self.device)?;
        let path = resolve_model_at(&self.model, Some(&self.model_revision))?;
        let dtype = match self.dtype.as_str() {
            "auto" => crate::model::device::checkpoint_dtype(&path)?,
            other => crate::model::device::parse_dtype(other)?,
        };
        if let Some(attention) = &self.attn_implementation {
            tracing::info!("attn_implementation {attention}: prefalign runs its own attention");
        }
        let template = match (&self.chat_template, &self.chat_template_path) {
            (Some(text), _) => Some(text.clone()),
            (None, Some(path)) if path.is_dir() => {
                Some(crate::model::load_tokenizer(path)?.chat_template.with_context(|| {
                    format!("--chat-template-path {}: its tokenizer has no chat template", path.display())
                })?)
            }
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the chat template {}", path.display()))?,
            ),
            (None, None) => None,
        };
        let mut loaded = crate::model::load_with(&path, device, dtype, quantization)?;
        if let Some(template) = template {
            let tokenizer = loaded.tokenizer.as_mut().context("--chat-template: the model has no tokenizer")?;
            tokenizer.chat_template = Some(template);
            tokenizer.chat_template()?; // compiles, so that a broken template fails here
        }
        if let Some(adapter) = &self.adapter {
            loaded.load_adapter(adapter, &self.model)?;
        }
        Ok(loaded)
    }

    /// The --load-in-* flags, checked.
    fn quantization(&self) -> anyhow::Result<crate::model::BaseQuantization> {
        if self.load_in_8bit {
            anyhow::bail!(
                "--load-in-8bit (bitsandbytes' LLM.int8, with its outlier decomposition) is not supported: use \
                 --load-in-4bit, or a Q8_0 GGUF model with --use-peft"
            );
        }
        if !self.load_in_4bit {
            if self.use_bnb_nested_quant {
                tracing::warn!("--use-bnb-nested-quant has no effect without --load-in-4bit");
            }
            return Ok(crate::model::BaseQuantization::None);
        }
        if self.bnb_4bit_quant_type != "nf4" {
            anyhow::bail!("--bnb-4bit-quant-type {}: prefalign quantizes to nf4 only", self.bnb_4bit_quant_type);
        }
        Ok(crate::model::BaseQuantization::Nf4 { double_quant: self.use_bnb_nested_quant })
    }

    /// The same placement and quantization for another model (a reference model), without the adapter.
    pub fn with_model(&self, model: &str) -> Self {
        let revision = if model == self.model { self.model_revision.clone() } else { "main".into() };
        Self { model: model.to_string(), model_revision: revision, adapter: None, ..self.clone() }
    }
}

/// How batches run: layout (prefix sharing, packing), autocast and gradient checkpointing.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Run chosen and rejected as separate padded rows (TRL's layout) instead of sharing the prompt
    #[arg(long)]
    pub no_prefix_sharing: bool,
    /// One row per pair (or per sequence) instead of packing several pairs per row without padding
    #[arg(long)]
    pub no_packing: bool,
    /// With packing: the most tokens in one row (0: the longest pair's; a longer pair gets a row of its own)
    #[arg(long, default_value_t = 0)]
    pub pack_tokens: usize,
    /// Mixed precision: matrix products in bfloat16, f32 master weights, norms and softmax statistics
    #[arg(long)]
    pub bf16: bool,
    /// Recompute each layer during the backward pass instead of keeping its activations
    #[arg(long)]
    pub gradient_checkpointing: bool,
}

impl ComputeArgs {
    pub fn layout(&self) -> crate::data::pack::PackOptions {
        crate::data::pack::PackOptions {
            prefix_sharing: !self.no_prefix_sharing,
            packing: !self.no_packing,
            row_tokens: self.pack_tokens,
        }
    }

    pub fn step(&self) -> crate::train::step::StepOptions {
        crate::train::step::StepOptions {
            precision: crate::model::lm_head::Precision { cast: self.bf16.then_some(tch::Kind::BFloat16) },
            gradient_checkpointing: self.gradient_checkpointing,
            lora_dropout: None, // the trainer's, per step
        }
    }
}

/// A local model path, or a Hub model id downloaded (or taken from the cache) to a local folder.
pub fn resolve_model(model: &str) -> anyhow::Result<PathBuf> {
    resolve_model_at(model, None)
}

/// `resolve_model` at a Hub revision (default `main`).
pub fn resolve_model_at(model: &str, revision: Option<&str>) -> anyhow::Result<PathBuf> {
    if !std::path::Path::new(model).exists() && crate::data::hub::looks_like_repo_id(model) {
        return crate::data::hub::model_dir(&crate::data::hub::HubSettings::from_env(), model, revision)
            .with_context(|| format!("{model} is no local path, so it was read as a Hub model id"));
    }
    Ok(PathBuf::from(model))
}

/// Expands `--config` and parses `argv` as `main` does, without running anything (for tests and fuzzing).
pub fn parse_args(argv: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let argv = config::expand(argv, &Cli::command())?;
    Cli::try_parse_from(argv)?;
    Ok(())
}

/// Runs the CLI; returns the process exit code. User mistakes print one `error:` line chain, no backtrace.
pub fn main() -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("PREFALIGN_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let argv = match config::expand(std::env::args_os().collect(), &Cli::command()) {
        Ok(argv) => argv,
        Err(error) => {
            eprintln!("error: {error:#}");
            return 2;
        }
    };
    let cli = Cli::parse_from(argv);
    crate::runtime::handle_stop_signals();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Merge(args) => convert::merge(args),
        Command::Eval(args) => eval::run(args),
        Command::Dpo(args) => train::run_dpo(args),
        Command::Orpo(args) => train::run_orpo(args),
        Command::Cpo(args) => train::run_cpo(args),
        Command::Sft(args) => train::run_sft(args),
        Command::Kto(args) => train::run_kto(args),
        Command::Launch(args) => launch::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Data(DataCommand::Inspect(args)) => data::inspect(args),
        Command::Data(DataCommand::Export(args)) => data::export(args),
    };
    match result {
        Ok(()) => 0,
        Err(error) if error.downcast_ref::<crate::train::run::Stopped>().is_some() => {
            let stopped = error.downcast_ref::<crate::train::run::Stopped>().expect("checked");
            eprintln!("{stopped}");
            128 + stopped.signal
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    }
}
