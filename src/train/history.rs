//! What a run leaves behind besides the model: `metrics.jsonl` (one row per logging or evaluation step),
//! TensorBoard event files under `runs/`, `train_summary.json`, and the progress bar on the terminal.

use crate::train::tensorboard::TensorBoardWriter;
use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::Path;

/// `metrics.jsonl` (truncated to the rows up to the resumed step and appended to from there) and TensorBoard
/// event files under `runs/`.
pub struct History {
    file: std::io::BufWriter<std::fs::File>,
    tensorboard: TensorBoardWriter,
}

impl History {
    pub fn open(out: &Path, resume_step: usize) -> Result<Self> {
        let path = &out.join("metrics.jsonl");
        let kept: Vec<String> = match std::fs::read_to_string(path) {
            Ok(text) if resume_step > 0 => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= resume_step)
                })
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        for line in kept {
            writeln!(file, "{line}")?;
        }
        Ok(Self { file, tensorboard: TensorBoardWriter::create(&out.join("runs"))? })
    }

    /// Writes `row` with its `epoch` and `step` to both; returns the row as written.
    pub fn write(&mut self, mut row: Map<String, Value>, epoch: f64, step: usize) -> Result<Map<String, Value>> {
        row.insert("epoch".into(), epoch.into());
        row.insert("step".into(), step.into());
        writeln!(self.file, "{}", Value::Object(row.clone()))?;
        self.file.flush()?;
        self.tensorboard.add_metrics(&row, step as i64)?;
        tracing::info!("{}", serde_json::Value::Object(row.clone()));
        Ok(row)
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
    std::fs::write(out.join("train_summary.json"), serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", out.join("train_summary.json").display()))
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
