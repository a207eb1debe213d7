//! SFT and KTO train step for step like TRL 1.16 (fixtures: tools/fixtures/make_sft_fixtures.py and
//! make_kto_fixtures.py): 5 optimizer steps on the tiny Llama, every logged metric within 1e-4 relative and the final
//! weights, in TRL's layout and in prefalign's default one (packed rows; KTO's prompt shared between its matched and
//! KL sequences). Packed SFT equals unpacked SFT in loss and gradients.

use crate::common::fixture;
use crate::training::{assert_final_params, assert_history, fixture_config};
use prefalign::data::batches::{Examples, KtoExamples};
use prefalign::data::collate::TruncationMode;
use prefalign::data::kto::prepare_kto;
use prefalign::data::pack::{Batching, PackOptions};
use prefalign::data::sft::{prepare_sft, SftOptions, SftRow};
use prefalign::data::source::read_rows;
use prefalign::data::tokenize::PairTokenizer;
use prefalign::model::{self, tokenizer::TextTokenizer};
use prefalign::objective::kto::KtoLoss;
use prefalign::objective::sft::SftLoss;
use prefalign::objective::{Given, KtoParams, Objective, SftParams};
use prefalign::train::{train, Reference, TrainInputs};
use serde_json::Value;
use tch::{Device, Kind};

fn load_fixture(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(path)).unwrap()).unwrap()
}

/// The SFT rows of a fixture's data, prepared with its settings.
fn sft_rows(expected: &Value, template: Option<&str>) -> Vec<SftRow> {
    let settings = &expected["settings"];
    let mut tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    if let Some(template) = template {
        tokenizer.chat_template = Some(std::fs::read_to_string(fixture(template)).unwrap());
    }
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let options = SftOptions {
        max_length: settings["max_length"].as_u64().map(|m| m as usize),
        assistant_only_loss: settings["assistant_only_loss"].as_bool().unwrap(),
        packing: settings["packing"].as_bool().unwrap(),
        ..SftOptions::default()
    };
    let dataset = settings["dataset"].as_str().unwrap().trim_start_matches("tests/fixtures/");
    let prepared = prepare_sft(read_rows(&fixture(dataset)).unwrap(), &tok, &options);
    assert!(prepared.invalid.is_empty(), "{:?}", prepared.invalid);
    prepared.rows(&options)
}

/// Where a trajectory's reference log-probs come from.
#[derive(Clone, Copy)]
enum ReferenceSource<'a> {
    None,
    /// a model folder under tests/fixtures
    Folder(&'a str),
    /// the policy with its adapters off (TRL with a peft_config and no ref_model)
    Policy,
}

/// Trains the fixture's 5 steps in TRL's layout and in prefalign's default one (from the LoRA adapter `adapter`,
/// when given, as TRL's PEFT run started); every logged value and the final weights as TRL's.
fn check_trajectory(
    name: &str,
    expected: &Value,
    examples: Examples,
    (reference, adapter): (ReferenceSource, Option<&str>),
    objective: &Objective,
    truncation: Option<(usize, TruncationMode)>,
) {
    for layout in [PackOptions::TRL, PackOptions::default()] {
        let mut policy = model::load(&fixture("eval/tiny_policy"), Device::Cpu, Kind::Float).unwrap();
        if let Some(adapter) = adapter {
            policy.load_adapter(&fixture(adapter), "tiny").unwrap();
        }
        let reference_model = match reference {
            ReferenceSource::Folder(path) => {
                let mut model = model::load(&fixture(path), Device::Cpu, Kind::Float).unwrap();
                model.vs.freeze();
                Some(model)
            }
            _ => None,
        };
        let out = tempfile::tempdir().unwrap();
        let config = fixture_config(&expected["settings"], out.path(), Batching { pad_id: 2, truncation, layout });
        let inputs = TrainInputs {
            policy: &policy,
            reference: match (reference, &reference_model) {
                (ReferenceSource::Policy, _) => Reference::Model(&policy),
                (_, Some(model)) => Reference::Model(model),
                _ => Reference::None,
            },
            train: examples,
            eval: None,
            objective,
        };
        let logged = train(&inputs, &config).unwrap();
        let label = format!("{name} ({layout:?})");
        assert_history(&label, &logged, expected, &|_| false);
        assert_final_params(&label, &policy, expected);
    }
}

