//! The decoder-only transformer behind Llama, Mistral, Qwen2 and Qwen3 (pre-norm RMSNorm, RoPE, grouped-query
//! attention, SwiGLU MLP). The families differ only in q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3) and
//! sliding-window attention (Mistral), read from the config. Parameters are registered in a `VarStore` under
//! their Hugging Face names, so loading, saving and optimizers all speak the same names.

use crate::model::config::ModelConfig;
use crate::model::rope::{apply_rotary, Rope};
use anyhow::Result;
use tch::{nn, Kind, Tensor};

struct Linear {
    weight: Tensor,         // [out, in]
    bias: Option<Tensor>,   // [out]
}

impl Linear {
    fn new(p: nn::Path, in_dim: usize, out_dim: usize, bias: bool) -> Self {
        let weight = p.var("weight", &[out_dim as i64, in_dim as i64], nn::Init::Const(0.0));
        let bias = bias.then(|| p.var("bias", &[out_dim as i64], nn::Init::Const(0.0)));
        Self { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

struct RmsNorm {
    weight: Tensor, // [dim]
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: usize, eps: f64) -> Self {
        Self { weight: p.var("weight", &[dim as i64], nn::Init::Const(1.0)), eps }
    }

    /// Normalizes in f32 and casts back before the weight, exactly as transformers' LlamaRMSNorm.
    fn forward(&self, x: &Tensor) -> Tensor {
        let input_kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(input_kind)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, config: &ModelConfig) -> Self {
        let (hidden, head_dim) = (config.hidden_size, config.head_dim());
        let (heads, kv_heads) = (config.num_attention_heads, config.num_kv_heads());
        let qkv_bias = config.qkv_bias();
        let qk_norm = config.qk_norm();
        Self {
            q_proj: Linear::new(&p / "q_proj", hidden, heads * head_dim, qkv_bias),
            k_proj: Linear::new(&p / "k_proj", hidden, kv_heads * head_dim, qkv_bias),
            v_proj: Linear::new(&p / "v_proj", hidden, kv_heads * head_dim, qkv_bias),
            o_proj: Linear::new(&p / "o_proj", heads * head_dim, hidden, config.o_bias()),
            q_norm: qk_norm.then(|| RmsNorm::new(&p / "q_norm", head_dim, config.rms_norm_eps)),
            k_norm: qk_norm.then(|| RmsNorm::new(&p / "k_norm", head_dim, config.rms_norm_eps)),
            num_heads: heads as i64,
            num_kv_heads: kv_heads as i64,
            head_dim: head_dim as i64,
        }
    }

    /// x [batch, len, hidden]; mask [batch, 1, len, past+len] (true = attend); cache holds past k/v.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor, cache: Option<&mut LayerCache>) -> Tensor {
        let (batch, len) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let t = t.view([batch, len, n, self.head_dim]);
            let t = match norm {
                Some(norm) => norm.forward(&t),
                None => t,
            };
            t.transpose(1, 2) // [batch, n, len, head_dim]
        };
        let q = heads(self.q_proj.forward(x), self.num_heads, &self.q_norm);
        let k = heads(self.k_proj.forward(x), self.num_kv_heads, &self.k_norm);
        let v = heads(self.v_proj.forward(x), self.num_kv_heads, &None);
        let q = apply_rotary(&q, cos, sin);
        let k = apply_rotary(&k, cos, sin);
        let (k, v) = match cache {
            Some(cache) => {
                let (k, v) = match cache.take() {
                    Some((past_k, past_v)) => (Tensor::cat(&[past_k, k], 2), Tensor::cat(&[past_v, v], 2)),
                    None => (k, v),
                };
                *cache = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
            None => (k, v),
        };
        // Grouped-query attention: each k/v head serves num_heads / num_kv_heads query heads.
        let groups = self.num_heads / self.num_kv_heads;
        let (k, v) = if groups > 1 {
            (k.repeat_interleave_self_int(groups, 1, None), v.repeat_interleave_self_int(groups, 1, None))
        } else {
            (k, v)
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, scale, false);
        let out = out.transpose(1, 2).reshape([batch, len, self.num_heads * self.head_dim]);
        self.o_proj.forward(&out)
    }
}

/// Past keys and values of one layer, each [batch, kv_heads, past_len, head_dim].
pub type LayerCache = Option<(Tensor, Tensor)>;

/// The key/value cache of a whole model, for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Tokens already seen (positions of the next token start here).
    pub len: i64,
    /// Padding mask over the seen tokens [batch, len] (1 = real token).
    mask: Option<Tensor>,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(p: nn::Path, config: &ModelConfig) -> Self {
        let (hidden, inter, bias) = (config.hidden_size, config.intermediate_size, config.mlp_bias);
        Self {
            gate_proj: Linear::new(&p / "gate_proj", hidden, inter, bias),
            up_proj: Linear::new(&p / "up_proj", hidden, inter, bias),
            down_proj: Linear::new(&p / "down_proj", inter, hidden, bias),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    sliding_window: Option<i64>,
}

impl DecoderLayer {
    fn new(p: nn::Path, config: &ModelConfig, index: usize) -> Self {
        let eps = config.rms_norm_eps;
        Self {
            input_layernorm: RmsNorm::new(&p / "input_layernorm", config.hidden_size, eps),
            self_attn: Attention::new(&p / "self_attn", config),
            post_attention_layernorm: RmsNorm::new(&p / "post_attention_layernorm", config.hidden_size, eps),
            mlp: Mlp::new(&p / "mlp", config),
            sliding_window: config.sliding_window_of(index).map(|w| w as i64),
        }
    }
}

/// A causal language model with its parameters in a `VarStore`, named as in the Hugging Face checkpoint.
pub struct CausalLm {
    pub config: ModelConfig,
    embed_tokens: Tensor, // [vocab, hidden]
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>, // [vocab, hidden]; None when tied to embed_tokens
    rope: Rope,
    /// transformers builds `nn.Embedding(..., padding_idx=pad_token_id)`: that row gets no gradient from lookups.
    padding_idx: i64,
}

impl CausalLm {
    /// Registers every parameter under `root` (zero-initialised; load weights afterwards).
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Result<Self> {
        config.validate()?;
        let model = root / "model";
        let (vocab, hidden) = (config.vocab_size as i64, config.hidden_size as i64);
        let layers_path = &model / "layers";
        Ok(Self {
            embed_tokens: (&model / "embed_tokens").var("weight", &[vocab, hidden], nn::Init::Const(0.0)),
            layers: (0..config.num_hidden_layers)
                .map(|i| DecoderLayer::new(&layers_path / i, config, i))
                .collect(),
            norm: RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps),
            lm_head: (!config.tie_word_embeddings)
                .then(|| (root / "lm_head").var("weight", &[vocab, hidden], nn::Init::Const(0.0))),
            rope: Rope::new(config, root.device())?,
            padding_idx: config.pad_token_id.as_ref().and_then(|ids| ids.to_vec().first().copied()).unwrap_or(-1),
            config: config.clone(),
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.layers.len()).map(|_| None).collect(), len: 0, mask: None }
    }

    /// The output projection [vocab, hidden] (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Logits [batch, len, vocab] for input_ids [batch, len] with an optional padding mask [batch, len].
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.hidden_states(input_ids, attention_mask, None).matmul(&self.lm_head_weight().tr())
    }

