//! Recipes as TRL and the alignment-handbook write them run unchanged: the handbook's dataset mixing equals what
//! its own code makes with `datasets` (tests/fixtures/recipes, by tools/fixtures/make_recipe_fixtures.py), its
//! recipes' keys train as they say, and every key prefalign refuses says why.

use crate::common::{self, fixture, tiny_model_dir};
use crate::lora::{ok, prefalign};
use prefalign::data::hub::Selection;
use prefalign::data::mixture::{legacy_mixer, parse_mixer, Mixture};
use prefalign::data::source::{read_dataset, ReadRows};
use serde_json::Value;
use std::path::Path;

fn chosen_answers(read: &ReadRows) -> Vec<String> {
    read.rows
        .iter()
        .map(|row| {
            let chosen = row.fields["chosen"].as_array().expect("chosen messages");
            chosen.last().unwrap()["content"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn mixtures_equal_the_handbooks_on_datasets() {
    let text = std::fs::read_to_string(fixture("recipes/mixtures.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let splits = if let Some(mixture) = case.get("dataset_mixture") {
            Mixture::parse(&mixture.to_string())
                .unwrap()
                .build(|d, c, s| read_dataset(d, &Selection { config: c, ..Selection::default() }, s))
                .unwrap()
        } else {
            let mixer = parse_mixer(&case["dataset_mixer"].to_string()).unwrap();
            let splits: Vec<String> =
                case["dataset_splits"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect();
            legacy_mixer(&mixer, &splits, &[], |d, c, s| {
                read_dataset(d, &Selection { config: c, ..Selection::default() }, s)
            })
            .unwrap()
        };
        let expected = case["answers"].as_object().unwrap();
        let mut expected_splits: Vec<&String> = expected.keys().collect();
        expected_splits.sort();
        assert_eq!(splits.keys().collect::<Vec<_>>(), expected_splits, "{name}");
        for (split, answers) in expected {
            let answers: Vec<String> = answers.as_array().unwrap().iter().map(|a| a.as_str().unwrap().into()).collect();
            assert_eq!(chosen_answers(&splits[split]), answers, "{name}: split {split}");
        }
        if name == "two_datasets_weighted_with_test_split" {
            // columns selected as the mixture says
            let fields: Vec<&String> = splits["train"].rows[0].fields.keys().collect();
            assert_eq!(fields, ["chosen", "rejected"], "{name}");
        }
    }
}

#[test]
fn a_dataset_cards_configs_choose_the_files() {
    let prefs = fixture("recipes/prefs");
    let prefs = prefs.to_str().unwrap();
    assert_eq!(
        read_dataset(prefs, &Selection { config: None, ..Selection::default() }, "test_prefs").unwrap().rows.len(),
        8
    );
    assert_eq!(
        read_dataset(prefs, &Selection { config: Some("default"), ..Selection::default() }, "train_prefs")
            .unwrap()
            .rows
            .len(),
        24
    );
    let err =
        format!("{:#}", read_dataset(prefs, &Selection { config: None, ..Selection::default() }, "train").unwrap_err());
    assert!(err.contains("no split \"train\"") && err.contains("train_prefs, test_prefs"), "{err}");
    let err = format!(
        "{:#}",
        read_dataset(prefs, &Selection { config: Some("other"), ..Selection::default() }, "train_prefs").unwrap_err()
    );
    assert!(err.contains("no config \"other\""), "{err}");
    // data_files, as load_dataset takes them: patterns for train, or per split; the card does not apply then
    let files = |spec: &str, split: &str| {
        let select = Selection { data_files: Some(spec), ..Selection::default() };
        read_dataset(prefs, &select, split).map(|r| r.rows.len())
    };
    assert_eq!(files("data/test_prefs-*", "train").unwrap(), 8);
    assert_eq!(files("data/test_prefs-*.parquet,data/train_prefs-*", "train").unwrap(), 32);
    assert_eq!(files(r#"{"train": "data/train_prefs-*", "dev": ["data/test_prefs-*"]}"#, "dev").unwrap(), 8);
    let err = format!("{:#}", files("data/test_prefs-*", "test").unwrap_err());
    assert!(err.contains("no split \"test\""), "{err}");
    // without a card: files named by split, as `datasets` finds them
    let b = fixture("recipes/prefs_b");
    assert_eq!(
        read_dataset(b.to_str().unwrap(), &Selection { config: None, ..Selection::default() }, "test")
            .unwrap()
            .rows
            .len(),
        4
    );
    let err = format!(
        "{:#}",
        read_dataset(b.to_str().unwrap(), &Selection { config: None, ..Selection::default() }, "validation")
            .unwrap_err()
    );
    assert!(err.contains("splits that seem available: test, train"), "{err}");
}

const TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
                        {% if add_generation_prompt %}<|assistant|>{% endif %}";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn metrics(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The handbook's DPO recipe style (zephyr-7b-beta's keys), on the fixture model and Hub-laid-out data.
#[test]
fn a_handbook_dpo_recipe_with_a_dataset_mixture_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let out = dir.path().join("zephyr-dpo");
    let recipe = format!(
        "# Model arguments
model_name_or_path: {model}
model_revision: main
torch_dtype: auto
attn_implementation: flash_attention_2
# Data training arguments
chat_template: {template:?}
dataset_mixture:
  datasets:
    - id: {prefs}
      config: default
      split: train_prefs
      columns:
        - chosen
        - rejected
      weight: 0.5
    - id: {prefs_b}
      split: train
      columns: [chosen, rejected]
  seed: 42
  test_split_size: 0.2
dataset_num_proc: 2
# DPOTrainer arguments
bf16: false
beta: 0.01
do_eval: true
eval_strategy: steps
eval_steps: 2
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: False
learning_rate: 1.0e-3
log_level: info
logging_first_step: true
logging_steps: 3
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
max_length: 128
max_prompt_length: 64
max_steps: 5
num_train_epochs: 1
optim: adamw_torch
output_dir: {out}
per_device_train_batch_size: 4
per_device_eval_batch_size: 4
push_to_hub: false
report_to:
- tensorboard
save_strategy: steps
save_steps: 2
save_total_limit: 1
save_only_model: true
seed: 42
warmup_ratio: 0.1
",
        model = model.display(),
        template = TEMPLATE,
        prefs = fixture("recipes/prefs").display(),
        prefs_b = fixture("recipes/prefs_b").display(),
        out = out.display(),
    );
    let recipe = write(dir.path(), "dpo.yaml", &recipe);
    let stderr = ok(&["dpo", "--config", &recipe]);
    assert!(stderr.contains("accepted without effect") && stderr.contains("dataset_num_proc"), "{stderr}");
    assert!(stderr.contains("6 evaluation pairs"), "the mixture's test split: {stderr}");
    let rows = metrics(&out);
    let steps = |eval: bool| -> Vec<u64> {
        rows.iter().filter(|r| r.get("eval_loss").is_some() == eval).map(|r| r["step"].as_u64().unwrap()).collect()
    };
    // logging_first_step, every 3, the last; evaluation every 2 and after the last step
    assert_eq!(steps(false), [1, 3, 5]);
    assert_eq!(steps(true), [2, 4, 5]);
    // save_strategy steps saves at 2, 4 and after the last step; save_total_limit 1 keeps the last; model only
    assert!(out.join("checkpoint-5/model.safetensors").exists() && !out.join("checkpoint-4").exists());
    assert!(!out.join("checkpoint-5/optimizer.safetensors").exists(), "save_only_model");
    let err = String::from_utf8_lossy(
        &prefalign(&[
            "dpo",
            "--config",
            &recipe,
            "--resume-from-checkpoint",
            out.join("checkpoint-5").to_str().unwrap(),
        ])
        .stderr,
    )
    .into_owned();
    assert!(err.contains("save_only_model and cannot be resumed"), "{err}");
    // the inline template replaced the tokenizer's and is saved with the model
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), TEMPLATE);
}

/// zephyr-7b-beta's SFT recipe (its keys and inline chat template with `eos_token`) on the fixture model and a chat
/// set laid out as HuggingFaceH4/ultrachat_200k: the mixture's `messages` column, evaluation at each epoch's end.
#[test]
fn a_handbook_sft_recipe_with_an_inline_chat_template_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let out = dir.path().join("zephyr-sft");
    let template = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + \
                    message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + \
                    message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n' \
                    + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n\
                    {{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";
    let recipe = format!(
        "# Model arguments
model_name_or_path: {model}
model_revision: main
torch_dtype: auto
attn_implementation: flash_attention_2

# Data training arguments
chat_template: {template:?}
dataset_mixture:
  datasets:
    - id: {chat}
      config: default
      split: train_sft
      columns:
        - messages
      weight: 1.0
  seed: 42
  test_split_size: 0.25
dataset_num_proc: 12

# SFT trainer config
bf16: false
do_eval: true
eval_strategy: epoch
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: False
hub_model_id: zephyr-7b-sft-full
hub_strategy: every_save
learning_rate: 2.0e-04
log_level: info
logging_steps: 2
logging_strategy: steps
lr_scheduler_type: cosine
max_length: 256
max_steps: -1
num_train_epochs: 2
output_dir: {out}
overwrite_output_dir: true
per_device_eval_batch_size: 2
per_device_train_batch_size: 4
push_to_hub: false
remove_unused_columns: true
report_to:
- tensorboard
save_strategy: \"steps\"
save_steps: 100
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
",
        model = model.display(),
        chat = fixture("recipes/chat").display(),
        out = out.display(),
    );
    let recipe = write(dir.path(), "sft.yaml", &recipe);
    let stderr = ok(&["sft", "--config", &recipe]);
    assert!(stderr.contains("4 evaluation rows"), "the mixture's test split (0.25 of 16): {stderr}");
    let rows = metrics(&out);
    // 12 train rows, batch 4: 3 steps per epoch, 6 in all; evaluated at each epoch's end
    let steps = |eval: bool| -> Vec<u64> {
        rows.iter().filter(|r| r.get("eval_loss").is_some() == eval).map(|r| r["step"].as_u64().unwrap()).collect()
    };
    assert_eq!(steps(false), [2, 4, 6]);
    assert_eq!(steps(true), [3, 6]);
    for row in rows.iter().filter(|r| r.get("loss").is_some()) {
        for key in ["entropy", "mean_token_accuracy", "num_tokens", "grad_norm"] {
            assert!(row.get(key).is_some(), "{key} in {row}");
        }
    }
    let eval = rows.iter().find(|r| r.get("eval_loss").is_some()).unwrap();
    assert!(eval.get("eval_entropy").is_some() && eval.get("eval_mean_token_accuracy").is_some(), "{eval}");
    // the last step is saved; the inline template replaced the tokenizer's and is saved with the model
    assert!(out.join("checkpoint-6/model.safetensors").exists());
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), template);
}

/// An older handbook recipe (QLoRA zephyr): dataset_mixer + dataset_splits, evaluation_strategy, LoRA keys,
/// load_in_4bit and a paged optimizer.
#[test]
fn an_older_qlora_handbook_recipe_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let out = dir.path().join("zephyr-dpo-qlora");
    let recipe = format!(
        "model_name_or_path: {model}
torch_dtype: null
use_flash_attention_2: true
load_in_4bit: true
use_peft: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
- q_proj
- k_proj
- v_proj
- o_proj
dataset_mixer:
  {prefs_b}: 0.75
dataset_splits:
- train
- test
preprocessing_num_workers: 12
bf16: true
beta: 0.01
do_eval: true
evaluation_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 2
gradient_checkpointing: true
hub_model_id: zephyr-7b-dpo-qlora
learning_rate: 5.0e-4
log_level: info
logging_steps: 1
lr_scheduler_type: cosine
max_length: 96
max_prompt_length: 32
num_train_epochs: 1
optim: paged_adamw_32bit
output_dir: {out}
per_device_train_batch_size: 2
per_device_eval_batch_size: 4
save_strategy: \"no\"
seed: 42
warmup_ratio: 0.1
",
        model = model.display(),
        prefs_b = fixture("recipes/prefs_b").display(),
        out = out.display(),
    );
    let recipe = write(dir.path(), "qlora.yaml", &recipe);
    let stderr = ok(&["dpo", "--config", &recipe]);
    assert!(stderr.contains("4 evaluation pairs"), "{stderr}");
    let rows = metrics(&out);
    // 12 train rows (0.75 of 16), batch 2 x accumulation 2: 3 steps; evaluated once, after the last (do_eval)
    let evals: Vec<u64> =
        rows.iter().filter(|r| r.get("eval_loss").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, [3]);
    assert!(out.join("adapter_model.safetensors").exists() && !out.join("checkpoint-3").exists());
}

