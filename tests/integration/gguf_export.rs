//! `prefalign convert --output model.gguf`: what prefalign writes, read back by prefalign's own GGUF loader (the
//! same logits, tokens and chat template); transformers and gguf-py read it in tools/fixtures/check_hf_roundtrip.py.

use crate::common::{fixture, max_abs_diff, smollm2_gguf, tiny_model_dir};
use crate::lora::{ok, prefalign};
use prefalign::model::generate::{generate, SamplingOptions};
use prefalign::model::gguf::reader::Value;
use prefalign::model::gguf::GgufFile;
use prefalign::model::{self, LoadedModel};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn load(path: &Path) -> LoadedModel {
    model::load(path, Device::Cpu, Kind::Float).unwrap()
}

fn convert(model: &Path, output: &Path, outtype: &str) {
    ok(&["convert", "--model", model.to_str().unwrap(), "--output", output.to_str().unwrap(), "--outtype", outtype]);
}

const TEXT: &str = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\nIt is 42, évidemment.";

/// The largest difference of the two models' logits on TEXT, relative to the largest logit, after checking that
/// they tokenize it alike and carry the same chat template.
fn logit_difference(a: &LoadedModel, b: &LoadedModel) -> f64 {
    let ids = a.tokenizer().unwrap().encode(TEXT, false).unwrap();
    assert_eq!(b.tokenizer().unwrap().encode(TEXT, false).unwrap(), ids, "the same tokens");
    assert_eq!(a.tokenizer().unwrap().chat_template, b.tokenizer().unwrap().chat_template);
    let input = Tensor::from_slice(&ids).unsqueeze(0);
    let (x, y) = tch::no_grad(|| (a.model.forward(&input, None), b.model.forward(&input, None)));
    max_abs_diff(&x, &y) / y.abs().max().double_value(&[])
}

#[test]
fn llama_and_qwen2_round_trip_through_gguf_in_every_outtype() {
    let dir = tempfile::tempdir().unwrap();
    let qwen2 = dir.path().join("tiny_qwen2");
    std::fs::create_dir_all(&qwen2).unwrap();
    for src in [fixture("training/tiny_qwen2"), fixture("trl_data/tokenizer")] {
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), qwen2.join(entry.file_name())).unwrap();
        }
    }
    for (folder, arch) in [(tiny_model_dir(dir.path(), "tiny_policy"), "llama"), (qwen2, "qwen2")] {
        let original = load(&folder);
        // (outtype, general.file_type, the q/k/v/embedding type, tolerance): hidden size 16 fills no Q8_0 block, so
        // those fall back to F16 as in llama.cpp's converter; down_proj's rows of 32 are Q8_0
        for (outtype, file_type, matrix_type, tolerance) in
            [("f32", 0, 0, 0.0), ("f16", 1, 1, 2e-3), ("bf16", 32, 30, 2e-2), ("q8_0", 7, 1, 2e-2)]
        {
            let path = dir.path().join(format!("{arch}-{outtype}.gguf"));
            convert(&folder, &path, outtype);
            let file = GgufFile::open(&path).unwrap();
            assert_eq!(file.get("general.architecture"), Some(&Value::String(arch.into())));
            assert_eq!(file.get("general.file_type"), Some(&Value::U32(file_type)));
            let ty = |name: &str| file.tensor_info(name).unwrap().ggml_type;
            assert_eq!((ty("blk.0.attn_q.weight"), ty("token_embd.weight")), (matrix_type, matrix_type), "{path:?}");
            assert_eq!(ty("blk.0.attn_norm.weight"), 0, "vectors stay F32");
            assert_eq!(ty("blk.0.ffn_down.weight"), if outtype == "q8_0" { 8 } else { matrix_type });
            assert!(file.tensor_info("output.weight").is_none(), "tied embeddings");
            let exported = load(&path);
            let difference = logit_difference(&exported, &original);
            assert!(difference <= tolerance, "{arch} {outtype}: {difference:e}");
        }
    }
}

#[test]
fn q8_0_export_of_a_quantized_gguf_stays_within_q8_0_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("quantized/tiny_q4_k.gguf");
    let path = dir.path().join("tiny.q8_0.gguf");
    convert(&source, &path, "q8_0");
    let file = GgufFile::open(&path).unwrap();
    for name in ["token_embd.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"] {
        assert_eq!(file.tensor_info(name).unwrap().ggml_type, 8, "{name} in Q8_0");
    }
    // the q/k rows permuted back as llama.cpp stores them: a loader that undoes it sees the original's weights
    let (original, exported) = (load(&source), load(&path));
    let difference = logit_difference(&exported, &original);
    assert!(difference > 0.0 && difference < 5e-2, "{difference:e}");
    // without --outtype a GGUF source is written in f32: the same logits
    let f32_path = dir.path().join("tiny.f32.gguf");
    ok(&["convert", "--model", source.to_str().unwrap(), "--output", f32_path.to_str().unwrap()]);
    assert_eq!(logit_difference(&load(&f32_path), &original), 0.0);
}

