//! Reference log-probs computed once (TRL's `precompute_ref_log_probs`) and cached on disk under a fingerprint
//! of the reference weights, the token ids and the truncation settings, so that a sweep over β, loss types or
//! learning rates runs the reference model once.

use crate::data::pack::{Batching, PackedBatch};
use crate::data::tokenize::TokenizedPair;
use crate::model::decoder::CausalLm;
use crate::model::lm_head::{summed_completion_logps, Precision};
use crate::model::LoadedModel;
use crate::objective::dpo::PairLogps;
use crate::train::distributed::{mean_across, ProcessGroup};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Summed completion log-probs of the reference for every pair: (chosen, rejected), [N] each, on the CPU.
pub struct ReferenceLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
}

impl ReferenceLogps {
    /// The values of the pairs at `indices`, as a batch on `device` (where the policy's log-probs are).
    pub fn batch(&self, indices: &[usize], device: Device) -> PairLogps {
        let index = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let select = |values: &Tensor| values.index_select(0, &index).to_device(device);
        PairLogps { chosen: select(&self.chosen), rejected: select(&self.rejected) }
    }
}

/// The reference's summed completion log-probs of one batch (no gradient). A model with LoRA adapters serves as
/// its own reference (`CausalLm::as_reference`).
pub fn reference_logps(reference: &CausalLm, batch: &PackedBatch, precision: Precision) -> PairLogps {
    reference.as_reference(|| PairLogps::from_sequences(&summed_completion_logps(reference, batch, precision)))
}

/// Where cached reference log-probs live: `$PREFALIGN_CACHE`, else `$HF_HOME/prefalign`, else
/// `~/.cache/prefalign`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PREFALIGN_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("prefalign");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/prefalign")
}

/// A fingerprint of everything the reference log-probs depend on.
fn fingerprint(reference: &LoadedModel, pairs: &[TokenizedPair], batching: &Batching, precision: Precision) -> String {
    let mut hasher = blake3::Hasher::new();
    // The trained adapters of a model that is its own reference take no part in the reference pass.
    let mut variables: Vec<(String, Tensor)> = reference
        .vs
        .variables()
        .into_iter()
        .filter(|(name, _)| !crate::model::lora::is_adapter_variable(name))
        .collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    // a quantized base's projections by their quantized parts (and the dtype they are computed in)
    for (name, weight) in reference.model.quantized_weights() {
        let parts = weight.parts.iter().enumerate().map(|(i, part)| (format!("{name}#{i}"), part.shallow_clone()));
        variables.extend(parts);
        hasher.update(format!("{name} {:?} {:?}", weight.format, weight.kind).as_bytes());
    }
    for (name, tensor) in variables {
        let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
        let mut bytes = vec![0u8; tensor.numel() * tensor.kind().elt_size_in_bytes()];
        tensor.copy_data_u8(&mut bytes, tensor.numel());
        hasher.update(name.as_bytes());
        hasher.update(&bytes);
    }
    hasher.update(format!("{:?}", reference.config()).as_bytes());
    for pair in pairs {
        for seq in [&pair.chosen, &pair.rejected] {
            hasher.update(&(seq.prompt_len as u64).to_le_bytes());
            for id in &seq.ids {
                hasher.update(&id.to_le_bytes());
            }
        }
    }
    hasher.update(format!("{:?}", batching.truncation).as_bytes());
    // The layout changes log-probs by rounding only; the autocast dtype by more.
    if let Some(cast) = precision.cast {
        hasher.update(format!("{cast:?}").as_bytes());
    }
    hasher.finalize().to_hex()[..32].to_string()
}

/// The reference log-probs of `pairs`, computed in batches of `batch_size`.
pub fn compute(
    reference: &CausalLm,
    pairs: &[TokenizedPair],
    batching: &Batching,
    precision: Precision,
    batch_size: usize,
) -> ReferenceLogps {
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    tch::no_grad(|| {
        for chunk in pairs.chunks(batch_size.max(1)) {
            let logps = reference_logps(reference, &batching.pack(&chunk.iter().collect::<Vec<_>>()), precision);
            chosen.push(logps.chosen.to_device(tch::Device::Cpu));
            rejected.push(logps.rejected.to_device(tch::Device::Cpu));
        }
    });
    ReferenceLogps { chosen: Tensor::cat(&chosen, 0), rejected: Tensor::cat(&rejected, 0) }
}

