//! Training step for step like TRL 1.16 (fixtures: tools/fixtures/make_training_fixtures.py): 5 optimizer steps
//! at lr 1e-3, constant schedule, batch 4, sequential order, max_length 128, f32 on CPU; every logged metric
//! within 1e-4 relative, and the final weights; in TRL's layout and in prefalign's default one (prefix sharing
//! and packing), where ORPO's and CPO's `logits/*` leave out padding, which a packed batch does not compute.
//! With LoRA as TRL + PEFT 0.21.2 train it (tools/fixtures/make_lora_fixtures.py, lr 1e-2), from the fixture's
//! initial adapter, the reference being the policy with that adapter (B = 0: the base model, as TRL's adapters
//! off); the final adapter tensors too.

use crate::common::{fixture, repo_path};
use prefalign::data::collate::{SamplingStrategy, TruncationMode};
use prefalign::data::pack::{Batching, PackOptions};
use prefalign::data::prepare::{prepare, PrepareOptions, Rules};
use prefalign::data::source::read_rows;
use prefalign::data::tokenize::PairTokenizer;
use prefalign::model::{self, tokenizer::TextTokenizer};
use prefalign::objective::dpo::{DpoLoss, LossParams};
use prefalign::objective::{CpoParams, DpoParams, Objective, OrpoParams};
use prefalign::train::optimizer::AdamWConfig;
use prefalign::train::schedule::Schedule;
use prefalign::train::{train, Interval, Reference, TrainInputs, TrainerConfig};
use serde_json::Value;
use tch::{Device, Kind};

fn check(name: &str) {
    check_layout(name, PackOptions::TRL);
    check_layout(name, PackOptions::default());
}

fn check_layout(name: &str, layout: PackOptions) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap()).unwrap();
    let settings = &expected["settings"];
    let s = |key: &str| settings[key].as_str().unwrap_or_else(|| panic!("setting {key}")).to_string();
    let f = |key: &str| settings[key].as_f64().unwrap_or_else(|| panic!("setting {key}"));
    let trainer = s("trainer");
    let is_dpo = trainer == "DPOTrainer";
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let mut options = PrepareOptions::new(if is_dpo { Rules::Dpo } else { Rules::Orpo });
    options.max_length = Some(f("max_length") as usize);
    options.validation.allow_empty_completions = true;
    options.keep_empty_completions = true; // CPO keeps them (finite with summed log-probs)
    let pairs = prepare(read_rows(&repo_path(&s("dataset"))).unwrap(), &tok, &options).unwrap().pairs;

    let mut policy = model::load(&repo_path(&s("policy")), Device::Cpu, Kind::Float).unwrap();
    let lora = settings.get("lora").is_some();
    if lora {
        policy.load_adapter(&fixture(&format!("{name}.initial")), "tiny").unwrap();
    }
    let objective = if is_dpo {
        let losses = settings["loss_type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (DpoLoss::parse(l.as_str().unwrap()).unwrap(), 1.0))
            .collect();
        let loss = LossParams { beta: f("beta"), label_smoothing: f("label_smoothing"), ..LossParams::default() };
        Objective::Dpo(DpoParams { losses, loss, ..DpoParams::default() })
    } else if trainer == "CPOTrainer" {
        let params = CpoParams {
            beta: f("beta"),
            label_smoothing: f("label_smoothing"),
            cpo_alpha: f("cpo_alpha"),
            simpo_gamma: f("simpo_gamma"),
            ..CpoParams::default()
        };
        Objective::Cpo(params.with_loss_type(&s("loss_type")).unwrap())
    } else {
        Objective::Orpo(OrpoParams { beta: f("beta") })
    };
    // No ref_model: TRL's reference is a frozen copy of the policy.
    let reference = (is_dpo && !lora).then(|| {
        let path = settings["ref_model"]
            .as_str()
            .map(repo_path)
            .filter(|p| p.exists())
            .unwrap_or_else(|| repo_path(&s("policy")));
        let mut r = model::load(&path, Device::Cpu, Kind::Float).unwrap();
        r.vs.freeze();
        r
    });
    let out = tempfile::tempdir().unwrap();
    let truncation = is_dpo.then_some((f("max_length") as usize, TruncationMode::KeepStart));
    let config = fixture_config(settings, out.path(), Batching { pad_id: 2, truncation, layout });
    let reference = match &reference {
        _ if is_dpo && lora => Reference::Model(&policy),
        Some(model) => Reference::Model(model),
        None => Reference::None,
    };
    let inputs = TrainInputs { policy: &policy, reference, train: (&pairs).into(), eval: None, objective: &objective };
    let rows = train(&inputs, &config).unwrap();

    let skip_logits = !is_dpo && !layout.is_trl_layout();
    assert_history(&format!("{name} ({layout:?})"), &rows, &expected, &|key| skip_logits && key.starts_with("logits/"));
    if lora {
        use prefalign::model::weights::{SafetensorsFiles, WeightSource};
        let last = SafetensorsFiles::open_dir_file(&fixture(&format!("{name}.final/adapter_model.safetensors")));
        let last = last.unwrap();
        for (param, ours) in policy.adapter_variables() {
            if prefalign::model::lora::is_saved_module(&param) {
                continue; // not in the fixture's file; final_params below checks it
            }
            let saved = prefalign::model::lora::saved_name(&param);
            let theirs = last.tensor(&saved).unwrap().unwrap_or_else(|| panic!("{saved} in the final adapter"));
            let scale = theirs.abs().max().double_value(&[]).max(1.0);
            let diff = (&ours - &theirs).abs().max().double_value(&[]);
            assert!(diff <= 1e-4 * scale, "{name} ({layout:?}): {param} differs by {diff}");
        }
    }
    let line_count = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(line_count, expected["log_history"].as_array().unwrap().len());
    assert_final_params(&format!("{name} ({layout:?})"), &policy, &expected);
}

