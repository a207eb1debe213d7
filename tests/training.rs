//! Training step for step like TRL 1.16 (fixtures: tools/fixtures/make_training_fixtures.py): 5 optimizer steps
//! at lr 1e-3, constant schedule, batch 4, sequential order, max_length 128, f32 on CPU; every logged metric
//! within 1e-4 relative, and the final weights.

mod common;

use common::{fixture, repo_path};
use prefalign::data::collate::{SamplingStrategy, TruncationMode};
use prefalign::data::prepare::{prepare, PrepareOptions, Rules};
use prefalign::data::source::read_rows;
use prefalign::data::tokenize::PairTokenizer;
use prefalign::model::{self, tokenizer::TextTokenizer};
use prefalign::objective::dpo::{DpoLoss, LossParams};
use prefalign::objective::Objective;
use prefalign::train::optimizer::AdamWConfig;
use prefalign::train::schedule::Schedule;
use prefalign::train::trainer::{train, TrainerConfig};
use serde_json::Value;
use tch::{Device, Kind};

fn check(name: &str) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("training/{name}.json"))).unwrap()).unwrap();
    let settings = &expected["settings"];
    let s = |key: &str| settings[key].as_str().unwrap_or_else(|| panic!("setting {key}")).to_string();
    let f = |key: &str| settings[key].as_f64().unwrap_or_else(|| panic!("setting {key}"));
    let is_dpo = s("trainer") == "DPOTrainer";
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let mut options = PrepareOptions::new(if is_dpo { Rules::Dpo } else { Rules::Orpo });
    options.max_length = Some(f("max_length") as usize);
    options.validation.allow_empty_completions = true;
    let pairs = prepare(read_rows(&repo_path(&s("dataset"))).unwrap(), &tok, &options).unwrap().pairs;

    let policy = model::load(&repo_path(&s("policy")), Device::Cpu, Kind::Float).unwrap();
    let objective = if is_dpo {
        let losses = settings["loss_type"].as_array().unwrap().iter().map(|l| (DpoLoss::parse(l.as_str().unwrap()).unwrap(), 1.0)).collect();
        Objective::Dpo {
            losses,
            params: LossParams { beta: f("beta"), label_smoothing: f("label_smoothing"), discopop_tau: 0.05 },
            reference_free: false,
        }
    } else {
        Objective::Orpo { beta: f("beta") }
    };
    // No ref_model: TRL's reference is a frozen copy of the policy.
    let reference = is_dpo.then(|| {
        let path = settings["ref_model"].as_str().map(repo_path).filter(|p| p.exists()).unwrap_or_else(|| repo_path(&s("policy")));
        let mut r = model::load(&path, Device::Cpu, Kind::Float).unwrap();
        r.vs.freeze();
        r
    });
    let out = tempfile::tempdir().unwrap();
    let config = TrainerConfig {
        output_dir: out.path().to_path_buf(),
        learning_rate: f("learning_rate"),
        schedule: Schedule::parse(&s("lr_scheduler_type"), 0.0).unwrap(),
        warmup_steps: 0,
        warmup_ratio: 0.0,
        optimizer: AdamWConfig { beta1: f("adam_beta1"), beta2: f("adam_beta2"), eps: f("adam_epsilon"), weight_decay: f("weight_decay") },
        max_grad_norm: f("max_grad_norm"),
        per_device_train_batch_size: f("per_device_train_batch_size") as usize,
        gradient_accumulation_steps: 1,
        num_train_epochs: 1.0,
        max_steps: f("max_steps") as i64,
        logging_steps: 1,
        seed: 42,
        sampling: SamplingStrategy::Sequential,
        pad_id: 2,
        truncation: is_dpo.then_some((f("max_length") as usize, TruncationMode::KeepStart)),
    };
    let rows = train(&policy.vs, &policy.model, reference.as_ref().map(|r| &r.model), &pairs, &objective, &config).unwrap();

    let history = expected["log_history"].as_array().unwrap();
    assert_eq!(rows.len(), history.len(), "{name}: logged steps");
    for (ours, theirs) in rows.iter().zip(history) {
        let step = theirs["step"].as_i64().unwrap();
        for (key, value) in theirs.as_object().unwrap() {
            let Some(want) = value.as_f64() else { continue };
            let got = ours.get(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("{name} step {step}: {key} not logged"));
            let tolerance = 1e-4 * want.abs().max(if key.starts_with("logits/") { 1e-2 } else { 1.0 });
            assert!((got - want).abs() <= tolerance, "{name} step {step}: {key} = {got}, TRL {want}");
        }
    }
    let line_count = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(line_count, history.len());
    for (param, stats) in expected["final_params"].as_object().unwrap() {
        let ours = policy.vs.variables()[param].to_kind(Kind::Double);
        let (sum, norm) = (ours.sum(Kind::Double).double_value(&[]), ours.norm().double_value(&[]));
        let (want_sum, want_norm) = (stats[0].as_f64().unwrap(), stats[1].as_f64().unwrap());
        assert!((norm - want_norm).abs() <= 1e-4 * want_norm.abs().max(1.0), "{name}: {param} norm {norm} vs {want_norm}");
        assert!((sum - want_sum).abs() <= 1e-4 * want_norm.abs().max(1.0), "{name}: {param} sum {sum} vs {want_sum}");
    }
}

#[test]
fn dpo_sigmoid_with_a_reference_model() {
    check("dpo_sigmoid_ref_model");
}

#[test]
fn dpo_sigmoid_reference_copy_conversational() {
    check("dpo_sigmoid_ref_copy_conversational");
}

#[test]
fn dpo_ipo() {
    check("dpo_ipo");
}

#[test]
fn dpo_hinge() {
    check("dpo_hinge");
}

#[test]
fn dpo_robust_label_smoothing() {
    check("dpo_robust");
}

#[test]
fn dpo_qwen2_implicit_prompt() {
    check("dpo_qwen2_implicit");
}

#[test]
fn orpo_standard() {
    check("orpo_standard");
}

#[test]
fn orpo_conversational() {
    check("orpo_conversational");
}
