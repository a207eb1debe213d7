//! `prefalign convert`: a model (GGUF or Hugging Face folder), with a LoRA adapter merged into it when --adapter is
//! given, written as a Hugging Face folder.

use crate::cli::ModelArgs;
use crate::model::save::{save_hf, DEFAULT_MAX_SHARD_BYTES};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The folder to write
    #[arg(long)]
    output: PathBuf,
    /// Largest safetensors shard in bytes before splitting (transformers' default: 5 GB)
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    max_shard_size: usize,
}

pub fn merge(args: ConvertArgs) -> Result<()> {
    if args.model.adapter.is_none() {
        bail!("prefalign merge needs --adapter DIR (the LoRA adapter to merge into --model)");
    }
    run(args)
}

pub fn run(args: ConvertArgs) -> Result<()> {
    if args.model.load_in_4bit {
        bail!("--load-in-4bit: a model is written in full precision; leave it out");
    }
    let mut loaded = args.model.load()?;
    loaded.merge_adapter()?;
    save_hf(&loaded, &args.output, args.max_shard_size)?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
