//! `prefalign compare`: train several recipes (or one recipe over a grid of one parameter), score each model on
//! held-out preference data before and after, and write a Markdown report with a table and PNG plots.
//!
//! Every training and every evaluation is a child process of this same binary, so runs are isolated from each
//! other (a crash or an out-of-memory kill fails one run, not the comparison) and each one's peak memory is its
//! own. A run's folder holds the recipe as it was trained (`recipe.yaml`), the trained model, `metrics.jsonl`,
//! `train_summary.json`, the logs, and the held-out scores.

use crate::files;
use crate::report::{self, Report, RunRow};
use crate::train::checkpoint::list_checkpoints;
use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args, CommandFactory};
use serde_json::Value as Json;
use serde_norway::{Mapping, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Instant;

const TRAINERS: [&str; 5] = ["dpo", "orpo", "cpo", "sft", "kto"];

/// The rules `prefalign eval` scores held-out pairs by for a trainer: ORPO's (and CPO's, which shares its data
/// path), else DPO's (SFT and KTO models are scored on pairs as DPO reads them).
fn eval_objective(trainer: &str) -> &'static str {
    if matches!(trainer, "orpo" | "cpo") {
        "orpo"
    } else {
        "dpo"
    }
}

#[derive(Args, Debug)]
#[command(after_help = "\
A recipe is the YAML that `prefalign dpo|orpo|cpo|sft|kto --config` takes. The command that trains it comes from \
--trainer, else from one more top-level key in the recipe, `trainer: dpo|orpo|cpo|sft|kto`. compare removes `trainer` (and \
`output_dir`), writes the rest to OUTPUT_DIR/runs/<name>/recipe.yaml and runs `prefalign <trainer> --config \
OUTPUT_DIR/runs/<name>/recipe.yaml --output-dir OUTPUT_DIR/runs/<name>`.

