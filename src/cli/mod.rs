//! The `prefalign` command line: one file per subcommand.

mod convert;
mod generate;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "prefalign", version, about = "Align causal language models with human preferences (DPO, ORPO, SimPO)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model (chat template applied unless --raw)
    Generate(generate::GenerateArgs),
    /// Convert a model (e.g. a GGUF file) into a Hugging Face folder
    Convert(convert::ConvertArgs),
}

/// Where a model comes from and how it is placed, shared by every subcommand that loads one.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder or a .gguf file
    #[arg(long, visible_alias = "model-name-or-path")]
    pub model: PathBuf,
    /// cpu, cuda, cuda:N or auto
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 or bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<crate::model::LoadedModel> {
        let device = crate::model::device::parse_device(&self.device)?;
        let dtype = crate::model::device::parse_dtype(&self.dtype)?;
        crate::model::load(&self.model, device, dtype)
    }
}

/// Runs the CLI; returns the process exit code. User mistakes print one `error:` line chain, no backtrace.
pub fn main() -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PREFALIGN_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Convert(args) => convert::run(args),
    };
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    }
}