/// The trainer settings of a fixture made by tools/fixtures/make_*_fixtures.py (logging every step).
pub fn fixture_config(settings: &Value, output_dir: &std::path::Path, batching: Batching) -> TrainerConfig {
    let s = |key: &str| settings[key].as_str().unwrap_or_else(|| panic!("setting {key}")).to_string();
    let f = |key: &str| settings[key].as_f64().unwrap_or_else(|| panic!("setting {key}"));
    TrainerConfig {
        output_dir: output_dir.to_path_buf(),
        learning_rate: f("learning_rate"),
        schedule: Schedule::parse(&s("lr_scheduler_type"), 0.0).unwrap(),
        optimizer: AdamWConfig {
            beta1: f("adam_beta1"),
            beta2: f("adam_beta2"),
            eps: f("adam_epsilon"),
            weight_decay: f("weight_decay"),
        },
        max_grad_norm: f("max_grad_norm"),
        per_device_train_batch_size: f("per_device_train_batch_size") as usize,
        gradient_accumulation_steps: f("gradient_accumulation_steps") as usize,
        num_train_epochs: 1.0,
        max_steps: f("max_steps") as i64,
        logging: Interval::Steps(1.0),
        seed: f("seed") as u64,
        sampling: if s("train_sampling_strategy") == "random" {
            SamplingStrategy::Random
        } else {
            SamplingStrategy::Sequential
        },
        batching,
        ..TrainerConfig::default()
    }
}

