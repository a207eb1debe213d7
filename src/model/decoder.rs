//! The decoder-only transformer behind Llama, Mistral, Qwen2 and Qwen3 (pre-norm RMSNorm, RoPE, grouped-query
//! attention, SwiGLU MLP). The families differ only in q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3) and
//! sliding-window attention (Mistral), read from the config. Parameters are registered in a `VarStore` under
//! their Hugging Face names, so loading, saving and optimizers all speak the same names.

use crate::model::config::ModelConfig;
use crate::model::fused;
use crate::model::lora::{self, Lora, LoraConfig};
use crate::model::quantized::QuantizedWeight;
use crate::model::rope::{Rope, RotaryTables};
use anyhow::{bail, Result};
use std::cell::Cell;
use tch::{nn, Device, Kind, Tensor};

/// A projection's weight: a parameter in the `VarStore`, or frozen and kept quantized (`model::quantized`), which
/// `CausalLm::load_quantized` fills in after construction.
enum Weight {
    Dense(Tensor),
    Quantized(QuantizedWeight),
    Unloaded,
}

struct Linear {
    weight: Weight,       // [out, in]
    dims: (i64, i64),     // (out, in)
    bias: Option<Tensor>, // [out]
    lora: Option<Lora>,
}

impl Linear {
    fn new(p: nn::Path, in_dim: usize, out_dim: usize, bias: bool, quantized: bool) -> Self {
        let dims = (out_dim as i64, in_dim as i64);
        let weight = match quantized {
            true => Weight::Unloaded,
            false => Weight::Dense(p.var("weight", &[dims.0, dims.1], nn::Init::Const(0.0))),
        };
        let bias = bias.then(|| p.var("bias", &[out_dim as i64], nn::Init::Const(0.0)));
        Self { weight, dims, bias, lora: None }
    }

    fn dense(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            _ => None,
        }
    }

    /// x [..., in] through the weight and bias alone, in `cast` when given.
    fn base(&self, x: &Tensor, cast: Option<Kind>) -> Tensor {
        match &self.weight {
            Weight::Dense(w) => match cast {
                None => x.linear(w, self.bias.as_ref()),
                Some(kind) => {
                    let bias: Vec<&Tensor> = self.bias.iter().collect();
                    let biases = (!bias.is_empty()).then_some(bias.as_slice());
                    fused::cast_linears(x, &[w], biases, kind).remove(0)
                }
            },
            Weight::Quantized(q) => {
                let y = q.linear(x, cast);
                match &self.bias {
                    Some(bias) => &y + bias.to_kind(y.kind()),
                    None => y,
                }
            }
            Weight::Unloaded => panic!("a quantized projection used before its weights were loaded"),
        }
    }

    /// `base`, the projection of `x`, plus its adapter's update when it has one, in `base`'s dtype.
    fn with_update(&self, x: &Tensor, base: Tensor, ctx: &LayerContext) -> Tensor {
        match self.lora.as_ref().and_then(|l| l.update(x, ctx.cast, ctx.reference, ctx.lora_dropout)) {
            Some(update) => (&base + update).to_kind(base.kind()),
            None => base,
        }
    }
}

/// x [..., in] through each of `linears`, projections that read the same input, each with its adapter's update.
/// Under autocast to `cast` they run in that dtype from the f32 master weights, through `fused::cast_linears`: x
/// cast once for all of them, and no cast kept for the backward pass.
fn project<const N: usize>(x: &Tensor, linears: [&Linear; N], ctx: &LayerContext) -> [Tensor; N] {
    let mut outputs = project_base(x, linears, ctx.cast).into_iter();
    std::array::from_fn(|i| linears[i].with_update(x, outputs.next().expect("one output per projection"), ctx))
}

