//! AdamW with PyTorch's arithmetic (`torch.optim.AdamW`), weight decay only where transformers' Trainer applies
//! it (not on biases or norm weights), and gradient clipping as `clip_grad_norm_`. Written on tensors rather
//! than through tch's optimizer so that its state can be checkpointed and restored exactly.

use std::collections::BTreeMap;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct ParamState {
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
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
                    param,
                };
                (name, state)
            })
            .collect();
        Self { config, params, step: 0 }
    }

    pub fn zero_grad(&mut self) {
        for state in self.params.values_mut() {
            let mut grad = state.param.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self.params.values().map(|s| s.param.grad()).filter(Tensor::defined).collect();
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        tch::no_grad(|| {
            for mut grad in grads {
                let _ = grad.g_mul_(&coef);
            }
        });
        total.double_value(&[])
    }

    /// One AdamW step at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        tch::no_grad(|| {
            for state in self.params.values_mut() {
                let grad = state.param.grad();
                if !grad.defined() {
                    continue;
                }
                if state.decay && weight_decay != 0.0 {
                    let _ = state.param.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let _ = state.exp_avg.lerp_(&grad, 1.0 - beta1);
                // (1-β2)·g·g, multiplied in the order of PyTorch's addcmul kernel.
                let _ = state.exp_avg_sq.g_mul_scalar_(beta2).addcmul_(&grad, &(&grad * (1.0 - beta2)));
                let denom = (state.exp_avg_sq.sqrt() / bias_correction2_sqrt) + eps;
                let _ = state.param.addcdiv_(&(&state.exp_avg * -step_size), &denom);
            }
        });
    }

    /// The moments as named tensors, for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|(name, s)| {
                [(format!("{name}.exp_avg"), s.exp_avg.shallow_clone()), (format!("{name}.exp_avg_sq"), s.exp_avg_sq.shallow_clone())]
            })
            .collect()
    }

    /// Restores the moments saved by `state_tensors`.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: i64) -> anyhow::Result<()> {
        tch::no_grad(|| {
            for (name, state) in self.params.iter_mut() {
                for (suffix, target) in [("exp_avg", &mut state.exp_avg), ("exp_avg_sq", &mut state.exp_avg_sq)] {
                    let key = format!("{name}.{suffix}");
                    let saved = tensors.get(&key).ok_or_else(|| anyhow::anyhow!("optimizer state {key} missing from the checkpoint"))?;
                    target.copy_(saved);
                }
            }
            Ok::<(), anyhow::Error>(())
        })?;
        self.step = step;
        Ok(())
    }

    pub fn kind(&self) -> Option<Kind> {
        self.params.values().next().map(|s| s.param.kind())
    }
}
