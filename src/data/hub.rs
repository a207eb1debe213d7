//! Hugging Face Hub downloads: a dataset split's data files, and a model's folder.
//!
//! Files land in the cache that Python's `huggingface_hub` uses (`$HF_HOME/hub/{datasets,models}--org--name/`
//! with `blobs/`, `snapshots/<commit>/...` and `refs/<revision>`), so either tool reuses the other's downloads.
//! `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN` (else the `$HF_HOME/token` file) and `HF_HUB_OFFLINE` are honoured.
//!
//! The `hf-hub` crate does the HTTP, the cache layout, locking and resumable downloads (an interrupted file stays
//! a `blobs/<etag>.part` and is resumed with a `Range` request, never linked into a snapshot). What it lacks is
//! written here: offline mode and listing a cached snapshot, `HF_TOKEN`, readable errors from the Hub's status
//! codes, reuse of cached files only while they belong to the revision's current commit, and choosing the files.

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The branch where the Hub keeps its automatic Parquet conversion of a dataset.
const PARQUET_REVISION: &str = "refs/convert/parquet";
/// File endings `data::source` reads.
const DATA_EXTENSIONS: [&str; 9] =
    [".parquet", ".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".csv", ".csv.gz"];
/// JSON files that are metadata, not rows (the `datasets` library skips them too; `save_to_disk` writes the last two).
const NOT_DATA: [&str; 5] =
    ["config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"];
/// Model files fetched when the repo has them; weights are added from what the repo holds.
const MODEL_FILES: [&str; 10] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
];
const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Where and how the Hub is reached: Python `huggingface_hub`'s environment variables, read once.
#[derive(Debug, Clone, PartialEq)]
pub struct HubSettings {
    /// `HF_ENDPOINT`, without a trailing slash
    pub endpoint: String,
    /// `HF_HOME` (default `~/.cache/huggingface`); downloads go to its `hub/` folder, the token file is `token`
    pub home: PathBuf,
    /// `HF_HUB_OFFLINE`: the cache only
    pub offline: bool,
    /// `HF_TOKEN` (else hf-hub reads `$HF_HOME/token`)
    pub token: Option<String>,
}

impl HubSettings {
    /// The settings the process's environment gives.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The settings the variables `var` returns give.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let user_home = set("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
            user_home.join(".cache/huggingface")
        });
        HubSettings {
            endpoint: set("HF_ENDPOINT").map_or(DEFAULT_ENDPOINT.to_string(), |e| e.trim_end_matches('/').to_string()),
            home,
            offline: set("HF_HUB_OFFLINE")
                .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")),
            token: set("HF_TOKEN"),
        }
    }
}

/// Local data files (parquet/jsonl/json, possibly .gz) for split `split` (and config `config`) of Hub dataset `repo`
/// ("org/name"), downloaded or taken from the cache.
///
/// Files are chosen like the `datasets` library's defaults (see [`split_files`]) on the `main` branch; when none
/// match, the Hub's Parquet conversion (`refs/convert/parquet`, `{config or default}/{split}/*.parquet`) is used.
pub fn dataset_files(hub: &HubSettings, repo: &str, select: &Selection, split: &str) -> Result<Vec<PathBuf>> {
    let config = select.config;
    let main = HubRepo::new(hub, repo, RepoType::Dataset, "main")?;
    let parquet = HubRepo::new(hub, repo, RepoType::Dataset, PARQUET_REVISION)?;
    if main.api.is_none() {
        return cached_dataset_files(&main, &parquet, select, split);
    }
    let listing = main.list()?.ok_or_else(|| main.not_found())?;
    let readme = || -> Result<Option<String>> {
        if !listing.files.iter().any(|f| f == "README.md") {
            return Ok(None);
        }
        let path = main.fetch("README.md", &listing.sha)?;
        Ok(Some(std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?))
    };
    let chosen = choose_files(&listing.files, readme, select, split, &main.name())?;
    if !chosen.is_empty() {
        return chosen.iter().map(|f| main.fetch(f, &listing.sha)).collect();
    }
    // No file names the split: the Hub may still have converted the dataset (a loading script, odd names).
    let converted = parquet.list()?;
    if let Some(converted) = &converted {
        let chosen = parquet_files(&converted.files, config, split);
        if !chosen.is_empty() {
            tracing::info!("{}: using the Hub's Parquet conversion ({PARQUET_REVISION})", main.name());
            return chosen.iter().map(|f| parquet.fetch(f, &converted.sha)).collect();
        }
    }
    let mut available = data_files(&listing.files).collect::<Vec<_>>();
    available
        .extend(converted.iter().flat_map(|c| c.files.iter().map(String::as_str).filter(|f| f.ends_with(".parquet"))));
    bail!("{}", split_not_found(&main, config, split, &available, ""))
}

