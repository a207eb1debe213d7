//! `prefalign convert`: a model (GGUF or Hugging Face folder), with a LoRA adapter merged into it when --adapter is
//! given, written as a Hugging Face folder, or as a GGUF file when --output ends in `.gguf`.

use crate::cli::ModelArgs;
use crate::model::gguf::export::{write_gguf, write_lora_gguf, OutType};
use crate::model::save::{save_hf, DEFAULT_MAX_SHARD_BYTES};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The folder to write, or a .gguf file (llama.cpp's format)
    #[arg(long)]
    output: PathBuf,
    /// GGUF output: the matrices' type, f32, f16, bf16 or q8_0 (default: the source's precision, f32 for a GGUF)
    #[arg(long)]
    outtype: Option<String>,
    /// With --adapter and a .gguf --output: write the adapter alone, as a llama.cpp LoRA adapter (llama-cli --lora)
    #[arg(long)]
    adapter_only: bool,
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
    let gguf = args.output.extension().is_some_and(|e| e == "gguf");
    if args.outtype.is_some() && !gguf {
        bail!("--outtype applies to a .gguf --output; a folder is written in --dtype");
    }
    if args.adapter_only && (args.model.adapter.is_none() || !gguf) {
        bail!(
            "--adapter-only writes the --adapter as a llama.cpp LoRA adapter: it needs --adapter and a .gguf --output"
        );
    }
    let mut loaded = args.model.load()?;
    if args.adapter_only {
        let name = args.model.adapter.as_ref().and_then(|a| a.file_name()).map(|n| n.to_string_lossy().into_owned());
        let outtype = args.outtype.as_deref().map(OutType::parse).transpose()?.unwrap_or(OutType::F32);
        write_lora_gguf(&loaded, &args.output, outtype, &name.unwrap_or_default())?;
        eprintln!("wrote {}", args.output.display());
        return Ok(());
    }
    loaded.merge_adapter()?;
    if gguf {
        let config = loaded.config();
        let outtype = match &args.outtype {
            Some(name) => OutType::parse(name)?,
            None => OutType::of_dtype(config.torch_dtype.as_deref().or(config.dtype.as_deref())),
        };
        let name = std::path::Path::new(&args.model.model)
            .file_stem()
            .map_or_else(|| args.model.model.clone(), |stem| stem.to_string_lossy().into_owned());
        write_gguf(&loaded, &args.output, outtype, &name)?;
    } else {
        save_hf(&loaded, &args.output, args.max_shard_size)?;
    }
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
