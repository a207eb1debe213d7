//! LoRA adapters as PEFT builds, trains and saves them: a low-rank update `scaling · B A x` beside the frozen
//! weight of each targeted projection, A [r, in] initialised kaiming-uniform and B [out, r] zero, so training starts
//! from the base model; `adapter_config.json` and `adapter_model.safetensors` with PEFT's names, which
//! `PeftModel.from_pretrained` loads.
//!
//! PEFT's `modules_to_save` (the embeddings or the output layer trained whole beside the adapters) is a trained copy
//! of the module, used by the policy pass; the reference pass uses the original, as PEFT does with its adapters
//! disabled.
//!
//! Dropout on the adapters' input (`lora_dropout`) applies in SFT's gradient passes, as TRL's SFTTrainer trains
//! with it; TRL's preference trainers switch every dropout of the model off (`disable_dropout`, true by default),
//! PEFT's LoRA dropout included, and so does prefalign for them. Its masks come from a seed per pass and adapter
//! (`LayerContext::with_lora_dropout`), not from torch's global generator: a resumed run and a recomputed layer
//! draw the same masks, but not the masks TRL draws.

use crate::files::write_file_atomically;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use tch::{Kind, Tensor};

/// The projections LoRA can adapt, in a decoder layer's order (`all-linear`: every one; PEFT leaves the output
/// layer out).
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT puts before a module's name in a causal LM's adapter file.
const SAVED_PREFIX: &str = "base_model.model.";
/// The modules that can be trained whole beside the adapters (`modules_to_save`), by their names in the model.
pub const MODULES_TO_SAVE: [(&str, &str); 2] = [("embed_tokens", "model.embed_tokens"), ("lm_head", "lm_head")];
/// What the trained copy of a module in `modules_to_save` adds to its name here (`lm_head.modules_to_save.weight`).
const SAVED_MODULE: &str = ".modules_to_save.";

/// TRL's `ModelConfig` LoRA fields (`get_peft_config` turns them into PEFT's `LoraConfig`), with their defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// On the adapters' input, in SFT only (see the module's note).
    pub dropout: f64,
    /// Module names (a module is adapted when its full name is one of them or ends with "." and one of them),
    /// or `all-linear`; None: PEFT's default for the architecture.
    pub target_modules: Option<Vec<String>>,
    /// scaling alpha/√r instead of alpha/r
    pub use_rslora: bool,
    /// Modules trained whole (embed_tokens, lm_head), as given.
    pub modules_to_save: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { r: 16, alpha: 32.0, dropout: 0.05, target_modules: None, use_rslora: false, modules_to_save: Vec::new() }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The module names to match: the given ones, every projection for `all-linear`, or PEFT's default for
    /// `model_type` (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`: q_proj and v_proj for the
    /// architectures prefalign runs).
    pub fn target_names(&self, model_type: &str) -> Result<Vec<String>> {
        match self.target_modules.as_deref() {
            Some([one]) if one == "all-linear" => Ok(PROJECTIONS.iter().map(|p| p.to_string()).collect()),
            Some([]) => bail!("--lora-target-modules is empty"),
            Some(names) => {
                if let Some(name) = names.iter().find(|n| n.ends_with("lm_head") || n.ends_with("embed_tokens")) {
                    bail!(
                        "--lora-target-modules {name}: LoRA on the embeddings or the output layer is not supported \
                         (TRL refuses an adapter on lm_head too: its log-probs use lm_head.weight directly)"
                    );
                }
                Ok(names.to_vec())
            }
            None => match model_type {
                "llama" | "mistral" | "qwen2" | "qwen3" => Ok(vec!["q_proj".into(), "v_proj".into()]),
                other => bail!("no default LoRA target modules for model_type {other:?}; pass --lora-target-modules"),
            },
        }
    }

    /// The module paths `modules_to_save` names (`model.embed_tokens`, `lm_head`): PEFT matches a module whose full
    /// name is a given one or ends with "." and it.
    pub fn saved_modules(&self) -> Result<Vec<&'static str>> {
        let mut paths = Vec::new();
        for name in &self.modules_to_save {
            let Some((_, path)) =
                MODULES_TO_SAVE.iter().find(|(_, path)| path == name || path.ends_with(&format!(".{name}")))
            else {
                bail!(
                    "modules_to_save {name}: prefalign trains the embeddings (embed_tokens) or the output layer \
                     (lm_head) whole, no other module"
                );
            };
            if !paths.contains(path) {
                paths.push(*path);
            }
        }
        Ok(paths)
    }

    /// Reads a PEFT adapter's `adapter_config.json`, refusing what prefalign does not run.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        let field = |key: &str| value.get(key).filter(|v| !v.is_null());
        let refuse = |why: String| anyhow::anyhow!("{}: {why}", path.display());
        match field("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => return Err(refuse(format!("peft_type is {other:?}; only LoRA adapters are supported"))),
        }
        for (key, default) in [("use_dora", json!(false)), ("bias", json!("none")), ("fan_in_fan_out", json!(false))] {
            if let Some(v) = field(key).filter(|v| **v != default) {
                return Err(refuse(format!("{key} is {v}; prefalign supports {default} only")));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if field(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                return Err(refuse(format!("{key} is not supported (one rank and alpha for every module)")));
            }
        }
        for key in ["layers_to_transform", "target_parameters", "exclude_modules"] {
            if field(key).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(refuse(format!("{key} is not supported")));
            }
        }
        let r = field("r").and_then(Value::as_u64).filter(|&r| r > 0).ok_or_else(|| refuse("no positive r".into()))?;
        let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        if !(0.0..=1.0).contains(&dropout) {
            return Err(refuse(format!("lora_dropout is {dropout}; a probability is in [0, 1]")));
        }
        let target_modules = match field("target_modules") {
            Some(Value::Array(names)) => {
                names.iter().map(|n| n.as_str().map(str::to_string)).collect::<Option<Vec<_>>>()
            }
            Some(Value::String(name)) if name == "all-linear" => Some(vec![name.clone()]),
            Some(other) => return Err(refuse(format!("target_modules {other} is not a list of module names"))),
            None => None,
        };
        Ok(Self {
            r: r as usize,
            alpha: field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
            dropout,
            target_modules: Some(target_modules.ok_or_else(|| refuse("target_modules is not a list".into()))?),
            use_rslora: field("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            modules_to_save: match field("modules_to_save") {
                None => Vec::new(),
                Some(value) => value
                    .as_array()
                    .and_then(|names| names.iter().map(|n| n.as_str().map(str::to_string)).collect())
                    .ok_or_else(|| refuse("modules_to_save is not a list of module names".into()))?,
            },
        })
    }

    /// Writes `adapter_config.json` as PEFT 0.21 does for a causal LM, with the module names that were matched.
    pub fn write(&self, dir: &Path, targets: &[String], base_model: &str) -> Result<()> {
        let mut targets = targets.to_vec();
        targets.sort();
        // PEFT's lora_alpha is an int; TRL's ModelConfig too.
        let alpha = if self.alpha.fract() == 0.0 { json!(self.alpha as i64) } else { json!(self.alpha) };
        let config = json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": alpha,
            "lora_bias": false,
            "lora_dropout": self.dropout,
            "modules_to_save": (!self.modules_to_save.is_empty()).then_some(&self.modules_to_save),
            "peft_type": "LORA",
            "peft_version": "0.21.2",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "target_parameters": null,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        });
        write_file_atomically(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config)?)
    }
}