/// A local folder holding a Hub model's config.json, tokenizer files, chat template and safetensors weights
/// (single, or sharded per model.safetensors.index.json), at `revision` (a branch, tag or commit; default `main`).
pub fn model_dir(settings: &HubSettings, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let hub = HubRepo::new(settings, repo, RepoType::Model, revision.unwrap_or("main"))?;
    if hub.api.is_none() {
        let dir = hub.cached_snapshot().ok_or_else(|| hub.not_cached(None))?;
        check_model_dir(&hub, &dir)?;
        return Ok(dir);
    }
    let listing = hub.list()?.ok_or_else(|| hub.not_found())?;
    let listed = |name: &str| listing.files.iter().any(|f| f == name);
    if !listed("config.json") {
        bail!(
            "{} has no config.json: not a transformers model (for a GGUF file, download it and pass its path)",
            hub.name()
        );
    }
    let mut wanted: Vec<String> = MODEL_FILES.iter().filter(|f| listed(f)).map(|f| f.to_string()).collect();
    if listed(SINGLE_WEIGHTS) {
        wanted.push(SINGLE_WEIGHTS.into());
    } else if listed(WEIGHTS_INDEX) {
        let index = hub.fetch(WEIGHTS_INDEX, &listing.sha)?;
        for shard in shard_names(&index)? {
            if !listed(&shard) {
                bail!("{} lists shard {shard} in {WEIGHTS_INDEX}, but the repo has no such file", hub.name());
            }
            wanted.push(shard);
        }
    } else {
        bail!(
            "{} has no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX} (prefalign reads safetensors weights only); files: {}",
            hub.name(),
            listing.files.join(", ")
        );
    }
    let paths = wanted.iter().map(|f| hub.fetch(f, &listing.sha)).collect::<Result<Vec<_>>>()?;
    // Every file of one commit sits in the same snapshot folder (config.json is first), as the loaders want.
    let dir = paths[0].parent().context("config.json has no parent folder")?.to_path_buf();
    check_model_dir(&hub, &dir)?;
    Ok(dir)
}

/// Whether a --dataset / --model argument names a Hub repo: "org/name" with the Hub's allowed characters, not an
/// existing local path, and not ending like a data or weights file (so a mistyped local path is reported as one).
pub fn looks_like_repo_id(arg: &str) -> bool {
    let part_ok = |p: &str| {
        (1..=96).contains(&p.len())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    let file_like = [".gguf", ".safetensors", ".bin", ".gz", ".txt", ".csv"]
        .iter()
        .chain(DATA_EXTENSIONS.iter())
        .any(|ext| arg.to_ascii_lowercase().ends_with(ext));
    matches!(arg.split_once('/'), Some((org, name)) if part_ok(org) && part_ok(name))
        && !file_like
        && !Path::new(arg).exists()
}

/// Which of a dataset repo's (or folder's) files to read, as `datasets.load_dataset` takes it besides the split.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selection<'a> {
    /// `name`: a config of the card's `configs:`, else a folder
    pub config: Option<&'a str>,
    /// `data_dir`: a folder of the repo, whose files are chosen by name
    pub data_dir: Option<&'a str>,
    /// `data_files`: glob patterns for the train split (comma-separated), or JSON {split: pattern(s)}; relative to
    /// `data_dir` when both are given
    pub data_files: Option<&'a str>,
}

