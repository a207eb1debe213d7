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
        "f16" | "float16" | "fp16" | "half" => {
            bail!("dtype {spec}: float16 weights are not supported; use bfloat16 (the same memory) or float32")
        }
        other => bail!("invalid dtype \"{other}\" (expected float32, bfloat16 or auto)"),
    })
}

/// `dtype: auto`, as transformers resolves it: the `dtype` (or older `torch_dtype`) in a model folder's
/// config.json; float32 for a GGUF file (its blocks are dequantized) or a config without one. A float16 checkpoint
/// loads as float32, since float16 weights are not supported.
pub fn checkpoint_dtype(model: &std::path::Path) -> Result<Kind> {
    let config = model.join("config.json");
    if !config.is_file() {
        return Ok(Kind::Float);
    }
    let text = std::fs::read_to_string(&config)?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let stored = json.get("dtype").or_else(|| json.get("torch_dtype")).and_then(|v| v.as_str()).unwrap_or("float32");
    Ok(match stored {
        "bfloat16" => Kind::BFloat16,
        "float16" => {
            tracing::warn!("{}: float16 weights load as float32 (dtype auto)", config.display());
            Kind::Float
        }
        _ => Kind::Float,
    })
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// Memory in use on CUDA device `index` (total minus free, as `nvidia-smi` counts it: the CUDA context and
/// libtorch's cached blocks included), from the CUDA runtime libtorch has loaded; None without CUDA. libtorch's
/// own allocator statistics are not reachable through tch, so the benchmark samples this after every step.
pub fn cuda_memory_used_bytes(index: usize) -> Option<u64> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    type GetDevice = unsafe extern "C" fn(*mut i32) -> i32;
    type SetDevice = unsafe extern "C" fn(i32) -> i32;
    if !tch::Cuda::is_available() {
        return None;
    }
    // SAFETY: RTLD_NOLOAD only finds a library that libtorch_cuda already loaded; these three functions have these
    // C signatures in every CUDA runtime.
    unsafe {
        let handle = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
            .iter()
            .map(|name| std::ffi::CString::new(*name).expect("no NUL"))
            .map(|name| libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD))
            .find(|handle| !handle.is_null())?;
        let function =
            |name: &std::ffi::CStr| Some(libc::dlsym(handle, name.as_ptr())).filter(|symbol| !symbol.is_null());
        let mem_get_info: MemGetInfo = std::mem::transmute(function(c"cudaMemGetInfo")?);
        let get_device: GetDevice = std::mem::transmute(function(c"cudaGetDevice")?);
        let set_device: SetDevice = std::mem::transmute(function(c"cudaSetDevice")?);
        // cudaMemGetInfo reports the thread's current device, which libtorch's device guards leave at the default
        let mut current = 0;
        if get_device(&mut current) != 0 || set_device(index as i32) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        let status = mem_get_info(&mut free, &mut total);
        set_device(current);
        (status == 0).then(|| (total - free) as u64)
    }
}