#[test]
fn smollm2_exported_as_q8_0_still_answers_paris() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smollm2.q8_0.gguf");
    convert(&smollm2_gguf(), &path, "q8_0");
    let exported = load(&path);
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.get("tokenizer.ggml.pre"), Some(&Value::String("smollm".into())));
    let tokenizer = exported.tokenizer().unwrap();
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tokenizer.encode(prompt, false).unwrap();
    let options = SamplingOptions { max_new_tokens: 12, temperature: 1.0, top_p: 1.0, greedy: true, seed: 0 };
    let eos = exported.config().eos_token_ids();
    let answer = generate(&exported.model, &ids, &eos, &options, |_| Ok(())).unwrap();
    let text = tokenizer.decode(&answer, true).unwrap();
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn an_adapter_alone_as_a_llama_cpp_lora_gguf_adds_up_to_the_merged_model() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("quantized/tiny_q4_k.gguf");
    let adapter = dir.path().join("adapter");
    let lora = ["--use-peft", "--lora-target-modules", "all-linear", "--lora-r", "4", "--max-length", "64"];
    crate::lora::dpo(&source, &adapter, &lora);
    let path = |name: &str| dir.path().join(name);
    let (src, adapter_dir) = (source.to_str().unwrap(), adapter.to_str().unwrap());
    ok(&["convert", "--model", src, "--output", path("base.gguf").to_str().unwrap()]);
    ok(&["convert", "--model", src, "--adapter", adapter_dir, "--output", path("merged.gguf").to_str().unwrap()]);
    let lora_path = path("lora.gguf");
    ok(&[
        "convert",
        "--model",
        src,
        "--adapter",
        adapter_dir,
        "--adapter-only",
        "--output",
        lora_path.to_str().unwrap(),
    ]);
    let [base, merged, lora] = [path("base.gguf"), path("merged.gguf"), lora_path].map(|p| GgufFile::open(&p).unwrap());
    assert_eq!(lora.get("general.type"), Some(&Value::String("adapter".into())));
    assert_eq!(lora.get("adapter.type"), Some(&Value::String("lora".into())));
    // llama.cpp scales by alpha / r: 32 / 4 here (TRL's default alpha)
    let alpha = lora.get("adapter.lora.alpha").and_then(Value::as_f64).unwrap();
    assert_eq!(alpha, 32.0);
    assert_eq!(lora.tensors.len(), 2 * 7 * 2, "A and B of 7 projections in 2 layers");
    let tensor = |file: &GgufFile, name: &str| file.dequantize(file.tensor_info(name).unwrap()).unwrap();
    for name in ["blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"] {
        let (a, b) = (tensor(&lora, &format!("{name}.lora_a")), tensor(&lora, &format!("{name}.lora_b")));
        assert_eq!((a.size()[0], b.size()[1]), (4, 4), "{name}: A [r, in], B [out, r]");
        // in the file's own row order, as llama.cpp adds them up
        let sum = tensor(&base, name) + b.matmul(&a) * (alpha / 4.0);
        let want = tensor(&merged, name);
        assert!(max_abs_diff(&sum, &want) <= 1e-6 * want.abs().max().double_value(&[]), "{name}");
    }
}

#[test]
fn gguf_export_refuses_what_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let run = |extra: &[&str]| {
        let mut args = vec!["convert", "--model", model.to_str().unwrap()];
        args.extend(extra);
        let output = prefalign(&args);
        assert!(!output.status.success(), "{extra:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let folder = dir.path().join("folder");
    assert!(run(&["--output", folder.to_str().unwrap(), "--outtype", "q8_0"]).contains("applies to a .gguf"));
    let gguf = dir.path().join("m.gguf");
    assert!(run(&["--output", gguf.to_str().unwrap(), "--outtype", "q4_k"]).contains("one of f32, f16, bf16, q8_0"));
    let llama3 = fixture("models/llama_untied_llama3rope");
    let output = prefalign(&["convert", "--model", llama3.to_str().unwrap(), "--output", gguf.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("tokenizer"), "{stderr}");
}