impl Selection<'_> {
    /// The files `data_files` or `data_dir` choose (which override the card's configs), if either is given.
    fn explicit_files<'f>(&self, files: &'f [String], split: &str, repo: &str) -> Option<Result<Vec<&'f str>>> {
        if let Some(spec) = self.data_files {
            return Some(self.data_files_config(spec).and_then(|c| card_split_files(&[c], files, None, split, repo)));
        }
        let dir = self.data_dir?;
        Some(data_dir_files(files, dir, split).map_err(|e| anyhow!("{repo}: {e}")))
    }

    fn data_files_config(&self, spec: &str) -> Result<CardConfig> {
        let value = if spec.trim_start().starts_with('{') {
            serde_json::from_str(spec).context("data_files: expected {split: pattern(s)}")?
        } else {
            serde_json::Value::from(spec.split(',').map(str::trim).collect::<Vec<_>>())
        };
        let data_files = under_data_dir(data_files_by_split(&value, "data_files")?, self.data_dir);
        Ok(CardConfig { name: "data_files".into(), default: true, data_files })
    }
}

/// `data_files` as `datasets` takes them, per split: a pattern or a list of them (the train split's), a list of
/// `{split, path}` entries, or a mapping of splits to a pattern or a list of them. `what` names it in errors.
fn data_files_by_split(value: &serde_json::Value, what: &str) -> Result<Vec<(String, Vec<String>)>> {
    use serde_json::Value;
    let patterns = |value: &Value| -> Result<Vec<String>> {
        match value {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string).with_context(|| format!("{what}: a pattern is not a string")))
                .collect(),
            other => bail!("{what}: expected a pattern or a list of them, found {other}"),
        }
    };
    match value {
        Value::Array(items) if items.iter().all(Value::is_object) => items
            .iter()
            .map(|item| {
                let split = item.get("split").and_then(Value::as_str).unwrap_or("train").to_string();
                let paths = item.get("path").with_context(|| format!("{what}: an entry has no path"))?;
                Ok((split, patterns(paths)?))
            })
            .collect(),
        Value::Object(map) => map.iter().map(|(split, paths)| Ok((split.clone(), patterns(paths)?))).collect(),
        other => Ok(vec![("train".to_string(), patterns(other)?)]),
    }
}

/// The patterns relative to `data_dir`, when there is one.
fn under_data_dir(by_split: Vec<(String, Vec<String>)>, data_dir: Option<&str>) -> Vec<(String, Vec<String>)> {
    let Some(dir) = data_dir.map(|d| d.trim_matches('/')) else { return by_split };
    by_split.into_iter().map(|(split, p)| (split, p.into_iter().map(|p| format!("{dir}/{p}")).collect())).collect()
}

/// `datasets`' `data_dir`: the data files under that folder of the repo (the card's configs do not apply), chosen
/// for `split` by their names; when none is named by a split, all of them are the train split.
fn data_dir_files<'a>(files: &'a [String], data_dir: &str, split: &str) -> Result<Vec<&'a str>> {
    let prefix = format!("{}/", data_dir.trim_matches('/'));
    let under: Vec<String> = files.iter().filter(|f| f.starts_with(&prefix)).cloned().collect();
    let chosen: Vec<&str> = split_files(&under, None, split)
        .into_iter()
        .map(|f| files.iter().find(|g| g.as_str() == f).expect("a listed file").as_str())
        .collect();
    if !chosen.is_empty() {
        return Ok(chosen);
    }
    let all: Vec<&str> = data_files(files).filter(|f| f.starts_with(&prefix)).collect();
    if all.is_empty() {
        bail!("data_dir {data_dir}: no data files under it");
    }
    let named = all.iter().any(|f| split_files(&under, None, &split_name_of(f)).contains(f));
    if split == "train" && !named {
        return Ok(all);
    }
    let mut splits: Vec<String> = all.iter().map(|f| split_name_of(f)).collect();
    splits.dedup();
    bail!("data_dir {data_dir}: no data files for split {split:?}; splits that seem available: {}", splits.join(", "))
}

/// One entry of a dataset card's `configs:` (the YAML front matter of the repo's README.md), as `datasets` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct CardConfig {
    pub name: String,
    pub default: bool,
    /// (split, glob patterns relative to the repo, `data_dir` applied)
    pub data_files: Vec<(String, Vec<String>)>,
}

