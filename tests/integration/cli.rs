//! The `prefalign` binary end to end on the real SmolLM2 GGUF: generate and convert.

use crate::common;
use crate::common::{smollm2_gguf, tiny_model_dir};
use std::process::Command;

fn prefalign(args: &[&str]) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_prefalign")).args(args).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned());
    assert!(output.status.success(), "prefalign {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn generate_greedy_chat_answers_paris() {
    let gguf = smollm2_gguf();
    let (stdout, _) = prefalign(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--greedy",
        "--max-new-tokens",
        "24",
    ]);
    assert_eq!(stdout.trim(), "The capital of France is Paris.");
}

#[test]
fn sampling_is_deterministic_per_seed() {
    let gguf = smollm2_gguf();
    let run = |seed: &str| {
        prefalign(&[
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt",
            "Tell me a story.",
            "--temperature",
            "0.9",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--max-new-tokens",
            "16",
        ])
        .0
    };
    let first = run("7");
    assert_eq!(first, run("7"));
    assert_ne!(first, run("8"));
}

#[test]
fn system_message_and_raw_mode() {
    let gguf = smollm2_gguf();
    let gguf = gguf.to_str().unwrap();
    let (stdout, _) = prefalign(&[
        "generate",
        "--model",
        gguf,
        "--system",
        "You are a pirate. Always answer like a pirate.",
        "--prompt",
        "Hello!",
        "--greedy",
        "--max-new-tokens",
        "20",
    ]);
    assert!(!stdout.trim().is_empty());
    let (raw, _) = prefalign(&[
        "generate",
        "--model",
        gguf,
        "--raw",
        "--prompt",
        "The capital of France is",
        "--greedy",
        "--max-new-tokens",
        "3",
    ]);
    assert!(raw.contains("Paris"), "{raw}");
}

#[test]
fn convert_then_generate_from_the_hf_folder() {
    let gguf = smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    let (_, stderr) = prefalign(&["convert", "--model", gguf.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(stderr.contains("wrote"), "{stderr}");
    let (stdout, _) = prefalign(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--greedy",
        "--dtype",
        "bf16",
        "--max-new-tokens",
        "24",
    ]);
    assert!(stdout.contains("Paris"), "{stdout}");
}

#[test]
fn eval_writes_per_example_scores_and_trl_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny_model_dir(dir.path(), "tiny_policy");
    let reference = tiny_model_dir(dir.path(), "tiny_ref");
    let output = dir.path().join("per_example.jsonl");
    let dataset = common::fixture("trl_data/standard.jsonl");
    let (stdout, stderr) = prefalign(&[
        "eval",
        "--model",
        policy.to_str().unwrap(),
        "--ref-model",
        reference.to_str().unwrap(),
        "--dataset",
        dataset.to_str().unwrap(),
        "--max-length",
        "64",
        "--allow-empty-completions",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("12 pairs scored (14 rows read, 0 invalid skipped, 2 dropped by the DPO rules)"),
        "{stderr}"
    );
    let metrics: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("eval/dpo_standard.json")).unwrap()).unwrap();
    for name in ["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"] {
        let (ours, theirs) = (metrics[name].as_f64().unwrap(), expected["metrics"][name].as_f64().unwrap());
        assert!((ours - theirs).abs() <= 1e-4 * theirs.abs().max(1.0), "{name}: {ours} vs {theirs}");
    }
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12);
    let first = &expected["rows"][0];
    assert!((lines[0]["chosen_logps"].as_f64().unwrap() - first["chosen_logps"].as_f64().unwrap()).abs() < 1e-3);
    assert!(lines[0]["ref_chosen_logps"].is_f64() && lines[0]["chosen_tokens"] == 5);
}

