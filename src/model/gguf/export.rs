//! A model as a llama.cpp GGUF file, the inverse of `import`: the architecture's metadata as llama.cpp's
//! `convert_hf_to_gguf.py` writes it, the tokenizer and chat template, and the weights under llama.cpp's names
//! (q/k rows permuted for llama), matrices in the chosen type and vectors in F32.

use super::dequant::GgmlType;
use super::import::{gguf_tensor_name, permute_rows};
use super::reader::Value;
use super::writer::GgufWriter;
use crate::model::config::Architecture;
use crate::model::lora;
use crate::model::LoadedModel;
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::Tensor;

/// What the matrices are stored as (`--outtype`, llama.cpp's names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OutType {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl OutType {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            other => bail!("--outtype {other}: one of f32, f16, bf16, q8_0"),
        })
    }

    /// The type of a model stored in `dtype` ("float32", "bfloat16", "float16", as config.json names it).
    pub fn of_dtype(dtype: Option<&str>) -> Self {
        match dtype {
            Some("bfloat16") => Self::BF16,
            Some("float16") => Self::F16,
            _ => Self::F32,
        }
    }

    /// The type a matrix is stored as: a matrix whose rows do not fill Q8_0 blocks falls back to F16, as in
    /// llama.cpp's converter.
    fn type_of(self, matrix: &Tensor) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::BF16 => GgmlType::BF16,
            Self::Q8_0 if matrix.size()[1] % 32 != 0 => GgmlType::F16,
            Self::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::BF16 => 32,
        }
    }
}

/// Writes `model` (no adapters, weights not quantized) to `path` as GGUF, named `name` in its metadata.
pub fn write_gguf(model: &LoadedModel, path: &Path, outtype: OutType, name: &str) -> Result<()> {
    if model.adapter.is_some() || !model.model.quantized_weights().is_empty() {
        bail!("a GGUF file is written from a plain model: merge its adapter first, and load it unquantized");
    }
    let config = model.config();
    let tokenizer = model.tokenizer().context("a GGUF file carries the tokenizer")?;
    let arch = config.architecture()?;
    let sliding = (0..config.num_hidden_layers).any(|layer| config.sliding_window_of(layer).is_some());
    if sliding {
        bail!("sliding-window attention is not written to GGUF (llama.cpp's llama and qwen architectures lack it)");
    }
    let arch_name = gguf_architecture(arch);
    let mut gguf = GgufWriter::default();
    let text = |s: &str| Value::String(s.to_string());
    let int = |n: usize| Value::U32(n as u32);
    gguf.add("general.architecture", text(arch_name));
    gguf.add("general.type", text("model"));
    gguf.add("general.name", text(name));
    gguf.add("general.file_type", Value::U32(outtype.file_type()));
    gguf.add("general.quantization_version", Value::U32(2));
    let key = |k: &str| format!("{arch_name}.{k}");
    gguf.add(&key("vocab_size"), int(config.vocab_size));
    gguf.add(&key("context_length"), int(config.max_position_embeddings));
    gguf.add(&key("embedding_length"), int(config.hidden_size));
    gguf.add(&key("block_count"), int(config.num_hidden_layers));
    gguf.add(&key("feed_forward_length"), int(config.intermediate_size));
    gguf.add(&key("attention.head_count"), int(config.num_attention_heads));
    gguf.add(&key("attention.head_count_kv"), int(config.num_kv_heads()));
    gguf.add(&key("attention.key_length"), int(config.head_dim()));
    gguf.add(&key("attention.value_length"), int(config.head_dim()));
    gguf.add(&key("rope.dimension_count"), int(config.head_dim()));
    let rope = config.rope();
    gguf.add(&key("rope.freq_base"), Value::F32(rope.rope_theta.unwrap_or(10_000.0) as f32));
    match rope.rope_type.as_deref() {
        None | Some("default") => {}
        Some("linear") => {
            gguf.add(&key("rope.scaling.type"), text("linear"));
            gguf.add(&key("rope.scaling.factor"), Value::F32(rope.factor.unwrap_or(1.0) as f32));
        }
        Some(other) => bail!("RoPE type {other} is not written to GGUF yet"),
    }
    gguf.add(&key("attention.layer_norm_rms_epsilon"), Value::F32(config.rms_norm_eps as f32));
    for (k, value) in tokenizer.gguf_metadata(config.vocab_size)? {
        gguf.add(&k, value);
    }

    let mut tensors: Vec<(String, Tensor)> =
        model.vs.variables().into_iter().filter(|(name, _)| !lora::is_adapter_state(name)).collect();
    tensors.sort_by_key(|(name, _)| layer_order(name));
    for (hf_name, tensor) in tensors {
        let tensor = in_llama_cpp_row_order(model, &hf_name, tensor.detach());
        // vectors (norms, biases) stay F32, as llama.cpp's converter keeps them
        let ty = if tensor.dim() == 1 { GgmlType::F32 } else { outtype.type_of(&tensor) };
        gguf.add_tensor(&gguf_tensor_name(&hf_name)?, tensor, ty)?;
    }
    gguf.write(path)
}

