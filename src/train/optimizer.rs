//! AdamW as transformers' Trainer runs it by default (`torch.optim.AdamW(fused=True)`: torch's fused kernel), weight
//! decay only where the Trainer applies it (not on biases or norm weights), and gradient clipping as
//! `clip_grad_norm_`. Not tch's optimizer, so that its state can be checkpointed and restored exactly.

use crate::model::fused::{handle, panic_on_error};
use std::collections::BTreeMap;
use std::ffi::c_char;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    /// src/train/optimizer.cpp: `torch._fused_adamw_` over `count` parameters; null or an error to free().
    fn prefalign_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        step: *mut C_tensor,
        count: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    /// src/train/optimizer.cpp: `clip_grad_norm_` over `count` gradients; null or an error to free().
    fn prefalign_clip_grad_norm(
        grads: *const *mut C_tensor,
        count: usize,
        max_norm: f64,
        foreach: bool,
        total_out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn prefalign_clear_grad(param: *mut C_tensor);
}

/// AdamW's settings, with transformers' `TrainingArguments` defaults.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

struct ParamState {
    param: Tensor,
    /// empty where another rank owns the parameter's update (`shard`)
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
    /// whether this optimizer updates it
    owned: bool,
}

pub struct AdamW {
    config: AdamWConfig,
    params: BTreeMap<String, ParamState>,
    /// optimizer steps taken
    pub step: i64,
}

/// transformers' `get_decay_parameter_names`: biases and normalization weights get no weight decay.
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

impl AdamW {
    /// Tracks every trainable tensor in `params` (name -> parameter).
    pub fn new(params: BTreeMap<String, Tensor>, config: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .filter(|(_, p)| p.requires_grad())
            .map(|(name, param)| {
                let state = ParamState {
                    exp_avg: param.zeros_like(),
                    exp_avg_sq: param.zeros_like(),
                    decay: decays(&name),
                    owned: true,
                    param,
                };
                (name, state)
            })
            .collect();
        Self { config, params, step: 0 }
    }

    /// Optimizer-state sharding (ZeRO-1): from now on only the parameters `owned` names are updated, and only their
    /// moments are kept; the others' owners update them. Gradient clipping still sees every gradient.
    pub fn shard(&mut self, owned: impl Fn(&str) -> bool) {
        for (name, state) in self.params.iter_mut() {
            state.owned = owned(name);
            if !state.owned {
                state.exp_avg = Tensor::empty([0], (state.param.kind(), state.param.device()));
                state.exp_avg_sq = state.exp_avg.shallow_clone();
            }
        }
    }

    /// The parameters it tracks, by name.
    pub fn parameters(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.params.iter().map(|(name, s)| (name, &s.param))
    }

