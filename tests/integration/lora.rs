//! LoRA through the command line: the adapter a run saves (PEFT's files and names, nothing else), checkpoints that
//! resume bit for bit, continuing from a saved adapter, merging it, and what LoRA leaves unchanged: gradient
//! checkpointing and precomputed reference log-probs give the same run; bf16 autocast and a bf16 base train.
//! (Parity with TRL + PEFT: `training`.)

use crate::common::{fixture, read_tensors, tiny_model_dir};
use std::path::Path;
use std::process::{Command, Output};

pub fn prefalign(args: &[&str]) -> Output {
    let cache = tempfile::tempdir().unwrap(); // precomputed reference log-probs go here, not to ~/.cache
    let mut command = Command::new(env!("CARGO_BIN_EXE_prefalign"));
    command.args(args).env("OMP_NUM_THREADS", "1").env("PREFALIGN_CACHE", cache.path()).output().unwrap()
}

pub fn ok(args: &[&str]) -> String {
    let output = prefalign(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "prefalign {}: {stderr}", args.join(" "));
    stderr
}

/// `prefalign dpo` with LoRA on the tiny model and the fixture data, 4 steps at a large rate, into `out`.
pub fn dpo(model: &Path, out: &Path, extra: &[&str]) -> String {
    let data = fixture("trl_data/standard.jsonl");
    let mut args = vec!["dpo", "--model", model.to_str().unwrap(), "--dataset", data.to_str().unwrap()];
    args.extend(["--output-dir", out.to_str().unwrap(), "--max-steps", "4", "--per-device-train-batch-size", "4"]);
    args.extend(["--learning-rate", "1e-2", "--logging-steps", "1", "--seed", "3", "--skip-invalid-rows"]);
    args.extend(extra);
    ok(&args)
}

pub fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn a_lora_run_saves_pefts_adapter_files_and_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let whole = dir.path().join("whole");
    let stderr = dpo(&model, &whole, &["--use-peft", "--lora-target-modules", "all-linear", "--lora-r", "4"]);
    assert!(stderr.contains("saved the trained adapter"), "{stderr}");
    assert!(!whole.join("model.safetensors").exists(), "the base model is not saved again");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some(4)));
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
    let adapter = read_tensors(&whole.join("adapter_model.safetensors"));
    assert_eq!(adapter.len(), 2 * 7 * 2, "A and B of 7 projections in 2 layers");
    for (name, tensor) in &adapter {
        assert!(name.starts_with("base_model.model.model.layers."), "{name}");
        if name.contains("lora_B") {
            assert!(tensor.abs().sum(tch::Kind::Double).double_value(&[]) > 0.0, "{name} trained");
        }
    }
    assert!(whole.join("tokenizer.json").exists());

    // Killed after the checkpoint of step 2 (simulated: a run to step 2), resumed: the same adapter, bit for bit.
    let parts = dir.path().join("parts");
    let lora = ["--use-peft", "--lora-target-modules", "all-linear", "--lora-r", "4", "--save-steps", "2"];
    dpo(&model, &parts, &lora);
    let checkpoint = parts.join("checkpoint-2");
    assert!(checkpoint.join("adapter_model.safetensors").exists() && !checkpoint.join("model.safetensors").exists());
    let moments = read_tensors(&checkpoint.join("optimizer.safetensors"));
    assert!(moments.keys().all(|k| k.contains("lora_")), "optimizer state of the adapters only");
    std::fs::remove_file(parts.join("adapter_model.safetensors")).unwrap();
    dpo(&model, &parts, &[&lora[..], &["--resume-from-checkpoint", "last"]].concat());
    let resumed = read_tensors(&parts.join("adapter_model.safetensors"));
    for (name, tensor) in &adapter {
        assert!(tensor.equal(&resumed[name]), "{name} after a resume");
    }

    // Continued from the saved adapter: its settings apply, and its reference is the adapter as it was, so the
    // first step's loss is log 2 again.
    let more = dir.path().join("more");
    dpo(&model, &more, &["--adapter", whole.to_str().unwrap(), "--merge"]);
    assert!(more.join("merged/model.safetensors").exists() && more.join("merged/config.json").exists());
    assert!((losses(&more)[0] - std::f64::consts::LN_2).abs() < 1e-6, "{:?}", losses(&more));
    let continued = read_tensors(&more.join("adapter_model.safetensors"));
    assert_eq!(continued.len(), adapter.len());

    // Merged into the base: the same log-probs as base + adapter.
    let merged = dir.path().join("merged");
    ok(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        whole.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    let data = fixture("trl_data/standard.jsonl");
    let scores = |args: &[&str], name: &str| {
        let file = dir.path().join(name);
        let mut all = vec!["eval", "--dataset", data.to_str().unwrap(), "--output", file.to_str().unwrap()];
        all.push("--skip-invalid-rows");
        all.extend(args);
        ok(&all);
        let text = std::fs::read_to_string(file).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["chosen_logps"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let with_adapter = scores(&["--model", model.to_str().unwrap(), "--adapter", whole.to_str().unwrap()], "a.jsonl");
    let from_merged = scores(&["--model", merged.to_str().unwrap()], "m.jsonl");
    let base = scores(&["--model", model.to_str().unwrap()], "b.jsonl");
    for ((a, m), b) in with_adapter.iter().zip(&from_merged).zip(&base) {
        assert!((a - m).abs() < 1e-3 * a.abs().max(1.0), "adapter {a} vs merged {m}");
        assert!((a - b).abs() > 1e-4, "the adapter changes the log-probs");
    }
}

#[test]
fn gradient_checkpointing_and_precomputed_reference_give_the_same_lora_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        dpo(&model, &out, &[&["--use-peft", "--lora-target-modules", "q_proj,v_proj,down_proj"], extra].concat());
        losses(&out)
    };
    let plain = run("plain", &[]);
    assert_eq!(plain.len(), 4);
    assert!((plain[0] - std::f64::consts::LN_2).abs() < 1e-6, "reference = adapters off: {plain:?}");
    assert!(plain[3] != plain[0]);
    for (name, extra) in
        [("checkpointed", &["--gradient-checkpointing"][..]), ("precomputed", &["--precompute-ref-log-probs"][..])]
    {
        let other = run(name, extra);
        for (a, b) in plain.iter().zip(&other) {
            assert!((a - b).abs() < 1e-6 * a.abs().max(1.0), "{name}: {other:?} vs {plain:?}");
        }
    }
    let bf16 = run("bf16", &["--bf16"]);
    assert!(bf16.iter().all(|l| l.is_finite()) && (bf16[3] - plain[3]).abs() < 0.05, "{bf16:?} vs {plain:?}");
    // A base stored in bf16 with f32 adapters.
    let bf16_base = run("bf16-base", &["--dtype", "bf16"]);
    assert!(bf16_base.iter().all(|l| l.is_finite()) && (bf16_base[0] - plain[0]).abs() < 1e-3, "{bf16_base:?}");
    let adapter = read_tensors(&dir.path().join("bf16-base/adapter_model.safetensors"));
    assert!(adapter.values().all(|t| t.kind() == tch::Kind::Float), "f32 adapters");
    // Continued on the bf16 base: the reference copy stays f32 like the adapter, so step 1 compares equals.
    let adapter_dir = dir.path().join("bf16-base");
    let continued = run("bf16-base-continued", &["--dtype", "bf16", "--adapter", adapter_dir.to_str().unwrap()]);
    assert!((continued[0] - std::f64::consts::LN_2).abs() < 1e-6, "{continued:?}");
}