Held-out data (--held-out, else the recipe's eval_dataset and dataset_test_split) is scored by `prefalign eval` with the recipe's data \
settings (max_length, dataset_format, columns, truncation_mode, allow_empty_completions, …, and its beta) on the \
base model before training and on the trained model after (preference pairs: for sft and kto, held-out pairs as \
DPO reads them); DPO and KTO runs are scored against their reference model.

Examples:
  prefalign compare --recipe dpo.yaml --recipe orpo.yaml --held-out test.jsonl --output-dir dpo-vs-orpo
  prefalign compare --recipe recipes/hh_dpo.yaml --trainer dpo --recipe recipes/hh_orpo.yaml --trainer orpo
  prefalign compare --recipe orpo.yaml --grid beta=0.05,0.1,0.2,0.5 --output-dir orpo-lambda
  prefalign compare --recipe dpo.yaml --grid trainer=dpo,orpo --output-dir same-recipe

OUTPUT_DIR gets report.md (one table row per run), loss.png, reward_accuracy.png, heldout_accuracy.png and runs/. \
A run that fails is reported as failed with its error and the others go on; the exit status is 1 if any failed.

Compare again into the same OUTPUT_DIR and it picks up where it stopped: a run whose folder holds a finished run \
of the same recipe is reused (not trained again), one that stopped after a checkpoint resumes from it (set \
save_steps in the recipe), and base-model scores of the same evaluation are reused. --reuse-runs DIR also reuses \
the finished runs of another compare's OUTPUT_DIR. --rerun trains everything again.")]
pub struct CompareArgs {
    /// A training recipe (the YAML `--config` takes). Repeat for more runs
    #[arg(long = "recipe", value_name = "YAML", required = true, action = ArgAction::Append)]
    recipes: Vec<PathBuf>,
    /// The command that trains each --recipe, in the same order, or once for all [default: the recipe's
    /// `trainer:` key]
    #[arg(long = "trainer", value_name = "dpo|orpo|cpo|sft|kto", value_parser = TRAINERS, action = ArgAction::Append)]
    trainers: Vec<String>,
    /// The name of each --recipe, in the same order (default: the file name without its extension)
    #[arg(long = "name", value_name = "NAME", action = ArgAction::Append)]
    names: Vec<String>,
    /// Run each recipe once per value of one parameter, a recipe key or flag name (beta=0.05,0.1,0.2,
    /// learning_rate=1e-6,5e-6, or trainer=dpo,orpo); the runs are named KEY=V
    #[arg(long, value_name = "KEY=V1,V2,…")]
    grid: Option<String>,
    /// Held-out preference data (file, folder or Hub id) scored before and after training [default: each recipe's
    /// eval_dataset; without either, no held-out scores]
    #[arg(long, value_name = "DATASET")]
    held_out: Option<String>,
    /// The split (or slice, "train[:300]") of the held-out data [default: with --held-out "test" (all of a local
    /// file), else the recipe's dataset_test_split]
    #[arg(long, value_name = "SPLIT")]
    held_out_split: Option<String>,
    /// Where the report, the plots and runs/<name>/ go
    #[arg(long, default_value = "prefalign-compare")]
    output_dir: PathBuf,
    /// Train and score every run again, even where OUTPUT_DIR holds a finished run of the same recipe
    #[arg(long)]
    rerun: bool,
    /// An earlier compare's OUTPUT_DIR whose finished runs are reused where the recipe is the same (a DPO vs ORPO
    /// report from the runs of a seed grid and a λ sweep); repeatable
    #[arg(long, value_name = "DIR", action = ArgAction::Append)]
    reuse_runs: Vec<PathBuf>,
}

/// How a run's training came about.
enum Trained {
    /// Trained from the start by this compare.
    Now,
    /// A finished run of the same recipe was already in this folder.
    Reused(PathBuf),
    /// Resumed from this checkpoint folder of an interrupted run of the same recipe.
    Resumed(String),
}

/// Written into a run's folder once its training finished: what a later compare needs to reuse it.
const FINISHED: &str = "compare_finished.json";
/// The `prefalign eval` flags that scored a run's trained model, beside its scores.
const AFTER_FLAGS: &str = "heldout_after.flags.json";

/// One run to make: a recipe, its name, and the grid value it takes (if any).
struct Planned {
    name: String,
    recipe: PathBuf,
    /// From --trainer.
    trainer: Option<String>,
    grid: Option<(String, String)>,
}

/// A recipe read and resolved against its trainer's flags.
struct Recipe {
    trainer: String,
    /// The YAML to train with (`trainer` and `output_dir` removed, the grid value set).
    yaml: Mapping,
    /// Every key that is a flag of the trainer, by the flag's long name (aliases resolved).
    flags: HashMap<String, Value>,
    command: clap::Command,
}

/// The scores of base models, computed once per distinct evaluation (by its `prefalign eval` flags) and shared by
/// the runs that evaluate the same way; a failure is reported in each of those runs' rows.
type Baselines = HashMap<Vec<String>, (PathBuf, Result<Scored, Rc<anyhow::Error>>)>;

/// What `prefalign eval` reported.
#[derive(Clone)]
struct Scored {
    accuracy: Option<f64>,
    margin: Option<f64>,
    pairs: Option<usize>,
}

fn parse_grid(grid: &str) -> Result<(String, Vec<String>)> {
    let (key, values) = grid.split_once('=').with_context(|| format!("--grid {grid:?}: expected KEY=V1,V2,…"))?;
    let key = key.trim().trim_start_matches("--").to_string();
    let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
    if key.is_empty() || values.is_empty() {
        bail!("--grid {grid:?}: expected KEY=V1,V2,…");
    }
    Ok((key, values))
}

fn plan(args: &CompareArgs) -> Result<Vec<Planned>> {
    if !args.names.is_empty() && args.names.len() != args.recipes.len() {
        bail!("{} --name for {} --recipe: give one name per recipe, or none", args.names.len(), args.recipes.len());
    }
    let names: Vec<String> = match args.names.is_empty() {
        false => args.names.clone(),
        true => args
            .recipes
            .iter()
            .map(|p| p.file_stem().map_or("recipe".into(), |s| s.to_string_lossy().into_owned()))
            .collect(),
    };
    let trainers: Vec<Option<String>> = match args.trainers.len() {
        0 => vec![None; args.recipes.len()],
        1 => vec![Some(args.trainers[0].clone()); args.recipes.len()],
        n if n == args.recipes.len() => args.trainers.iter().cloned().map(Some).collect(),
        n => bail!("{n} --trainer for {} --recipe: give one per recipe, one for all, or none", args.recipes.len()),
    };
    let grid = args.grid.as_deref().map(parse_grid).transpose()?;
    let mut planned = Vec::new();
    for ((recipe, name), trainer) in args.recipes.iter().zip(&names).zip(trainers) {
        match &grid {
            None => planned.push(Planned { name: name.clone(), recipe: recipe.clone(), trainer, grid: None }),
            Some((key, values)) => {
                for value in values {
                    let point = format!("{key}={value}");
                    let name = if args.recipes.len() == 1 { point } else { format!("{name} {point}") };
                    let grid = Some((key.clone(), value.clone()));
                    planned.push(Planned { name, recipe: recipe.clone(), trainer: trainer.clone(), grid });
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for run in &planned {
        if !seen.insert(folder_name(&run.name)) {
            bail!("two runs are named {:?}: give each --recipe its own --name", run.name);
        }
    }
    Ok(planned)
}

/// A run's folder name: its name with anything but letters, digits and `._=+-,` replaced by `_`.
fn folder_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._=+-,".contains(c) { c } else { '_' }).collect()
}

fn find_arg<'a>(command: &'a clap::Command, key: &str) -> Option<&'a clap::Arg> {
    let long = key.replace('_', "-");
    command.get_arguments().find(|a| {
        a.get_long() == Some(long.as_str())
            || a.get_all_aliases().is_some_and(|aliases| aliases.contains(&long.as_str()))
    })
}

fn is_switch(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

fn read_recipe(path: &Path, trainer: Option<&str>, grid: Option<&(String, String)>) -> Result<Recipe> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
    let value: Value =
        serde_norway::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))?;
    let Value::Mapping(mut yaml) = value else {
        bail!("{}: expected a mapping of keys to values at the top level", path.display());
    };
    let from_grid = grid.filter(|(key, _)| key == "trainer").map(|(_, value)| value.clone());
    let trainer = match (from_grid.or(trainer.map(str::to_string)), yaml.remove("trainer")) {
        (Some(trainer), _) => trainer,
        (None, Some(Value::String(t))) => t,
        (None, Some(_)) => bail!("{}: `trainer` must be one of {}", path.display(), TRAINERS.join(", ")),
        (None, None) => bail!(
            "{}: which command trains it? Pass --trainer dpo|orpo|cpo|sft|kto, or add `trainer: dpo` (or orpo, cpo, \
             sft, kto) to the recipe",
            path.display()
        ),
    };
    if !TRAINERS.contains(&trainer.as_str()) {
        bail!("{}: trainer {trainer:?} is not one of {}", path.display(), TRAINERS.join(", "));
    }
    yaml.remove("output_dir");
    let command = super::Cli::command().find_subcommand(&trainer).expect("the trainers are subcommands").clone();
    if let Some((key, value)) = grid.filter(|(key, _)| key != "trainer") {
        let arg = find_arg(&command, key).with_context(|| {
            format!("--grid {key}: `prefalign {trainer}` has no such flag (see prefalign {trainer} --help)")
        })?;
        let long = arg.get_long().expect("found by its long name").to_string();
        // Drop the key under any of its names, then set it under the snake_case of the flag.
        yaml.retain(|k, _| {
            k.as_str().and_then(|k| find_arg(&command, k)).and_then(|a| a.get_long()) != Some(long.as_str())
        });
        let value = if is_switch(arg) {
            Value::Bool(value.parse().with_context(|| format!("--grid {key}: {value:?} is not true or false"))?)
        } else {
            // Numbers as YAML numbers (`beta: 0.05`), anything else as the text given.
            match serde_norway::from_str::<Value>(value) {
                Ok(number @ Value::Number(_)) => number,
                _ => Value::String(value.clone()),
            }
        };
        yaml.insert(Value::String(long.replace('-', "_")), value);
    }
    let flags = yaml
        .iter()
        .filter_map(|(k, v)| {
            let long = find_arg(&command, k.as_str()?)?.get_long()?.to_string();
            Some((long, v.clone()))
        })
        .collect();
    Ok(Recipe { trainer, yaml, flags, command })
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Sequence(items) => Some(items.iter().map(scalar).collect::<Option<Vec<_>>>()?.join(",")),
        _ => None,
    }
}

