//! Models: config, the decoder architecture, weights (safetensors and GGUF), tokenizer, saving and generation.

pub mod config;
pub mod decoder;
pub mod device;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod lm_head;
pub mod rope;
pub mod save;
pub mod tokenizer;
pub mod weights;

use anyhow::{bail, Context, Result};
use config::ModelConfig;
use decoder::CausalLm;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind};
use tokenizer::TextTokenizer;
use weights::WeightSource;

/// A model ready to run: parameters in `vs`, the network, and its tokenizer (absent for bare weight folders).
pub struct LoadedModel {
    pub vs: VarStore,
    pub model: CausalLm,
    pub tokenizer: Option<TextTokenizer>,
}

impl LoadedModel {
    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().context("this model has no tokenizer (no tokenizer.json beside its weights)")
    }
}

/// Loads a Hugging Face model folder or a `.gguf` file onto `device` in `dtype`.
pub fn load(path: &Path, device: Device, dtype: Kind) -> Result<LoadedModel> {
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            let gguf = gguf::GgufModel::open(path)?;
            return build(gguf.config, &gguf.weights, Some(gguf.tokenizer), device, dtype);
        }
        bail!("{} is a file but not a .gguf; pass a GGUF file or a Hugging Face model folder", path.display());
    }
    let config = ModelConfig::from_file(&path.join("config.json"))?;
    let weights = weights::SafetensorsFiles::open_dir(path)?;
    let tokenizer = if path.join("tokenizer.json").exists() { Some(TextTokenizer::from_hf_dir(path)?) } else { None };
    build(config, &weights, tokenizer, device, dtype)
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
    let model = CausalLm::new(&vs.root(), &config)?;
    vs.set_kind(dtype);
    let unused = weights::load_into(&vs, weights)?;
    if !unused.is_empty() {
        tracing::warn!(
            "{} tensor(s) in {} are not used by the model: {}",
            unused.len(),
            weights.describe(),
            unused.join(", ")
        );
    }
    Ok(LoadedModel { vs, model, tokenizer })
}
