//! A GGUF file as a Hugging Face model: config from `<arch>.*` metadata, tensors renamed from llama.cpp's
//! names (with llama.cpp's Q/K row permutation undone for llama), and a tokenizer from `tokenizer.ggml.*`.

use super::dequant::GgmlType;
use super::reader::{GgufFile, Value};
use crate::model::config::{Architecture, ModelConfig, RopeParameters, TokenIds};
use crate::model::tokenizer::TextTokenizer;
use crate::model::weights::WeightSource;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

pub struct GgufModel {
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub weights: GgufWeights,
}

/// The tensors of a GGUF file under Hugging Face names, dequantized to f32 when asked for.
pub struct GgufWeights {
    file: GgufFile,
    /// HF name -> index into `file.tensors`
    names: BTreeMap<String, usize>,
    /// (num_heads, num_kv_heads) when Q/K rows must be un-permuted (llama.cpp's llama conversion).
    unpermute: Option<(i64, i64)>,
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let context = || format!("in {}", path.display());
        let arch_name = file
            .get("general.architecture")
            .and_then(Value::as_str)
            .context("GGUF metadata has no general.architecture")
            .with_context(context)?
            .to_string();
        let arch = Architecture::from_model_type(&arch_name).with_context(context)?;
        let tokenizer = TextTokenizer::from_gguf(&file).with_context(context)?;
        let config = config_from_metadata(&file, arch, &arch_name, &tokenizer).with_context(context)?;
        let mut names = BTreeMap::new();
        for (i, info) in file.tensors.iter().enumerate() {
            names.insert(hf_tensor_name(&info.name).with_context(context)?, i);
        }
        // llama.cpp permutes q/k rows of llama-family models (for its interleaved RoPE); Qwen is left as is.
        let unpermute = (arch == Architecture::Llama || arch == Architecture::Mistral)
            .then_some((config.num_attention_heads as i64, config.num_kv_heads() as i64));
        Ok(Self { config, tokenizer, weights: GgufWeights { file, names, unpermute } })
    }
}

fn config_from_metadata(
    file: &GgufFile,
    arch: Architecture,
    prefix: &str,
    tokenizer: &TextTokenizer,
) -> Result<ModelConfig> {
    let key = |k: &str| format!("{prefix}.{k}");
    let get_u = |k: &str| -> Result<usize> {
        file.get(&key(k))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .with_context(|| format!("GGUF metadata has no integer {}", key(k)))
    };
    let opt_u = |k: &str| file.get(&key(k)).and_then(Value::as_u64).map(|v| v as usize);
    let opt_f = |k: &str| file.get(&key(k)).and_then(Value::as_f64);
    let hidden_size = get_u("embedding_length")?;
    let num_attention_heads = get_u("attention.head_count")?;
    // checked: 0 heads reaches `ModelConfig::validate`, which names it.
    let head_dim = opt_u("attention.key_length").filter(|&d| Some(d) != hidden_size.checked_div(num_attention_heads));
    let vocab_size = opt_u("vocab_size").unwrap_or(tokenizer.vocab_size());
    let has_output = file.tensors.iter().any(|t| t.name == "output.weight");
    let token_id = |k: &str| file.get(&format!("tokenizer.ggml.{k}")).and_then(Value::as_i64).map(TokenIds::One);
    let rope_scaling = match file.get(&key("rope.scaling.type")).and_then(Value::as_str) {
        None | Some("none") => None,
        Some("linear") => Some(RopeParameters {
            rope_type: Some("linear".into()),
            factor: opt_f("rope.scaling.factor"),
            ..Default::default()
        }),
        Some(other) => bail!("unsupported GGUF rope scaling type \"{other}\""),
    };
    let config = ModelConfig {
        architectures: vec![arch.class_name().to_string()],
        model_type: arch.model_type().to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: get_u("feed_forward_length")?,
        num_hidden_layers: get_u("block_count")?,
        num_attention_heads,
        num_key_value_heads: Some(opt_u("attention.head_count_kv").unwrap_or(num_attention_heads)),
        head_dim,
        hidden_act: "silu".into(),
        max_position_embeddings: opt_u("context_length").unwrap_or(2048),
        rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        rope_theta: Some(opt_f("rope.freq_base").unwrap_or(10_000.0)),
        rope_scaling,
        rope_parameters: None,
        attention_bias: Some(file.tensors.iter().any(|t| t.name == "blk.0.attn_q.bias") && arch != Architecture::Qwen2),
        mlp_bias: false,
        attention_dropout: None,
        tie_word_embeddings: !has_output,
        sliding_window: None,
        use_sliding_window: false,
        max_window_layers: None,
        layer_types: None,
        bos_token_id: token_id("bos_token_id"),
        eos_token_id: token_id("eos_token_id"),
        pad_token_id: token_id("padding_token_id"),
        dtype: Some("float32".into()),
        torch_dtype: None,
    };
    config.validate()?;
    Ok(config)
}