#[test]
fn data_inspect_reports_counts_and_examples() {
    let tokenizer = common::fixture("trl_data/tokenizer");
    let dataset = common::fixture("trl_data/standard.jsonl");
    let (stdout, _) = prefalign(&[
        "data",
        "inspect",
        "--model",
        tokenizer.to_str().unwrap(),
        "--dataset",
        dataset.to_str().unwrap(),
        "--max-length",
        "64",
        "--allow-empty-completions",
        "--examples",
        "1",
    ]);
    for expected in [
        "rows read    14",
        "pairs kept   12",
        "dropped      2",
        "standard.jsonl:8: the prompt has",
        "[chosen]\n It is blue.<|im_end|>",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

fn prefalign_err(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_prefalign")).args(args).output().unwrap();
    assert!(!output.status.success(), "prefalign {args:?} should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A recipe in TRL's YAML keys, overridden by a flag; checkpoints; resuming the last checkpoint; the trained
/// model saved as a loadable Hugging Face folder.
#[test]
fn dpo_from_a_yaml_recipe_with_checkpoints_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let out = dir.path().join("out");
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "model_name_or_path: {}\ndataset_name: {}\nbeta: 0.1\nloss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.5]\n\
             learning_rate: 1.0e-3\nper_device_train_batch_size: 4\nmax_steps: 2\nlogging_steps: 1\nsave_steps: 2\n\
             max_length: 64\nallow_empty_completions: true\noutput_dir: {}\nreport_to: none\ntrain_sampling_strategy: sequential\n\
             preprocessing_num_workers: 12\ntorch_compile: false\n",
            model.display(),
            common::fixture("trl_data/standard.jsonl").display(),
            out.display()
        ),
    )
    .unwrap();
    let recipe = recipe.to_str().unwrap();
    let (_, stderr) = prefalign(&["dpo", "--config", recipe, "--max-steps", "4"]);
    assert!(stderr.contains("accepted without effect") && stderr.contains("preprocessing_num_workers"), "{stderr}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "the flag overrides the recipe's max_steps");
    assert!(out.join("checkpoint-2/trainer_state.json").exists());
    assert!(out.join("checkpoint-4/optimizer.safetensors").exists(), "a final checkpoint, as transformers saves");
    assert!(std::fs::read_dir(out.join("runs")).unwrap().count() >= 1, "TensorBoard events");
    let trained = prefalign::model::load(&out, tch::Device::Cpu, tch::Kind::Float).unwrap();

    // Resume from checkpoint-2 and reach the same weights.
    let checkpoint = out.join("checkpoint-2");
    let checkpoint = checkpoint.to_str().unwrap();
    let (_, stderr) =
        prefalign(&["dpo", "--config", recipe, "--max-steps", "4", "--resume-from-checkpoint", checkpoint]);
    assert!(stderr.contains("resuming from") && stderr.contains("checkpoint-2"), "{stderr}");
    let resumed = prefalign::model::load(&out, tch::Device::Cpu, tch::Kind::Float).unwrap();
    for (name, tensor) in trained.vs.variables() {
        assert!(tensor.equal(&resumed.vs.variables()[&name]), "{name}");
    }
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), metrics);
    // Resumed at its end (the final checkpoint), a run trains nothing; its summary keeps the last logged loss.
    prefalign(&["dpo", "--config", recipe, "--max-steps", "4", "--resume-from-checkpoint", "last"]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap()).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!((&summary["final_loss"], &summary["global_step"]), (&last["loss"], &last["step"]));

    let err = prefalign_err(&["dpo", "--config", recipe, "--lerning-rate", "1"]);
    assert!(err.contains("--lerning-rate"), "{err}");
    std::fs::write(dir.path().join("typo.yaml"), "lerning_rate: 0.1\n").unwrap();
    let err = prefalign_err(&["dpo", "--config", dir.path().join("typo.yaml").to_str().unwrap()]);
    assert!(err.contains("unknown key \"lerning_rate\"; did you mean \"learning_rate\"?"), "{err}");
}

/// The README's demo, shortened to a few steps: it trains, reports accuracy before and after, and saves.
#[test]
fn demo_runs_end_to_end() {
    let gguf = smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let (stdout, _) = prefalign(&[
        "demo",
        "--model",
        gguf.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--num-train-epochs",
        "0.1",
    ]);
    for expected in [
        "before  held-out preference accuracy",
        "after   held-out preference accuracy",
        "trained  3 steps",
        "> What is the capital of Peru?",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    prefalign::model::load(&out, tch::Device::Cpu, tch::Kind::Float).unwrap();
}

/// `bench` on a tiny shape: every layout and precision runs and reports step time, pairs/s and memory.
#[test]
fn bench_reports_step_time_and_memory() {
    let shape = common::fixture("models/llama/config.json");
    for (objective, flags) in [
        ("dpo", &[][..]),
        ("dpo", &["--no-prefix-sharing", "--no-packing", "--bf16"][..]),
        ("dpo", &["--gradient-checkpointing", "--precompute-ref-log-probs"][..]),
        ("orpo", &["--bf16", "--gradient-checkpointing"][..]),
    ] {
        let mut args =
            vec!["bench", "--json", "--shape", shape.to_str().unwrap(), "--objective", objective, "--steps", "2"];
        args.extend_from_slice(flags);
        let (stdout, _) = prefalign(&args);
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(result["objective"], objective);
        assert!(result["median_step_s"].as_f64().unwrap() > 0.0, "{result}");
        assert!(result["pairs_per_s"].as_f64().unwrap() > 0.0, "{result}");
        assert!(result["peak_rss_gib"].as_f64().unwrap() > 0.0, "{result}");
        assert_eq!(result["bf16"], flags.contains(&"--bf16"));
    }
}

/// A training command line as TRL's scripts take it (transformers' HfArgumentParser): snake_case flags and
/// switches with their value; its log lines where stderr is no terminal, as TRL's.
#[test]
fn trl_command_lines_run_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model_dir(dir.path(), "tiny_policy");
    let data = common::fixture("trl_data/standard.jsonl");
    let out = dir.path().join("out");
    let (_, stderr) = prefalign(&[
        "dpo",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--dataset_name",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate=1e-3",
        "--use_peft",
        "True",
        "--bf16",
        "false",
        "--skip_invalid_rows",
        "--logging_steps",
        "1",
    ]);
    assert!(stderr.contains("saved the trained adapter"), "{stderr}");
    // stderr is no terminal here: each logged row as TRL prints it, and the summary
    assert!(stderr.contains("{'loss': '0.6931', 'grad_norm': '"), "{stderr}");
    assert!(stderr.contains("{'train_runtime': '"), "{stderr}");
}