/// The projections of `project` without adapters.
fn project_base<const N: usize>(x: &Tensor, linears: [&Linear; N], cast: Option<Kind>) -> [Tensor; N] {
    let dense: Vec<&Tensor> = linears.iter().filter_map(|l| l.dense()).collect();
    let kind = match cast {
        Some(kind) if dense.len() == N => kind,
        _ => return linears.map(|l| l.base(x, cast)),
    };
    let biases: Vec<&Tensor> = linears.iter().filter_map(|l| l.bias.as_ref()).collect();
    let biases = match biases.len() {
        0 => None,
        n if n == N => Some(biases.as_slice()),
        _ => panic!("projections of one input with and without bias"),
    };
    let outputs = fused::cast_linears(x, &dense, biases, kind);
    outputs.try_into().unwrap_or_else(|_| unreachable!("one output per projection"))
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
        fused::rms_norm(x, &self.weight, self.eps)
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
    fn new(p: nn::Path, config: &ModelConfig, quantized: bool) -> Self {
        let (hidden, head_dim) = (config.hidden_size, config.head_dim());
        let (heads, kv_heads) = (config.num_attention_heads, config.num_kv_heads());
        let qkv_bias = config.qkv_bias();
        let qk_norm = config.qk_norm();
        Self {
            q_proj: Linear::new(&p / "q_proj", hidden, heads * head_dim, qkv_bias, quantized),
            k_proj: Linear::new(&p / "k_proj", hidden, kv_heads * head_dim, qkv_bias, quantized),
            v_proj: Linear::new(&p / "v_proj", hidden, kv_heads * head_dim, qkv_bias, quantized),
            o_proj: Linear::new(&p / "o_proj", heads * head_dim, hidden, config.o_bias(), quantized),
            q_norm: qk_norm.then(|| RmsNorm::new(&p / "q_norm", head_dim, config.rms_norm_eps)),
            k_norm: qk_norm.then(|| RmsNorm::new(&p / "k_norm", head_dim, config.rms_norm_eps)),
            num_heads: heads as i64,
            num_kv_heads: kv_heads as i64,
            head_dim: head_dim as i64,
        }
    }

    /// x [batch, len, hidden]; mask [batch, 1, len, past+len] (0 = attend, -inf = not); cache holds past k/v.
    fn forward(&self, x: &Tensor, ctx: &LayerContext, mask: &Tensor, cache: Option<&mut LayerCache>) -> Tensor {
        let cast = ctx.cast;
        let (batch, len) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let t = t.view([batch, len, n, self.head_dim]);
            let t = match norm {
                Some(norm) => norm.forward(&t),
                None => t,
            };
            t.transpose(1, 2) // [batch, n, len, head_dim]
        };
        let [q, k, v] = project(x, [&self.q_proj, &self.k_proj, &self.v_proj], ctx);
        let q = heads(q, self.num_heads, &self.q_norm);
        let k = heads(k, self.num_kv_heads, &self.k_norm);
        let v = heads(v, self.num_kv_heads, &None);
        let q = ctx.rotary.apply(&q);
        let k = ctx.rotary.apply(&k);
        // Rotary runs in the activations' dtype; under autocast attention itself runs in the cast dtype.
        let (q, k) = match cast {
            Some(kind) => (q.to_kind(kind), k.to_kind(kind)),
            None => (q, k),
        };
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
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = grouped_query_attention(&q, &k, &v, mask, scale, q.device() == Device::Cpu);
        let out = out.transpose(1, 2).reshape([batch, len, self.num_heads * self.head_dim]);
        let [out] = project(&out, [&self.o_proj], ctx);
        out
    }
}

