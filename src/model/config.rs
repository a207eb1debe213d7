//! `config.json` of a Hugging Face causal LM, as a serde struct (unknown keys are ignored).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The architectures prefalign implements. Llama, Mistral, Qwen2 and Qwen3 are one decoder that differs in
/// q/k/v biases, per-head q/k RMSNorm and sliding-window attention (see `decoder.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        Ok(match model_type {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            other => {
                bail!("unsupported architecture (model_type \"{other}\"); supported: llama, mistral, qwen2, qwen3")
            }
        })
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// The transformers class name written into `architectures`.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// RoPE parameters: transformers < 5 writes `rope_theta` + `rope_scaling`, transformers 5 `rope_parameters`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type` (some files carry both).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// A token id, or a list of them (`eos_token_id` often is a list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Dropout on the attention weights in training; prefalign applies none (see `cli::train`'s warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_dropout: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<TokenIds>,
    /// The weights' dtype: `dtype` since transformers 4.56, `torch_dtype` before (files may carry both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

fn default_hidden_act() -> String {
    "silu".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let config: Self =
            serde_json::from_str(&text).with_context(|| format!("{} is not a valid model config", path.display()))?;
        config.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        self.architecture()?;
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim.unwrap_or(1)),
        ] {
            if value == 0 {
                bail!("{key} is 0");
            }
        }
        if self.head_dim() == 0 {
            bail!("hidden_size {} is smaller than num_attention_heads {}", self.hidden_size, self.num_attention_heads);
        }
        if self.hidden_act != "silu" {
            bail!("unsupported hidden_act \"{}\" (only silu)", self.hidden_act);
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "head_dim {} (hidden_size {} / num_attention_heads {} unless head_dim is given) is odd: rotary position \
                 embeddings rotate pairs of dimensions",
                self.head_dim(),
                self.hidden_size,
                self.num_attention_heads
            );
        }
        crate::model::rope::RopeScaling::from_config(self)?;
        Ok(())
    }

    pub fn architecture(&self) -> Result<Architecture> {
        Architecture::from_model_type(&self.model_type)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 always has q/k/v biases; the others follow `attention_bias`.
    pub fn qkv_bias(&self) -> bool {
        match self.architecture() {
            Ok(Architecture::Qwen2) => true,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// `o_proj` has a bias only where `attention_bias` says so (never on Qwen2).
    pub fn o_bias(&self) -> bool {
        match self.architecture() {
            Ok(Architecture::Qwen2) => false,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    pub fn qk_norm(&self) -> bool {
        matches!(self.architecture(), Ok(Architecture::Qwen3))
    }

    /// The sliding window of layer `layer`, if it has one (transformers' rules per architecture).
    pub fn sliding_window_of(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        if let Some(types) = &self.layer_types {
            return (types.get(layer).map(String::as_str) == Some("sliding_attention")).then_some(window);
        }
        match self.architecture().ok()? {
            Architecture::Mistral => Some(window),
            Architecture::Qwen2 | Architecture::Qwen3 => {
                (self.use_sliding_window && layer >= self.max_window_layers.unwrap_or(0)).then_some(window)
            }
            Architecture::Llama => None,
        }
    }

    /// RoPE parameters, whichever way the file spells them.
    pub fn rope(&self) -> RopeParameters {
        let mut rope = self.rope_parameters.clone().or_else(|| self.rope_scaling.clone()).unwrap_or_default();
        rope.rope_type = rope.rope_type.or(rope.legacy_type.take());
        rope.rope_theta = rope.rope_theta.or(self.rope_theta).or(Some(10_000.0));
        rope
    }

    pub fn eos_token_ids(&self) -> Vec<i64> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rope::RopeScaling;

    fn parse(json: &str) -> ModelConfig {
        serde_json::from_str(json).unwrap()
    }

    const BASE: &str = r#""model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "unknown_key": [1, 2]"#;

    #[test]
    fn transformers_4_and_5_rope_spellings_agree() {
        let v4 = parse(&format!(
            r#"{{{BASE}, "rope_theta": 500000.0, "rope_scaling": {{"type": "llama3", "rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ));
        let v5 = parse(&format!(
            r#"{{{BASE}, "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ));
        assert_eq!(v4.rope().rope_theta, Some(500000.0));
        assert_eq!(RopeScaling::from_config(&v4).unwrap(), RopeScaling::from_config(&v5).unwrap());
        assert!(matches!(RopeScaling::from_config(&v4).unwrap(), RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn defaults_and_token_id_lists() {
        let config = parse(&format!(r#"{{{BASE}, "eos_token_id": [2, 7], "torch_dtype": "bfloat16"}}"#));
        assert_eq!(config.num_kv_heads(), 2);
        assert_eq!(config.head_dim(), 8);
        assert_eq!(config.rope().rope_theta, Some(10_000.0));
        assert_eq!(config.eos_token_ids(), vec![2, 7]);
        assert!(!config.tie_word_embeddings);
        assert_eq!(config.torch_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn qwen2_has_qkv_bias_without_saying_so() {
        let config = parse(&format!("{{{}}}", BASE.replace("\"llama\"", "\"qwen2\"")));
        assert!(config.qkv_bias() && !config.o_bias());
    }

    #[test]
    fn impossible_head_layouts_are_refused() {
        // hidden 64 over 3 heads: head_dim 21, which rotary embeddings cannot split into pairs
        let odd = parse(
            r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 3}"#,
        );
        let message = odd.validate().unwrap_err().to_string();
        assert!(message.contains("head_dim 21") && message.contains("odd"), "{message}");
        let groups = parse(&format!(r#"{{{BASE}, "num_key_value_heads": 3}}"#));
        assert!(groups.validate().unwrap_err().to_string().contains("not a multiple of num_key_value_heads (3)"));
        assert!(parse(&format!("{{{BASE}}}")).validate().is_ok());
    }
}