#[test]
fn modules_to_save_are_trained_whole_saved_under_their_names_and_merged_untied() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy"); // tied embeddings
    let out = dir.path().join("out");
    dpo(&model, &out, &["--use-peft", "--lora-modules-to-save", "lm_head", "--save-steps", "2", "--merge"]);
    assert!((losses(&out)[0] - std::f64::consts::LN_2).abs() < 1e-6, "the copy starts as the original");
    let adapter = read_tensors(&out.join("adapter_model.safetensors"));
    let lm_head = &adapter["base_model.model.lm_head.weight"];
    let base = read_tensors(&model.join("model.safetensors"));
    assert!(!lm_head.equal(&base["model.embed_tokens.weight"]), "the output layer trained");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["modules_to_save"], serde_json::json!(["lm_head"]));
    // merged: the trained output layer untied from the embeddings, which stay the base model's
    let merged = read_tensors(&out.join("merged/model.safetensors"));
    assert!(merged["lm_head.weight"].equal(lm_head));
    assert!(merged["model.embed_tokens.weight"].equal(&base["model.embed_tokens.weight"]));
    let merged_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("merged/config.json")).unwrap()).unwrap();
    assert_eq!(merged_config["tie_word_embeddings"], false);
    // resumed from the checkpoint of step 2: the same copy, bit for bit
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    let resumed = ["--use-peft", "--lora-modules-to-save", "lm_head", "--save-steps", "2"];
    dpo(&model, &out, &[&resumed[..], &["--resume-from-checkpoint", "last"]].concat());
    let again = read_tensors(&out.join("adapter_model.safetensors"));
    assert!(again["base_model.model.lm_head.weight"].equal(lm_head));
}

#[test]
fn lora_settings_prefalign_cannot_honour_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let data = fixture("trl_data/standard.jsonl");
    for (extra, expected) in [
        (&["--use-dora"][..], "--use-dora is not supported"),
        (&["--lora-modules-to-save", "norm"][..], "modules_to_save norm: prefalign trains the embeddings"),
        (&["--lora-target-modules", "lm_head"][..], "not supported"),
        (&["--lora-target-modules", "qkv_proj"][..], "match no module"),
        (&["--lora-r", "0"][..], "--lora-r"),
    ] {
        let out = dir.path().join("out");
        let mut args = vec!["dpo", "--model", model.to_str().unwrap(), "--dataset", data.to_str().unwrap()];
        args.extend(["--output-dir", out.to_str().unwrap(), "--max-steps", "1", "--use-peft", "--skip-invalid-rows"]);
        args.extend(extra);
        let output = prefalign(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(expected), "{extra:?}: {stderr}");
    }
}