/// Attention where each of the kv_heads key/value heads serves heads / kv_heads query heads: q [batch, heads, len,
/// head_dim], k and v [batch, kv_heads, past+len, head_dim]. `share_in_sdpa` lets SDPA share the k/v heads without
/// copies (`enable_gqa`), which on CPU keeps less for backward; on CUDA only the flash kernel does that and it takes
/// no mask, so with ours SDPA would fall back to its unfused math kernel (pytorch/pytorch#181528): there the k/v
/// heads are repeated and the memory-efficient kernel runs.
fn grouped_query_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    share_in_sdpa: bool,
) -> Tensor {
    let groups = q.size()[1] / k.size()[1];
    let (k, v) = if groups > 1 && !share_in_sdpa {
        (k.repeat_interleave_self_int(groups, 1, None), v.repeat_interleave_self_int(groups, 1, None))
    } else {
        (k.shallow_clone(), v.shallow_clone())
    };
    Tensor::scaled_dot_product_attention(q, &k, &v, Some(mask), 0.0, false, scale, k.size()[1] != q.size()[1])
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
    fn new(p: nn::Path, config: &ModelConfig, quantized: bool) -> Self {
        let (hidden, inter, bias) = (config.hidden_size, config.intermediate_size, config.mlp_bias);
        Self {
            gate_proj: Linear::new(&p / "gate_proj", hidden, inter, bias, quantized),
            up_proj: Linear::new(&p / "up_proj", hidden, inter, bias, quantized),
            down_proj: Linear::new(&p / "down_proj", inter, hidden, bias, quantized),
        }
    }

    /// down_proj(silu(gate_proj(x)) * up_proj(x))
    fn forward(&self, x: &Tensor, ctx: &LayerContext) -> Tensor {
        let [gate, up] = project(x, [&self.gate_proj, &self.up_proj], ctx); // [batch, len, intermediate]
        let Some(weight) = self.down_proj.dense() else {
            let product = gate.silu() * up;
            return self.down_proj.with_update(&product, self.down_proj.base(&product, ctx.cast), ctx);
        };
        let out = fused::swiglu_down(&gate, &up, weight, self.down_proj.bias.as_ref(), ctx.cast);
        if self.down_proj.lora.is_none() {
            return out;
        }
        // swiglu_down keeps silu(gate) * up to itself; the adapter takes it as its input, so it is formed here.
        let product = gate.silu() * up;
        self.down_proj.with_update(&product, out, ctx)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    sliding_window: Option<i64>,
}

/// A decoder layer's projections by their module names within the layer, in `DecoderLayer::projections` order.
const LAYER_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl DecoderLayer {
    fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    fn projections_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }

    fn new(p: nn::Path, config: &ModelConfig, index: usize, quantized: bool) -> Self {
        let eps = config.rms_norm_eps;
        Self {
            input_layernorm: RmsNorm::new(&p / "input_layernorm", config.hidden_size, eps),
            self_attn: Attention::new(&p / "self_attn", config, quantized),
            post_attention_layernorm: RmsNorm::new(&p / "post_attention_layernorm", config.hidden_size, eps),
            mlp: Mlp::new(&p / "mlp", config, quantized),
            sliding_window: config.sliding_window_of(index).map(|w| w as i64),
        }
    }

    fn forward(&self, x: &Tensor, ctx: &LayerContext, cache: Option<&mut LayerCache>) -> Tensor {
        let mask = ctx.mask_for(self.sliding_window);
        let h = self.self_attn.forward(&self.input_layernorm.forward(x), ctx, mask, cache);
        let x = x + h;
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x), ctx)
    }
}

/// What every layer of one forward pass shares: the rotary tables (broadcastable to [batch, heads, len, head_dim]),
/// one additive attention mask [batch, 1, len, keys] per sliding-window size, and the autocast dtype.
pub struct LayerContext {
    rotary: RotaryTables,
    /// per sliding-window size, [batch, 1, len, keys]: 0 where a query may attend, -inf elsewhere
    masks: Vec<(Option<i64>, Tensor)>,
    cast: Option<Kind>,
    /// The reference pass of a model with adapters: their frozen copies, or none (see `CausalLm::as_reference`).
    reference: bool,
    /// The seed of the adapters' dropout masks in this pass; None: no dropout.
    lora_dropout: Option<u64>,
}