/// PEFT's name in `adapter_model.safetensors` of a variable named `name` here (`model.layers.0.self_attn.q_proj.
/// lora_A.weight` → `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
pub fn saved_name(name: &str) -> String {
    // a trained module copy is saved under the module's own name (PEFT drops "modules_to_save.<adapter>")
    format!("{SAVED_PREFIX}{}", name.replace(SAVED_MODULE, "."))
}

/// The name here of a tensor PEFT saved as `saved`: an adapter's A or B, or a module trained whole.
pub fn name_from_saved(saved: &str) -> Option<String> {
    let name = saved.strip_prefix(SAVED_PREFIX)?;
    if is_adapter_variable(name) {
        return Some(name.to_string());
    }
    let (module, parameter) = name.rsplit_once('.')?;
    Some(format!("{module}{SAVED_MODULE}{parameter}"))
}

/// The name of the trained copy of `module`'s parameter `parameter` (`lm_head.modules_to_save.weight`).
pub fn saved_module_variable(module: &str, parameter: &str) -> String {
    format!("{module}{SAVED_MODULE}{parameter}")
}

/// Whether a variable is the trained copy of a whole module (`modules_to_save`).
pub fn is_saved_module(name: &str) -> bool {
    name.contains(SAVED_MODULE)
}

/// Whether a variable is trained with the adapters: an adapter's A or B, or a module trained whole.
pub fn is_adapter_variable(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.") || name.contains(SAVED_MODULE)
}

/// Whether a variable belongs to the adapters (trained, or their frozen reference copy) rather than the model.
pub fn is_adapter_state(name: &str) -> bool {
    is_adapter_variable(name) || name.contains(".reference_lora_") || name.contains(".reference_modules_to_save.")
}

