//! Bad input produces an error a user can act on: it names the file, the tensor and the shapes involved.

use crate::common::{error_text, fixture};
use prefalign::model;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind};

/// A copy of fixture model `name` with `edit` applied to its config.json.
fn edited_model(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture(&format!("models/{name}"));
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

fn load_error(path: &Path) -> String {
    error_text(model::load(path, Device::Cpu, Kind::Float))
}

#[test]
fn missing_model_path() {
    let err = load_error(Path::new("/nonexistent/model"));
    assert_eq!(err, "model path /nonexistent/model does not exist");
}

#[test]
fn folder_without_config_or_weights() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("cannot read") && err.contains("config.json"), "{err}");
    let (_d, path) = edited_model("llama", |_| {});
    std::fs::remove_file(path.join("model.safetensors")).unwrap();
    let err = load_error(&path);
    assert!(err.contains("no model.safetensors or model.safetensors.index.json in"), "{err}");
}

#[test]
fn non_gguf_file() {
    let err = load_error(&fixture("models/llama/config.json"));
    assert!(err.contains("is a file but not a .gguf"), "{err}");
}

#[test]
fn corrupt_safetensors_names_the_file() {
    let (_d, path) = edited_model("llama", |_| {});
    std::fs::write(path.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let err = load_error(&path);
    assert!(err.contains("model.safetensors is not a valid safetensors file"), "{err}");
}

#[test]
fn unsupported_architecture_is_named() {
    let (_d, path) = edited_model("llama", |c| c["model_type"] = "gpt2".into());
    let err = load_error(&path);
    assert!(err.contains("unsupported architecture (model_type \"gpt2\")") && err.contains("config.json"), "{err}");
}

#[test]
fn unsupported_rope_type_is_named() {
    let (_d, path) = edited_model("llama", |c| c["rope_parameters"]["rope_type"] = "yarn".into());
    let err = load_error(&path);
    assert!(err.contains("unsupported rope type \"yarn\""), "{err}");
}

#[test]
fn shape_mismatch_names_tensor_and_both_shapes() {
    let (_d, path) = edited_model("llama", |c| c["intermediate_size"] = 96.into());
    let err = load_error(&path);
    assert!(
        err.contains("tensor model.layers.0.mlp.down_proj.weight in")
            && err.contains("has shape [64, 128], the model config expects [64, 96]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let (_d, path) = edited_model("llama", |c| c["tie_word_embeddings"] = false.into());
    let err = load_error(&path);
    assert!(err.contains("tensor lm_head.weight is missing from") && err.contains("model.safetensors"), "{err}");
}

#[test]
fn tokenizer_larger_than_vocabulary() {
    let (_d, path) = edited_model("llama", |_| {});
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..300).map(|i| (format!("tok{i}"), serde_json::Value::from(i))).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "tok0"}
    });
    std::fs::write(path.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let err = load_error(&path);
    assert!(err.contains("the tokenizer has 300 tokens but the model's vocab_size is 256"), "{err}");
}

#[test]
fn bad_device_and_dtype() {
    let err = error_text(model::device::parse_device("gpu"));
    assert!(err.contains("invalid device \"gpu\" (expected cpu, cuda, cuda:N or auto)"), "{err}");
    let err = error_text(model::device::parse_dtype("f8"));
    assert!(err.contains("invalid dtype \"f8\""), "{err}");
    if !tch::Cuda::is_available() {
        let err = error_text(model::device::parse_device("cuda:0"));
        assert!(err.contains("device cuda:0 is not available"), "{err}");
        assert_eq!(model::device::parse_device("auto").unwrap(), Device::Cpu);
    }
}

/// The CLI prints one `error:` line chain and exits 1: no panic, no backtrace.
#[test]
fn cli_reports_user_errors_without_backtrace() {
    let output = Command::new(env!("CARGO_BIN_EXE_prefalign"))
        .args(["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr.trim(), "error: model path /nonexistent/model.gguf does not exist");
}