fn check_sft(name: &str, template: Option<&str>) {
    let expected = load_fixture(&format!("sft/{name}.json"));
    let rows = sft_rows(&expected, template);
    assert_eq!(rows.len(), expected["rows"].as_array().unwrap().len(), "{name}: rows");
    let loss = SftLoss::parse(expected["settings"]["loss_type"].as_str().unwrap()).unwrap();
    let objective = Objective::Sft(SftParams { loss });
    let adapter = expected["settings"].get("lora").map(|_| format!("sft/{name}.initial"));
    let sources = (ReferenceSource::None, adapter.as_deref());
    check_trajectory(name, &expected, Examples::Sft(&rows), sources, &objective, None);
}

#[test]
fn sft_conversational_messages() {
    check_sft("sft_messages", None);
}

#[test]
fn sft_prompt_completion_with_completion_only_loss() {
    check_sft("sft_prompt_completion", None);
}

#[test]
fn sft_prompt_completion_conversational() {
    check_sft("sft_prompt_completion_conversational", None);
}

/// With LoRA (PEFT's adapters on every projection, dropout 0: TRL's masks come from torch's generator), from the
/// adapter TRL's run started from.
#[test]
fn sft_with_lora_adapters() {
    check_sft("sft_lora_messages", None);
}

#[test]
fn sft_text() {
    check_sft("sft_text", None);
}

#[test]
fn sft_packing_bfd() {
    check_sft("sft_packing_bfd", None);
}

#[test]
fn sft_assistant_only_loss() {
    check_sft("sft_assistant_only_loss", Some("sft/chat_template_generation.jinja"));
}

#[test]
fn sft_gradient_accumulation_counts_label_tokens_over_the_step() {
    check_sft("sft_messages_grad_accum", None);
}

fn check_kto(name: &str) {
    let expected = load_fixture(&format!("kto/{name}.json"));
    let settings = &expected["settings"];
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let max_length = settings["max_length"].as_u64().unwrap() as usize;
    let batch_size = settings["per_device_train_batch_size"].as_u64().unwrap() as usize;
    let dataset = settings["dataset"].as_str().unwrap().trim_start_matches("tests/fixtures/");
    let prepared = prepare_kto(read_rows(&fixture(dataset)).unwrap(), &tok, Some(max_length), batch_size);
    let examples = KtoExamples::new(&prepared.sequences);
    let f = |key: &str| settings[key].as_f64().unwrap();
    let objective = Objective::Kto(KtoParams {
        beta: f("beta"),
        loss: KtoLoss::parse(settings["loss_type"].as_str().unwrap()).unwrap(),
        desirable_weight: f("desirable_weight"),
        undesirable_weight: f("undesirable_weight"),
    });
    // no ref_model: with LoRA the policy with its adapters off, else a copy of the policy
    let lora = settings.get("lora").is_some();
    let adapter = lora.then(|| format!("kto/{name}.initial"));
    let reference = match settings["ref_model"].as_str() {
        Some(path) => ReferenceSource::Folder(path.trim_start_matches("tests/fixtures/")),
        None if lora => ReferenceSource::Policy,
        None => ReferenceSource::Folder("eval/tiny_policy"),
    };
    let truncation = Some((max_length, TruncationMode::KeepStart));
    let sources = (reference, adapter.as_deref());
    check_trajectory(name, &expected, Examples::Kto(&examples), sources, &objective, truncation);
}

/// With LoRA (every projection) and no reference model: the reference is the policy with its adapters off.
#[test]
fn kto_with_lora_adapters() {
    check_kto("kto_lora_unpaired");
}

#[test]
fn kto_unpaired_with_a_reference_model() {
    check_kto("kto_unpaired_ref_model");
}

#[test]
fn kto_from_paired_data() {
    check_kto("kto_from_paired");
}