impl Recipe {
    fn get(&self, long: &str) -> Option<String> {
        self.flags.get(long).and_then(scalar)
    }

    /// `prefalign eval` flags for `model` on `dataset` with this recipe's data settings; `reference` for DPO.
    /// `with_beta`: pass the recipe's β (rewards and margins); the preference accuracy does not depend on it, so
    /// base models are scored without it and a β grid shares one baseline.
    fn eval_flags(
        &self,
        model: &str,
        (dataset, split): (&str, &str),
        reference: Option<&str>,
        with_beta: bool,
    ) -> Vec<String> {
        let mut flags = vec!["eval".to_string(), "--model".into(), model.into(), "--dataset".into(), dataset.into()];
        flags.extend(["--dataset-split".into(), split.into()]);
        const PASSED: [&str; 16] = [
            "dataset-config",
            "prompt-column",
            "chosen-column",
            "rejected-column",
            "dataset-format",
            "skip-invalid-rows",
            "allow-empty-completions",
            "keep-empty-completions",
            "max-length",
            "truncation-mode",
            "device",
            "dtype",
            "bf16",
            "no-prefix-sharing",
            "no-packing",
            "pack-tokens",
        ];
        for long in PASSED {
            let (Some(value), Some(arg)) = (self.flags.get(long), find_arg(&self.command, long)) else { continue };
            if is_switch(arg) {
                if matches!(value, Value::Bool(true)) {
                    flags.push(format!("--{long}"));
                }
            } else if let Some(text) = scalar(value) {
                flags.extend([format!("--{long}"), text]);
            }
        }
        flags.extend(["--objective".into(), eval_objective(&self.trainer).into()]);
        if let Some(beta) = self.get("beta").filter(|_| with_beta) {
            flags.extend(["--beta".into(), beta]);
        }
        flags.extend(["--batch-size".into(), self.get("per-device-eval-batch-size").unwrap_or_else(|| "8".into())]);
        if let Some(reference) = reference {
            flags.extend(["--ref-model".into(), reference.into()]);
        }
        flags
    }

