//! `prefalign eval`: per-example log-probs and rewards of a model (and a reference) on preference data, with
//! TRL's evaluation metrics.

use crate::cli::data::{DatasetArgs, RulesArg};
use crate::cli::{ComputeArgs, ModelArgs};
use crate::objective::dpo::{DpoParams, LossParams};
use crate::objective::{Objective, OrpoParams};
use crate::train::evaluate::{evaluate, EvalOptions, EvalReference};
use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A reference model (same tokenizer); without one, rewards are reference-free (β·log-prob)
    #[arg(long)]
    ref_model: Option<String>,
    #[command(flatten)]
    data: DatasetArgs,
    #[command(flatten)]
    compute: ComputeArgs,
    /// dpo: summed log-probs and the sigmoid DPO loss; orpo: averaged log-probs and the ORPO loss
    #[arg(long, value_enum, default_value = "dpo")]
    objective: RulesArg,
    #[arg(long, value_parser = crate::cli::values::positive, default_value_t = LossParams::default().beta)]
    beta: f64,
    #[arg(long, visible_alias = "per-device-eval-batch-size", value_parser = crate::cli::values::at_least_one, default_value_t = 4)]
    batch_size: usize,
    /// Write one JSON object per example here
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let policy = args.model.load()?;
    let reference = args.ref_model.as_ref().map(|r| args.model.with_model(r).load()).transpose()?;
    let tokenizer = policy.tokenizer()?;
    let rules = args.objective.rules();
    let prepared = args.data.prepare(tokenizer, rules)?;
    let objective = match args.objective {
        RulesArg::Dpo => Objective::Dpo(DpoParams {
            loss: LossParams { beta: args.beta, ..LossParams::default() },
            reference_free: reference.is_none(),
            ..DpoParams::default()
        }),
        RulesArg::Orpo => Objective::Orpo(OrpoParams { beta: args.beta }),
    };
    let options = EvalOptions {
        batch_size: args.batch_size,
        batching: args.data.batching(rules, tokenizer.pad_id()?, args.compute.layout()),
        precision: args.compute.step().precision,
    };
    let result = evaluate(
        &policy.model,
        reference.as_ref().map(|r| EvalReference::Model(&r.model)),
        &prepared.pairs,
        &objective,
        &options,
    );
    if let Some(path) = &args.output {
        crate::files::write_atomically(path, |tmp| {
            let mut file = std::io::BufWriter::new(std::fs::File::create(tmp)?);
            for example in &result.examples {
                writeln!(file, "{}", serde_json::to_string(example)?)?;
            }
            Ok(file.flush()?)
        })?;
    }
    eprintln!("{} pairs scored ({})", prepared.pairs.len(), prepared.report.counts(rules));
    println!("{}", serde_json::to_string_pretty(&result.metrics)?);
    Ok(())
}