/// Every key prefalign refuses says why, naming the key and the recipe.
#[test]
fn refused_keys_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("dpo", "torch_compile: true", "prefalign's kernels are compiled in"),
        ("dpo", "fp16: true", "use bf16"),
        ("dpo", "deepspeed: ds.json", "multi-process training"),
        ("dpo", "load_best_model_at_end: true", "best checkpoint"),
        ("dpo", "f_divergence_type: js_divergence", "f-divergence DPO is not implemented"),
        ("dpo", "sync_ref_model: true", "TR-DPO"),
        ("dpo", "use_weighting: true", "WPO"),
        ("dpo", "disable_dropout: false", "no dropout"),
        ("dpo", "use_liger_kernel: true", "fused kernels"),
        ("dpo", "neftune_noise_alpha: 5", "NEFTune"),
        ("dpo", "eval_on_start: true", "before the first step"),
        ("dpo", "dataset_streaming: true", "read whole"),
        ("dpo", "packing_strategy: wrapped", "a field of TRL's SFTConfig, not of its DPOConfig"),
        ("dpo", "desirable_weight: 2.0", "KTOConfig"),
        ("orpo", "precompute_ref_log_probs: true", "not of its ORPOConfig"),
        ("cpo", "alpha: 0.5", "AlphaPO"),
        ("dpo", "lr_scheduler_kwargs: {num_cycles: 2}", "only min_lr_rate"),
        ("dpo", "lerning_rate: 0.1", "did you mean \"learning_rate\""),
        ("sft", "eos_token: <|endoftext|>", "the tokenizer's EOS token ends the sequences"),
        ("sft", "beta: 0.1", "not of its SFTConfig"),
        ("kto", "sync_ref_model: true", "TR-DPO"),
        ("kto", "packing: true", "not of its KTOConfig"),
    ];
    for (command, line, expected) in cases {
        let recipe = write(dir.path(), "r.yaml", &format!("model_name_or_path: m\ndataset_name: d.jsonl\n{line}\n"));
        let argv = ["prefalign", command, "--config", &recipe].iter().map(Into::into).collect();
        let err = format!("{:#}", prefalign::cli::parse_args(argv).unwrap_err());
        assert!(err.contains(expected) && err.contains("r.yaml"), "{line}: {err}");
    }
    // at TRL's default these keys change nothing and are accepted
    let defaults = "model_name_or_path: m\ndataset_name: d.jsonl\ntorch_compile: false\nfp16: false\n\
                    f_divergence_type: reverse_kl\ndisable_dropout: true\nsync_ref_model: false\n";
    let recipe = write(dir.path(), "defaults.yaml", defaults);
    let argv = ["prefalign", "dpo", "--config", &recipe].iter().map(Into::into).collect();
    prefalign::cli::parse_args(argv).unwrap();
    // refused at the start of a run, before any model is read
    for (flags, expected) in [
        (&["--optim", "adamw_8bit"][..], "8-bit optimizer states are not implemented"),
        (&["--optim", "adafactor"], "prefalign implements AdamW"),
        (&["--save-strategy", "best"], "metric_for_best_model"),
        (&["--eval-strategy", "sometimes"], "expected no, steps or epoch"),
        (&["--dtype", "float16"], "float16 weights are not supported"),
    ] {
        let out = dir.path().join("out");
        let mut args = vec!["dpo", "--model", "no-such-model", "--dataset", "d.jsonl", "--output-dir"];
        args.push(out.to_str().unwrap());
        args.extend(flags);
        let err = String::from_utf8_lossy(&prefalign(&args).stderr).into_owned();
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
}

