//! Checkpoints: `checkpoint-<step>` folders holding a loadable model (or its LoRA adapters), the optimizer's
//! moments and where training stands, written atomically; and resuming from one.

use crate::files;
use crate::model::lora;
use crate::model::save::save_trained;
use crate::model::weights::{load_into, save_safetensors_file, SafetensorsFiles, WeightSource};
use crate::model::LoadedModel;
use crate::train::optimizer::AdamW;
use crate::train::run::Progress;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    progress: Progress,
    optimizer_step: i64,
}

/// Writes `checkpoint-<step>` (a loadable model folder plus optimizer and trainer state) atomically: into a
/// temporary folder that replaces the checkpoint in one step, so a crash never leaves a half-written checkpoint
/// (a killed run's temporary folder is removed at the next start). Keeps the newest `keep` checkpoints when given.
/// `optimizer`: the moments (`Trainer::optimizer_state`) and the optimizer's step count; without it
/// (transformers' `save_only_model`) the checkpoint holds no moments and cannot be resumed.
pub fn save_checkpoint(
    out: &Path,
    policy: &LoadedModel,
    optimizer: Option<(&[(String, Tensor)], i64)>,
    progress: &Progress,
    keep: Option<usize>,
) -> Result<PathBuf> {
    let final_dir = out.join(format!("checkpoint-{}", progress.global_step));
    let tmp = files::partial_path(&final_dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    save_trained(policy, &tmp)?;
    if let Some((moments, _)) = optimizer {
        save_safetensors_file(&tmp.join(OPTIMIZER_FILE), moments)?;
    }
    let state = CheckpointState { progress: progress.clone(), optimizer_step: optimizer.map_or(0, |(_, step)| step) };
    files::write_file_atomically(&tmp.join(STATE_FILE), serde_json::to_string_pretty(&state)?)?;
    files::replace_dir(&tmp, &final_dir)?;
    if let Some(keep) = keep {
        let mut checkpoints = list_checkpoints(out)?;
        while checkpoints.len() > keep.max(1) {
            let (_, oldest) = checkpoints.remove(0);
            std::fs::remove_dir_all(&oldest).with_context(|| format!("cannot remove {}", oldest.display()))?;
        }
    }
    Ok(final_dir)
}

/// `checkpoint-<step>` folders of `out`, oldest first.
pub fn list_checkpoints(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .with_context(|| format!("cannot list {}", out.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("checkpoint-").and_then(|s| s.parse().ok()).map(|step| (step, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Loads a checkpoint's weights into `policy` and its moments into `optimizer`; returns where training stood.
pub fn restore(checkpoint: &Path, policy: &LoadedModel, optimizer: &mut AdamW) -> Result<Progress> {
    let state_path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("{} is not a prefalign checkpoint (no {STATE_FILE})", checkpoint.display()))?;
    let state: CheckpointState =
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", state_path.display()))?;
    if policy.adapter.is_some() {
        policy.load_adapter_weights(&checkpoint.join(lora::WEIGHTS_FILE))?;
    } else {
        load_into(&policy.vs, &SafetensorsFiles::open_dir(checkpoint)?)?;
    }
    if !checkpoint.join(OPTIMIZER_FILE).exists() {
        anyhow::bail!(
            "{} has no {OPTIMIZER_FILE}: it was saved with save_only_model and cannot be resumed from (load it as a \
             model with --model instead)",
            checkpoint.display()
        );
    }
    let moments_file = SafetensorsFiles::open_dir_file(&checkpoint.join(OPTIMIZER_FILE))?;
    let moments = moments_file
        .names()
        .into_iter()
        .map(|n| Ok((n.clone(), moments_file.tensor(&n)?.expect("listed"))))
        .collect::<Result<_>>()?;
    optimizer.load_state(&moments, state.optimizer_step)?;
    Ok(state.progress)
}