/// The `configs:` of a dataset card's front matter; empty when it has none.
pub fn card_configs(readme: &str, path: &str) -> Result<Vec<CardConfig>> {
    let Some(front) = readme.strip_prefix("---").and_then(|rest| rest.split_once("\n---").map(|(yaml, _)| yaml)) else {
        return Ok(Vec::new());
    };
    let yaml: serde_norway::Value =
        serde_norway::from_str(front).with_context(|| format!("{path}: the YAML front matter does not parse"))?;
    let Some(configs) = yaml.get("configs") else { return Ok(Vec::new()) };
    let configs = configs.as_sequence().with_context(|| format!("{path}: configs: expected a list"))?;
    configs
        .iter()
        .map(|config| {
            let name = config.get("config_name").and_then(|n| n.as_str()).unwrap_or("default").to_string();
            let data_files = match config.get("data_files") {
                None => vec![("train".to_string(), vec!["**".to_string()])],
                Some(value) => {
                    let value = serde_json::to_value(value).with_context(|| format!("{path}: config {name}"))?;
                    data_files_by_split(&value, &format!("{path}: config {name}: data_files"))?
                }
            };
            let data_files = under_data_dir(data_files, config.get("data_dir").and_then(|d| d.as_str()));
            let default = config.get("default").and_then(|d| d.as_bool()).unwrap_or(false);
            Ok(CardConfig { name, default, data_files })
        })
        .collect()
}

/// The files (repo paths, sorted) a card's `configs:` give for `config` (default: the one marked `default`, else
/// the one named "default", else the only one) and `split`.
pub fn card_split_files<'a>(
    configs: &[CardConfig],
    files: &'a [String],
    config: Option<&str>,
    split: &str,
    repo: &str,
) -> Result<Vec<&'a str>> {
    let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
    let chosen = match config {
        Some(name) => configs.iter().find(|c| c.name == name).with_context(|| {
            format!("{repo} has no config \"{name}\" in its card's configs: (it has: {})", names.join(", "))
        })?,
        None => configs
            .iter()
            .find(|c| c.default)
            .or_else(|| configs.iter().find(|c| c.name == "default"))
            .or_else(|| (configs.len() == 1).then(|| &configs[0]))
            .with_context(|| {
                format!("{repo} has several configs ({}); choose one with dataset_config", names.join(", "))
            })?,
    };
    let Some((_, patterns)) = chosen.data_files.iter().find(|(s, _)| s == split) else {
        let splits: Vec<&str> = chosen.data_files.iter().map(|(s, _)| s.as_str()).collect();
        bail!("{repo} (config {}) has no split \"{split}\" (its card lists: {})", chosen.name, splits.join(", "));
    };
    let mut builder = globset::GlobSetBuilder::new();
    for pattern in patterns {
        let glob = globset::GlobBuilder::new(pattern.trim_start_matches("./"))
            .literal_separator(true)
            .build()
            .with_context(|| format!("{repo}: data_files pattern {pattern:?}"))?;
        builder.add(glob);
    }
    let set = builder.build()?;
    let mut out: Vec<&str> = data_files(files).filter(|f| set.is_match(f)).collect();
    out.sort();
    if out.is_empty() {
        bail!("{repo} (config {}): no data file matches split {split}'s patterns {patterns:?}", chosen.name);
    }
    Ok(out)
}

/// The data files of `files` (repo paths) for `split`, sorted, as the `datasets` library would pick them without a
/// `configs:` section in the README: with a config, only files under a folder named after it; then files in a
/// folder named `split` or whose name is `split` followed by `-`, `.`, or `_` and a digit. (`_` only before a digit,
/// so that `train` does not also take `train_prefs-*.parquet` and `train_sft-*.parquet`.)
pub fn split_files<'a>(files: &'a [String], config: Option<&str>, split: &str) -> Vec<&'a str> {
    let mut chosen: Vec<&str> = data_files(files)
        .filter(|f| {
            let (dirs, name) = dirs_and_name(f);
            config.is_none_or(|c| dirs.contains(&c)) && (dirs.contains(&split) || name_is_split(name, split))
        })
        .collect();
    chosen.sort();
    chosen
}