/// Every numeric value of every row of the fixture's `log_history` equals ours within 1e-4 relative (`logits/*`
/// relative to at least 1e-2), except the keys `skip` names.
pub fn assert_history(
    name: &str,
    rows: &[serde_json::Map<String, Value>],
    expected: &Value,
    skip: &dyn Fn(&str) -> bool,
) {
    let history = expected["log_history"].as_array().unwrap();
    assert_eq!(rows.len(), history.len(), "{name}: logged steps");
    for (ours, theirs) in rows.iter().zip(history) {
        let step = theirs["step"].as_i64().unwrap();
        for (key, value) in theirs.as_object().unwrap() {
            let Some(want) = value.as_f64() else { continue };
            if skip(key) {
                continue;
            }
            let got =
                ours.get(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("{name} step {step}: {key} not logged"));
            let tolerance = 1e-4 * want.abs().max(if key.starts_with("logits/") { 1e-2 } else { 1.0 });
            assert!((got - want).abs() <= tolerance, "{name} step {step}: {key} = {got}, TRL {want}");
        }
        // prefalign logs num_tokens for every objective (docs/TRAINING.md); TRL's ORPO and CPO do not
        for key in ours.keys().filter(|k| !["num_tokens", "skipped_nonfinite"].contains(&k.as_str())) {
            assert!(theirs.get(key).is_some(), "{name} step {step}: {key} not in TRL's log");
        }
    }
}

/// The sum and L2 norm of every trained parameter equal the fixture's `final_params` within 1e-4 relative.
pub fn assert_final_params(name: &str, policy: &prefalign::model::LoadedModel, expected: &Value) {
    for (param, stats) in expected["final_params"].as_object().unwrap() {
        let ours = policy.vs.variables()[param].to_kind(Kind::Double);
        let (sum, norm) = (ours.sum(Kind::Double).double_value(&[]), ours.norm().double_value(&[]));
        let (want_sum, want_norm) = (stats[0].as_f64().unwrap(), stats[1].as_f64().unwrap());
        assert!(
            (norm - want_norm).abs() <= 1e-4 * want_norm.abs().max(1.0),
            "{name}: {param} norm {norm} vs {want_norm}"
        );
        assert!((sum - want_sum).abs() <= 1e-4 * want_norm.abs().max(1.0), "{name}: {param} sum {sum} vs {want_sum}");
    }
}

#[test]
fn dpo_sigmoid_with_a_reference_model() {
    check("training/dpo_sigmoid_ref_model");
}

#[test]
fn dpo_sigmoid_reference_copy_conversational() {
    check("training/dpo_sigmoid_ref_copy_conversational");
}

#[test]
fn dpo_ipo() {
    check("training/dpo_ipo");
}

#[test]
fn dpo_hinge() {
    check("training/dpo_hinge");
}

#[test]
fn dpo_robust_label_smoothing() {
    check("training/dpo_robust");
}

/// Gradient accumulation 4 over 7 batches per epoch: each epoch's second update takes the 3 batches left, as in
/// transformers 5, and the trajectory runs into a third epoch.
#[test]
fn dpo_accumulation_across_epochs() {
    check("training/dpo_accumulation_across_epochs");
}

/// TRL's default random sampling: the same seeded batches (torch.randperm per epoch), so the same trajectory.
#[test]
fn dpo_random_order() {
    check("training/dpo_random_order");
}

#[test]
fn dpo_qwen2_implicit_prompt() {
    check("training/dpo_qwen2_implicit");
}

#[test]
fn orpo_standard() {
    check("training/orpo_standard");
}

#[test]
fn orpo_conversational() {
    check("training/orpo_conversational");
}

#[test]
fn dpo_lora_on_all_linear_layers() {
    check("lora/dpo_lora_all_linear");
}

#[test]
fn orpo_lora_conversational() {
    check("lora/orpo_lora_conversational");
}

#[test]
fn dpo_qwen2_rslora_on_q_and_v() {
    check("lora/dpo_qwen2_rslora_qv");
}

#[test]
fn dpo_lora_training_the_embeddings_and_output_layer_whole() {
    check("lora/dpo_lora_modules_to_save");
}

#[test]
fn cpo_sigmoid() {
    check("cpo/cpo_sigmoid");
}

#[test]
fn simpo() {
    check("cpo/simpo");
}

#[test]
fn cpo_conversational() {
    check("cpo/cpo_conversational");
}

