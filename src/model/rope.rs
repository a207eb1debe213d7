//! Rotary position embeddings, computed as transformers does (f32 frequencies, cos/sin cast to the
//! activations' dtype), including the `linear` and `llama3` frequency scalings.

use crate::model::config::ModelConfig;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_positions: f64 },
}

impl RopeScaling {
    pub fn from_config(config: &ModelConfig) -> Result<Self> {
        let rope = config.rope();
        let required = |value: Option<f64>, name: &str| match value {
            Some(v) => Ok(v),
            None => bail!("rope type \"{}\" needs `{name}`", rope.rope_type.as_deref().unwrap_or("")),
        };
        Ok(match rope.rope_type.as_deref().unwrap_or("default") {
            "default" => Self::None,
            "linear" => Self::Linear { factor: required(rope.factor, "factor")? },
            "llama3" => Self::Llama3 {
                factor: required(rope.factor, "factor")?,
                low_freq_factor: required(rope.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: required(rope.high_freq_factor, "high_freq_factor")?,
                original_max_positions: required(
                    rope.original_max_position_embeddings.map(|v| v as f64),
                    "original_max_position_embeddings",
                )?,
            },
            other => bail!("unsupported rope type \"{other}\" (supported: default, linear, llama3)"),
        })
    }
}

pub struct Rope {
    inv_freq: Tensor, // [head_dim / 2], f32
}

impl Rope {
    pub fn new(config: &ModelConfig, device: Device) -> Result<Self> {
        let dim = config.head_dim() as i64;
        let theta = config.rope().rope_theta.unwrap_or(10_000.0);
        // 1 / theta^(2i/d), in f32 like transformers, and on the CPU for every device: a transformers model that
        // TRL's Trainer moves to a GPU computed them on the CPU, and a GPU's pow may round them apart.
        let exponents =
            Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim as f64;
        let mut inv_freq = Tensor::from(theta).to_kind(Kind::Float).pow(&exponents).reciprocal();
        match RopeScaling::from_config(config)? {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq /= factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
                let low_freq_wavelen = original_max_positions / low_freq_factor;
                let high_freq_wavelen = original_max_positions / high_freq_factor;
                // PyTorch's `scalar / tensor` is `tensor.reciprocal() * scalar`; written the same way for equal rounding.
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                // Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
                let divided: Tensor = &inv_freq / factor;
                let scaled = divided.where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
                let ratio = wavelen.reciprocal() * original_max_positions;
                let smooth = (ratio - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let one_minus_smooth: Tensor = 1.0 - &smooth;
                let smoothed = one_minus_smooth * &scaled / factor + &smooth * &scaled;
                let is_medium = wavelen.ge(high_freq_wavelen).logical_and(&wavelen.le(low_freq_wavelen));
                inv_freq = smoothed.where_self(&is_medium, &scaled);
            }
        }
        Ok(Self { inv_freq: inv_freq.to_device(device) })
    }

    /// The rotary tables for positions `start..start+len`, each [len, head_dim], in `kind`.
    pub fn tables(&self, start: i64, len: i64, kind: Kind) -> RotaryTables {
        let positions = Tensor::arange_start(start, start + len, (Kind::Float, self.inv_freq.device()));
        let freqs = positions.outer(&self.inv_freq); // [len, head_dim/2]
        RotaryTables::new(&Tensor::cat(&[&freqs, &freqs], -1), kind) // angles [len, head_dim]
    }

    /// The rotary tables at `positions` [batch, len] (int64), each [batch, 1, len, head_dim], in `kind`.
    pub fn tables_at(&self, positions: &Tensor, kind: Kind) -> RotaryTables {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq; // [batch, len, head_dim/2]
        RotaryTables::new(&Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1), kind)
        // angles [batch, 1, len, head_dim]
    }
}

/// cos of the rotary angles, and their sin with the first half negated, so that transformers'
/// `x * cos + rotate_half(x) * sin` (rotate_half(x) = [-x2, x1]) is `x * cos + roll(x, half) * signed_sin`: the same
/// numbers from one roll instead of a negation, a concatenation and two slices (and fewer kernels backward).
pub struct RotaryTables {
    cos: Tensor,
    signed_sin: Tensor,
}

impl RotaryTables {
    fn new(angles: &Tensor, kind: Kind) -> Self {
        let sin = angles.sin().to_kind(kind);
        let half = sin.size().last().expect("angles") / 2;
        let signed_sin = Tensor::cat(&[&sin.narrow(-1, 0, half).neg(), &sin.narrow(-1, half, half)], -1);
        RotaryTables { cos: angles.cos().to_kind(kind), signed_sin }
    }

    /// x * cos + rotate_half(x) * sin for x [batch, heads, len, head_dim].
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        x * &self.cos + x.roll([half], [3]) * &self.signed_sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The roll form gives transformers' `x * cos + rotate_half(x) * sin` bit for bit, and the same gradient, for
    /// f32 and bf16 activations (under autocast q and k are bf16 and the tables f32).
    #[test]
    fn rotary_tables_equal_rotate_half() {
        tch::manual_seed(0);
        let angles = Tensor::randn([2, 1, 5, 8], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let tables = RotaryTables::new(&angles, Kind::Float);
        let (cos, sin) = (angles.cos(), angles.sin());
        for kind in [Kind::Float, Kind::BFloat16] {
            let x_leaf = Tensor::randn([2, 3, 5, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
            let x = x_leaf.to_kind(kind);
            let rotate_half = Tensor::cat(&[&x.narrow(3, 4, 4).neg(), &x.narrow(3, 0, 4)], 3);
            let want = &x * &cos + rotate_half * &sin;
            let got = tables.apply(&x);
            assert!(got.equal(&want), "{kind:?}: values differ");
            let probe = Tensor::randn([2, 3, 5, 8], (Kind::Float, tch::Device::Cpu));
            let grad = |y: &Tensor| {
                (y * &probe).sum(Kind::Float).backward();
                let g = x_leaf.grad().copy();
                let _ = x_leaf.grad().zero_();
                g
            };
            assert!(grad(&got).equal(&grad(&want)), "{kind:?}: gradients differ");
        }
    }
}