/// llama.cpp's architecture name (it runs Mistral models without a sliding window as llama).
fn gguf_architecture(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
    }
}

/// `rows` (a tensor whose rows are those of the weight `hf_name`, [out, …]) in the order llama.cpp keeps that
/// weight's rows: a llama model's q/k rows permuted, every other as it is.
fn in_llama_cpp_row_order(model: &LoadedModel, hf_name: &str, rows: Tensor) -> Tensor {
    let config = model.config();
    if !matches!(config.architecture(), Ok(Architecture::Llama | Architecture::Mistral)) {
        return rows;
    }
    if hf_name.contains("self_attn.q_proj.") {
        permute_rows(&rows, config.num_attention_heads as i64)
    } else if hf_name.contains("self_attn.k_proj.") {
        permute_rows(&rows, config.num_kv_heads() as i64)
    } else {
        rows
    }
}

/// The embeddings, the layers in order, then the final norm and the output layer (llama.cpp's order).
fn layer_order(name: &str) -> (u64, String) {
    let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()?.parse::<u64>().ok());
    match (name, layer) {
        ("model.embed_tokens.weight", _) => (0, String::new()),
        (_, Some(layer)) => (1 + layer, name.to_string()),
        _ => (u64::MAX, name.to_string()),
    }
}

/// Writes `model`'s LoRA adapters alone as a llama.cpp LoRA adapter (`llama-cli --lora`), laid out as llama.cpp's
/// `convert_lora_to_gguf.py` writes one: `general.type` "adapter", `adapter.type` "lora", `adapter.lora.alpha`
/// (α such that llama.cpp's α / r is the adapter's scaling, rsLoRA's included), and per adapted matrix
/// `<name>.lora_a` [r, in] and `<name>.lora_b` [out, r], B's rows permuted as the base's q/k rows are for llama.
pub fn write_lora_gguf(model: &LoadedModel, path: &Path, outtype: OutType, name: &str) -> Result<()> {
    let adapter = model.adapter.as_ref().context("no adapter to write (--adapter DIR)")?;
    if !adapter.config.modules_to_save.is_empty() {
        bail!("a llama.cpp LoRA adapter holds low-rank updates only, not modules_to_save: merge the adapter instead");
    }
    let arch_name = gguf_architecture(model.config().architecture()?);
    let mut gguf = GgufWriter::default();
    gguf.add("general.architecture", Value::String(arch_name.into()));
    gguf.add("general.type", Value::String("adapter".into()));
    gguf.add("general.name", Value::String(name.into()));
    gguf.add("general.file_type", Value::U32(outtype.file_type()));
    gguf.add("general.quantization_version", Value::U32(2));
    gguf.add("adapter.type", Value::String("lora".into()));
    let alpha = adapter.config.scaling() * adapter.config.r as f64;
    gguf.add("adapter.lora.alpha", Value::F32(alpha as f32));
    let mut variables: Vec<(String, Tensor)> =
        model.adapter_variables().into_iter().filter(|(n, _)| !lora::is_saved_module(n)).collect();
    variables.sort_by_key(|(n, _)| layer_order(n));
    for (variable, tensor) in variables {
        let (module, suffix) = match variable.strip_suffix(".lora_A.weight") {
            Some(module) => (module, "lora_a"),
            None => (variable.strip_suffix(".lora_B.weight").context("an adapter tensor is A or B")?, "lora_b"),
        };
        let weight = format!("{module}.weight");
        // B's rows are the weight's rows
        let tensor = tensor.detach();
        let tensor = if suffix == "lora_b" { in_llama_cpp_row_order(model, &weight, tensor) } else { tensor };
        let ty = outtype.type_of(&tensor);
        gguf.add_tensor(&format!("{}.{suffix}", gguf_tensor_name(&weight)?), tensor, ty)?;
    }
    gguf.write(path)
}
