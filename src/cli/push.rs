//! `--push-to-hub`: a training run's --output-dir to a Hub model repo, as transformers' Trainer and TRL push it
//! (`model::push` speaks to the Hub). The repo is created before anything is loaded, so that a missing token or
//! right fails at once; at the end the saved model (or adapter) is pushed with a README.md model card written
//! beside it, and with `--hub-strategy every_save` also at each checkpoint.

use crate::data::hub::{looks_like_repo_id, HubSettings};
use crate::files;
use crate::model::lora::LoraConfig;
use crate::model::push::{folder_files, model_card, CommitInfo, HubClient, ModelCard};
use crate::objective::cpo::CpoLoss;
use crate::objective::dpo::DpoLoss;
use crate::objective::kto::KtoLoss;
use crate::objective::sft::SftLoss;
use crate::objective::Objective;
use crate::train::checkpoint::{OPTIMIZER_FILE, STATE_FILE};
use crate::train::history::{python_float, python_g4};
use crate::train::schedule::Schedule;
use crate::train::TrainerConfig;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// transformers' `HubStrategy`: what is pushed, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum HubStrategy {
    /// once, after training
    End,
    /// also at each checkpoint (--save-steps): the checkpoint's model in --output-dir
    #[value(alias = "every-save")]
    EverySave,
    /// as every_save, and the checkpoint itself to the repo's last-checkpoint/ folder
    Checkpoint,
    /// as every_save, and each checkpoint to its own checkpoint-N/ folder
    #[value(alias = "all-checkpoints")]
    AllCheckpoints,
}

/// TrainingArguments' Hub flags.
#[derive(Args)]
pub struct HubPushArgs {
    /// Push --output-dir (the model or adapter as saved, a README.md model card, the logs; not the checkpoint-*
    /// folders) to a Hub model repo after training, and at checkpoints as --hub-strategy says
    #[arg(long)]
    push_to_hub: bool,
    /// The repo: "org/name", or a name in the token owner's namespace; default: --output-dir's folder name
    #[arg(long)]
    hub_model_id: Option<String>,
    /// Create the repo private (a repo that exists keeps its visibility); default: the namespace's default
    #[arg(long)]
    hub_private_repo: bool,
    #[arg(long, value_enum, default_value = "every_save")]
    hub_strategy: HubStrategy,
    /// A token with write access; default: HF_TOKEN, else the one `hf auth login` saved in $HF_HOME/token
    #[arg(long)]
    hub_token: Option<String>,
}