impl LayerContext {
    /// `masks` are boolean (true = attend); activations are `kind` and run attention in `cast` when given. SDPA
    /// turns a boolean mask into this additive one in the query's dtype at every call: here it happens once for
    /// all layers.
    fn new(
        rotary: RotaryTables,
        masks: impl IntoIterator<Item = (Option<i64>, Tensor)>,
        cast: Option<Kind>,
        kind: Kind,
        reference: bool,
    ) -> Self {
        let attention_kind = cast.unwrap_or(kind);
        let masks = masks
            .into_iter()
            .map(|(window, allowed)| {
                let additive = Tensor::zeros(allowed.size(), (attention_kind, allowed.device()));
                (window, additive.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY))
            })
            .collect();
        LayerContext { rotary, masks, cast, reference, lora_dropout: None }
    }

    /// The same pass with the adapters' dropout (LoRA's `lora_dropout`, where an adapter has one), its masks drawn
    /// from `seed`: a layer run again with this context (gradient checkpointing) draws the same masks.
    pub fn with_lora_dropout(self, seed: Option<u64>) -> Self {
        LayerContext { lora_dropout: seed, ..self }
    }

    fn mask_for(&self, window: Option<i64>) -> &Tensor {
        &self.masks.iter().find(|(w, _)| *w == window).expect("a mask for every window size").1
    }
}

