//! Learning-rate schedules as transformers' `get_scheduler` defines them: the rate at optimizer step `step`
//! (0-based) is `learning_rate * factor(step)`.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    /// cosine decaying to `min_lr_rate` times the base rate
    CosineWithMinLr {
        min_lr_rate: f64,
    },
}

impl Schedule {
    pub fn parse(name: &str, min_lr_rate: f64) -> Result<Self> {
        Ok(match name {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "cosine_with_min_lr" => Self::CosineWithMinLr { min_lr_rate },
            other => bail!(
                "unknown lr_scheduler_type \"{other}\" (expected constant, constant_with_warmup, linear, cosine, cosine_with_min_lr)"
            ),
        })
    }

    /// The multiplier of the base rate at `step` of `total` with `warmup` warmup steps.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (step, warmup, total) = (step as f64, warmup as f64, total as f64);
        if self != Self::Constant && step < warmup {
            return step / warmup.max(1.0);
        }
        let progress = (step - warmup) / (total - warmup).max(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            Self::Cosine => cosine.max(0.0),
            Self::CosineWithMinLr { min_lr_rate } => cosine.max(0.0) * (1.0 - min_lr_rate) + min_lr_rate,
        }
    }
}

/// transformers' warmup: `warmup_steps` when positive, else `ceil(warmup_ratio * total)`.
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * total as f64).ceil() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        assert_eq!(Schedule::Constant.factor(0, 5, 10), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(2, 4, 10), 0.5);
        assert_eq!(Schedule::Linear.factor(2, 4, 10), 0.5);
        assert_eq!(Schedule::Linear.factor(7, 4, 10), 0.5);
        assert!((Schedule::Cosine.factor(7, 4, 10) - 0.5).abs() < 1e-12);
        assert!((Schedule::CosineWithMinLr { min_lr_rate: 0.1 }.factor(10, 0, 10) - 0.1).abs() < 1e-12);
        assert_eq!(warmup_steps(0, 0.1, 95), 10);
        assert_eq!(warmup_steps(3, 0.1, 95), 3);
        assert!(Schedule::parse("cosine_restarts", 0.0).is_err());
    }
}
