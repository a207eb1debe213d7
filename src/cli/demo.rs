//! `prefalign demo`: DPO on SmolLM2-135M-Instruct with the preference data that ships in the binary
//! (data/demo, made by tools/make_demo_data.py), showing held-out preference accuracy and answers before and
//! after training, and leaving the trained model as a Hugging Face folder.

use crate::cli::ModelArgs;
use crate::data::chat_template::Message;
use crate::data::collate::TruncationMode;
use crate::data::pack::{Batching, PackOptions};
use crate::data::prepare::{prepare, PrepareOptions, Rules};
use crate::data::source::read_rows;
use crate::data::tokenize::PairTokenizer;
use crate::model::generate::{generate, SamplingOptions};
use crate::model::save::{save_hf, DEFAULT_MAX_SHARD_BYTES};
use crate::model::LoadedModel;
use crate::objective::{DpoParams, Objective};
use crate::train::evaluate::{evaluate, EvalOptions};
use crate::train::reference::{cache_dir, precompute};
use crate::train::schedule::Schedule;
use crate::train::{train, Interval, Reference, TrainInputs, TrainerConfig};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

const TRAIN: &str = include_str!("../../data/demo/train.jsonl");
const TEST: &str = include_str!("../../data/demo/test.jsonl");
/// Held-out questions whose answers are shown before and after training.
const QUESTIONS: [&str; 3] =
    ["What is the capital of Peru?", "How many minutes are in 4 hours?", "Name a fruit that is yellow."];

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The model to align (default: the SmolLM2-135M-Instruct GGUF that scripts/setup.sh fetches)
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    #[arg(long, default_value = "prefalign-demo")]
    output_dir: PathBuf,
    #[arg(long, value_parser = crate::cli::values::non_negative, default_value_t = 5e-6)]
    learning_rate: f64,
    #[arg(long, value_parser = crate::cli::values::positive, default_value_t = 1.0)]
    num_train_epochs: f64,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let model_args = ModelArgs::plain(&args.model, &args.device);
    if !std::path::Path::new(&args.model).exists() {
        anyhow::bail!(
            "{} does not exist: run `bash scripts/setup.sh` first (it fetches SmolLM2-135M-Instruct), or pass --model",
            args.model
        );
    }
    let _lock = crate::files::RunLock::acquire(&args.output_dir)?;
    let policy = model_args.load()?;
    let tokenizer = policy.tokenizer()?;
    let data_dir = args.output_dir.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let mut splits = Vec::new();
    for (name, text) in [("train", TRAIN), ("test", TEST)] {
        let path = data_dir.join(format!("{name}.jsonl"));
        crate::files::write_file_atomically(&path, text)?;
        let tok = PairTokenizer::new(tokenizer)?;
        splits.push(prepare(read_rows(&path)?, &tok, &PrepareOptions::new(Rules::Dpo))?.pairs);
    }
    let (train_pairs, test_pairs) = (&splits[0], &splits[1]);
    println!("DPO demo: {} on {} preference pairs, {} held out", args.model, train_pairs.len(), test_pairs.len());
    println!("(chosen answers are correct and open with \"Sure! \"; rejected ones are wrong or evasive)\n");

    let objective = Objective::Dpo(DpoParams::default());
    let batching = Batching {
        pad_id: tokenizer.pad_id()?,
        truncation: Rules::Dpo.truncation_at_collation(1024, TruncationMode::KeepStart),
        layout: PackOptions::default(),
    };
    let config = TrainerConfig {
        output_dir: args.output_dir.clone(),
        learning_rate: args.learning_rate,
        schedule: Schedule::Constant,
        num_train_epochs: args.num_train_epochs,
        logging: Interval::Steps(5.0),
        save: Interval::No, // the demo keeps the trained model only
        batching,
        ..TrainerConfig::default()
    };
    let precision = config.step.precision;
    let eval_options = EvalOptions { batch_size: 8, batching, precision };
    // Before training the policy is its own reference; its log-probs serve as the reference from then on.
    let reference = precompute(&policy, train_pairs, &batching, precision, 8, &cache_dir(), None)?;
    let score = |label: &str, policy: &LoadedModel| {
        let result = evaluate(&policy.model, None, test_pairs, &objective, &eval_options);
        println!(
            "{label:<7} held-out preference accuracy {:>5.1}%  (chosen log-prob above rejected)",
            100.0 * result.metrics["eval_preference_accuracy"]
        );
    };
    score("before", &policy);
    let answers_before = answers(&policy)?;

    let started = std::time::Instant::now();
    let inputs = TrainInputs {
        policy: &policy,
        reference: Reference::Precomputed { train: &reference, eval: None },
        train: train_pairs.into(),
        eval: None,
        objective: &objective,
    };
    let rows = train(&inputs, &config)?;
    let last = rows.last().context("no training step ran")?;
    println!(
        "trained  {} steps in {:.0} s, final loss {:.3}, reward accuracy {:.2}",
        last["step"],
        started.elapsed().as_secs_f64(),
        last["loss"].as_f64().unwrap_or(f64::NAN),
        last["rewards/accuracies"].as_f64().unwrap_or(f64::NAN)
    );
    score("after", &policy);
    let answers_after = answers(&policy)?;
    for ((question, before), after) in QUESTIONS.iter().zip(answers_before).zip(answers_after) {
        println!("\n> {question}\n  before: {before}\n  after:  {after}");
    }
    save_hf(&policy, &args.output_dir, DEFAULT_MAX_SHARD_BYTES)?;
    println!(
        "\nThe aligned model is in {} (a Hugging Face folder; metrics in metrics.jsonl).",
        args.output_dir.display()
    );
    Ok(())
}

/// Greedy answers to the demo questions.
fn answers(model: &LoadedModel) -> Result<Vec<String>> {
    let tokenizer = model.tokenizer()?;
    let template = tokenizer.chat_template()?;
    let options = SamplingOptions { max_new_tokens: 40, temperature: 0.0, top_p: 1.0, greedy: true, seed: 0 };
    QUESTIONS
        .iter()
        .map(|question| {
            let prompt = template.render(&[Message::new("user", question)], true)?;
            let ids = generate(
                &model.model,
                &tokenizer.encode(&prompt, false)?,
                &model.config().eos_token_ids(),
                &options,
                |_| Ok(()),
            )?;
            Ok(tokenizer.decode(&ids, true)?.trim().replace('\n', " "))
        })
        .collect()
}