/// The adapter of one projection: A [r, in] and B [out, r], trained; and, when training continues from an
/// existing adapter, a frozen copy of it for the reference pass (TRL adds one, "ref", in that case).
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub reference: Option<(Tensor, Tensor)>,
    /// PEFT's `lora_dropout` on x, where a pass asks for it
    pub dropout: f64,
    /// The adapter's place among the model's projections, which makes its dropout masks its own.
    pub index: u64,
}

impl Lora {
    /// scaling · B A x, [..., out], for x [..., in] (PEFT: `lora_B(lora_A(dropout(x))) * scaling`): in the autocast
    /// dtype under autocast, else in the adapter's dtype (PEFT casts x to it). In the reference pass the frozen
    /// copy's, or None when there is none (the base model alone, adapters off). With `dropout_seed` (a gradient
    /// pass that trains with dropout) x goes through the adapter's dropout first, its mask drawn from that seed and
    /// the adapter's index.
    pub fn update(&self, x: &Tensor, cast: Option<Kind>, reference: bool, dropout_seed: Option<u64>) -> Option<Tensor> {
        let (a, b) = match (reference, &self.reference) {
            (false, _) => (&self.a, &self.b),
            (true, Some((a, b))) => (a, b),
            (true, None) => return None,
        };
        let x = match dropout_seed {
            // PEFT casts x to the adapter's dtype first (an f32 adapter on a bf16 model drops out in f32)
            Some(seed) if self.dropout > 0.0 && !reference => {
                crate::model::fused::dropout(&x.to_kind(a.kind()), self.dropout, mix_seeds(seed, self.index))
            }
            _ => x.shallow_clone(),
        };
        let kind = cast.unwrap_or(a.kind());
        let down = x.to_kind(kind).linear::<&Tensor>(&a.to_kind(kind), None);
        Some(down.linear::<&Tensor>(&b.to_kind(kind), None) * self.scaling)
    }
}

/// One seed from two (splitmix64's finalizer over their combination): nearby inputs give unrelated seeds.
pub fn mix_seeds(seed: u64, value: u64) -> u64 {
    let mut z = seed ^ value.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// PEFT's initialisation of A: `kaiming_uniform_(a=√5)`, uniform in ±1/√in.
pub fn init_a(a: &Tensor) {
    let fan_in = a.size()[1] as f64;
    let bound = 1.0 / fan_in.sqrt();
    tch::no_grad(|| {
        let _ = a.shallow_clone().uniform_(-bound, bound);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_default_to_pefts_and_all_linear_means_every_projection() {
        let config = LoraConfig::default();
        assert_eq!(config.target_names("qwen2").unwrap(), ["q_proj", "v_proj"]);
        assert!(config.target_names("gpt2").is_err());
        let all = LoraConfig { target_modules: Some(vec!["all-linear".into()]), ..LoraConfig::default() };
        assert_eq!(all.target_names("llama").unwrap().len(), 7);
        let head = LoraConfig { target_modules: Some(vec!["lm_head".into()]), ..LoraConfig::default() };
        assert!(head.target_names("llama").unwrap_err().to_string().contains("not supported"));
        assert_eq!(LoraConfig::default().scaling(), 2.0);
        assert_eq!(LoraConfig { use_rslora: true, ..LoraConfig::default() }.scaling(), 8.0);
    }

    #[test]
    fn adapter_configs_round_trip_and_unsupported_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = LoraConfig {
            r: 4,
            alpha: 8.0,
            use_rslora: true,
            modules_to_save: vec!["lm_head".into()],
            ..LoraConfig::default()
        };
        config.write(dir.path(), &["v_proj".into(), "q_proj".into()], "base").unwrap();
        let read = LoraConfig::read(dir.path()).unwrap();
        assert_eq!(read, LoraConfig { target_modules: Some(vec!["q_proj".into(), "v_proj".into()]), ..config });
        let path = dir.path().join(CONFIG_FILE);
        let mut value: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        value["use_dora"] = json!(true);
        std::fs::write(&path, value.to_string()).unwrap();
        assert!(LoraConfig::read(dir.path()).unwrap_err().to_string().contains("use_dora"));
    }

    #[test]
    fn whole_modules_are_saved_under_their_own_names() {
        let copy = saved_module_variable("lm_head", "weight");
        assert_eq!(saved_name(&copy), "base_model.model.lm_head.weight");
        assert_eq!(name_from_saved("base_model.model.lm_head.weight").as_deref(), Some(copy.as_str()));
        let a = "model.layers.0.self_attn.q_proj.lora_A.weight";
        assert_eq!(name_from_saved(&saved_name(a)).as_deref(), Some(a));
        let config =
            LoraConfig { modules_to_save: vec!["embed_tokens".into(), "model.norm".into()], ..Default::default() };
        assert!(config.saved_modules().unwrap_err().to_string().contains("modules_to_save model.norm"));
    }
}