/// The data files of a local folder for `split`, chosen as in a Hub repo (see [`split_files`]). Empty when no
/// file's name or folder names a split (then the folder is one split, whatever its name); an error when some do,
/// but none this one.
pub fn local_split_files(dir: &Path, select: &Selection, split: &str) -> Result<Vec<PathBuf>> {
    let config = select.config;
    let files = list_tree(dir);
    let chosen = choose_files(&files, || Ok(read_card(dir)), select, split, &dir.display().to_string())?;
    if !chosen.is_empty() {
        return Ok(chosen.iter().map(|f| dir.join(f)).collect());
    }
    // `datasets`' split keywords (and the handbook's train_prefs, test_sft, ...)
    let keywords = ["train", "test", "validation", "valid", "val", "dev", "eval"];
    let named: Vec<&str> =
        data_files(&files).filter(|f| keywords.iter().any(|k| split_name_of(f).starts_with(k))).collect();
    if named.is_empty() && config.is_none() {
        return Ok(Vec::new());
    }
    let mut splits: Vec<String> = named.iter().map(|f| split_name_of(f)).collect();
    splits.sort();
    splits.dedup();
    let config = config.map(|c| format!(" (config {c})")).unwrap_or_default();
    bail!(
        "no data files for split {split:?}{config} in {}; splits that seem available: {}",
        dir.display(),
        splits.join(", ")
    )
}

/// The files of a repo (or folder) for `split`, as `datasets` chooses them: `data_files` or `data_dir` when given,
/// else the card's `configs:` (`readme` gives the README.md text, if there is one), else the files named or
/// foldered by split (empty when none is).
fn choose_files<'a>(
    files: &'a [String],
    readme: impl FnOnce() -> Result<Option<String>>,
    select: &Selection,
    split: &str,
    repo: &str,
) -> Result<Vec<&'a str>> {
    if let Some(chosen) = select.explicit_files(files, split, repo) {
        return chosen;
    }
    if let Some(text) = readme()? {
        let configs = card_configs(&text, &format!("README.md of {repo}"))?;
        if !configs.is_empty() {
            return card_split_files(&configs, files, select.config, split, repo);
        }
    }
    Ok(split_files(files, select.config, split))
}

/// A folder's README.md, if it has one.
fn read_card(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("README.md")).ok()
}

/// Files of the Parquet conversion for a split: `{config}/{split}/*.parquet`, or `{config}/partial-{split}/...`
/// where the Hub converted only the first rows of a large split.
fn parquet_files<'a>(files: &'a [String], config: Option<&str>, split: &str) -> Vec<&'a str> {
    let config = config.unwrap_or("default");
    let in_dir = |dir: &str| {
        let mut chosen: Vec<&str> = files
            .iter()
            .map(String::as_str)
            .filter(|f| {
                f.ends_with(".parquet") && f.rsplit_once('/').is_some_and(|(d, _)| d == format!("{config}/{dir}"))
            })
            .collect();
        chosen.sort();
        chosen
    };
    let full = in_dir(split);
    if !full.is_empty() {
        return full;
    }
    let partial = in_dir(&format!("partial-{split}"));
    if !partial.is_empty() {
        tracing::warn!("the Hub converted only part of split {split} to Parquet; using that part");
    }
    partial
}

fn data_files(files: &[String]) -> impl Iterator<Item = &str> {
    files
        .iter()
        .map(String::as_str)
        .filter(|f| DATA_EXTENSIONS.iter().any(|ext| f.ends_with(ext)) && !NOT_DATA.contains(&dirs_and_name(f).1))
}

fn dirs_and_name(path: &str) -> (Vec<&str>, &str) {
    match path.rsplit_once('/') {
        Some((dirs, name)) => (dirs.split('/').collect(), name),
        None => (Vec::new(), path),
    }
}

fn name_is_split(name: &str, split: &str) -> bool {
    let Some(rest) = name.strip_prefix(split) else { return false };
    rest.starts_with(['-', '.']) || rest.strip_prefix('_').is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
}

/// The split a data file seems to belong to, for error messages: its folder when the name is a bare shard number
/// (`default/train/0000.parquet`), else the name up to `-`, `.` or `_<digit>` (`train_prefs-00000-of-00001`).
fn split_name_of(path: &str) -> String {
    let (dirs, name) = dirs_and_name(path);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return dirs.last().unwrap_or(&name).trim_start_matches("partial-").to_string();
    }
    let end = name
        .char_indices()
        .find(|&(i, c)| c == '-' || c == '.' || (c == '_' && name[i + 1..].starts_with(|d: char| d.is_ascii_digit())))
        .map_or(name.len(), |(i, _)| i);
    name[..end].to_string()
}