    /// torch's `zero_grad(set_to_none=True)`, as transformers' Trainer calls it: gradients hold no memory during
    /// the next forward pass, which lowers a step's peak by most of their size (docs/PERFORMANCE.md).
    pub fn zero_grad(&mut self) {
        for state in self.params.values() {
            // Safety: the handle points at a parameter that `self.params` keeps alive.
            unsafe { prefalign_clear_grad(handle(&state.param)) };
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping. As
    /// torch's `clip_grad_norm_`, with its foreach kernels on CUDA (a few launches instead of two per parameter).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self.params.values().map(|s| s.param.grad()).filter(Tensor::defined).collect();
        let Some(first) = grads.first() else { return 0.0 };
        clip_grad_norm(&grads, max_norm, first.device().is_cuda()).double_value(&[])
    }

    /// One AdamW step at learning rate `lr`: torch's fused kernel (`adamw_torch_fused`, transformers' default
    /// optimizer), once for the parameters with weight decay and once for those without.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        for decay in [true, false] {
            let states: Vec<&ParamState> =
                self.params.values().filter(|s| s.owned && s.decay == decay && s.param.grad().defined()).collect();
            if states.is_empty() {
                continue;
            }
            let grads: Vec<Tensor> = states.iter().map(|s| s.param.grad()).collect();
            // torch keeps the step count as a float32 tensor on the parameters' device
            let step = Tensor::from(self.step as f32).to_device(states[0].param.device());
            let params: Vec<*mut C_tensor> = states.iter().map(|s| handle(&s.param)).collect();
            let exp_avgs: Vec<*mut C_tensor> = states.iter().map(|s| handle(&s.exp_avg)).collect();
            let exp_avg_sqs: Vec<*mut C_tensor> = states.iter().map(|s| handle(&s.exp_avg_sq)).collect();
            let grads: Vec<*mut C_tensor> = grads.iter().map(handle).collect();
            let decay_rate = if decay { weight_decay } else { 0.0 };
            // Safety: every handle points at a tensor that `states`, `grads` or `step` keeps alive for the call.
            let error = tch::no_grad(|| unsafe {
                prefalign_fused_adamw(
                    params.as_ptr(),
                    grads.as_ptr(),
                    exp_avgs.as_ptr(),
                    exp_avg_sqs.as_ptr(),
                    handle(&step),
                    params.len(),
                    lr,
                    beta1,
                    beta2,
                    decay_rate,
                    eps,
                )
            });
            // Only a broken invariant fails here (tensors of mixed devices or kinds): a bug, not a user error.
            panic_on_error("torch's fused AdamW", error);
        }
    }

    /// The moments it keeps as named tensors, for a checkpoint (with `shard`, the owned parameters' only).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter(|(_, s)| s.owned)
            .flat_map(|(name, s)| {
                [
                    (format!("{name}.exp_avg"), s.exp_avg.shallow_clone()),
                    (format!("{name}.exp_avg_sq"), s.exp_avg_sq.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Restores the moments saved by `state_tensors`.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: i64) -> anyhow::Result<()> {
        tch::no_grad(|| {
            for (name, state) in self.params.iter_mut().filter(|(_, s)| s.owned) {
                for (suffix, target) in [("exp_avg", &mut state.exp_avg), ("exp_avg_sq", &mut state.exp_avg_sq)] {
                    let key = format!("{name}.{suffix}");
                    let saved = tensors
                        .get(&key)
                        .ok_or_else(|| anyhow::anyhow!("optimizer state {key} missing from the checkpoint"))?;
                    target.copy_(saved);
                }
            }
            Ok::<(), anyhow::Error>(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// `clip_grad_norm_` over gradients of one device and kind, torch's foreach kernels or one tensor at a time; the
/// norm before clipping, a 0-d tensor.
fn clip_grad_norm(grads: &[Tensor], max_norm: f64, foreach: bool) -> Tensor {
    let handles: Vec<*mut C_tensor> = grads.iter().map(handle).collect();
    let mut total = std::ptr::null_mut();
    // Safety: every handle points at a gradient that `grads` keeps alive for the call.
    let error = tch::no_grad(|| unsafe {
        prefalign_clip_grad_norm(handles.as_ptr(), handles.len(), max_norm, foreach, &mut total)
    });
    // Only a broken invariant fails here (gradients of mixed devices or kinds): a bug, not a user error.
    panic_on_error("clip_grad_norm", error);
    // Safety: on success the function stored a fresh `at::Tensor *` that nothing else owns.
    unsafe { Tensor::from_ptr(total) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The first optimizer step of TRL's DPO fixture run (`adamw_step1`: model.norm.weight, recorded from
    /// transformers' default fused AdamW) is reproduced bit for bit.
    #[test]
    fn first_step_equals_torchs_fused_adamw() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/training/dpo_sigmoid_ref_model.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let probe = &fixture["adamw_step1"];
        let floats = |key: &str| -> Vec<f32> {
            probe[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
        };
        let param = Tensor::from_slice(&floats("value")).set_requires_grad(true);
        // d/dparam of sum(param · g) is exactly g
        (&param * Tensor::from_slice(&floats("grad_post_clip"))).sum(Kind::Float).backward();
        let betas = probe["betas"].as_array().unwrap();
        let config = AdamWConfig {
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: probe["eps"].as_f64().unwrap(),
            weight_decay: 0.0,
        };
        let mut adamw = AdamW::new(BTreeMap::from([("model.norm.weight".to_string(), param.shallow_clone())]), config);
        adamw.step(probe["lr"].as_f64().unwrap());
        let state = &adamw.params["model.norm.weight"];
        for (key, got) in [("value_after", &param), ("exp_avg", &state.exp_avg), ("exp_avg_sq", &state.exp_avg_sq)] {
            assert_eq!(Vec::<f32>::try_from(got.detach()).unwrap(), floats(key), "{key}");
        }
    }

    /// Clipping scales every gradient by max_norm / (norm + 1e-6) when the global norm exceeds max_norm, and the
    /// foreach kernels (torch's choice on CUDA) give the same gradients and norm as one tensor at a time.
    #[test]
    fn clip_grad_norm_scales_to_max_norm_either_way() {
        tch::manual_seed(3);
        let fresh = || {
            [
                Tensor::randn([7, 5], (Kind::Float, tch::Device::Cpu)),
                Tensor::randn([11], (Kind::Float, tch::Device::Cpu)) * 3.0,
            ]
        };
        let originals = fresh();
        let norm_f64 = originals
            .iter()
            .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let mut clipped = Vec::new();
        for foreach in [false, true] {
            let grads: Vec<Tensor> = originals.iter().map(|g| g.copy()).collect();
            let total = clip_grad_norm(&grads, 1.0, foreach).double_value(&[]);
            assert!((total - norm_f64).abs() < 1e-5 * norm_f64, "norm {total} vs {norm_f64}");
            let coef = 1.0 / (total + 1e-6);
            for (got, original) in grads.iter().zip(&originals) {
                let want = original.to_kind(Kind::Double) * coef;
                assert!((got.to_kind(Kind::Double) - want).abs().max().double_value(&[]) < 1e-6);
            }
            clipped.push(grads);
        }
        for (plain, foreach) in clipped[0].iter().zip(&clipped[1]) {
            assert!(plain.equal(foreach), "foreach and per-tensor clipping differ");
        }
        // under max_norm nothing changes
        let grads: Vec<Tensor> = originals.iter().map(|g| g.copy()).collect();
        let _ = clip_grad_norm(&grads, 1e3, false);
        assert!(grads.iter().zip(&originals).all(|(g, o)| g.equal(o)));
    }
}
