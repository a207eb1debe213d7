//! `prefalign demo`: DPO on SmolLM2-135M-Instruct with the preference data that ships in the binary
//! (data/demo, made by tools/make_demo_data.py), showing held-out preference accuracy and answers before and
//! after training, and leaving the trained model as a Hugging Face folder.

use crate::cli::ModelArgs;
use crate::data::collate::{SamplingStrategy, TruncationMode};
use crate::data::pack::PackOptions;
use crate::data::prepare::{prepare, PrepareOptions, Rules};
use crate::data::source::read_rows;
use crate::data::tokenize::PairTokenizer;
use crate::model::generate::{generate, SamplingOptions};
use crate::model::save::{save_hf, DEFAULT_MAX_SHARD_BYTES};
use crate::model::LoadedModel;
use crate::data::chat_template::Message;
use crate::objective::dpo::{DpoLoss, LossParams};
use crate::objective::evaluate::{evaluate, EvalOptions};
use crate::objective::reference::precompute;
use crate::objective::Objective;
use crate::train::optimizer::AdamWConfig;
use crate::train::schedule::Schedule;
use crate::train::step::StepOptions;
use crate::train::trainer::{train, Reference, TrainInputs, TrainerConfig};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

const TRAIN: &str = include_str!("../../data/demo/train.jsonl");
const TEST: &str = include_str!("../../data/demo/test.jsonl");
/// Held-out questions whose answers are shown before and after training.
const QUESTIONS: [&str; 3] = ["What is the capital of Peru?", "How many minutes are in 4 hours?", "Name a fruit that is yellow."];

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The model to align (default: the SmolLM2-135M-Instruct GGUF that scripts/setup.sh fetches)
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    #[arg(long, default_value = "prefalign-demo")]
    output_dir: PathBuf,
    #[arg(long, default_value_t = 5e-6)]
    learning_rate: f64,
    #[arg(long, default_value_t = 1.0)]
    num_train_epochs: f64,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let model_args = ModelArgs { model: args.model.clone(), device: args.device.clone(), dtype: "f32".into() };
    if !std::path::Path::new(&args.model).exists() {
        anyhow::bail!("{} does not exist: run `bash scripts/setup.sh` first (it fetches SmolLM2-135M-Instruct), or pass --model", args.model);
    }
    let policy = model_args.load()?;
    let tokenizer = policy.tokenizer()?;
    let data_dir = args.output_dir.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let mut splits = Vec::new();
    for (name, text) in [("train", TRAIN), ("test", TEST)] {
        let path = data_dir.join(format!("{name}.jsonl"));
        std::fs::write(&path, text)?;
        let tok = PairTokenizer::new(tokenizer)?;
        splits.push(prepare(read_rows(&path)?, &tok, &PrepareOptions::new(Rules::Dpo))?.pairs);
    }
    let (train_pairs, test_pairs) = (&splits[0], &splits[1]);
    println!("DPO demo: {} on {} preference pairs, {} held out", args.model, train_pairs.len(), test_pairs.len());
    println!("(chosen answers are correct and open with \"Sure! \"; rejected ones are wrong or evasive)\n");

    let objective = Objective::Dpo {
        losses: vec![(DpoLoss::Sigmoid, 1.0)],
        params: LossParams { beta: 0.1, label_smoothing: 0.0, discopop_tau: 0.05 },
        reference_free: false,
    };
    let pad_id = tokenizer.pad_id()?;
    let truncation = Some((1024, TruncationMode::KeepStart));
    let (layout, step) = (PackOptions::default(), StepOptions::default());
    let eval_options = EvalOptions { batch_size: 8, pad_id, truncation, layout, precision: step.precision };
    // Before training the policy is its own reference; its log-probs serve as the reference from then on.
    let reference = precompute(&policy, train_pairs, pad_id, truncation, layout, step.precision, 8)?;
    let score = |label: &str, policy: &LoadedModel| {
        let result = evaluate(&policy.model, None, test_pairs, &objective, &eval_options);
        println!(
            "{label:<7} held-out preference accuracy {:>5.1}%  (chosen log-prob above rejected)",
            100.0 * result.metrics["eval_preference_accuracy"]
        );
    };
    score("before", &policy);
    let answers_before = answers(&policy)?;

    let config = TrainerConfig {
        output_dir: args.output_dir.clone(),
        learning_rate: args.learning_rate,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        warmup_ratio: 0.0,
        optimizer: AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
        max_grad_norm: 1.0,
        per_device_train_batch_size: 8,
        gradient_accumulation_steps: 1,
        num_train_epochs: args.num_train_epochs,
        max_steps: -1,
        logging_steps: 5,
        save_steps: 0,
        save_total_limit: None,
        eval_steps: 0,
        per_device_eval_batch_size: 8,
        seed: 42,
        sampling: SamplingStrategy::Random,
        pad_id,
        truncation,
        layout,
        step,
        skip_nonfinite: false,
        resume_from_checkpoint: None,
    };
    let started = std::time::Instant::now();
    let inputs = TrainInputs { policy: &policy, reference: Reference::Precomputed { train: &reference, eval: None }, train: train_pairs, eval: None, objective: &objective };
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
    println!("\nThe aligned model is in {} (a Hugging Face folder; metrics in metrics.jsonl).", args.output_dir.display());
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
            let ids = generate(&model.model, &tokenizer.encode(&prompt, false)?, &model.config().eos_token_ids(), &options, |_| Ok(()))?;
            Ok(tokenizer.decode(&ids, true)?.trim().replace('\n', " "))
        })
        .collect()
}
