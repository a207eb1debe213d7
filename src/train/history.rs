//! What a run leaves behind besides the model: `metrics.jsonl` (one row per logging or evaluation step),
//! TensorBoard event files under `runs/`, `train_summary.json`, and the progress bar on the terminal; where stderr
//! is no terminal (nohup, SLURM, CI) each row as the line TRL prints for it instead, and the summary at the end.

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
    /// Print each row on stderr (no progress bar shows there).
    echo: bool,
    /// The last row kept from before a resume, for the summary of a run resumed at its end.
    last_kept: Option<Map<String, Value>>,
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
        let last_kept = kept.lines().rev().find_map(|line| match serde_json::from_str(line) {
            Ok(Value::Object(row)) if row.contains_key("loss") => Some(row),
            _ => None,
        });
        files::write_file_atomically(&path, kept)?;
        // A fresh run's history starts empty in both files: events an earlier run left in runs/ go too.
        let runs = out.join("runs");
        files::remove_partials(&runs)?;
        keep_events_up_to(&runs, resume_step as i64)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { path, file, tensorboard: TensorBoardWriter::create(&runs)?, echo: no_progress_bar(), last_kept })
    }

    /// The last training row kept from before the resume (`None` on a fresh run).
    pub fn last_kept_training_row(&self) -> Option<&Map<String, Value>> {
        self.last_kept.as_ref()
    }

    /// Writes `row` with its `epoch` and `step` to both; returns the row as written.
    pub fn write(&mut self, mut row: Map<String, Value>, epoch: f64, step: usize) -> Result<Map<String, Value>> {
        row.insert("epoch".into(), epoch.into());
        row.insert("step".into(), step.into());
        // one write per row: a kill leaves whole rows, or a torn last one that the next resume drops
        let line = format!("{}\n", Value::Object(row.clone()));
        self.file.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", self.path.display()))?;
        self.tensorboard.add_metrics(&row, step as i64)?;
        if self.echo {
            eprintln!("{}", console_line(&row));
        }
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
    if no_progress_bar() {
        eprintln!("{}", console_line(summary.as_object().expect("an object")));
    }
    files::write_file_atomically(&out.join("train_summary.json"), serde_json::to_string_pretty(&summary)?)
}

/// Whether stderr is no terminal, where the progress bar hides: the rows and the summary are printed instead.
fn no_progress_bar() -> bool {
    !std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// A row as transformers' `ProgressCallback.on_log` prints it: a Python dict, numbers as strings of 4 significant
/// digits (`{'loss': '0.6931', 'learning_rate': '5e-07', 'epoch': '0.25'}`), without the step it adds only to
/// its history.
pub fn console_line(row: &Map<String, Value>) -> String {
    let items: Vec<String> = row
        .iter()
        .filter(|(key, _)| key.as_str() != "step")
        .map(|(key, value)| {
            let value = match value {
                Value::Number(n) => format!("'{}'", python_g4(n.as_f64().unwrap_or(f64::NAN))),
                Value::String(s) => format!("'{s}'"),
                Value::Null => "None".to_string(),
                other => other.to_string(),
            };
            format!("'{key}': {value}")
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// How Python writes a value that is not finite (`nan`, `inf`, `-inf`), in `repr` and in format specs alike.
fn python_non_finite(v: f64) -> Option<&'static str> {
    match v {
        v if v.is_nan() => Some("nan"),
        v if v.is_infinite() => Some(if v > 0.0 { "inf" } else { "-inf" }),
        _ => None,
    }
}

/// A float as Python's `repr` writes it (`5e-07`, `0.1`, `3.0`), as transformers' model cards show values.
pub fn python_float(value: f64) -> String {
    if let Some(text) = python_non_finite(value) {
        return text.into();
    }
    if value == 0.0 {
        return if value.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let exponent = value.abs().log10().floor() as i32;
    if !(-4..16).contains(&exponent) {
        // Rust's shortest round-trip digits, with Python's signed two-digit exponent
        let text = format!("{value:e}");
        let (mantissa, exp) = text.split_once('e').expect("{:e} has an exponent");
        let exp: i32 = exp.parse().expect("an integer exponent");
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let text = format!("{value}");
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

/// Python's `f"{v:.4g}"`.
pub fn python_g4(v: f64) -> String {
    if let Some(text) = python_non_finite(v) {
        return text.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    let scientific = format!("{v:.3e}"); // rounded to 4 significant digits: "1.235e4"
    let (mantissa, exponent) = scientific.split_once('e').expect("an exponent");
    let exponent: i32 = exponent.parse().expect("an integer exponent");
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if !(-4..4).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa.to_string()), exponent.abs())
    } else {
        trim(format!("{v:.*}", (3 - exponent) as usize))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_prints_them() {
        for (value, python) in [
            (5e-7, "5e-07"),
            (1e-6, "1e-06"),
            (0.0001, "0.0001"),
            (0.1, "0.1"),
            (3.0, "3.0"),
            (1e16, "1e+16"),
            (123456.5, "123456.5"),
            (-2.5e-5, "-2.5e-05"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float(value), python, "{value}");
        }
    }

    #[test]
    fn rows_print_as_transformers_prints_its_logs() {
        // what transformers 5.24 printed for TRL's DPO fixture run (tools/fixtures/make_lora_fixtures.py)
        let row = serde_json::json!({"loss": std::f64::consts::LN_2, "grad_norm": 0.7356992, "learning_rate": 0.01,
            "num_tokens": 115.0, "logits/chosen": -0.000375676, "epoch": 0.25, "step": 1});
        assert_eq!(
            console_line(row.as_object().unwrap()),
            "{'loss': '0.6931', 'grad_norm': '0.7357', 'learning_rate': '0.01', 'num_tokens': '115', \
             'logits/chosen': '-0.0003757', 'epoch': '0.25'}"
        );
        for (value, python) in
            [(5e-7, "5e-07"), (12345.0, "1.234e+04"), (0.99996, "1"), (1234.5, "1234"), (-0.5, "-0.5")]
        {
            assert_eq!(python_g4(value), python, "{value}");
        }
    }
}