/// How the tokens of a batch see each other.
pub enum TokenLayout<'a> {
    /// One sequence per row, right-padded: mask [batch, len] (1 = real token), positions 0..len.
    Padded(Option<&'a Tensor>),
    /// Several (partial) sequences per row. Token i sees token j <= i of the same `group` when j's `branch`
    /// is 0 (a shared prefix) or i's own branch; `positions` restart wherever a sequence or branch does.
    /// All three are [batch, len] int64.
    Segments { positions: &'a Tensor, group: &'a Tensor, branch: &'a Tensor },
}

/// A module trained whole beside the adapters (PEFT's `modules_to_save`): the trained copy of its weight, and,
/// when training continues from an adapter, a frozen copy as it started, for the reference pass.
struct SavedModule {
    trained: Tensor,
    reference: Option<Tensor>,
}

/// A causal language model with its parameters in a `VarStore`, named as in the Hugging Face checkpoint.
pub struct CausalLm {
    pub config: ModelConfig,
    embed_tokens: Tensor, // [vocab, hidden]
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>, // [vocab, hidden]; None when tied to embed_tokens
    /// Trained copies of the embeddings and the output layer, with LoRA's `modules_to_save`.
    embed_saved: Option<SavedModule>,
    lm_head_saved: Option<SavedModule>,
    rope: Rope,
    /// transformers builds `nn.Embedding(..., padding_idx=pad_token_id)`: that row gets no gradient from lookups.
    padding_idx: i64,
    /// Set while `as_reference` runs.
    reference_pass: Cell<bool>,
}

impl CausalLm {
    /// Registers every parameter under `root` (zero-initialised; load weights afterwards).
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Result<Self> {
        Self::new_with(root, config, false)
    }

    /// Like `new`; with `quantized` the projections are not parameters but frozen weights kept quantized, given
    /// by `load_quantized`.
    pub fn new_with(root: &nn::Path, config: &ModelConfig, quantized: bool) -> Result<Self> {
        config.validate()?;
        let model = root / "model";
        let (vocab, hidden) = (config.vocab_size as i64, config.hidden_size as i64);
        let layers_path = &model / "layers";
        Ok(Self {
            embed_tokens: (&model / "embed_tokens").var("weight", &[vocab, hidden], nn::Init::Const(0.0)),
            layers: (0..config.num_hidden_layers)
                .map(|i| DecoderLayer::new(&layers_path / i, config, i, quantized))
                .collect(),
            norm: RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps),
            lm_head: (!config.tie_word_embeddings)
                .then(|| (root / "lm_head").var("weight", &[vocab, hidden], nn::Init::Const(0.0))),
            embed_saved: None,
            lm_head_saved: None,
            rope: Rope::new(config, root.device())?,
            padding_idx: config.pad_token_id.as_ref().and_then(|ids| ids.to_vec().first().copied()).unwrap_or(-1),
            reference_pass: Cell::new(false),
            config: config.clone(),
        })
    }

    /// Stores the weights of every linear layer in `kind`, for a frozen model run under autocast to `kind`: the
    /// same numbers as casting them at every use, without the time and the f32 copies. Embeddings (and a tied
    /// lm_head) and norms keep their dtype, as autocast would.
    pub fn store_matmul_weights_in(&mut self, kind: Kind) {
        tch::no_grad(|| {
            for (_, linear) in self.projections_mut() {
                // a quantized weight is dequantized in the pass's dtype anyway
                let Weight::Dense(dense) = &linear.weight else { continue };
                let mut weight = dense.shallow_clone();
                weight.set_data(&dense.to_kind(kind));
                if let Some(bias) = &linear.bias {
                    let mut b = bias.shallow_clone();
                    b.set_data(&bias.to_kind(kind));
                }
            }
        });
    }

    /// Every projection of every layer (what LoRA can adapt), with its module name (`model.layers.0.self_attn.q_proj`).
    fn projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let named = LAYER_PROJECTIONS.iter().zip(layer.projections_mut());
            out.extend(named.map(|(name, linear)| (format!("model.layers.{i}.{name}"), linear)));
        }
        out
    }

    /// `projections_mut`, read-only.
    fn projections(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let named = LAYER_PROJECTIONS.iter().zip(layer.projections());
            out.extend(named.map(|(name, linear)| (format!("model.layers.{i}.{name}"), linear)));
        }
        out
    }

    /// Adds a LoRA adapter (A kaiming-uniform, B zero, in f32) to every projection `config` targets, registered
    /// in `vs` as `<module>.lora_A.weight` and `<module>.lora_B.weight`, and freezes every other variable of `vs`.
    /// Returns the targeted names that matched, for `adapter_config.json`.
    pub fn add_lora(&mut self, vs: &nn::VarStore, config: &LoraConfig) -> Result<Vec<String>> {
        let names = config.target_names(&self.config.model_type)?;
        for (_, tensor) in vs.variables() {
            let _ = tensor.set_requires_grad(false);
        }
        let mut matched: Vec<String> = Vec::new();
        let (scaling, r) = (config.scaling(), config.r as i64);
        for (index, (module, linear)) in self.projections_mut().into_iter().enumerate() {
            let Some(name) = names.iter().find(|n| module == **n || module.ends_with(&format!(".{n}"))) else {
                continue;
            };
            if !matched.contains(name) {
                matched.push(name.clone());
            }
            let path = module_path(vs, &module);
            let (out_dim, in_dim) = linear.dims;
            // f32 whatever the base's dtype, as PEFT keeps them; `add` takes the tensor as it is.
            let zeros = |dims: [i64; 2]| Tensor::zeros(dims, (Kind::Float, vs.device()));
            let a = (&path / "lora_A").add("weight", zeros([r, in_dim]), true);
            let b = (&path / "lora_B").add("weight", zeros([out_dim, r]), true);
            lora::init_a(&a);
            let (dropout, index) = (config.dropout, index as u64);
            linear.lora = Some(Lora { a, b, scaling, reference: None, dropout, index });
        }
        // PEFT refuses targets that match nothing, and passes over a name of several that matches nothing.
        if matched.is_empty() {
            bail!(
                "LoRA target modules {} match no module of the model (its projections: {})",
                names.join(", "),
                lora::PROJECTIONS.join(", ")
            );
        }
        for missing in names.iter().filter(|n| !matched.contains(n)) {
            tracing::warn!("LoRA target module {missing:?} matches no module of the model");
        }
        for module in config.saved_modules()? {
            // a trainable copy in the original's dtype, as PEFT's deepcopy (of a tied lm_head: an untied copy)
            let original = match module {
                "model.embed_tokens" => &self.embed_tokens,
                _ => self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            };
            let trained = (&module_path(vs, module) / "modules_to_save").add("weight", original.detach().copy(), true);
            let saved = Some(SavedModule { trained, reference: None });
            match module {
                "model.embed_tokens" => self.embed_saved = saved,
                _ => self.lm_head_saved = saved,
            }
        }
        Ok(matched)
    }

    /// Keeps a frozen copy of every adapter as it is now, registered in `vs` as `<module>.reference_lora_A.weight`
    /// and `…_B`, for the reference pass: what TRL does when training continues from an existing adapter.
    pub fn copy_adapters_for_reference(&mut self, vs: &nn::VarStore) {
        for (module, linear) in self.projections_mut() {
            let Some(lora) = linear.lora.as_mut() else { continue };
            let path = module_path(vs, &module);
            // In the adapter's own dtype (`var_copy` would take the VarStore's, bf16 under --dtype bf16).
            let copy = |name: &str, t: &Tensor| (&path / name).add("weight", t.detach().copy(), false);
            lora.reference = Some((copy("reference_lora_A", &lora.a), copy("reference_lora_B", &lora.b)));
        }
        for (module, saved) in [("model.embed_tokens", &mut self.embed_saved), ("lm_head", &mut self.lm_head_saved)] {
            if let Some(saved) = saved {
                let path = module_path(vs, module) / "reference_modules_to_save";
                saved.reference = Some(path.add("weight", saved.trained.detach().copy(), false));
            }
        }
    }

    /// Folds every adapter into its projection's weight (W + scaling · B A, as PEFT's `merge_and_unload`), puts
    /// trained module copies in place of their originals (a trained copy of a tied output layer becomes an untied
    /// `lm_head`, registered in `vs`), and drops the adapters. A quantized base cannot take them.
    pub fn merge_adapters(&mut self, vs: &nn::VarStore) -> Result<()> {
        if !self.quantized_weights().is_empty() {
            bail!(
                "the base model's weights are quantized and cannot take the adapter: merge it into the model in full \
                 precision with `prefalign merge --model BASE --adapter DIR --output OUT`"
            );
        }
        for (_, linear) in self.projections_mut() {
            let Some(lora) = linear.lora.take() else { continue };
            let Weight::Dense(weight) = &linear.weight else { unreachable!("checked: no quantized weights") };
            tch::no_grad(|| {
                let update = lora.b.to_kind(Kind::Float).matmul(&lora.a.to_kind(Kind::Float)) * lora.scaling;
                let merged = weight.to_kind(Kind::Float) + update;
                weight.shallow_clone().copy_(&merged.to_kind(weight.kind()));
            });
        }
        tch::no_grad(|| {
            if let Some(saved) = self.embed_saved.take() {
                self.embed_tokens.shallow_clone().copy_(&saved.trained);
            }
            if let Some(saved) = self.lm_head_saved.take() {
                match &self.lm_head {
                    Some(lm_head) => {
                        lm_head.shallow_clone().copy_(&saved.trained);
                    }
                    None => {
                        let untied = (vs.root() / "lm_head").add("weight", saved.trained.detach().copy(), false);
                        self.lm_head = Some(untied);
                        self.config.tie_word_embeddings = false;
                    }
                }
            }
        });
        Ok(())
    }

    /// Gives every projection built by `new_with(…, quantized: true)` its weight: `load(name, rows, cols)` for the
    /// weight named `model.layers.0.self_attn.q_proj.weight`, [rows, cols].
    pub fn load_quantized(&mut self, mut load: impl FnMut(&str, i64, i64) -> Result<QuantizedWeight>) -> Result<()> {
        for (module, linear) in self.projections_mut() {
            if let Weight::Unloaded = linear.weight {
                let (rows, cols) = linear.dims;
                linear.weight = Weight::Quantized(load(&format!("{module}.weight"), rows, cols)?);
            }
        }
        Ok(())
    }

    /// The projections' quantized weights, by weight name.
    pub fn quantized_weights(&self) -> Vec<(String, &QuantizedWeight)> {
        let mut out = Vec::new();
        for (module, linear) in self.projections() {
            if let Weight::Quantized(q) = &linear.weight {
                out.push((format!("{module}.weight"), q));
            }
        }
        out
    }

    /// Runs `f` with the model as the reference of its own training: with each adapter's frozen copy when there is
    /// one, else with the adapters off (the base model, as TRL's reference with PEFT and no reference model). A
    /// model without adapters is itself.
    pub fn as_reference<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = self.reference_pass.replace(true);
        let out = f();
        self.reference_pass.set(before);
        out
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.layers.len()).map(|_| None).collect(), len: 0, mask: None }
    }

    /// The output projection [vocab, hidden] (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.in_this_pass(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), &self.lm_head_saved)
    }

    /// A module's weight as this pass sees it: its trained copy when it has one, or in the reference pass its
    /// frozen copy or the original.
    fn in_this_pass<'a>(&'a self, original: &'a Tensor, saved: &'a Option<SavedModule>) -> &'a Tensor {
        match saved {
            None => original,
            Some(saved) if self.reference_pass.get() => saved.reference.as_ref().unwrap_or(original),
            Some(saved) => &saved.trained,
        }
    }

    /// Logits [batch, len, vocab] for input_ids [batch, len] with an optional padding mask [batch, len].
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.hidden_states(input_ids, &TokenLayout::Padded(attention_mask), None).matmul(&self.lm_head_weight().tr())
    }

    /// Like `forward`, but appends to `cache` and attends to what it holds.
    pub fn forward_cached(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, cache: &mut KvCache) -> Tensor {
        let len = input_ids.size()[1];
        let past = cache.len;
        // Padding mask over past and new tokens [batch, past+len].
        let new_mask = key_mask(input_ids, attention_mask);
        let key_mask = match &cache.mask {
            Some(past_mask) => Tensor::cat(&[past_mask, &new_mask], 1),
            None => new_mask,
        };
        let mut x = self.embed(input_ids);
        let rotary = self.rope.tables(past, len, x.kind());
        let masks = self.windows().map(|w| (w, attention_mask_4d(&key_mask, past, len, w)));
        let ctx = LayerContext::new(rotary, masks, None, x.kind(), self.reference_pass.get());
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &ctx, Some(layer_cache));
        }
        cache.len += len;
        cache.mask = Some(key_mask);
        self.norm.forward(&x).matmul(&self.lm_head_weight().tr())
    }

    /// Final hidden states [batch, len, hidden], after the last norm; with `cast`, matrix products run in
    /// that dtype (autocast) while norms, softmax statistics and the residual stream stay in the weights' dtype.
    pub fn hidden_states(&self, input_ids: &Tensor, layout: &TokenLayout, cast: Option<Kind>) -> Tensor {
        self.hidden_states_in(input_ids, &self.layer_context(input_ids, layout, cast))
    }

    /// `hidden_states` with a context made beforehand (`layer_context`).
    pub fn hidden_states_in(&self, input_ids: &Tensor, ctx: &LayerContext) -> Tensor {
        let mut x = self.embed(input_ids);
        for i in 0..self.num_layers() {
            x = self.layer(i, &x, ctx);
        }
        self.final_norm(&x)
    }

    /// Token embeddings [batch, len, hidden].
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        let weight = self.in_this_pass(&self.embed_tokens, &self.embed_saved);
        Tensor::embedding(weight, input_ids, self.padding_idx, false, false)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layer `index` on x [batch, len, hidden].
    pub fn layer(&self, index: usize, x: &Tensor, ctx: &LayerContext) -> Tensor {
        self.layers[index].forward(x, ctx, None)
    }

    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    /// The sliding-window sizes in use (None = full attention), each once.
    fn windows(&self) -> impl Iterator<Item = Option<i64>> + '_ {
        let mut seen: Vec<Option<i64>> = Vec::new();
        self.layers.iter().map(|l| l.sliding_window).filter(move |w| {
            let new = !seen.contains(w);
            seen.push(*w);
            new
        })
    }

    /// Rotary tables and attention masks for one forward pass over `input_ids` [batch, len].
    pub fn layer_context(&self, input_ids: &Tensor, layout: &TokenLayout, cast: Option<Kind>) -> LayerContext {
        let len = input_ids.size()[1];
        let kind = self.embed_tokens.kind();
        let (rotary, masks): (_, Vec<_>) = match *layout {
            TokenLayout::Padded(attention_mask) => {
                let key_mask = key_mask(input_ids, attention_mask);
                let masks = self.windows().map(|w| (w, attention_mask_4d(&key_mask, 0, len, w))).collect();
                (self.rope.tables(0, len, kind), masks)
            }
            TokenLayout::Segments { positions, group, branch } => {
                let masks = self.windows().map(|w| (w, segment_mask_4d(positions, group, branch, w))).collect();
                (self.rope.tables_at(positions, kind), masks)
            }
        };
        LayerContext::new(rotary, masks, cast, kind, self.reference_pass.get())
    }
}