    /// The reference a trained DPO or KTO model is scored against: --ref-model, else the base model; none when
    /// reference-free or another trainer.
    fn reference(&self) -> Option<String> {
        let has_reference = matches!(self.trainer.as_str(), "dpo" | "kto");
        if !has_reference || matches!(self.flags.get("reference-free"), Some(Value::Bool(true))) {
            return None;
        }
        self.get("ref-model").or_else(|| self.get("model"))
    }
}

/// Runs this binary with `args`, stdout to `stdout` (or into the log), stderr to `log`.
/// Returns the wall time; an error carries the first line of what went wrong.
fn child(args: &[String], stdout: Option<&Path>, log: &Path) -> Result<f64> {
    let exe = std::env::current_exe().context("cannot find the prefalign executable")?;
    let log_file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let out: Stdio = match stdout {
        Some(path) => std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?.into(),
        None => log_file.try_clone()?.into(),
    };
    let started = Instant::now();
    let status = Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log_file)
        .status()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    if status.success() {
        return Ok(seconds);
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    bail!("{} (log: {})", first_error_line(&text, &status), log.display())
}

/// The line that says what went wrong: the CLI's last `error:` line, a panic's message, else the exit status
/// with the last line of the log.
fn first_error_line(log: &str, status: &std::process::ExitStatus) -> String {
    let lines: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if let Some(line) = lines.iter().rev().find(|l| l.starts_with("error:")) {
        return line.trim_start_matches("error:").trim().to_string();
    }
    if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
        return format!("panicked: {}", lines.get(at + 1).unwrap_or(&lines[at]));
    }
    let how = match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "killed by a signal (out of memory?)".to_string(),
    };
    match lines.last() {
        Some(last) => format!("{how}; last output: {last}"),
        None => how,
    }
}