/// `compute`, or the values cached under `cache` (see `cache_dir`) by an earlier run with the same fingerprint.
/// On the ranks of a `group` each computes a share of `pairs` and all gather the shares; rank 0 caches them, and
/// the cache counts only where every rank finds it (on several machines each has its own).
pub fn precompute(
    reference: &LoadedModel,
    pairs: &[TokenizedPair],
    batching: &Batching,
    precision: Precision,
    batch_size: usize,
    cache: &Path,
    group: Option<&ProcessGroup>,
) -> Result<ReferenceLogps> {
    let key = fingerprint(reference, pairs, batching, precision);
    let path = cache.join("ref_logps").join(format!("{key}.safetensors"));
    let cached = read_cache(&path)?;
    let everywhere = match group {
        Some(group) => mean_across(group, &[f64::from(cached.is_some())], "the reference cache check")?[0] == 1.0,
        None => true,
    };
    let main = group.is_none_or(|g| g.rank == 0);
    if let (Some(cached), true) = (cached, everywhere) {
        if main {
            eprintln!("reference log-probs: cached ({})", path.display());
        }
        return Ok(cached);
    }
    let logps = match group {
        Some(group) => compute_shares(group, &reference.model, pairs, batching, precision, batch_size)?,
        None => compute(&reference.model, pairs, batching, precision, batch_size),
    };
    if main {
        write_cache(&path, &logps)?;
        eprintln!("reference log-probs: computed for {} pairs, cached in {}", pairs.len(), path.display());
    }
    Ok(logps)
}

/// `compute` on the ranks of `group`: each its contiguous share of `pairs`, then all gather the shares.
fn compute_shares(
    group: &ProcessGroup,
    reference: &CausalLm,
    pairs: &[TokenizedPair],
    batching: &Batching,
    precision: Precision,
    batch_size: usize,
) -> Result<ReferenceLogps> {
    let share = pairs.len().div_ceil(group.world_size);
    let range = |rank: usize| (rank * share).min(pairs.len())..((rank + 1) * share).min(pairs.len());
    let mine = compute(reference, &pairs[range(group.rank)], batching, precision, batch_size);
    let padding = Tensor::zeros([(share - range(group.rank).len()) as i64], (Kind::Float, tch::Device::Cpu));
    let padded = |t: &Tensor| Tensor::cat(&[t.to_kind(Kind::Float), padding.shallow_clone()], 0);
    let mine = Tensor::stack(&[padded(&mine.chosen), padded(&mine.rejected)], 0).to_device(group.device);
    // [world, 2, share]
    let gathered = group.all_gather(&mine, "the reference log-probs")?.to_device(tch::Device::Cpu);
    let side = |i: i64| {
        let parts: Vec<Tensor> =
            (0..group.world_size).map(|r| gathered.get(r as i64).get(i).narrow(0, 0, range(r).len() as i64)).collect();
        Tensor::cat(&parts, 0)
    };
    Ok(ReferenceLogps { chosen: side(0), rejected: side(1) })
}

fn write_cache(path: &Path, logps: &ReferenceLogps) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("cache folder"))
        .with_context(|| format!("cannot create {}", path.display()))?;
    crate::model::weights::save_safetensors_file(
        path,
        &[("chosen".into(), logps.chosen.shallow_clone()), ("rejected".into(), logps.rejected.shallow_clone())],
    )
}

fn read_cache(path: &Path) -> Result<Option<ReferenceLogps>> {
    if !path.exists() {
        return Ok(None);
    }
    let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .with_context(|| format!("cannot read cached reference log-probs {}", path.display()))?
        .into_iter()
        .collect();
    match (tensors.get("chosen"), tensors.get("rejected")) {
        (Some(c), Some(r)) => {
            Ok(Some(ReferenceLogps { chosen: c.to_kind(Kind::Float), rejected: r.to_kind(Kind::Float) }))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Precomputed log-probs stay on the CPU; a batch of them goes where the policy's log-probs are (on CUDA too,
    /// where the tests run with a GPU: the loss cannot mix devices).
    #[test]
    fn batch_selects_pairs_onto_the_policys_device() {
        let logps = ReferenceLogps {
            chosen: Tensor::from_slice(&[-1.0f32, -2.0, -3.0]),
            rejected: Tensor::from_slice(&[-4.0f32, -5.0, -6.0]),
        };
        let devices = [Device::Cpu].into_iter().chain(tch::Cuda::is_available().then_some(Device::Cuda(0)));
        for device in devices {
            let batch = logps.batch(&[2, 0], device);
            for (values, want) in [(&batch.chosen, [-3.0f32, -1.0]), (&batch.rejected, [-6.0, -4.0])] {
                assert_eq!(values.device(), device);
                assert_eq!(Vec::<f32>::try_from(values.to_device(Device::Cpu)).unwrap(), want);
            }
        }
    }
}