/// The VarStore path of a module's variables (`model.layers.0.self_attn.q_proj`: tch takes one part at a time).
fn module_path<'a>(vs: &'a nn::VarStore, module: &str) -> nn::Path<'a> {
    module.split('.').fold(vs.root(), |p, part| p / part)
}

/// Which of `input_ids`' tokens [batch, len] are real (bool): the padding mask, or all of them.
fn key_mask(input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
    match attention_mask {
        Some(m) => m.to_kind(Kind::Bool),
        None => Tensor::ones(input_ids.size(), (Kind::Bool, input_ids.device())),
    }
}

/// Boolean attention mask [batch, 1, len, len] of a segment layout (see `TokenLayout::Segments`).
fn segment_mask_4d(positions: &Tensor, group: &Tensor, branch: &Tensor, window: Option<i64>) -> Tensor {
    let len = group.size()[1];
    let index = Tensor::arange(len, (Kind::Int64, group.device()));
    let causal = index.unsqueeze(0).le_tensor(&index.unsqueeze(1)); // [len(query), len(key)]
    let same_group = group.unsqueeze(2).eq_tensor(&group.unsqueeze(1)); // [batch, query, key]
    let key_branch = branch.unsqueeze(1); // [batch, 1, key]
    let branch_visible = key_branch.eq(0).logical_or(&key_branch.eq_tensor(&branch.unsqueeze(2)));
    let mut allowed = same_group.logical_and(&branch_visible).logical_and(&causal.unsqueeze(0));
    if let Some(window) = window {
        let distance = positions.unsqueeze(2) - positions.unsqueeze(1); // [batch, query, key]
        allowed = allowed.logical_and(&distance.lt(window));
    }
    allowed.unsqueeze(1)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA layout (k/v heads repeated) and the CPU one (shared inside SDPA) compute the same attention,
    /// gradients included.
    #[test]
    fn grouped_query_attention_is_the_same_with_repeated_or_shared_heads() {
        tch::manual_seed(0);
        let q = Tensor::randn([2, 6, 5, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let k = Tensor::randn([2, 2, 5, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let v = Tensor::randn([2, 2, 5, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mask = Tensor::ones([5, 5], (Kind::Bool, Device::Cpu)).tril(0).view([1, 1, 5, 5]).repeat([2, 1, 1, 1]);
        let run = |share: bool| {
            let out = grouped_query_attention(&q, &k, &v, &mask, 0.5, share);
            let grads = Tensor::run_backward(&[(&out * &out).sum(Kind::Float)], &[&q, &k, &v], false, false);
            (out.detach(), grads)
        };
        let (shared, shared_grads) = run(true);
        let (repeated, repeated_grads) = run(false);
        assert!(shared.allclose(&repeated, 1e-5, 1e-6, false));
        for (a, b) in shared_grads.iter().zip(&repeated_grads) {
            assert!(a.allclose(b, 1e-5, 1e-6, false));
        }
        // and it is grouped: query heads 0-2 read k/v head 0, heads 3-5 k/v head 1
        let one_head = Tensor::scaled_dot_product_attention(
            &q.narrow(1, 3, 1),
            &k.narrow(1, 1, 1),
            &v.narrow(1, 1, 1),
            Some(&mask),
            0.0,
            false,
            0.5,
            false,
        );
        assert!(one_head.detach().allclose(&repeated.narrow(1, 3, 1), 1e-5, 1e-6, false));
    }
}