/// TRL's `packing` changes which sequences share a batch, not what a sequence contributes: the same sequences
/// packed (bfd rows, each sequence attending only to itself) and unpacked (right-padded rows) give the same loss and
/// the same gradient of every parameter, within f32 rounding.
#[test]
fn packed_sft_equals_unpacked_sft_in_loss_and_gradients() {
    use prefalign::objective::metrics::MetricLog;
    use prefalign::train::step::{forward_backward, StepOptions};
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let options = SftOptions { max_length: Some(256), ..SftOptions::default() };
    let prepared = prepare_sft(read_rows(&fixture("sft/messages.jsonl")).unwrap(), &tok, &options);
    let unpacked = prepared.rows(&options);
    let packed = prepared.rows(&SftOptions { packing: true, ..options });
    assert!(packed.len() < unpacked.len() && packed.iter().any(|r| r.seq_lengths.len() > 1));
    let objective = Objective::Sft(SftParams::default());
    let run = |rows: &[SftRow]| {
        let policy = model::load(&fixture("eval/tiny_policy"), Device::Cpu, Kind::Float).unwrap();
        let examples = Examples::Sft(rows);
        let batching = Batching { pad_id: 2, truncation: None, layout: PackOptions::TRL };
        let batch = examples.micro_batch(&(0..rows.len()).collect::<Vec<_>>(), &batching).batch;
        let scale = 1.0 / batch.label_tokens() as f64;
        let loss = forward_backward(
            &policy.model,
            &batch,
            &objective,
            &Given::default(),
            scale,
            StepOptions::default(),
            &mut MetricLog::default(),
        );
        let grads: Vec<(String, tch::Tensor)> =
            policy.trainable_variables().into_iter().map(|(n, v)| (n, v.grad().copy())).collect();
        (loss, grads)
    };
    let (loss_unpacked, grads_unpacked) = run(&unpacked);
    let (loss_packed, grads_packed) = run(&packed);
    assert!((loss_packed - loss_unpacked).abs() <= 1e-6 * loss_unpacked.abs(), "{loss_packed} vs {loss_unpacked}");
    for ((name, a), (_, b)) in grads_unpacked.iter().zip(&grads_packed) {
        let scale = a.abs().max().double_value(&[]).max(1e-12);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= 1e-4 * scale, "{name}: gradients differ by {diff} (largest {scale})");
    }
}