fn split_not_found(hub: &HubRepo, config: Option<&str>, split: &str, available: &[&str], note: &str) -> String {
    let mut available = available.to_vec();
    available.sort();
    let mut splits: Vec<String> = available.iter().map(|f| split_name_of(f)).collect();
    splits.sort();
    splits.dedup();
    let shown: Vec<&str> = available.iter().take(20).copied().collect();
    let more = if available.len() > shown.len() {
        format!(" (and {} more)", available.len() - shown.len())
    } else {
        String::new()
    };
    let config = config.map(|c| format!(" (config {c})")).unwrap_or_default();
    if available.is_empty() {
        return format!(
            "no data files for split {split:?}{config} in {}{note}: the repo has no .parquet/.jsonl/.json files",
            hub.name()
        );
    }
    format!(
        "no data files for split {split:?}{config} in {}{note}; splits that seem available: {}; data files: {}{more}",
        hub.name(),
        splits.join(", "),
        shown.join(", ")
    )
}

/// Offline: the split's files among those already in the cache (main branch first, then the Parquet conversion).
fn cached_dataset_files(main: &HubRepo, parquet: &HubRepo, select: &Selection, split: &str) -> Result<Vec<PathBuf>> {
    let config = select.config;
    let mut cached = Vec::new();
    for (hub, converted) in [(main, false), (parquet, true)] {
        let Some(dir) = hub.cached_snapshot() else { continue };
        let files = list_tree(&dir);
        let chosen = if converted {
            parquet_files(&files, config, split)
        } else {
            choose_files(&files, || Ok(read_card(&dir)), select, split, &hub.name())?
        };
        if !chosen.is_empty() {
            return Ok(chosen.iter().map(|f| dir.join(f)).collect());
        }
        cached.extend(data_files(&files).map(str::to_string));
    }
    if cached.is_empty() {
        bail!("{}", main.not_cached(None));
    }
    let cached: Vec<&str> = cached.iter().map(String::as_str).collect();
    bail!("{}", split_not_found(main, config, split, &cached, " among the cached files (HF_HUB_OFFLINE is set)"))
}

/// Relative paths ('/'-separated) of the files under `dir`, following the snapshot's symlinks to blobs.
fn list_tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                let rel = path.strip_prefix(dir).unwrap_or(&path);
                out.push(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            }
        }
    }
    out
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map =
        json["weight_map"].as_object().with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// The folder has what the loaders need: config.json and every weights file.
fn check_model_dir(hub: &HubRepo, dir: &Path) -> Result<()> {
    let mut needed = vec!["config.json".to_string()];
    if !dir.join(SINGLE_WEIGHTS).exists() {
        let index = dir.join(WEIGHTS_INDEX);
        if !index.exists() {
            return Err(hub.not_cached(Some(SINGLE_WEIGHTS)));
        }
        needed.extend(shard_names(&index)?);
    }
    match needed.iter().find(|f| !dir.join(f).exists()) {
        Some(missing) => Err(hub.not_cached(Some(missing))),
        None => Ok(()),
    }
}

/// A repo's file names at one commit.
struct Listing {
    sha: String,
    files: Vec<String>,
}

/// One repo at one revision; `api` is `None` in offline mode.
struct HubRepo {
    id: String,
    kind: &'static str,
    repo: Repo,
    cache: Cache,
    endpoint: String,
    api: Option<Api>,
}

impl HubRepo {
    fn new(settings: &HubSettings, id: &str, kind: RepoType, revision: &str) -> Result<Self> {
        let cache = Cache::new(settings.home.join("hub"));
        let endpoint = settings.endpoint.clone();
        let api = if settings.offline {
            None
        } else {
            // hf-hub reads the token file of its cache but not HF_TOKEN, which Python's client prefers.
            let token = settings.token.clone();
            let mut builder = ApiBuilder::from_cache(cache.clone())
                .with_endpoint(endpoint.clone())
                .with_progress(std::io::stderr().is_terminal())
                // Each retry resumes the partial file where the connection dropped.
                .with_retries(3);
            if token.is_some() {
                builder = builder.with_token(token);
            }
            Some(builder.build().context("cannot set up the Hugging Face Hub client")?)
        };
        let repo = Repo::with_revision(id.to_string(), kind, revision.to_string());
        let kind = if matches!(kind, RepoType::Dataset) { "dataset" } else { "model" };
        Ok(Self { id: id.to_string(), kind, repo, cache, endpoint, api })
    }

    fn name(&self) -> String {
        match self.repo.revision() {
            "main" => format!("{} {}", self.kind, self.id),
            rev => format!("{} {} (revision {rev})", self.kind, self.id),
        }
    }