fn error_text(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

/// `prefalign eval` for `flags`, metrics JSON to `json`, stderr to `log`.
fn score(flags: &[String], json: &Path, log: &Path) -> Result<Scored> {
    child(flags, Some(json), log)?;
    read_scored(json, log)
}

/// What a `prefalign eval` run left in `json` (its metrics) and `log` (the count of pairs scored).
fn read_scored(json: &Path, log: &Path) -> Result<Scored> {
    let text = std::fs::read_to_string(json).with_context(|| format!("cannot read {}", json.display()))?;
    let metrics: Json = serde_json::from_str(&text)
        .with_context(|| format!("{} is not the JSON prefalign eval prints", json.display()))?;
    let pairs = std::fs::read_to_string(log).ok().and_then(|log| {
        log.lines().find_map(|l| l.split_once(" pairs scored").and_then(|(n, _)| n.trim().parse().ok()))
    });
    Ok(Scored {
        accuracy: metrics["eval_preference_accuracy"].as_f64(),
        margin: metrics["eval_rewards/margins"].as_f64(),
        pairs,
    })
}

/// `score`, or what an earlier compare scored with the same `flags` (kept in `flags_file` beside the scores).
fn score_reusing(flags: &[String], json: &Path, log: &Path, flags_file: &Path, rerun: bool) -> Result<Scored> {
    let flags_text = serde_json::to_string(flags)?;
    if !rerun && std::fs::read_to_string(flags_file).is_ok_and(|earlier| earlier == flags_text) {
        if let Ok(scored) = read_scored(json, log) {
            return Ok(scored);
        }
    }
    let _ = std::fs::remove_file(flags_file);
    let scored = score(flags, json, log)?;
    files::write_file_atomically(flags_file, flags_text)?;
    Ok(scored)
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

pub fn run(args: CompareArgs) -> Result<()> {
    let planned = plan(&args)?;
    let out = &args.output_dir;
    std::fs::create_dir_all(out.join("runs")).with_context(|| format!("cannot create {}", out.display()))?;
    // Scores of base models, computed once per distinct evaluation (a β grid shares one).
    let mut baselines = Baselines::new();
    let mut heldout_sets: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    let mut picked_up = Vec::new();
    let total = planned.len();
    for (index, run) in planned.iter().enumerate() {
        let dir = out.join("runs").join(folder_name(&run.name));
        eprintln!("[{}/{total}] {}", index + 1, run.name);
        let mut row = RunRow { name: run.name.clone(), dir: relative(&dir, out), ..RunRow::default() };
        match one_run(run, &dir, out, &args, &mut row, &mut baselines, &mut heldout_sets) {
            Ok(Trained::Now) => {}
            Ok(Trained::Reused(folder)) => picked_up.push(format!(
                "`{}` is the finished run of the same recipe in `{}`, reused",
                run.name,
                relative(&folder, out)
            )),
            Ok(Trained::Resumed(checkpoint)) => picked_up.push(format!(
                "`{}` resumed from its `{checkpoint}`: its train and wall times cover only the part after it",
                run.name
            )),
            Err(error) => row.error = Some(error_text(&error)),
        }
        match &row.error {
            None => eprintln!(
                "[{}/{total}] {}: done in {:.1} s, final loss {}",
                index + 1,
                run.name,
                row.wall_seconds.unwrap_or(0.0),
                row.final_loss.map_or("–".into(), |l| format!("{l:.4}"))
            ),
            Some(error) => eprintln!("[{}/{total}] {}: FAILED: {error}", index + 1, run.name),
        }
        rows.push(row);
    }
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    let mut intro = vec![format!(
        "{total} run{} ({} failed); each trained by a separate `prefalign` process.",
        if total == 1 { "" } else { "s" },
        failed
    )];
    if let Some((key, values)) = args.grid.as_deref().map(parse_grid).transpose()? {
        intro.push(format!("Grid over `{key}`: {}.", values.join(", ")));
    }
    let mut notes = vec![
        "final loss: the last logged training loss. held-out pref. acc.: the share of held-out pairs whose chosen \
         completion the model gives the higher log-probability (DPO: summed; ORPO, CPO: per-token average)."
            .to_string(),
        "held-out reward margin: `eval_rewards/margins` of `prefalign eval` after training (DPO: β·(policy − \
         reference) log-ratio margin; ORPO, CPO: β·average log-prob margin)."
            .to_string(),
        "tokens/s and train time: the training loop (`train_summary.json`); wall time: the whole training process \
         (loading, data, training, saving); peak memory: its peak resident set (VmHWM)."
            .to_string(),
    ];
    notes.extend(heldout_sets.iter().map(|s| format!("held-out data: {s}")));
    notes.extend(picked_up);
    let report = Report { title: "prefalign compare".into(), intro, runs: rows, notes };
    report::write(out, &report)?;
    println!("{}", report::table(&report.runs));
    println!("report: {}", out.join("report.md").display());
    if failed > 0 {
        bail!("{failed} of {total} runs failed (see {})", out.join("report.md").display());
    }
    Ok(())
}

/// `path` relative to `base` for links in the report, else as given.
fn relative(path: &Path, base: &Path) -> String {
    path.strip_prefix(base).unwrap_or(path).display().to_string()
}

/// Trains and scores one run, filling `row`. A training failure returns an error; a failed held-out evaluation
/// is recorded in `row.error` after what did succeed.
fn one_run(
    run: &Planned,
    dir: &Path,
    out: &Path,
    args: &CompareArgs,
    row: &mut RunRow,
    baselines: &mut Baselines,
    heldout_sets: &mut Vec<String>,
) -> Result<Trained> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    row.trainer = run.trainer.clone().unwrap_or_else(|| {
        std::fs::read_to_string(&run.recipe)
            .ok()
            .and_then(|t| serde_norway::from_str::<Value>(&t).ok())
            .and_then(|v| v.get("trainer").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "?".into())
    });
    row.command = format!("prefalign {} --config {}", row.trainer, run.recipe.display());
    let recipe = read_recipe(&run.recipe, run.trainer.as_deref(), run.grid.as_ref())?;
    row.trainer = recipe.trainer.clone();
    // A finished run of the same recipe, in this run's folder or one of --reuse-runs, is not trained again.
    let earlier = std::iter::once(dir.to_path_buf()).chain(args.reuse_runs.iter().flat_map(|other| run_folders(other)));
    let finished = earlier.filter(|_| !args.rerun).find(|folder| finished_run_of(folder, &recipe));
    let dir = finished.as_deref().unwrap_or(dir);
    row.dir = relative(dir, out);
    let recipe_path = dir.join("recipe.yaml");
    let mut train_args: Vec<String> = vec![
        recipe.trainer.clone(),
        "--config".into(),
        recipe_path.display().to_string(),
        "--output-dir".into(),
        dir.display().to_string(),
    ];
    row.command = format!("prefalign {}", train_args.join(" "));
    // An interrupted run of the same recipe resumes from its newest checkpoint.
    let checkpoint = match finished.is_none() && !args.rerun && same_run(dir, &recipe) {
        true => newest_checkpoint(dir),
        false => None,
    };
    if finished.is_none() {
        // What an earlier compare left here must not be read as this run's; an interrupted run of the same recipe
        // keeps its checkpoints and the metrics up to them.
        let mut stale = vec![FINISHED, "train_summary.json", "heldout_after.json", "heldout_after.jsonl", AFTER_FLAGS];
        if checkpoint.is_none() {
            stale.push("metrics.jsonl");
            remove_checkpoints(dir)?;
        }
        for name in stale {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let recipe_text = serde_norway::to_string(&recipe.yaml)?;
        files::write_file_atomically(&recipe_path, recipe_text)?;
        files::write_file_atomically(&dir.join("command.txt"), format!("{}\n", row.command))?;
    }
    if let Some(checkpoint) = &checkpoint {
        train_args.extend(["--resume-from-checkpoint".into(), checkpoint.display().to_string()]);
    }

    // Held-out data and the base model's score on it.
    let heldout = match &args.held_out {
        Some(dataset) => Some((dataset.clone(), args.held_out_split.clone().unwrap_or_else(|| "test".into()))),
        None => recipe.get("eval-dataset").map(|dataset| {
            let split = args.held_out_split.clone().or_else(|| recipe.get("dataset-test-split"));
            (dataset, split.unwrap_or_else(|| "test".into()))
        }),
    };
    let heldout = heldout.as_ref().map(|(dataset, split)| (dataset.as_str(), split.as_str()));
    let model = recipe.get("model");
    if let (Some(heldout), Some(model)) = (heldout, &model) {
        let flags = recipe.eval_flags(model, heldout, None, false);
        let next = baselines.len() + 1;
        let (folder, scored) = baselines.entry(flags.clone()).or_insert_with(|| {
            let folder = out.join("baseline").join(format!("{}-{next}", recipe.trainer));
            let scored = std::fs::create_dir_all(&folder)
                .map_err(anyhow::Error::from)
                .and_then(|_| {
                    score_reusing(
                        &flags,
                        &folder.join("heldout.json"),
                        &folder.join("eval.log"),
                        &folder.join("flags.json"),
                        args.rerun,
                    )
                })
                .map_err(Rc::new);
            if let Ok(scored) = &scored {
                let (dataset, split) = heldout;
                heldout_sets.push(format!(
                    "`{dataset}` split `{split}` ({} pairs with {} rules; base model `{model}` scored in `{}`)",
                    scored.pairs.map_or("?".into(), |n| n.to_string()),
                    eval_objective(&recipe.trainer).to_uppercase(),
                    relative(&folder, out)
                ));
            }
            (folder, scored)
        });
        match scored {
            Ok(scored) => row.heldout_before = scored.accuracy,
            Err(error) => {
                row.error = Some(format!(
                    "held-out evaluation of the base model ({}): {}",
                    relative(folder, out),
                    error_text(error)
                ))
            }
        }
    }

    let trained = match (&finished, &checkpoint) {
        (Some(folder), _) => {
            eprintln!("  reusing the finished run in {} (same recipe; --rerun trains it again)", folder.display());
            Trained::Reused(folder.clone())
        }
        (None, Some(checkpoint)) => {
            eprintln!("  resuming from {}", checkpoint.display());
            Trained::Resumed(checkpoint.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()))
        }
        (None, None) => Trained::Now,
    };
    let wall = match finished {
        Some(_) => read_json(&dir.join(FINISHED)).map(|f| f["wall_seconds"].as_f64().unwrap_or(f64::NAN)),
        None => child(&train_args, None, &dir.join("train.log")),
    };
    row.metrics = report::read_metrics(&dir.join("metrics.jsonl")).unwrap_or_default();
    let wall = wall?;
    if matches!(trained, Trained::Now | Trained::Resumed(_)) {
        files::write_file_atomically(&dir.join(FINISHED), serde_json::json!({ "wall_seconds": wall }).to_string())?;
    }
    row.wall_seconds = Some(wall);
    let summary = read_json(&dir.join("train_summary.json"))?;
    row.final_loss = summary["final_loss"].as_f64();
    row.global_step = summary["global_step"].as_u64();
    row.tokens_per_second = summary["train_tokens_per_second"].as_f64();
    row.train_seconds = summary["train_runtime"].as_f64();
    row.peak_rss_bytes = summary["peak_rss_bytes"].as_u64();

    if let Some(heldout) = heldout {
        // A LoRA run leaves an adapter: the trained model is the recipe's model with it.
        let lora = matches!(recipe.flags.get("use-peft"), Some(Value::Bool(true))) || recipe.get("adapter").is_some();
        let trained = if lora { recipe.get("model").unwrap_or_default() } else { dir.display().to_string() };
        let mut flags = recipe.eval_flags(&trained, heldout, recipe.reference().as_deref(), true);
        if lora {
            flags.extend(["--adapter".into(), dir.display().to_string()]);
        }
        flags.extend(["--output".into(), dir.join("heldout_after.jsonl").display().to_string()]);
        let (json, log) = (dir.join("heldout_after.json"), dir.join("heldout_after.log"));
        match score_reusing(&flags, &json, &log, &dir.join(AFTER_FLAGS), args.rerun) {
            Ok(scored) => {
                row.heldout_after = scored.accuracy;
                row.heldout_margin = scored.margin;
            }
            Err(error) => {
                row.error.get_or_insert(format!("held-out evaluation after training: {}", error_text(&error)));
            }
        }
    }
    Ok(trained)
}

/// Whether `folder` holds a run of `recipe` (the same trainer and the same keys and values, in any order).
fn same_run(folder: &Path, recipe: &Recipe) -> bool {
    let trainer = std::fs::read_to_string(folder.join("command.txt"))
        .is_ok_and(|command| command.split_whitespace().nth(1) == Some(recipe.trainer.as_str()));
    let yaml = std::fs::read_to_string(folder.join("recipe.yaml"))
        .ok()
        .and_then(|t| serde_norway::from_str::<Mapping>(&t).ok());
    trainer && yaml.as_ref() == Some(&recipe.yaml)
}

/// Whether `folder` holds a finished run of `recipe`, trained by a compare.
fn finished_run_of(folder: &Path, recipe: &Recipe) -> bool {
    folder.join(FINISHED).exists() && folder.join("train_summary.json").exists() && same_run(folder, recipe)
}

/// The run folders of an earlier compare's OUTPUT_DIR.
fn run_folders(compare_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(compare_dir.join("runs")) else { return Vec::new() };
    let mut folders: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    folders.sort();
    folders
}

/// The newest `checkpoint-<step>` folder in `dir` (the trainer writes them whole, by renaming).
fn newest_checkpoint(dir: &Path) -> Option<PathBuf> {
    list_checkpoints(dir).ok()?.pop().map(|(_, path)| path)
}

fn remove_checkpoints(dir: &Path) -> Result<()> {
    for (_, path) in list_checkpoints(dir)? {
        std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove the stale {}", path.display()))?;
    }
    Ok(())
}