/// A tiny DPO setup on the fixture data, for the resume and non-finite tests.
struct Setup {
    policy: prefalign::model::LoadedModel,
    reference: prefalign::model::LoadedModel,
    pairs: Vec<prefalign::data::tokenize::TokenizedPair>,
}

fn setup(rules: Rules, max_length: usize, keep_empty: bool) -> Setup {
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let mut options = PrepareOptions::new(rules);
    options.max_length = Some(max_length);
    options.validation.allow_empty_completions = true;
    options.keep_empty_completions = keep_empty;
    let pairs = prepare(read_rows(&fixture("trl_data/standard.jsonl")).unwrap(), &tok, &options).unwrap().pairs;
    let policy = model::load(&fixture("eval/tiny_policy"), Device::Cpu, Kind::Float).unwrap();
    let mut reference = model::load(&fixture("eval/tiny_ref"), Device::Cpu, Kind::Float).unwrap();
    reference.vs.freeze();
    Setup { policy, reference, pairs }
}

fn small_config(out: &std::path::Path) -> TrainerConfig {
    TrainerConfig {
        output_dir: out.to_path_buf(),
        learning_rate: 1e-3,
        schedule: Schedule::Cosine,
        warmup_steps: 1,
        optimizer: AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() },
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        num_train_epochs: 1.0,
        max_steps: 6,
        logging: Interval::Steps(2.0),
        save: Interval::Steps(3.0),
        // the newest two: checkpoint-3 and the final checkpoint-6
        save_total_limit: Some(2),
        per_device_eval_batch_size: 4,
        seed: 7,
        batching: Batching {
            pad_id: 2,
            truncation: Some((64, TruncationMode::KeepStart)),
            layout: PackOptions::default(),
        },
        ..TrainerConfig::default()
    }
}

fn sigmoid_dpo() -> Objective {
    Objective::Dpo(DpoParams::default())
}

/// Stop after step 3 (a checkpoint mid logging window, mid epoch, random order, gradient accumulation),
/// resume in a fresh process state, and the final weights equal an uninterrupted run's bit for bit.
#[test]
fn resume_is_bit_for_bit() {
    let objective = sigmoid_dpo();
    let uninterrupted_dir = tempfile::tempdir().unwrap();
    let a = setup(Rules::Dpo, 64, false);
    let config = small_config(uninterrupted_dir.path());
    let inputs = TrainInputs {
        policy: &a.policy,
        reference: Reference::Model(&a.reference),
        train: (&a.pairs).into(),
        eval: Some(a.pairs[..4].into()),
        objective: &objective,
    };
    let rows_a = train(&inputs, &TrainerConfig { eval: Interval::Steps(3.0), ..config.clone() }).unwrap();
    let checkpoint = uninterrupted_dir.path().join("checkpoint-3");
    assert!(checkpoint.join("model.safetensors").exists() && checkpoint.join("trainer_state.json").exists());
    // The checkpoint is a model folder transformers-style loaders read.
    model::load(&checkpoint, Device::Cpu, Kind::Float).unwrap();

    let resumed_dir = tempfile::tempdir().unwrap();
    let b = setup(Rules::Dpo, 64, false);
    let inputs = TrainInputs {
        policy: &b.policy,
        reference: Reference::Model(&b.reference),
        train: (&b.pairs).into(),
        eval: Some(b.pairs[..4].into()),
        objective: &objective,
    };
    let resumed = TrainerConfig {
        output_dir: resumed_dir.path().to_path_buf(),
        resume_from_checkpoint: Some(checkpoint),
        eval: Interval::Steps(3.0),
        ..config
    };
    let rows_b = train(&inputs, &resumed).unwrap();

    let (va, vb) = (a.policy.vs.variables(), b.policy.vs.variables());
    for (name, tensor) in &va {
        assert!(tensor.equal(&vb[name]), "{name} differs after resuming");
    }
    // The trained model saved as a Hugging Face folder loads back with identical weights.
    let saved = tempfile::tempdir().unwrap();
    prefalign::model::save::save_hf(&a.policy, saved.path(), prefalign::model::save::DEFAULT_MAX_SHARD_BYTES).unwrap();
    let reloaded = model::load(saved.path(), Device::Cpu, Kind::Float).unwrap();
    for (name, tensor) in &va {
        assert!(tensor.equal(&reloaded.vs.variables()[name]), "{name} differs after save + load");
    }
    // The rows logged after the checkpoint are identical too.
    let after: Vec<_> = rows_a.into_iter().filter(|r| r["step"].as_u64().unwrap() > 3).collect();
    assert_eq!(after, rows_b);
}

