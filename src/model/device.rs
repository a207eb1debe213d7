//! `--device` and `--dtype` as the CLI spells them.

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
pub fn parse_device(spec: &str) -> Result<Device> {
    Ok(match spec {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => cuda(0)?,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(index) => cuda(index)?,
            None => bail!("invalid device \"{other}\" (expected cpu, cuda, cuda:N or auto)"),
        },
    })
}

fn cuda(index: usize) -> Result<Device> {
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        bail!(
            "device cuda:{index} is not available ({count} CUDA device(s) visible{})",
            if count == 0 { "; this build or machine has no CUDA" } else { "" }
        );
    }
    Ok(Device::Cuda(index))
}

/// `f32` or `bf16` (with the usual aliases).
pub fn parse_dtype(spec: &str) -> Result<Kind> {
    Ok(match spec {
        "f32" | "float32" | "fp32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("invalid dtype \"{other}\" (expected f32 or bf16)"),
    })
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}
