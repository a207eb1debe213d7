//! Text generation with a KV cache: greedy or temperature / top-p sampling, stopping at EOS.

use crate::model::decoder::CausalLm;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct SamplingOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub greedy: bool,
    pub seed: u64,
}

impl SamplingOptions {
    fn is_greedy(&self) -> bool {
        self.greedy || self.temperature == 0.0
    }
}

/// Generates up to `max_new_tokens` after `prompt_ids`, calling `on_token` with each new id; stops after
/// the first id in `stop_ids` (which is returned too, like transformers).
pub fn generate(
    model: &CausalLm,
    prompt_ids: &[i64],
    stop_ids: &[i64],
    options: &SamplingOptions,
    mut on_token: impl FnMut(i64) -> Result<()>,
) -> Result<Vec<i64>> {
    if prompt_ids.is_empty() {
        bail!("the prompt is empty: nothing to condition generation on");
    }
    if !(options.top_p > 0.0 && options.top_p <= 1.0) {
        bail!("top-p must be in (0, 1], got {}", options.top_p);
    }
    if options.temperature < 0.0 {
        bail!("temperature must be >= 0, got {}", options.temperature);
    }
    let device = model.lm_head_weight().device();
    tch::manual_seed(options.seed as i64);
    let mut cache = model.new_cache();
    let mut generated = Vec::new();
    let mut input = Tensor::from_slice(prompt_ids).unsqueeze(0).to_device(device); // [1, len]
    tch::no_grad(|| -> Result<()> {
        for _ in 0..options.max_new_tokens {
            let logits = model.forward_cached(&input, None, &mut cache); // [1, len, vocab]
            let last = logits.select(1, -1).squeeze_dim(0).to_kind(Kind::Float); // [vocab]
            let next = if options.is_greedy() { last.argmax(0, false) } else { sample(&last, options) };
            let next = next.int64_value(&[]);
            generated.push(next);
            on_token(next)?;
            if stop_ids.contains(&next) {
                break;
            }
            input = Tensor::from_slice(&[next]).unsqueeze(0).to_device(device);
        }
        Ok(())
    })?;
    Ok(generated)
}

/// Samples from softmax(logits / T) restricted to the smallest set of tokens whose mass reaches top_p.
fn sample(logits: &Tensor, options: &SamplingOptions) -> Tensor {
    let probs = (logits / options.temperature).softmax(-1, Kind::Float);
    let probs = if options.top_p < 1.0 {
        let (sorted, order) = probs.sort(-1, true);
        let before = sorted.cumsum(-1, Kind::Float) - &sorted; // mass of the more likely tokens
        let keep_sorted = before.lt(options.top_p); // always keeps the most likely token
        let keep = keep_sorted.zeros_like().scatter(-1, &order, &keep_sorted);
        probs * keep.to_kind(Kind::Float)
    } else {
        probs
    };
    probs.multinomial(1, false).squeeze_dim(0)
}
