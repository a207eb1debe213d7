//! Models: config, the decoder architecture, weights (safetensors and GGUF), tokenizer, saving (and pushing to the
//! Hub) and generation.

pub mod config;
pub mod decoder;
pub mod device;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod lm_head;
pub mod lora;
pub mod push;
pub mod quantized;
pub mod rope;
pub mod save;
pub mod tokenizer;
pub mod weights;

use anyhow::{bail, Context, Result};
use config::ModelConfig;
use decoder::CausalLm;
use lora::LoraConfig;
use quantized::QuantizedWeight;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};
use tokenizer::TextTokenizer;
use weights::WeightSource;

/// A model ready to run: parameters in `vs`, the network, its tokenizer (absent for bare weight folders) and its
/// LoRA adapters when it has some.
pub struct LoadedModel {
    pub vs: VarStore,
    pub model: CausalLm,
    pub tokenizer: Option<TextTokenizer>,
    pub adapter: Option<Adapter>,
}

/// A model's LoRA adapters: their settings, the target names they matched and the base model they adapt.
pub struct Adapter {
    pub config: LoraConfig,
    pub targets: Vec<String>,
    /// As the user named it; recorded in `adapter_config.json`.
    pub base_model: String,
}

impl LoadedModel {
    /// Adds fresh LoRA adapters to the projections `config` targets and freezes everything else (`base_model`
    /// names this model in the adapter's config).
    pub fn add_lora(&mut self, config: LoraConfig, base_model: &str) -> Result<()> {
        let targets = self.model.add_lora(&self.vs, &config)?;
        self.adapter = Some(Adapter { config, targets, base_model: base_model.to_string() });
        Ok(())
    }

    /// Continues from the PEFT adapter in `dir`: its settings and weights, and a frozen copy of it as the reference
    /// pass's adapter (TRL's "ref" adapter).
    pub fn load_adapter(&mut self, dir: &Path, base_model: &str) -> Result<()> {
        let config = LoraConfig::read(dir)?;
        self.add_lora(config, base_model).with_context(|| format!("the adapter {}", dir.display()))?;
        self.load_adapter_weights(&dir.join(lora::WEIGHTS_FILE))?;
        self.model.copy_adapters_for_reference(&self.vs);
        Ok(())
    }

    /// Folds the adapters into the weights (PEFT's `merge_and_unload`): a plain model again.
    pub fn merge_adapter(&mut self) -> Result<()> {
        self.model.merge_adapters(&self.vs)?;
        self.adapter = None;
        Ok(())
    }

    /// What the frozen projections are kept in, when quantized: "14 projections in Q4_K, 0.5 MB".
    pub fn quantized_summary(&self) -> Option<String> {
        let weights = self.model.quantized_weights();
        if weights.is_empty() {
            return None;
        }
        let mut formats: Vec<String> = weights.iter().map(|(_, w)| w.format.name()).collect();
        formats.sort();
        formats.dedup();
        let bytes: usize = weights.iter().map(|(_, w)| w.bytes()).sum();
        Some(format!("{} projections kept in {}, {:.1} MB", weights.len(), formats.join(" and "), bytes as f64 / 1e6))
    }

    /// The adapters' trained tensors by their name here (`model.layers.0.self_attn.q_proj.lora_A.weight`, …).
    pub fn adapter_variables(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().filter(|(name, _)| lora::is_adapter_variable(name)).collect()
    }

    /// What the optimizer updates: the adapters when there are some, else every parameter.
    pub fn trainable_variables(&self) -> BTreeMap<String, Tensor> {
        match self.adapter {
            Some(_) => self.adapter_variables(),
            None => self.vs.variables().into_iter().collect(),
        }
    }

