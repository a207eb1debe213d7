//! Frozen bases kept quantized (QLoRA): NF4 against bitsandbytes, a GGUF file's blocks against the same weights
//! dequantized, and LoRA training on both (fixtures: tools/fixtures/make_quantized_fixtures.py).

use crate::common::{fixture, max_abs_diff, read_tensors, tiny_model_dir};
use crate::lora::{dpo, losses, ok, prefalign};
use prefalign::model::gguf::GgufFile;
use prefalign::model::quantized::{dynamic_map, QuantFormat, QuantizedWeight};
use std::path::Path;
use tch::Kind;

#[test]
fn gguf_blocks_kept_quantized_dequantize_as_when_loaded() {
    let file = GgufFile::open(&fixture("gguf/quants.gguf")).unwrap();
    let expected = read_tensors(&fixture("gguf/quants_expected.safetensors"));
    for ty in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"] {
        let info = file.tensor_info(&format!("t.{ty}")).unwrap();
        let (ggml, bytes) = file.raw(info).unwrap();
        let kept = QuantizedWeight::from_ggml(ggml, &bytes, 3, 512, Kind::Float);
        let got = kept.dequantize(Kind::Float);
        // exactly what loading the file dequantized gives, and gguf-py's values
        assert!(got.equal(&file.dequantize(info).unwrap()), "{ty}");
        let theirs = &expected[&format!("t.{ty}")];
        let scale = theirs.abs().max().double_value(&[]).max(1.0);
        assert!(max_abs_diff(&got, theirs) <= 1e-6 * scale, "{ty} against gguf-py");
        assert_eq!(kept.bytes(), bytes.numel(), "{ty}: kept as stored");
    }
}

#[test]
fn nf4_quantization_equals_bitsandbytes() {
    let bnb = read_tensors(&fixture("quantized/nf4.safetensors"));
    assert!(dynamic_map().equal(&bnb["code.dynamic"]), "create_dynamic_map()");
    for case in ["small", "short_block", "two_nested_blocks", "bf16"] {
        let weight = &bnb[&format!("{case}.weight")];
        let (rows, cols) = (weight.size()[0], weight.size()[1]);
        for nested in [false, true] {
            let key = |k: &str| format!("{case}{}.{k}", if nested { ".nested" } else { "" });
            let q = QuantizedWeight::nf4(weight, nested, weight.kind());
            assert_eq!(q.format, QuantFormat::Nf4 { double_quant: nested });
            assert!(q.parts[0].equal(&bnb[&key("packed")]), "{} codes", key("packed"));
            assert!(q.parts[1].equal(&bnb["code.nf4"]), "NF4 code table");
            if nested {
                assert!(q.parts[2].equal(&bnb[&key("absmax_codes")]), "{}", key("absmax_codes"));
                assert!(q.parts[3].equal(&bnb["code.dynamic"]));
                assert!(q.parts[4].equal(&bnb[&key("absmax_scales")]), "{}", key("absmax_scales"));
                assert!(q.parts[5].equal(&bnb[&key("offset")]), "{}", key("offset"));
            } else {
                assert!(q.parts[2].equal(&bnb[&key("absmax")]), "{}", key("absmax"));
            }
            let dequantized = q.dequantize(weight.kind());
            assert_eq!(dequantized.size(), [rows, cols]);
            assert!(dequantized.equal(&bnb[&key("dequantized")]), "{}", key("dequantized"));
        }
    }
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// Every logged metric within `tolerance` relative, the final adapters within 100 × that of their largest value:
/// Adam's step, g / √v, turns rounding differences of near-zero gradients into differences of up to the learning
/// rate (1e-2 here).
fn assert_close_runs(a: &Path, b: &Path, tolerance: f64) {
    let (ours, theirs) = (metrics(a), metrics(b));
    assert_eq!(ours.len(), theirs.len());
    for (x, y) in ours.iter().zip(&theirs) {
        for (key, value) in x.as_object().unwrap() {
            let (Some(p), Some(q)) = (value.as_f64(), y[key].as_f64()) else { continue };
            if key.contains("runtime") || key.contains("per_second") {
                continue;
            }
            assert!((p - q).abs() <= tolerance * q.abs().max(1e-3), "{key}: {p} vs {q}");
        }
    }
    let (ours, theirs) =
        (read_tensors(&a.join("adapter_model.safetensors")), read_tensors(&b.join("adapter_model.safetensors")));
    for (name, tensor) in &ours {
        let scale = theirs[name].abs().max().double_value(&[]).max(1e-3);
        let diff = max_abs_diff(tensor, &theirs[name]);
        assert!(diff <= 100.0 * tolerance * scale, "{name}: {diff:e} of {scale:e}");
    }
}

#[test]
fn lora_on_a_quantized_gguf_equals_lora_on_its_weights_dequantized_to_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    for (file, format) in [("tiny_q8_0.gguf", "Q8_0"), ("tiny_q4_k.gguf", "Q4_K")] {
        let gguf = fixture(&format!("quantized/{file}"));
        let folder = dir.path().join(format!("{file}.f32"));
        ok(&["convert", "--model", gguf.to_str().unwrap(), "--output", folder.to_str().unwrap()]);
        let lora = ["--use-peft", "--lora-target-modules", "all-linear", "--lora-r", "4", "--max-length", "64"];
        let kept = dir.path().join(format!("{file}.kept"));
        let stderr = dpo(&gguf, &kept, &lora);
        assert!(stderr.contains(&format!("14 projections kept in {format}")), "{stderr}");
        let dense = dir.path().join(format!("{file}.dense"));
        let stderr = dpo(&folder, &dense, &lora);
        assert!(!stderr.contains("projections kept"), "{stderr}");
        // the same numbers but for rounding: a dense down_proj's backward runs the fused SwiGLU's formula
        assert_close_runs(&kept, &dense, 1e-5);
        assert!((losses(&kept)[0] - std::f64::consts::LN_2).abs() < 1e-6, "B = 0: the policy is its reference");
    }
}

