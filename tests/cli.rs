//! The `prefalign` binary end to end on the real SmolLM2 GGUF: generate and convert.

mod common;

use common::smollm2_gguf;
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
        "generate", "--model", gguf.to_str().unwrap(), "--prompt", "What is the capital of France?", "--greedy",
        "--max-new-tokens", "24",
    ]);
    assert_eq!(stdout.trim(), "The capital of France is Paris.");
}

#[test]
fn sampling_is_deterministic_per_seed() {
    let gguf = smollm2_gguf();
    let run = |seed: &str| {
        prefalign(&[
            "generate", "--model", gguf.to_str().unwrap(), "--prompt", "Tell me a story.", "--temperature", "0.9",
            "--top-p", "0.9", "--seed", seed, "--max-new-tokens", "16",
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
        "generate", "--model", gguf, "--system", "You are a pirate. Always answer like a pirate.", "--prompt",
        "Hello!", "--greedy", "--max-new-tokens", "20",
    ]);
    assert!(!stdout.trim().is_empty());
    let (raw, _) = prefalign(&["generate", "--model", gguf, "--raw", "--prompt", "The capital of France is", "--greedy", "--max-new-tokens", "3"]);
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
        "generate", "--model", out.to_str().unwrap(), "--prompt", "What is the capital of France?", "--greedy",
        "--dtype", "bf16", "--max-new-tokens", "24",
    ]);
    assert!(stdout.contains("Paris"), "{stdout}");
}