    fn repo_dir(&self) -> PathBuf {
        self.cache.path().join(self.repo.folder_name())
    }

    /// The commit the cache last saw for this revision (`refs/<revision>`).
    fn cached_commit(&self) -> Option<String> {
        let commit = std::fs::read_to_string(self.repo_dir().join("refs").join(self.repo.revision())).ok()?;
        Some(commit.trim().to_string())
    }

    fn cached_snapshot(&self) -> Option<PathBuf> {
        let dir = self.repo_dir().join("snapshots").join(self.cached_commit()?);
        dir.is_dir().then_some(dir)
    }

    fn not_found(&self) -> anyhow::Error {
        anyhow!(
            "{} not found at {} (check the name and revision; a private or gated repo needs HF_TOKEN)",
            self.name(),
            self.endpoint
        )
    }

    /// Offline and `file` (or, with `None`, the whole repo) is not cached.
    fn not_cached(&self, file: Option<&str>) -> anyhow::Error {
        let what = file.map_or_else(|| self.name(), |f| format!("{f} of {}", self.name()));
        anyhow!(
            "{what} is not in the cache {} and HF_HUB_OFFLINE is set; run once online to download it",
            self.repo_dir().display()
        )
    }

    /// The revision's commit and file names (`GET {endpoint}/api/{kind}s/{repo}/revision/{revision}`);
    /// `None` on a 404 other than RepoNotFound, i.e. a missing revision (such as a dataset the Hub never converted).
    fn list(&self) -> Result<Option<Listing>> {
        let api = self.api.as_ref().expect("list() is only called online");
        match api.repo(self.repo.clone()).info_request().call() {
            Ok(response) => {
                let info: RepoInfo = response
                    .into_json()
                    .with_context(|| format!("unexpected answer from {} listing {}", self.endpoint, self.name()))?;
                Ok(Some(Listing { sha: info.sha, files: info.siblings.into_iter().map(|s| s.rfilename).collect() }))
            }
            Err(e) => {
                let message = e.to_string();
                let Some(response) = e.into_response() else {
                    bail!(
                        "cannot reach {} to list {}: {message} (HF_HUB_OFFLINE=1 uses the cache only)",
                        self.endpoint,
                        self.name()
                    );
                };
                // The Hub answers 401 for missing repos too (so as not to reveal private ones) and marks the case.
                let code = response.header("x-error-code").unwrap_or_default().to_string();
                match response.status() {
                    404 if code != "RepoNotFound" => Ok(None),
                    401 | 404 => Err(self.not_found()),
                    403 => bail!(
                        "access to {} is denied at {} (gated: accept its terms, and set HF_TOKEN)",
                        self.name(),
                        self.endpoint
                    ),
                    status => bail!("{} answered HTTP {status} listing {}: {message}", self.endpoint, self.name()),
                }
            }
        }
    }

    /// The local path of `file` at commit `sha`: the cached copy if the cache's revision is still at `sha`,
    /// else a fresh download (hf-hub's `get` alone would keep serving a stale snapshot after the repo changes).
    fn fetch(&self, file: &str, sha: &str) -> Result<PathBuf> {
        let api = self.api.as_ref().expect("fetch() is only called online");
        if self.cached_commit().as_deref() == Some(sha) {
            if let Some(path) = self.cache.repo(self.repo.clone()).get(file) {
                return Ok(path);
            }
        }
        tracing::info!("downloading {file} of {} from {}", self.name(), self.endpoint);
        api.repo(self.repo.clone()).download(file).map_err(|e| {
            let what = format!("cannot download {file} of {} from {}", self.name(), self.endpoint);
            match e {
                ApiError::RequestError(e) => {
                    let message = e.to_string();
                    match (*e).into_response().map(|r| r.status()) {
                        Some(404) => anyhow!("{what}: no such file"),
                        Some(401 | 403) => anyhow!("{what}: access denied (set HF_TOKEN to a token with access)"),
                        _ => anyhow!("{what}: {message}"),
                    }
                }
                e @ (ApiError::IoError(_) | ApiError::TooManyRetries(_)) => anyhow::Error::new(e)
                    .context(format!("{what} (the partial download is kept as a .part file and resumed next time)")),
                e => anyhow::Error::new(e).context(what),
            }
        })
    }
}
