//! GGUF import: the container and dequantization against gguf-py (tools/fixtures/make_gguf_quant_fixtures.py),
//! and the real SmolLM2-135M-Instruct GGUF against transformers loading the same file
//! (tools/fixtures/make_smollm2_fixtures.py).

use crate::common;
use crate::common::{error_text, fixture, read_tensors, smollm2_gguf, to_vec_i64};
use prefalign::data::chat_template::Message;
use prefalign::model::generate::{generate, SamplingOptions};
use prefalign::model::gguf::reader::Value;
use prefalign::model::{self, gguf::GgufFile};
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[test]
fn dequantization_matches_gguf_py_for_every_type() {
    let file = GgufFile::open(&fixture("gguf/quants.gguf")).unwrap();
    let expected = read_tensors(&fixture("gguf/quants_expected.safetensors"));
    assert_eq!(file.tensors.len(), 9);
    for ty in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"] {
        let name = format!("t.{ty}");
        let info = file.tensor_info(&name).unwrap_or_else(|| panic!("{name} missing"));
        let ours = file.dequantize(info).unwrap();
        let theirs = &expected[&name];
        assert_eq!(ours.size(), theirs.size(), "{name} shape");
        let scale = theirs.abs().max().double_value(&[]).max(1.0);
        let diff = common::max_abs_diff(&ours, theirs);
        assert!(diff <= 1e-6 * scale, "{name}: max |diff| {diff:e} (values up to {scale})");
    }
}

#[test]
fn metadata_values_of_every_type() {
    let file = GgufFile::open(&fixture("gguf/quants.gguf")).unwrap();
    assert_eq!(file.version, 3);
    let text = std::fs::read_to_string(fixture("gguf/quants_metadata.json")).unwrap();
    let expected: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    for (key, want) in &expected {
        let got = file.get(key).unwrap_or_else(|| panic!("metadata key {key} missing"));
        let same = match (got, want) {
            (Value::String(s), w) => w.as_str() == Some(s.as_str()),
            (Value::Bool(b), w) => w.as_bool() == Some(*b),
            (Value::F32(_) | Value::F64(_), w) => got.as_f64() == w.as_f64(),
            (Value::U64(v), w) => w.as_u64() == Some(*v),
            (Value::Array(items), serde_json::Value::Array(w)) => {
                items.len() == w.len()
                    && items.iter().zip(w).all(|(i, w)| i.as_str() == w.as_str() && i.as_i64() == w.as_i64())
            }
            (_, w) => got.as_i64() == w.as_i64(),
        };
        assert!(same, "{key}: got {got:?}, want {want}");
    }
}

