//! Logits parity with transformers on tiny random models of every supported architecture
//! (fixtures from tools/fixtures/make_model_fixtures.py), and KV-cache consistency.

use crate::common::{fixture, max_abs_diff, read_tensors};
use prefalign::model;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

/// Loads fixture model `name` and returns the largest |logit - transformers' logit| over real tokens.
fn parity(name: &str, dtype: Kind) -> f64 {
    let dir = fixture(&format!("models/{name}"));
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let loaded = model::load(&dir, Device::Cpu, dtype).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let (ids, mask) = (&expected["input_ids"], &expected["attention_mask"]);
    let logits = tch::no_grad(|| loaded.model.forward(ids, Some(mask))).to_kind(Kind::Float);
    assert_eq!(logits.size(), expected["logits"].size(), "{name}: logits shape");
    // Padded positions carry no meaning (transformers lets them attend differently); compare real tokens.
    let real = mask.to_kind(Kind::Bool).unsqueeze(-1);
    let diff = (logits - &expected["logits"]).abs().masked_fill(&real.logical_not(), 0.0);
    diff.max().double_value(&[])
}

macro_rules! parity_test {
    ($test:ident, $name:literal) => {
        #[test]
        fn $test() {
            let diff = parity($name, Kind::Float);
            eprintln!("{}: max |logit diff| = {diff:.3e}", $name);
            assert!(diff <= TOLERANCE, "{}: max |logit diff| {diff:.3e} > {TOLERANCE:e}", $name);
        }
    };
}

parity_test!(llama_tied, "llama");
parity_test!(llama_untied_with_llama3_rope, "llama_untied_llama3rope");
parity_test!(mistral_head_dim_and_sliding_window, "mistral");
parity_test!(qwen2_qkv_bias, "qwen2");
parity_test!(qwen3_qk_norm, "qwen3");
parity_test!(llama_sharded_safetensors, "llama_sharded");
parity_test!(llama_bf16_weights_computed_in_f32, "llama_bf16");

#[test]
fn bf16_compute_stays_close_to_f32() {
    let diff = parity("llama", Kind::BFloat16);
    // bf16 keeps 8 bits of mantissa; logits of this tiny model are O(1).
    assert!(diff < 5e-2, "bf16 max |logit diff| {diff:.3e}");
}

/// Decoding token by token through the KV cache gives the logits of one full forward pass, including a
/// sliding window shorter than the sequence.
#[test]
fn kv_cache_matches_full_forward() {
    for name in ["llama", "mistral", "qwen3"] {
        let dir = fixture(&format!("models/{name}"));
        let loaded = model::load(&dir, Device::Cpu, Kind::Float).unwrap();
        let ids = read_tensors(&dir.join("expected.safetensors"))["input_ids"].get(0).unsqueeze(0); // [1, 12]
        let full = tch::no_grad(|| loaded.model.forward(&ids, None));
        let mut cache = loaded.model.new_cache();
        let first = tch::no_grad(|| loaded.model.forward_cached(&ids.narrow(1, 0, 5), None, &mut cache));
        let mut steps = vec![first];
        for t in 5..12 {
            steps.push(tch::no_grad(|| loaded.model.forward_cached(&ids.narrow(1, t, 1), None, &mut cache)));
        }
        let incremental = Tensor::cat(&steps, 1);
        let diff = max_abs_diff(&incremental, &full);
        assert!(diff < 1e-5, "{name}: cached vs full forward differ by {diff:.3e}");
    }
}
