//! The report of `prefalign compare`: `report.md` with one table row per run, and PNG plots of the runs'
//! metrics (training loss and reward accuracy against the optimizer step, held-out preference accuracy before
//! and after training).

pub mod plots;

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::path::Path;

/// Everything the report says about one run. Missing values (a failed run, no held-out data) print as "–".
#[derive(Debug, Clone, Default)]
pub struct RunRow {
    pub name: String,
    pub trainer: String,
    /// The first line of what went wrong, if anything did (training, or the held-out evaluation).
    pub error: Option<String>,
    /// The command line that trained it, for the run list under the table.
    pub command: String,
    /// Its folder, relative to the report.
    pub dir: String,
    pub global_step: Option<u64>,
    pub final_loss: Option<f64>,
    /// Held-out preference accuracy (fraction) of the model before and after training.
    pub heldout_before: Option<f64>,
    pub heldout_after: Option<f64>,
    /// Held-out `eval_rewards/margins` after training.
    pub heldout_margin: Option<f64>,
    pub tokens_per_second: Option<f64>,
    /// `train_runtime`: the training loop alone.
    pub train_seconds: Option<f64>,
    /// The training process from start to exit: loading, data preparation, training, saving.
    pub wall_seconds: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// The rows of the run's metrics.jsonl (training rows and `eval_` rows).
    pub metrics: Vec<Map<String, Value>>,
}

/// A whole report: a title, lines of context above the table, the runs, and notes below it.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub title: String,
    pub intro: Vec<String>,
    pub runs: Vec<RunRow>,
    pub notes: Vec<String>,
}

pub const LOSS_PNG: &str = "loss.png";
pub const REWARD_ACCURACY_PNG: &str = "reward_accuracy.png";
pub const HELDOUT_PNG: &str = "heldout_accuracy.png";

/// The rows of a `metrics.jsonl` file (lines that are not JSON objects are skipped: a run killed mid-write).
pub fn read_metrics(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|v| v.as_object().cloned())
        .collect())
}

/// (step, value) for every row that has `key` (training rows for `loss`, `rewards/accuracies`, …).
pub fn series(rows: &[Map<String, Value>], key: &str) -> Vec<(f64, f64)> {
    rows.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).collect()
}

/// Writes `report.md`, `loss.png`, `reward_accuracy.png` and `heldout_accuracy.png` into `dir`.
pub fn write(dir: &Path, report: &Report) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let label = |run: &RunRow| if run.error.is_some() { format!("{} (failed)", run.name) } else { run.name.clone() };
    let lines = |key: &str, scale: f64| -> Vec<plots::Series> {
        report
            .runs
            .iter()
            .enumerate()
            .map(|(i, run)| plots::Series {
                label: label(run),
                color: plots::color(i),
                points: series(&run.metrics, key).into_iter().map(|(x, y)| (x, y * scale)).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    plots::line_chart(&dir.join(LOSS_PNG), "Training loss", "optimizer step", "loss", &lines("loss", 1.0), None)?;
    plots::line_chart(
        &dir.join(REWARD_ACCURACY_PNG),
        "Reward accuracy on training batches",
        "optimizer step",
        "reward accuracy (%)",
        &lines("rewards/accuracies", 100.0),
        Some((-2.0, 102.0)),
    )?;
    let groups: Vec<plots::BeforeAfter> = report
        .runs
        .iter()
        .map(|run| plots::BeforeAfter {
            label: label(run),
            before: run.heldout_before.map(|a| 100.0 * a),
            after: run.heldout_after.map(|a| 100.0 * a),
        })
        .collect();
    plots::before_after_chart(
        &dir.join(HELDOUT_PNG),
        "Held-out preference accuracy",
        "run",
        "held-out preference accuracy (%)",
        &groups,
    )?;
    let path = dir.join("report.md");
    crate::files::write_file_atomically(&path, markdown(report))
}

pub const TABLE_HEADER: [&str; 11] = [
    "run",
    "trainer",
    "status",
    "steps",
    "final loss",
    "held-out pref. acc. before → after (%)",
    "held-out reward margin (after)",
    "tokens/s",
    "train time (s)",
    "wall time (s)",
    "peak memory (MiB)",
];

/// The table alone (also printed by `prefalign compare` when it ends).
pub fn table(runs: &[RunRow]) -> String {
    let dash = || "–".to_string();
    let num =
        |v: Option<f64>, digits: usize| v.filter(|v| v.is_finite()).map_or_else(dash, |v| format!("{v:.digits$}"));
    let pct = |v: Option<f64>| v.filter(|v| v.is_finite()).map_or_else(dash, |v| format!("{:.1}", 100.0 * v));
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", TABLE_HEADER.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        ["---|", "---|", "---|", "--:|", "--:|", ":-:|", "--:|", "--:|", "--:|", "--:|", "--:|"].concat()
    );
    for run in runs {
        let status = match &run.error {
            None => "ok".to_string(),
            Some(error) => format!("**failed**: {}", shorten(error, 200)),
        };
        let cells = [
            run.name.clone(),
            run.trainer.clone(),
            status,
            run.global_step.map_or_else(dash, |s| s.to_string()),
            num(run.final_loss, 4),
            if run.heldout_before.is_none() && run.heldout_after.is_none() {
                dash()
            } else {
                format!("{} → {}", pct(run.heldout_before), pct(run.heldout_after))
            },
            num(run.heldout_margin, 4),
            num(run.tokens_per_second, 0),
            num(run.train_seconds, 1),
            num(run.wall_seconds, 1),
            run.peak_rss_bytes.map_or_else(dash, |b| format!("{:.0}", b as f64 / (1024.0 * 1024.0))),
        ];
        let cells: Vec<String> = cells.iter().map(|c| escape(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}\n", report.title);
    for line in &report.intro {
        let _ = writeln!(out, "{line}");
    }
    if !report.intro.is_empty() {
        out.push('\n');
    }
    out.push_str(&table(&report.runs));
    out.push('\n');
    for note in &report.notes {
        let _ = writeln!(out, "- {note}");
    }
    if !report.notes.is_empty() {
        out.push('\n');
    }
    let _ =
        writeln!(out, "## Training loss\n\n![training loss against optimizer step, one line per run]({LOSS_PNG})\n");
    let _ = writeln!(
        out,
        "## Reward accuracy\n\nThe fraction of training pairs in each logged batch whose chosen completion earns the higher \
         implicit reward (`rewards/accuracies`).\n\n![reward accuracy against optimizer step, one line per run]({REWARD_ACCURACY_PNG})\n"
    );
    let _ = writeln!(
        out,
        "## Held-out preference accuracy\n\nThe fraction of held-out pairs whose chosen completion has the higher \
         log-probability under the model (summed for DPO, per-token average for ORPO and CPO), before and after \
         training.\n\n![held-out preference accuracy before and after training, per run]({HELDOUT_PNG})\n"
    );
    let _ = writeln!(out, "## Runs\n");
    for run in &report.runs {
        let _ = writeln!(out, "- **{}**: `{}` (folder `{}`)", escape(&run.name), run.command, run.dir);
        if let Some(error) = &run.error {
            let _ = writeln!(out, "  - failed: {}", escape(&shorten(error, 400)));
        }
    }
    out
}

/// A table cell: pipes escaped, line breaks flattened.
fn escape(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(max_chars).collect::<String>())
    }
}