/// Returns a copy of quants.gguf with `patch` applied to its bytes, in a temp dir.
fn patched_quants(patch: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, std::path::PathBuf) {
    let mut bytes = std::fs::read(fixture("gguf/quants.gguf")).unwrap();
    patch(&mut bytes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("patched.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

#[test]
fn unsupported_quant_type_is_named() {
    let (_dir, path) = patched_quants(|bytes| {
        // tensor info: name, n_dims u32, 2 dims u64, type u32 -> make t.Q8_0 a Q5_0 (ggml type 6).
        let at = find(bytes, b"t.Q8_0") + "t.Q8_0".len() + 4 + 16;
        bytes[at..at + 4].copy_from_slice(&6u32.to_le_bytes());
    });
    let file = GgufFile::open(&path).unwrap();
    let err = error_text(file.dequantize(file.tensor_info("t.Q8_0").unwrap()));
    assert!(err.contains("unsupported GGUF tensor type Q5_0") && err.contains("t.Q8_0"), "{err}");
}

#[test]
fn truncated_and_foreign_files_are_rejected() {
    let bytes = std::fs::read(fixture("gguf/quants.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..200]).unwrap();
    let err = error_text(GgufFile::open(&truncated));
    assert!(err.contains("truncated.gguf is not a valid GGUF file") && err.contains("unexpected end of file"), "{err}");

    let cut_data = dir.path().join("cut.gguf");
    std::fs::write(&cut_data, &bytes[..bytes.len() - 100]).unwrap();
    let file = GgufFile::open(&cut_data).unwrap();
    let err = error_text(file.dequantize(file.tensor_info("t.Q6_K").unwrap()));
    assert!(err.contains("t.Q6_K") && err.contains("past the end of the file"), "{err}");

    let foreign = dir.path().join("foreign.gguf");
    std::fs::write(&foreign, b"PK\x03\x04 not a gguf").unwrap();
    let err = error_text(GgufFile::open(&foreign));
    assert!(err.contains("missing GGUF magic"), "{err}");
}

#[test]
fn unsupported_gguf_architecture_is_named() {
    let (_dir, path) = patched_quants(|bytes| {
        let at = find(bytes, b"general.architecture") + "general.architecture".len() + 4 + 8;
        bytes[at..at + 5].copy_from_slice(b"gemma");
    });
    let err = error_text(model::load(&path, Device::Cpu, Kind::Float));
    assert!(err.contains("unsupported architecture (model_type \"gemma\")") && err.contains("patched.gguf"), "{err}");
}

struct SmolFixture {
    tensors: std::collections::HashMap<String, Tensor>,
    json: serde_json::Value,
}

fn smol_fixture() -> SmolFixture {
    let json = std::fs::read_to_string(fixture("smollm2/expected.json")).unwrap();
    SmolFixture {
        tensors: read_tensors(&fixture("smollm2/expected.safetensors")),
        json: serde_json::from_str(&json).unwrap(),
    }
}

/// Our GGUF import against transformers' import of the same file: same chat rendering, same token ids, same
/// top-1 token at every position, logits within a small bound (both dequantize the same blocks in f32).
#[test]
fn smollm2_gguf_matches_transformers() {
    let fx = smol_fixture();
    let loaded = model::load(&smollm2_gguf(), Device::Cpu, Kind::Float).unwrap();
    let tokenizer = loaded.tokenizer().unwrap();
    let config = loaded.config();
    assert_eq!((config.num_hidden_layers, config.hidden_size, config.vocab_size), (30, 576, 49152));
    assert_eq!((config.num_attention_heads, config.num_kv_heads()), (9, 3));
    assert!(config.tie_word_embeddings);
    let template = tokenizer.chat_template().unwrap();
    let mut worst = 0f64;
    for (i, prompt) in fx.json["prompts"].as_array().unwrap().iter().enumerate() {
        let rendered = template.render(&[Message::new("user", prompt.as_str().unwrap())], true).unwrap();
        assert_eq!(rendered, fx.json["rendered_prompts"][i].as_str().unwrap(), "rendering of prompt {i}");
        let ids = tokenizer.encode(&rendered, false).unwrap();
        assert_eq!(ids, to_vec_i64(&fx.tensors[&format!("input_ids.{i}")]), "token ids of prompt {i}");
        let logits = tch::no_grad(|| loaded.model.forward(&Tensor::from_slice(&ids).unsqueeze(0), None)).squeeze_dim(0);
        assert_eq!(
            to_vec_i64(&logits.argmax(-1, false)),
            to_vec_i64(&fx.tensors[&format!("argmax.{i}")]),
            "top-1 token at each position of prompt {i}"
        );
        let lse = logits.logsumexp(&[-1i64][..], false);
        let lse_diff = common::max_abs_diff(&lse, &fx.tensors[&format!("logsumexp.{i}")]);
        let last_diff = common::max_abs_diff(&logits.get(-1), &fx.tensors[&format!("last_logits.{i}")]);
        worst = worst.max(lse_diff).max(last_diff);
    }
    eprintln!("SmolLM2 GGUF vs transformers: max |logit diff| = {worst:.3e}");
    assert!(worst < 1e-3, "max |logit diff| {worst:.3e}");
}

#[test]
fn smollm2_greedy_chat_answers_paris() {
    let fx = smol_fixture();
    let loaded = model::load(&smollm2_gguf(), Device::Cpu, Kind::Float).unwrap();
    let prompt_ids = to_vec_i64(&fx.tensors["input_ids.0"]);
    let options = SamplingOptions { max_new_tokens: 24, temperature: 1.0, top_p: 1.0, greedy: true, seed: 0 };
    let eos = loaded.config().eos_token_ids();
    let ids = generate(&loaded.model, &prompt_ids, &eos, &options, |_| Ok(())).unwrap();
    let expected: Vec<i64> =
        fx.json["generated_0"]["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(ids, expected, "greedy tokens equal transformers' generate()");
    let text = loaded.tokenizer().unwrap().decode(&ids, true).unwrap();
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn smollm2_pretokenizer_splits_digits_like_the_original_tokenizer() {
    let loaded = model::load(&smollm2_gguf(), Device::Cpu, Kind::Float).unwrap();
    let ids = loaded.tokenizer().unwrap().encode("I have 123 apples and 4567 pears.", false).unwrap();
    assert_eq!(ids, vec![57, 457, 216, 33, 34, 35, 13855, 284, 216, 36, 37, 38, 39, 41684, 30]);
}

/// GGUF -> Hugging Face folder -> load again: identical weights, logits and tokenization.
#[test]
fn smollm2_round_trip_through_hf_folder() {
    let gguf = model::load(&smollm2_gguf(), Device::Cpu, Kind::Float).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model::save::save_hf(&gguf, dir.path(), model::save::DEFAULT_MAX_SHARD_BYTES).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(dir.path().join(file).exists(), "{file} written");
    }
    let hf = model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let text = "<|im_start|>user\nRound trip?<|im_end|>\n<|im_start|>assistant\n";
    let ids = gguf.tokenizer().unwrap().encode(text, false).unwrap();
    assert_eq!(hf.tokenizer().unwrap().encode(text, false).unwrap(), ids);
    assert_eq!(hf.tokenizer().unwrap().chat_template, gguf.tokenizer().unwrap().chat_template);
    let input = Tensor::from_slice(&ids).unsqueeze(0);
    let (a, b) = tch::no_grad(|| (gguf.model.forward(&input, None), hf.model.forward(&input, None)));
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["eos_token_id"], 2);
}

#[test]
fn sharded_save_writes_an_index() {
    let loaded = model::load(&fixture("models/llama"), Device::Cpu, Kind::Float).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model::save::save_hf(&loaded, dir.path(), 40_000).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shards: std::collections::BTreeSet<&str> =
        index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 1 && !Path::new(&dir.path().join("model.safetensors")).exists());
    let reloaded = model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let ids = Tensor::from_slice(&[1i64, 5, 9, 200]).unsqueeze(0);
    let (a, b) = tch::no_grad(|| (loaded.model.forward(&ids, None), reloaded.model.forward(&ids, None)));
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
}