/// Every field of TRL 1.16's DPOConfig / ORPOConfig / CPOConfig, TrainingArguments, ModelConfig and
/// ScriptArguments (src/cli/trl_fields.json, from tools/fixtures/list_trl_fields.py) is known: a recipe that sets
/// each to TRL's default runs, so each is a flag or answered by src/cli/recipe_keys.rs.
#[test]
fn every_trl_field_at_its_default_is_accepted() {
    let fields: Value =
        serde_json::from_str(&std::fs::read_to_string(common::repo_path("src/cli/trl_fields.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (command, config) in
        [("dpo", "DPOConfig"), ("orpo", "ORPOConfig"), ("cpo", "CPOConfig"), ("sft", "SFTConfig"), ("kto", "KTOConfig")]
    {
        let mut recipe = serde_json::Map::new();
        for class in ["TrainingArguments", config, "ModelConfig", "ScriptArguments"] {
            for (key, default) in fields[class].as_object().unwrap() {
                recipe.insert(key.clone(), default.clone());
            }
        }
        recipe.insert("model_name_or_path".into(), "m".into());
        recipe.insert("dataset_name".into(), "d.jsonl".into());
        recipe.insert("output_dir".into(), "out".into());
        // JSON is YAML
        let path = write(dir.path(), "all.yaml", &Value::Object(recipe).to_string());
        let argv = ["prefalign", command, "--config", &path].iter().map(Into::into).collect();
        if let Err(e) = prefalign::cli::parse_args(argv) {
            panic!("{command}: {e:#}");
        }
    }
}

/// Folders written by `datasets`' save_to_disk read as load_from_disk reads them: a DatasetDict by split, a
/// Dataset whole, message lists as messages.
#[test]
fn save_to_disk_folders_read_as_load_from_disk() {
    let saved = fixture("recipes/saved");
    let test =
        read_dataset(saved.to_str().unwrap(), &Selection { config: None, ..Selection::default() }, "test").unwrap();
    assert_eq!(
        chosen_answers(&test),
        ["140 plus 1 is 141. (t0)", "141 times 4 is 564. (t1)", "142 minus 7 is 135. (t2)"]
    );
    let row = &test.rows[0];
    assert_eq!(row.fields["prompt_id"], "t0");
    assert_eq!(row.fields["score_chosen"], 8.0);
    assert_eq!(row.fields["rejected"][0], serde_json::json!({"content": "What is 140 plus 1?", "role": "user"}));
    assert!(row.location.ends_with("test/data-00000-of-00001.arrow row 0"), "{}", row.location);
    let train = saved.join("train");
    assert_eq!(
        read_dataset(train.to_str().unwrap(), &Selection { config: None, ..Selection::default() }, "train")
            .unwrap()
            .rows
            .len(),
        6
    );
    let err = format!(
        "{:#}",
        read_dataset(saved.to_str().unwrap(), &Selection { config: None, ..Selection::default() }, "validation")
            .unwrap_err()
    );
    assert!(err.contains("no split \"validation\" (it has: train, test)"), "{err}");
}