    /// Loads adapter weights saved under PEFT's names (an `adapter_model.safetensors`) into this model's adapters;
    /// each must be there, with its shape.
    pub fn load_adapter_weights(&self, file: &Path) -> Result<()> {
        let source = weights::SafetensorsFiles::open_dir_file(file)?;
        let variables = self.adapter_variables();
        for saved in source.names() {
            let known = lora::name_from_saved(&saved).is_some_and(|name| variables.contains_key(&name));
            if !known {
                bail!("{}: tensor {saved} belongs to no adapter of this model and its settings", file.display());
            }
        }
        tch::no_grad(|| {
            for (name, variable) in &variables {
                let saved = lora::saved_name(name);
                let Some(tensor) = source.tensor(&saved)? else {
                    // A module trained whole starts as the base model's (PEFT loads such a file with a warning).
                    if lora::is_saved_module(name) {
                        tracing::warn!("{}: no {saved}; it starts as the base model's", file.display());
                        continue;
                    }
                    bail!("{}: {saved} is missing", file.display());
                };
                if tensor.size() != variable.size() {
                    bail!("{}: {saved} has shape {:?}, not {:?}", file.display(), tensor.size(), variable.size());
                }
                variable.shallow_clone().copy_(&tensor);
            }
            Ok(())
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().context("this model has no tokenizer (no tokenizer.json beside its weights)")
    }
}

/// How a model's projections are stored when they are not trained (LoRA): as parameters in the model's dtype, or
/// frozen and quantized (`model::quantized`).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum BaseQuantization {
    #[default]
    None,
    /// A GGUF file's projections in their blocks as stored (a folder's are loaded as usual).
    KeepGguf,
    /// bitsandbytes' NF4 of the weights in the model's dtype (`--load-in-4bit`).
    Nf4 { double_quant: bool },
}

/// Loads a Hugging Face model folder or a `.gguf` file onto `device` in `dtype`.
pub fn load(path: &Path, device: Device, dtype: Kind) -> Result<LoadedModel> {
    load_with(path, device, dtype, BaseQuantization::None)
}

/// `load` with the projections stored as `quantization` says.
pub fn load_with(path: &Path, device: Device, dtype: Kind, quantization: BaseQuantization) -> Result<LoadedModel> {
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            let gguf = gguf::GgufModel::open(path)?;
            return build(gguf.config, &gguf.weights, Some(gguf.tokenizer), device, dtype, quantization);
        }
        bail!("{} is a file but not a .gguf; pass a GGUF file or a Hugging Face model folder", path.display());
    }
    let config = ModelConfig::from_file(&path.join("config.json"))?;
    let weights = weights::SafetensorsFiles::open_dir(path)?;
    let tokenizer = if path.join("tokenizer.json").exists() { Some(TextTokenizer::from_hf_dir(path)?) } else { None };
    let quantization = if quantization == BaseQuantization::KeepGguf { BaseQuantization::None } else { quantization };
    build(config, &weights, tokenizer, device, dtype, quantization)
}

/// Only the tokenizer of a model folder or GGUF file (no weights are read).
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer> {
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    if path.is_file() {
        let file = gguf::GgufFile::open(path)?;
        return TextTokenizer::from_gguf(&file).with_context(|| format!("in {}", path.display()));
    }
    TextTokenizer::from_hf_dir(path)
}

fn build(
    config: ModelConfig,
    weights: &dyn WeightSource,
    tokenizer: Option<TextTokenizer>,
    device: Device,
    dtype: Kind,
    quantization: BaseQuantization,
) -> Result<LoadedModel> {
    if let Some(tokenizer) = &tokenizer {
        let tokens = tokenizer.vocab_size();
        if tokens > config.vocab_size {
            bail!(
                "the tokenizer has {tokens} tokens but the model's vocab_size is {}: token ids past {} have no embedding",
                config.vocab_size,
                config.vocab_size - 1
            );
        }
    }
    let mut vs = VarStore::new(device);
    let quantized = quantization != BaseQuantization::None;
    let mut model = CausalLm::new_with(&vs.root(), &config, quantized)?;
    vs.set_kind(dtype);
    let mut unused = weights::load_into(&vs, weights)?;
    // one tensor at a time: a model in full precision never exists
    model.load_quantized(|name, rows, cols| {
        let missing = || anyhow::anyhow!("tensor {name} is missing from {}", weights.describe());
        let weight = match quantization {
            BaseQuantization::KeepGguf => {
                let (ty, bytes) = weights.raw(name)?.ok_or_else(missing)?;
                QuantizedWeight::from_ggml(ty, &bytes, rows, cols, dtype)
            }
            BaseQuantization::Nf4 { double_quant } => {
                let tensor = weights.tensor(name)?.ok_or_else(missing)?;
                if tensor.size() != [rows, cols] {
                    bail!(
                        "tensor {name} in {} has shape {:?}, the model config expects {:?}",
                        weights.describe(),
                        tensor.size(),
                        [rows, cols]
                    );
                }
                QuantizedWeight::nf4(&tensor.to_device(device).to_kind(dtype), double_quant, dtype)
            }
            BaseQuantization::None => unreachable!("no quantized projections"),
        };
        unused.retain(|n| n != name);
        Ok(weight.to_device(device))
    })?;
    if !unused.is_empty() {
        tracing::warn!(
            "{} tensor(s) in {} are not used by the model: {}",
            unused.len(),
            weights.describe(),
            unused.join(", ")
        );
    }
    Ok(LoadedModel { vs, model, tokenizer, adapter: None })
}