/// llama.cpp's names of the tensors outside the layers, with their Hugging Face names.
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp's names of a layer's modules (`blk.N.<name>`), with their Hugging Face names (`model.layers.N.<name>`).
const LAYER_MODULES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// llama.cpp tensor name -> Hugging Face name.
fn hf_tensor_name(gguf_name: &str) -> Result<String> {
    if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(gguf, _)| *gguf == gguf_name) {
        return Ok(hf.to_string());
    }
    if gguf_name == "rope_freqs.weight" {
        bail!("GGUF tensor rope_freqs.weight (llama3-style RoPE frequency factors) is not supported yet; convert the original Hugging Face model instead");
    }
    let unknown = || anyhow::anyhow!("unknown GGUF tensor name {gguf_name}");
    let rest = gguf_name.strip_prefix("blk.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let (part, suffix) = rest.rsplit_once('.').ok_or_else(unknown)?;
    let (_, hf_part) = LAYER_MODULES.iter().find(|(gguf, _)| *gguf == part).ok_or_else(unknown)?;
    Ok(format!("model.layers.{layer}.{hf_part}.{suffix}"))
}

/// Hugging Face tensor name -> llama.cpp name (the inverse of `hf_tensor_name`).
pub fn gguf_tensor_name(hf_name: &str) -> Result<String> {
    if let Some((gguf, _)) = MODEL_TENSORS.iter().find(|(_, hf)| *hf == hf_name) {
        return Ok(gguf.to_string());
    }
    let unknown = || anyhow::anyhow!("tensor {hf_name} has no llama.cpp name");
    let rest = hf_name.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let (part, suffix) = rest.rsplit_once('.').ok_or_else(unknown)?;
    let (gguf_part, _) = LAYER_MODULES.iter().find(|(_, hf)| *hf == part).ok_or_else(unknown)?;
    Ok(format!("blk.{layer}.{gguf_part}.{suffix}"))
}

/// llama.cpp's `permute(w, n_head)` of a llama model's q/k rows: [head, 2, half] -> [head, half, 2].
pub fn permute_rows(w: &Tensor, heads: i64) -> Tensor {
    swap_row_groups(w, [heads, 2, w.size()[0] / heads / 2])
}

/// Undoes llama.cpp's `permute(w, n_head)`: rows grouped as [head, half, 2] go back to [head, 2, half].
fn unpermute_rows(w: &Tensor, heads: i64) -> Tensor {
    swap_row_groups(w, [heads, w.size()[0] / heads / 2, 2])
}

/// The rows of `w` grouped as `groups` ([head, a, b]), with the inner two groupings swapped ([head, b, a]).
fn swap_row_groups(w: &Tensor, groups: [i64; 3]) -> Tensor {
    let shape = w.size();
    let grouped: Vec<i64> = groups.iter().chain(&shape[1..]).copied().collect();
    w.reshape(grouped.as_slice()).transpose(1, 2).reshape(shape.as_slice())
}

impl WeightSource for GgufWeights {
    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(&index) = self.names.get(name) else { return Ok(None) };
        let tensor = self.file.dequantize(&self.file.tensors[index])?;
        Ok(Some(self.unpermuted(name, tensor)))
    }

    fn raw(&self, name: &str) -> Result<Option<(GgmlType, Tensor)>> {
        let Some(&index) = self.names.get(name) else { return Ok(None) };
        let (ty, bytes) = self.file.raw(&self.file.tensors[index])?;
        // whole rows move, and a row's blocks stay within it
        Ok(Some((ty, self.unpermuted(name, bytes))))
    }
}

impl GgufWeights {
    /// `tensor` (rows first) with llama.cpp's Q/K row permutation undone where the file has it.
    fn unpermuted(&self, name: &str, tensor: Tensor) -> Tensor {
        match self.unpermute {
            Some((heads, _))
                if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") =>
            {
                unpermute_rows(&tensor, heads)
            }
            Some((_, kv_heads))
                if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias") =>
            {
                unpermute_rows(&tensor, kv_heads)
            }
            _ => tensor,
        }
    }
}