#[test]
fn lora_on_a_kept_quantized_gguf_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = fixture("quantized/tiny_q4_k.gguf");
    let lora = ["--use-peft", "--lora-target-modules", "all-linear", "--max-length", "64", "--save-steps", "2"];
    let whole = dir.path().join("whole");
    dpo(&gguf, &whole, &lora);
    let parts = dir.path().join("parts");
    dpo(&gguf, &parts, &lora);
    std::fs::remove_file(parts.join("adapter_model.safetensors")).unwrap();
    let checkpoint = parts.join("checkpoint-2");
    dpo(&gguf, &parts, &[&lora[..], &["--resume-from-checkpoint", checkpoint.to_str().unwrap()]].concat());
    let (a, b) = (
        read_tensors(&whole.join("adapter_model.safetensors")),
        read_tensors(&parts.join("adapter_model.safetensors")),
    );
    for (name, tensor) in &a {
        assert!(tensor.equal(&b[name]), "{name} after a resume");
    }
    assert_eq!(losses(&whole), losses(&parts));
}

#[test]
fn qlora_trains_on_nf4_and_merges_into_the_base_in_full_precision() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let out = dir.path().join("qlora");
    let qlora = ["--use-peft", "--load-in-4bit", "--use-bnb-nested-quant", "--lora-target-modules", "all-linear"];
    let stderr = dpo(&model, &out, &[&qlora[..], &["--merge"]].concat());
    assert!(stderr.contains("14 projections kept in NF4 (double-quantized)"), "{stderr}");
    let steps = losses(&out);
    assert!((steps[0] - std::f64::consts::LN_2).abs() < 1e-6 && steps[3] < steps[0], "{steps:?}");
    // --merge folds the adapter into the base loaded in full precision
    let merged = read_tensors(&out.join("merged/model.safetensors"));
    assert_eq!(merged["model.layers.0.mlp.down_proj.weight"].kind(), Kind::Float);
    // a second run is the same run
    let again = dir.path().join("again");
    dpo(&model, &again, &qlora);
    assert_eq!(losses(&again), steps);
}

#[test]
fn quantized_bases_refuse_what_they_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let m = model.to_str().unwrap();
    let data = fixture("trl_data/standard.jsonl");
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["dpo", "--model", m, "--dataset", data.to_str().unwrap(), "--max-steps", "1"];
        args.extend(["--output-dir", out.to_str().unwrap()]);
        args.extend(extra);
        let output = prefalign(&args);
        assert!(!output.status.success(), "{extra:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(run(&["--load-in-4bit"]).contains("add --use-peft"));
    assert!(run(&["--use-peft", "--load-in-8bit"]).contains("--load-in-8bit (bitsandbytes' LLM.int8"));
    let fp4 = run(&["--use-peft", "--load-in-4bit", "--bnb-4bit-quant-type", "fp4"]);
    assert!(fp4.contains("nf4 only"), "{fp4}");
    let output = prefalign(&["convert", "--model", m, "--load-in-4bit", "--output", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("full precision"));
}