fn metrics_rows(out: &std::path::Path) -> Vec<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The fixture's settings as command-line flags (5 steps, constant rate, sequential order, logging each step).
fn fixture_flags(settings: &Value) -> Vec<String> {
    let mut flags = Vec::new();
    for key in
        ["learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "max_length"]
    {
        flags.extend([format!("--{key}"), settings[key].to_string()]);
    }
    flags.extend(
        ["--lr_scheduler_type", "constant", "--logging_steps", "1", "--train_sampling_strategy", "sequential"]
            .map(String::from),
    );
    flags
}

/// `prefalign sft` and `prefalign kto` from the command line, with TRL's flag names, train as the fixtures say;
/// `--completion_only_loss false` and `--packing` reach the data path, KTO's precomputed reference log-probs equal
/// its reference model's.
#[test]
fn the_sft_and_kto_commands_train_as_trl() {
    use crate::lora::ok;
    let dir = tempfile::tempdir().unwrap();
    let model = crate::common::tiny_model_dir(dir.path(), "tiny_policy");
    let reference = crate::common::tiny_model_dir(dir.path(), "tiny_ref");
    let run = |command: &str, fixture_name: &str, data: &str, extra: &[&str]| {
        let expected = load_fixture(fixture_name);
        let out = dir.path().join(fixture_name.replace('/', "_"));
        let _ = std::fs::remove_dir_all(&out);
        let mut args: Vec<String> =
            [command, "--model", model.to_str().unwrap(), "--dataset"].map(String::from).to_vec();
        args.push(fixture(data).to_str().unwrap().to_string());
        args.extend(["--output-dir".to_string(), out.to_str().unwrap().to_string()]);
        args.extend(fixture_flags(&expected["settings"]));
        args.extend(extra.iter().map(|s| s.to_string()));
        let stderr = ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_history(&format!("{command} {extra:?}"), &metrics_rows(&out), &expected, &|_| false);
        stderr
    };
    let stderr = run("sft", "sft/sft_prompt_completion.json", "sft/prompt_completion.jsonl", &[]);
    assert!(stderr.contains("1 dropped"), "{stderr}");
    run("sft", "sft/sft_packing_bfd.json", "sft/messages.jsonl", &["--packing"]);
    run("sft", "sft/sft_messages.json", "sft/messages.jsonl", &["--no-packing", "--no-prefix-sharing"]);
    let reference = reference.to_str().unwrap();
    run("kto", "kto/kto_unpaired_ref_model.json", "kto/unpaired.jsonl", &["--ref_model", reference]);
    // (each run gets its own reference cache: crate::lora::prefalign)
    let stderr = run(
        "kto",
        "kto/kto_from_paired.json",
        "trl_data/standard.jsonl",
        &["--ref_model", reference, "--precompute_ref_log_probs"],
    );
    assert!(stderr.contains("reference log-probs: computed for 28"), "{stderr}");
    // without completion-only loss the prompt is in the loss too: another trajectory
    let out = dir.path().join("full");
    let data = fixture("sft/prompt_completion.jsonl");
    ok(&[
        "sft",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--max-length",
        "64",
        "--completion_only_loss",
        "false",
        "--logging-steps",
        "1",
        "--train-sampling-strategy",
        "sequential",
    ]);
    let full = metrics_rows(&out)[0]["loss"].as_f64().unwrap();
    let trl = load_fixture("sft/sft_prompt_completion.json")["log_history"][0]["loss"].as_f64().unwrap();
    assert!((full - trl).abs() > 1e-3, "{full} vs {trl}");
    // KTO with evaluation (TRL's metrics with eval_), and SFT with LoRA (an adapter is saved)
    let out = dir.path().join("kto-eval");
    let data = fixture("kto/unpaired.jsonl");
    let (data, out_s) = (data.to_str().unwrap(), out.to_str().unwrap());
    let common = ["--model", model.to_str().unwrap(), "--dataset", data, "--output-dir", out_s, "--max-steps", "2"];
    let mut args = vec!["kto"];
    args.extend(common);
    args.extend(["--eval-dataset", data, "--eval-strategy", "steps", "--eval-steps", "1", "--ref-model", reference]);
    ok(&args);
    let evals: Vec<_> = metrics_rows(&out).into_iter().filter(|r| r.contains_key("eval_loss")).collect();
    assert_eq!(evals.len(), 2);
    assert!(evals.iter().all(|r| r.contains_key("eval_kl") && r["eval_loss"].as_f64().unwrap().is_finite()));
    let out = dir.path().join("sft-lora");
    let data = fixture("sft/messages.jsonl");
    ok(&[
        "sft",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--use-peft",
        "--lora-r",
        "4",
    ]);
    assert!(out.join("adapter_model.safetensors").exists() && out.join("adapter_config.json").exists());
}

/// What TRL refuses, prefalign refuses before loading anything, saying why.
#[test]
fn sft_and_kto_refuse_what_trl_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (args, expected) in [
        (&["kto", "--train-sampling-strategy", "random"][..], "--train-sampling-strategy sequential"),
        (&["kto", "--per-device-train-batch-size", "1"], "at least 2"),
        (&["sft", "--packing-strategy", "bfd_split"], "bfd_split is not implemented"),
        (&["sft", "--loss-type", "chunked"], "unknown SFT loss_type"),
        (&["kto", "--loss-type", "bco"], "unknown KTO loss_type"),
        (&["sft", "--completion-only-loss", "maybe"], "not a boolean"),
    ] {
        let mut argv = args.to_vec();
        argv.extend(["--model", "no-such-model", "--dataset", "d.jsonl", "--output-dir", out.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&crate::lora::prefalign(&argv).stderr).into_owned();
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

/// Evaluation scores a batch as TRL's `compute_loss` does in eval mode: the fixtures' `initial_loss` (the first
/// batch, initial weights) is the `eval_loss` of that batch, for SFT and for KTO with its reference model.
#[test]
fn evaluation_gives_trls_loss_of_a_batch() {
    use prefalign::model::lm_head::Precision;
    use prefalign::train::evaluate::{evaluate_examples, EvalOptions, EvalReference};
    let policy = model::load(&fixture("eval/tiny_policy"), Device::Cpu, Kind::Float).unwrap();
    let options = |truncation| EvalOptions {
        batch_size: 4,
        batching: Batching { pad_id: 2, truncation, layout: PackOptions::default() },
        precision: Precision::default(),
    };
    let expected = load_fixture("sft/sft_messages.json");
    let rows = sft_rows(&expected, None);
    let first: Vec<SftRow> = rows[..4].to_vec();
    let objective = Objective::Sft(SftParams::default());
    let metrics = evaluate_examples(&policy.model, None, Examples::Sft(&first), &objective, &options(None));
    let want = expected["initial_loss"].as_f64().unwrap();
    assert!((metrics["eval_loss"] - want).abs() <= 1e-5 * want, "{} vs {want}", metrics["eval_loss"]);
    assert!(metrics.contains_key("eval_entropy") && metrics.contains_key("eval_mean_token_accuracy"));

    let expected = load_fixture("kto/kto_unpaired_ref_model.json");
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let prepared = prepare_kto(read_rows(&fixture("kto/unpaired.jsonl")).unwrap(), &tok, Some(128), 4);
    let examples = KtoExamples::new(&prepared.sequences[..4]);
    let reference = model::load(&fixture("eval/tiny_ref"), Device::Cpu, Kind::Float).unwrap();
    let metrics = evaluate_examples(
        &policy.model,
        Some(EvalReference::Model(&reference.model)),
        Examples::Kto(&examples),
        &Objective::Kto(KtoParams::default()),
        &options(Some((128, TruncationMode::KeepStart))),
    );
    let want = expected["initial_loss"].as_f64().unwrap();
    assert!((metrics["eval_loss"] - want).abs() <= 1e-5 * want, "{} vs {want}", metrics["eval_loss"]);
    assert!(metrics.contains_key("eval_kl") && metrics.contains_key("eval_rewards/margins"), "{metrics:?}");
}

/// Trains 5 steps, and again resumed from the first run's step-3 checkpoint: equal weights and logged rows after it.
fn assert_resume_is_bit_for_bit(
    expected: &Value,
    train_on: Examples,
    eval: Option<Examples>,
    reference: Option<&str>,
    objective: &Objective,
    truncation: Option<(usize, TruncationMode)>,
) {
    use prefalign::train::{Interval, TrainerConfig};
    let reference = reference.map(|path| model::load(&fixture(path), Device::Cpu, Kind::Float).unwrap());
    let run = |out: &std::path::Path, resume: Option<std::path::PathBuf>| {
        let policy = model::load(&fixture("eval/tiny_policy"), Device::Cpu, Kind::Float).unwrap();
        let batching = Batching { pad_id: 2, truncation, layout: PackOptions::default() };
        let config = TrainerConfig {
            save: Interval::Steps(3.0),
            eval: Interval::Steps(2.0),
            resume_from_checkpoint: resume,
            ..fixture_config(&expected["settings"], out, batching)
        };
        let inputs = TrainInputs {
            policy: &policy,
            reference: reference.as_ref().map_or(Reference::None, Reference::Model),
            train: train_on,
            eval,
            objective,
        };
        let rows = train(&inputs, &config).unwrap();
        (policy, rows)
    };
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, rows_a) = run(first.path(), None);
    let (b, rows_b) = run(second.path(), Some(first.path().join("checkpoint-3")));
    for (name, tensor) in a.vs.variables() {
        assert!(tensor.equal(&b.vs.variables()[&name]), "{name} differs after resuming");
    }
    let after: Vec<_> = rows_a.into_iter().filter(|r| r["step"].as_u64().unwrap() > 3).collect();
    assert_eq!(after, rows_b);
}

#[test]
fn sft_and_kto_resume_bit_for_bit() {
    let expected = load_fixture("sft/sft_packing_bfd.json");
    let rows = sft_rows(&expected, None);
    let objective = Objective::Sft(SftParams::default());
    assert_resume_is_bit_for_bit(
        &expected,
        Examples::Sft(&rows),
        Some(Examples::Sft(&rows[..3])),
        None,
        &objective,
        None,
    );

    let expected = load_fixture("kto/kto_unpaired_ref_model.json");
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let prepared = prepare_kto(read_rows(&fixture("kto/unpaired.jsonl")).unwrap(), &tok, Some(128), 4);
    let examples = KtoExamples::new(&prepared.sequences);
    let truncation = Some((128, TruncationMode::KeepStart));
    let objective = Objective::Kto(KtoParams::default());
    let kto = Examples::Kto(&examples);
    assert_resume_is_bit_for_bit(&expected, kto, Some(kto), Some("eval/tiny_ref"), &objective, truncation);
}

/// SFT with LoRA trains with the adapters' dropout, as TRL's SFTTrainer does: it changes the gradients (the first
/// step's loss is the same, B being zero); a seed gives one run, again under gradient checkpointing (each layer
/// recomputed draws its masks again) and across a resume. The model's attention dropout, not applied, is named.
#[test]
fn sft_applies_lora_dropout_reproducibly() {
    use crate::lora::ok;
    let dir = tempfile::tempdir().unwrap();
    let model = crate::common::tiny_model_dir(dir.path(), "tiny_policy");
    let data = fixture("sft/messages.jsonl");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["sft", "--model", model.to_str().unwrap(), "--dataset", data.to_str().unwrap()];
        args.extend(["--output-dir", out.to_str().unwrap(), "--max-steps", "4", "--logging-steps", "1"]);
        args.extend(["--use-peft", "--lora-r", "4", "--learning-rate", "1e-2", "--save-steps", "2"]);
        args.extend(extra);
        let stderr = ok(&args);
        (metrics_rows(&out), out, stderr)
    };
    let value = |rows: &[serde_json::Map<String, Value>], step: usize, key: &str| rows[step][key].as_f64().unwrap();
    let (dropped, out, _) = run("dropout", &["--lora-dropout", "0.3"]);
    let (again, _, _) = run("again", &["--lora-dropout", "0.3"]);
    assert_eq!(dropped, again, "the same seed trained differently");
    let (none, _, _) = run("none", &["--lora-dropout", "0"]);
    assert_eq!(value(&dropped, 0, "loss"), value(&none, 0, "loss"));
    assert_ne!(value(&dropped, 0, "grad_norm"), value(&none, 0, "grad_norm"), "dropout changed no gradient");
    let (checkpointed, _, _) = run("checkpointed", &["--lora-dropout", "0.3", "--gradient-checkpointing"]);
    for step in 0..4 {
        for key in ["loss", "grad_norm"] {
            let (got, want) = (value(&checkpointed, step, key), value(&dropped, step, key));
            assert!((got - want).abs() <= 1e-5 * want.abs(), "step {}: {key} {got} vs {want}", step + 1);
        }
    }
    let checkpoint = out.join("checkpoint-2");
    let (resumed, resumed_out, _) =
        run("resumed", &["--lora-dropout", "0.3", "--resume-from-checkpoint", checkpoint.to_str().unwrap()]);
    assert_eq!(resumed, dropped[2..].to_vec());
    let adapter = |dir: &std::path::Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&resumed_out), adapter(&out), "the resumed run's adapter differs");

    // the model's own attention dropout, which TRL's SFTTrainer would apply too, is named, not silently left out
    let config_path = model.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["attention_dropout"] = serde_json::json!(0.1);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (_, _, stderr) = run("attention-dropout", &[]);
    assert!(stderr.contains("attention_dropout (0.1) is not applied"), "{stderr}");
}