    /// Like `forward`, but appends to `cache` and attends to what it holds.
    pub fn forward_cached(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, cache: &mut KvCache) -> Tensor {
        self.hidden_states(input_ids, attention_mask, Some(cache)).matmul(&self.lm_head_weight().tr())
    }

    /// Final hidden states [batch, len, hidden], after the last norm.
    pub fn hidden_states(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, mut cache: Option<&mut KvCache>) -> Tensor {
        let (batch, len) = (input_ids.size()[0], input_ids.size()[1]);
        let device = input_ids.device();
        let past = cache.as_ref().map_or(0, |c| c.len);
        // Padding mask over past and new tokens [batch, past+len].
        let new_mask = match attention_mask {
            Some(m) => m.to_kind(Kind::Bool),
            None => Tensor::ones([batch, len], (Kind::Bool, device)),
        };
        let key_mask = match cache.as_ref().and_then(|c| c.mask.as_ref()) {
            Some(past_mask) => Tensor::cat(&[past_mask, &new_mask], 1),
            None => new_mask,
        };
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, self.padding_idx, false, false); // [batch, len, hidden]
        let (cos, sin) = self.rope.cos_sin(past, len, x.kind());
        let mut masks: Vec<(Option<i64>, Tensor)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let mask = match masks.iter().find(|(w, _)| *w == layer.sliding_window) {
                Some((_, m)) => m.shallow_clone(),
                None => {
                    let m = attention_mask_4d(&key_mask, past, len, layer.sliding_window);
                    masks.push((layer.sliding_window, m.shallow_clone()));
                    m
                }
            };
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let h = layer.self_attn.forward(&layer.input_layernorm.forward(&x), &cos, &sin, &mask, layer_cache);
            x = x + h;
            x = &x + layer.mlp.forward(&layer.post_attention_layernorm.forward(&x));
        }
        if let Some(cache) = cache {
            cache.len += len;
            cache.mask = Some(key_mask);
        }
        self.norm.forward(&x)
    }
}

/// Boolean attention mask [batch, 1, len, past+len]: query i (absolute position past+i) sees key j when j is a
/// real token, j <= past+i, and, with a sliding window w, past+i - j < w.
fn attention_mask_4d(key_mask: &Tensor, past: i64, len: i64, window: Option<i64>) -> Tensor {
    let device = key_mask.device();
    let total = past + len;
    let query_pos = Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(1); // [len, 1]
    let key_pos = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0); // [1, total]
    let mut allowed = key_pos.le_tensor(&query_pos); // [len, total]
    if let Some(window) = window {
        allowed = allowed.logical_and(&(&query_pos - &key_pos).lt(window));
    }
    allowed.unsqueeze(0).logical_and(&key_mask.unsqueeze(1)).unsqueeze(1)
}