#[test]
fn nonfinite_loss_stops_naming_step_and_rows_or_is_skipped() {
    // ORPO pairs whose prompt fills max_length keep an empty completion here (TRL's behaviour): a NaN loss.
    let s = setup(Rules::Orpo, 64, true);
    let objective = Objective::Orpo(OrpoParams::default());
    let out = tempfile::tempdir().unwrap();
    let small = small_config(out.path());
    let config = TrainerConfig {
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 1,
        sampling: SamplingStrategy::Sequential,
        batching: Batching { truncation: None, ..small.batching },
        save: Interval::Steps(1.0),
        ..small
    };
    let inputs = TrainInputs {
        policy: &s.policy,
        reference: Reference::None,
        train: (&s.pairs).into(),
        eval: None,
        objective: &objective,
    };
    let err = format!("{:#}", train(&inputs, &config).unwrap_err());
    assert!(err.contains("non-finite loss NaN at step 2") && err.contains("standard.jsonl:8"), "{err}");
    assert!(err.contains("last good checkpoint: ") && err.contains("checkpoint-1"), "{err}");
    let rows = train(&inputs, &TrainerConfig { skip_nonfinite: true, save: Interval::No, ..config }).unwrap();
    assert_eq!(rows.last().unwrap()["step"], 6);
    assert!(rows.last().unwrap()["skipped_nonfinite"].as_u64().unwrap() >= 1);
}

/// Reference log-probs computed once (and read back from the on-disk cache the second time) train and
/// evaluate exactly like running the reference model at every step.
#[test]
fn precomputed_reference_matches_the_reference_model() {
    let cache = tempfile::tempdir().unwrap();
    let objective = sigmoid_dpo();
    let run = |precomputed: bool| {
        let s = setup(Rules::Dpo, 64, false);
        let out = tempfile::tempdir().unwrap();
        let config = TrainerConfig {
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 1,
            sampling: SamplingStrategy::Sequential,
            save: Interval::No,
            eval: Interval::Steps(3.0),
            ..small_config(out.path())
        };
        let eval_pairs = &s.pairs[..5];
        let precompute = |pairs| {
            prefalign::train::reference::precompute(
                &s.reference,
                pairs,
                &config.batching,
                config.step.precision,
                4,
                cache.path(),
                None,
            )
            .unwrap()
        };
        let logps = precomputed.then(|| (precompute(&s.pairs), precompute(eval_pairs)));
        let reference = logps
            .as_ref()
            .map_or(Reference::Model(&s.reference), |(train, eval)| Reference::Precomputed { train, eval: Some(eval) });
        let inputs = TrainInputs {
            policy: &s.policy,
            reference,
            train: (&s.pairs).into(),
            eval: Some(eval_pairs.into()),
            objective: &objective,
        };
        train(&inputs, &config).unwrap()
    };
    let live = run(false);
    assert!(live.iter().any(|row| row.contains_key("eval_rewards/margins")));
    assert_eq!(run(true), live);
    let cached: Vec<_> = std::fs::read_dir(cache.path().join("ref_logps")).unwrap().collect();
    assert_eq!(cached.len(), 2);
    assert_eq!(run(true), live, "from the cache");
}