impl std::fmt::Debug for HubPushArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubPushArgs")
            .field("push_to_hub", &self.push_to_hub)
            .field("hub_model_id", &self.hub_model_id)
            .field("hub_private_repo", &self.hub_private_repo)
            .field("hub_strategy", &self.hub_strategy)
            .field("hub_token", &self.hub_token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl HubPushArgs {
    /// With --push-to-hub: the client (a token, not offline) and the repo, created unless it exists, before anything
    /// is loaded or trained; `None` without it.
    pub fn connect(&self, output_dir: &Path) -> Result<Option<HubPush>> {
        if !self.push_to_hub {
            if self.hub_model_id.is_some() || self.hub_token.is_some() || self.hub_private_repo {
                eprintln!("warning: --hub-model-id, --hub-token and --hub-private-repo only apply with --push-to-hub");
            }
            return Ok(None);
        }
        let mut settings = HubSettings::from_env();
        if let Some(token) = self.hub_token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            settings.token = Some(token.to_string());
        }
        let client = HubClient::new(&settings).context("--push-to-hub")?;
        // transformers: Path(output_dir).absolute().name
        let wanted = match &self.hub_model_id {
            Some(id) => id.clone(),
            None => std::path::absolute(output_dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .with_context(|| format!("--output-dir {} names no repo: pass --hub-model-id", output_dir.display()))?,
        };
        let repo_id = client.create_repo(&wanted, self.hub_private_repo)?;
        let strategy = self.hub_strategy.to_possible_value().expect("no skipped values");
        eprintln!("pushing to model repo {repo_id} at {} (--hub-strategy {})", settings.endpoint, strategy.get_name());
        Ok(Some(HubPush {
            client,
            repo_id,
            strategy: self.hub_strategy,
            output_dir: output_dir.to_path_buf(),
            run: None,
        }))
    }
}

/// Pushes of one run to its repo.
pub struct HubPush {
    client: HubClient,
    repo_id: String,
    strategy: HubStrategy,
    output_dir: PathBuf,
    run: Option<ModelCard>,
}

impl HubPush {
    /// What the model card says about the run: `model` and `dataset` (Hub ids, or local paths by their last part),
    /// the objective and trainer settings, and the LoRA settings of an adapter.
    pub fn describing(
        mut self,
        model: &str,
        dataset: &str,
        objective: &Objective,
        config: &TrainerConfig,
        lora: Option<&LoraConfig>,
    ) -> Self {
        self.run = Some(ModelCard {
            model_name: self.repo_id.rsplit('/').next().unwrap_or(&self.repo_id).to_string(),
            hub_model_id: self.repo_id.clone(),
            base_model: hub_id_or_file_name(model),
            base_model_on_hub: looks_like_repo_id(model),
            dataset: hub_id_or_file_name(dataset),
            dataset_on_hub: looks_like_repo_id(dataset),
            trainer: objective.name().to_uppercase(),
            adapter: lora.is_some(),
            hyperparameters: hyperparameters(config, objective, lora),
            results: Vec::new(),
        });
        self
    }

    /// After the checkpoint `checkpoint` of step `step` was saved: unless --hub-strategy end, its model into
    /// --output-dir (transformers copies it there too) with a model card, pushed; with checkpoint or all_checkpoints,
    /// the checkpoint folder too. A failed push is reported and training goes on: the push at the end sends
    /// everything that changed.
    pub fn checkpoint_saved(&self, checkpoint: &Path, step: usize) -> Result<()> {
        if self.strategy == HubStrategy::End {
            return Ok(());
        }
        if let Err(error) = self.push_checkpoint(checkpoint, step) {
            eprintln!("warning: the push of step {step} to {} failed, training goes on: {error:#}", self.repo_id);
        }
        Ok(())
    }

    fn push_checkpoint(&self, checkpoint: &Path, step: usize) -> Result<()> {
        for entry in std::fs::read_dir(checkpoint).with_context(|| format!("cannot list {}", checkpoint.display()))? {
            let path = entry.with_context(|| format!("cannot list {}", checkpoint.display()))?.path();
            let name = path.file_name().unwrap_or_default();
            if path.is_file() && name != OPTIMIZER_FILE && name != STATE_FILE {
                let to = self.output_dir.join(name);
                files::write_atomically(&to, |tmp| {
                    std::fs::copy(&path, tmp).with_context(|| format!("cannot copy {}", path.display()))?;
                    Ok(())
                })?;
            }
        }
        self.write_card()?;
        let message = format!("Training in progress, step {step}");
        self.commit(&folder_files(&self.output_dir, "", true)?, &message)?;
        let folder = match self.strategy {
            HubStrategy::Checkpoint => "last-checkpoint".to_string(),
            HubStrategy::AllCheckpoints => format!("checkpoint-{step}"),
            HubStrategy::End | HubStrategy::EverySave => return Ok(()),
        };
        self.commit(&folder_files(checkpoint, &format!("{folder}/"), false)?, &format!("{message}, checkpoint"))?;
        Ok(())
    }

    /// After training: the model card into --output-dir, and the folder pushed.
    pub fn finish(&self) -> Result<CommitInfo> {
        self.write_card()?;
        let files = folder_files(&self.output_dir, "", true)?;
        let info = self
            .commit(&files, "End of training")
            .with_context(|| format!("the trained model is saved in {}, but not pushed", self.output_dir.display()))?;
        Ok(info)
    }

    fn commit(&self, files: &[crate::model::push::Upload], message: &str) -> Result<CommitInfo> {
        let info = self.client.commit(&self.repo_id, files, message)?;
        let unchanged = match info.unchanged {
            0 => String::new(),
            n => format!(", {n} unchanged"),
        };
        eprintln!("pushed {} file(s){unchanged} to {}: {} ({message})", info.committed, info.repo_id, info.commit_url);
        Ok(info)
    }

    /// README.md in --output-dir, with the run's latest metrics.
    fn write_card(&self) -> Result<()> {
        let mut card = self.run.clone().context("HubPush::describing was not called")?;
        card.results = results(&self.output_dir);
        files::write_file_atomically(&self.output_dir.join("README.md"), model_card(&card))
    }
}

/// A Hub id as it is; a local path by its last part only (a card is public, the folders it names are not).
fn hub_id_or_file_name(arg: &str) -> String {
    if looks_like_repo_id(arg) {
        return arg.to_string();
    }
    Path::new(arg).file_name().map_or_else(|| arg.to_string(), |name| name.to_string_lossy().into_owned())
}

/// The run's settings, named as transformers' model cards and TRL's configs name them.
fn hyperparameters(config: &TrainerConfig, objective: &Objective, lora: Option<&LoraConfig>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, value: String| out.push((name.to_string(), value));
    add("learning_rate", python_float(config.learning_rate));
    add("train_batch_size", config.per_device_train_batch_size.to_string());
    add("eval_batch_size", config.per_device_eval_batch_size.to_string());
    add("seed", config.seed.to_string());
    if config.gradient_accumulation_steps > 1 {
        add("gradient_accumulation_steps", config.gradient_accumulation_steps.to_string());
        let total = config.per_device_train_batch_size * config.gradient_accumulation_steps;
        add("total_train_batch_size", total.to_string());
    }
    let o = &config.optimizer;
    add(
        "optimizer",
        format!(
            "AdamW with betas=({},{}), epsilon={} and weight_decay={}",
            python_float(o.beta1),
            python_float(o.beta2),
            python_float(o.eps),
            python_float(o.weight_decay)
        ),
    );
    let schedule = match config.schedule {
        Schedule::Constant => "constant".to_string(),
        Schedule::ConstantWithWarmup => "constant_with_warmup".into(),
        Schedule::Linear => "linear".into(),
        Schedule::Cosine => "cosine".into(),
        Schedule::CosineWithMinLr { min_lr_rate } => format!("cosine_with_min_lr (min_lr_rate {min_lr_rate})"),
    };
    add("lr_scheduler_type", schedule);
    if config.warmup_steps != 0 {
        add("lr_scheduler_warmup_steps", config.warmup_steps.to_string());
    } else if config.warmup_ratio != 0.0 {
        add("lr_scheduler_warmup_ratio", python_float(config.warmup_ratio));
    }
    if config.max_steps > 0 {
        add("training_steps", config.max_steps.to_string());
    } else {
        add("num_epochs", python_float(config.num_train_epochs));
    }
    add("max_grad_norm", python_float(config.max_grad_norm));
    match objective {
        Objective::Dpo(p) => {
            add("beta", python_float(p.loss.beta));
            let name = |loss: &DpoLoss| DpoLoss::ALL.iter().find(|(_, l)| l == loss).map_or("?", |(n, _)| n);
            add("loss_type", p.losses.iter().map(|(l, _)| name(l)).collect::<Vec<_>>().join(","));
            if p.losses.len() > 1 || p.losses.iter().any(|&(_, w)| w != 1.0) {
                add("loss_weights", p.losses.iter().map(|&(_, w)| python_float(w)).collect::<Vec<_>>().join(","));
            }
            if p.loss.label_smoothing != 0.0 {
                add("label_smoothing", python_float(p.loss.label_smoothing));
            }
            if p.reference_free {
                add("reference_free", "True".into());
            }
        }
        Objective::Orpo(p) => add("beta", python_float(p.beta)),
        Objective::Sft(p) if p.loss == SftLoss::Dft => add("loss_type", "dft".into()),
        Objective::Sft(_) => {}
        Objective::Kto(p) => {
            add("beta", python_float(p.beta));
            if p.loss == KtoLoss::ApoZeroUnpaired {
                add("loss_type", "apo_zero_unpaired".into());
            }
            add("desirable_weight", python_float(p.desirable_weight));
            add("undesirable_weight", python_float(p.undesirable_weight));
        }
        Objective::Cpo(p) => {
            add("beta", python_float(p.beta));
            let loss = match p.loss {
                CpoLoss::Sigmoid => "sigmoid",
                CpoLoss::Hinge => "hinge",
                CpoLoss::Ipo => "ipo",
                CpoLoss::Simpo => "simpo",
            };
            add("loss_type", loss.into());
            add("cpo_alpha", python_float(p.cpo_alpha));
            if p.loss == CpoLoss::Simpo {
                add("simpo_gamma", python_float(p.simpo_gamma));
            }
            if p.label_smoothing != 0.0 {
                add("label_smoothing", python_float(p.label_smoothing));
            }
        }
    }
    if let Some(lora) = lora {
        add("lora_r", lora.r.to_string());
        add("lora_alpha", python_float(lora.alpha));
    }
    out
}

/// The last training row and the last evaluation row of `metrics.jsonl` (4 significant digits, as the console
/// shows them), and the run time of `train_summary.json` once training is over.
fn results(output_dir: &Path) -> Vec<(String, String)> {
    let rows: Vec<Map<String, Value>> = std::fs::read_to_string(output_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let last_train = rows.iter().rev().find(|r| r.contains_key("loss"));
    let last_eval = rows.iter().rev().find(|r| r.keys().any(|k| k.starts_with("eval_")));
    let summary: Map<String, Value> = std::fs::read_to_string(output_dir.join("train_summary.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let value = |v: &Value| match v {
        Value::Number(n) if n.is_f64() => python_g4(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for row in last_train.into_iter().chain(last_eval) {
        for (key, v) in row {
            if !out.iter().any(|(k, _)| k == key) {
                out.push((key.clone(), value(v)));
            }
        }
    }
    for key in ["train_runtime", "train_tokens_per_second"] {
        if let Some(v) = summary.get(key).filter(|v| !v.is_null()) {
            out.push((key.to_string(), value(v)));
        }
    }
    out
}
