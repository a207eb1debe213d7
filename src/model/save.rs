//! Saving a model as a Hugging Face folder that transformers loads: config.json, safetensors weights (sharded
//! past a size limit), generation_config.json and the tokenizer files; or, for a model with LoRA adapters, the
//! adapters as PEFT saves them (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer files.

use crate::files::write_file_atomically;
use crate::model::device::dtype_name;
use crate::model::lora;
use crate::model::weights::{save_safetensors, save_safetensors_file};
use crate::model::LoadedModel;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;
use tch::Tensor;

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// What a training run writes: the adapters when the model has some (as TRL's `save_model` with PEFT), else the
/// whole model.
pub fn save_trained(model: &LoadedModel, dir: &Path) -> Result<()> {
    let Some(adapter) = &model.adapter else { return save_hf(model, dir, DEFAULT_MAX_SHARD_BYTES) };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: Vec<(String, Tensor)> =
        model.adapter_variables().into_iter().map(|(name, t)| (lora::saved_name(&name), t)).collect();
    save_safetensors_file(&dir.join(lora::WEIGHTS_FILE), &tensors)?;
    adapter.config.write(dir, &adapter.targets, &adapter.base_model)?;
    if let Some(tokenizer) = &model.tokenizer {
        tokenizer.save_hf(dir, model.config().max_position_embeddings)?;
    }
    Ok(())
}

pub fn save_hf(model: &LoadedModel, dir: &Path, max_shard_bytes: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let variables = model.vs.variables();
    if model.adapter.is_some() {
        bail!("a model with LoRA adapters is saved as its adapters (save_trained) or merged first");
    }
    // A merged model's VarStore still holds its former adapters' tensors.
    let mut tensors: Vec<(String, Tensor)> =
        variables.into_iter().filter(|(name, _)| !lora::is_adapter_state(name)).collect();
    tensors.sort_by_key(|(name, _)| natural_key(name));
    let dtype = tensors.first().map_or(tch::Kind::Float, |(_, t)| t.kind());
    save_safetensors(dir, &tensors, max_shard_bytes)?;

    let config = model.config();
    let mut config_json = serde_json::to_value(config)?;
    config_json["dtype"] = json!(dtype_name(dtype));
    config_json["torch_dtype"] = json!(dtype_name(dtype)); // what transformers < 4.56 reads
    write_json(dir, "config.json", &config_json)?;

    let mut generation = json!({});
    for (key, value) in [
        ("bos_token_id", &config.bos_token_id),
        ("eos_token_id", &config.eos_token_id),
        ("pad_token_id", &config.pad_token_id),
    ] {
        if let Some(value) = value {
            generation[key] = serde_json::to_value(value)?;
        }
    }
    write_json(dir, "generation_config.json", &generation)?;

    if let Some(tokenizer) = &model.tokenizer {
        tokenizer.save_hf(dir, config.max_position_embeddings)?;
    }
    Ok(())
}

fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<()> {
    write_file_atomically(&dir.join(name), serde_json::to_string_pretty(value)?)
}

/// Sorts "model.layers.10" after "model.layers.9" so shards follow layer order.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    name.split('.').map(|part| part.parse::<u64>().map_or((part.to_string(), 0), |n| (String::new(), n))).collect()
}
