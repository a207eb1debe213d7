//! What a run leaves behind besides the model: `metrics.jsonl` (one row per logging or evaluation step),
//! TensorBoard event files under `runs/`, `train_summary.json`, and the progress bar on the terminal.

use crate::files;
use crate::train::tensorboard::{keep_events_up_to, TensorBoardWriter};
use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `metrics.jsonl` and TensorBoard event files under `runs/`. On a resume, the rows and events of steps after the
/// checkpoint (which the run logs again) are dropped by rewriting the files atomically, so a kill at any moment
/// leaves either the old history or the new one; rows are then appended one write each. A fresh run (no resume)
/// starts both empty.
pub struct History {
    path: PathBuf,
    file: std::fs::File,
    tensorboard: TensorBoardWriter,
}

impl History {
    /// The history of a run starting at `resume_step` (0: a fresh run, whose history starts empty).
    pub fn open(out: &Path, resume_step: usize) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        let kept = match std::fs::read_to_string(&path) {
            Ok(text) if resume_step > 0 => text
                .lines()
                .filter(|line| {
                    let step = serde_json::from_str::<Value>(line).ok().and_then(|v| v["step"].as_u64());
                    step.is_some_and(|s| s as usize <= resume_step)
                })
                .map(|line| format!("{line}\n"))
                .collect(),
            Ok(_) => String::new(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        files::write_file_atomically(&path, kept)?;
        // A fresh run's history starts empty in both files: events an earlier run left in runs/ go too.
        let runs = out.join("runs");
        files::remove_partials(&runs)?;
        keep_events_up_to(&runs, resume_step as i64)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { path, file, tensorboard: TensorBoardWriter::create(&runs)? })
    }

    /// Writes `row` with its `epoch` and `step` to both; returns the row as written.
    pub fn write(&mut self, mut row: Map<String, Value>, epoch: f64, step: usize) -> Result<Map<String, Value>> {
        row.insert("epoch".into(), epoch.into());
        row.insert("step".into(), step.into());
        // one write per row: a kill leaves whole rows, or a torn last one that the next resume drops
        let line = format!("{}\n", Value::Object(row.clone()));
        self.file.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", self.path.display()))?;
        self.tensorboard.add_metrics(&row, step as i64)?;
        tracing::info!("{}", serde_json::Value::Object(row.clone()));
        Ok(row)
    }

    /// Syncs both files to disk (before a checkpoint names a step as done).
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().with_context(|| format!("cannot sync {}", self.path.display()))?;
        self.tensorboard.sync()
    }
}

/// `train_summary.json`: wall time, throughput, peak memory and the last logged values of this run.
pub fn write_summary(out: &Path, rows: &[Map<String, Value>], seconds: f64, tokens: i64) -> Result<()> {
    let last_train = rows.iter().rev().find(|r| r.contains_key("loss"));
    let summary = serde_json::json!({
        "train_runtime": seconds,
        "train_tokens_per_second": tokens as f64 / seconds.max(1e-9),
        "peak_rss_bytes": crate::runtime::peak_rss_bytes(),
        "final_loss": last_train.and_then(|r| r.get("loss")),
        "global_step": rows.last().and_then(|r| r.get("step")),
    });
    files::write_file_atomically(&out.join("train_summary.json"), serde_json::to_string_pretty(&summary)?)
}

/// Step, loss, reward accuracy, tokens/s and ETA on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(total: usize, done: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  eta {eta}").expect("valid template"),
    );
    bar.set_position(done as u64);
    bar
}
