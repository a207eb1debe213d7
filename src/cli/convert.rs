//! `prefalign convert`: a model (GGUF or Hugging Face folder) written as a Hugging Face folder.

use crate::cli::ModelArgs;
use crate::model::save::{save_hf, DEFAULT_MAX_SHARD_BYTES};
use anyhow::Result;
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

pub fn run(args: ConvertArgs) -> Result<()> {
    let loaded = args.model.load()?;
    save_hf(&loaded, &args.output, args.max_shard_size)?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
