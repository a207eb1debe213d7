//! TensorBoard scalar event files as PyTorch's `SummaryWriter` writes them (through tensorboard's
//! `EventFileWriter`), so `tensorboard --logdir` shows prefalign's training curves; `add_metrics` names the tags
//! as transformers' `TensorBoardCallback` does.
//!
//! File: `events.out.tfevents.<%010d unix secs>.<hostname>.<pid>.<per-process counter>`. Records use the TFRecord
//! framing: u64 LE data length, masked CRC32C of those 8 bytes (u32 LE), the data, masked CRC32C of the data
//! (u32 LE). Each record's data is a `tensorboard.Event` protobuf; the first one carries
//! `file_version = "brain.Event:2"`, every later one a `Summary` with one `simple_value` (f32) scalar.
//!
//! The protobuf is encoded by hand: only six scalar/string/sub-message fields of three messages are ever written,
//! and pulling in `prost` (with its derive macros and a `.proto` build step) for that would cost more than these
//! few lines. The encoding follows proto3 as Python's protobuf serializes it (fields in number order, `wall_time`
//! and `step` left out when 0, oneof members always written), so the records match `SummaryWriter`'s byte for byte.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Like tensorboard's `_global_uid`: the last part of the file name, so writers created in the same second by
/// the same process get distinct files.
static FILE_UID: AtomicU64 = AtomicU64::new(0);

/// What the first event names as its writer (`Event.source_metadata.writer`; `SummaryWriter` puts
/// "tensorboard.summary.writer.event_file_writer" there).
const WRITER_NAME: &str = "prefalign";

pub struct TensorBoardWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl TensorBoardWriter {
    /// Creates `dir` and a new event file `events.out.tfevents.<unix secs>.<hostname>.<pid>.<n>` in it (`n` counts
    /// the writers this process created, from 0) whose first record is the `file_version "brain.Event:2"` event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into());
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.{}",
            wall_time() as u64,
            std::process::id(),
            FILE_UID.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = Self { path, file: BufWriter::new(file) };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        let mut source = Vec::new();
        put_bytes(&mut source, 1, WRITER_NAME.as_bytes());
        put_bytes(&mut event, 10, &source);
        writer.write_record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar (tag like "train/loss" or "eval/loss"), at `step`, with the current wall time. TensorBoard
    /// stores it as f32 (`Summary.Value.simple_value`), as `SummaryWriter.add_scalar` does by default.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: i64) -> Result<()> {
        self.write_record(&scalar_event(wall_time(), tag, value, step))
    }

    /// Every numeric entry of a logged metrics row (TRL names like "loss", "rewards/chosen", "eval_loss") at
    /// `step`, named as transformers' `TensorBoardCallback.on_log` (`rewrite_logs`) names them: "eval_x" becomes
    /// "eval/x", "test_x" becomes "test/x", any other key gets the "train/" prefix. Like that callback it logs
    /// booleans as 0/1 (Python's `isinstance(True, int)`) and drops what is not a number (it writes strings as text
    /// summaries, which this scalar writer leaves out), then flushes. A "step" key is skipped: the row is a
    /// `log_history`/`metrics.jsonl` entry, where transformers adds "step" after `on_log`, so its callback never
    /// sees it; the step is the events' step.
    pub fn add_metrics(&mut self, row: &serde_json::Map<String, serde_json::Value>, step: i64) -> Result<()> {
        for (key, value) in row {
            if key == "step" {
                continue;
            }
            let number = match value {
                serde_json::Value::Number(n) => n.as_f64(),
                serde_json::Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
                _ => None,
            };
            if let Some(number) = number {
                self.add_scalar(&tag_for(key), number, step)?;
            }
        }
        self.flush()
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Flushes and syncs the event file to disk.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.file.get_ref().sync_data().with_context(|| format!("cannot sync {}", self.path.display()))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(&frame(data)).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

impl Drop for TensorBoardWriter {
    fn drop(&mut self) {
        let _ = self.file.flush();
    }
}

/// Before a run resumed from the checkpoint of `step` (0: a fresh run) writes its events: every event file in `dir`
/// loses its events of later steps (the run logs them again) and any torn record a kill left at its end, so that no
/// step appears twice across the files. Each changed file is rewritten atomically, or removed when no step is left
/// in it; other files are left alone.
pub fn keep_events_up_to(dir: &Path, step: i64) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("events.out.tfevents.") || !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let records = records(&bytes);
        let kept: Vec<&[u8]> = records.iter().copied().filter(|r| event_step(r).is_none_or(|s| s <= step)).collect();
        if kept.iter().all(|r| event_step(r).is_none()) {
            // only the file_version header is left: the file would be an empty run in TensorBoard's list
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        } else if kept.len() < records.len() || records.iter().map(|r| r.len() + 16).sum::<usize>() < bytes.len() {
            let data: Vec<u8> = kept.iter().flat_map(|r| frame(r)).collect();
            crate::files::write_file_atomically(&path, data)?;
        }
    }
    Ok(())
}

/// The data of each whole, intact record of an event file, in order; reading stops at the first torn or
/// corrupt one.
pub fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 12 {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        let Some(end) = len.checked_add(at + 16).filter(|&end| end <= bytes.len()) else { break };
        let data = &bytes[at + 12..end - 4];
        let data_crc = u32::from_le_bytes(bytes[end - 4..end].try_into().expect("4 bytes"));
        if crc != masked_crc32c(len_bytes) || data_crc != masked_crc32c(data) {
            break;
        }
        out.push(data);
        at = end;
    }
    out
}

/// The `step` of an `Event` (field 2; absent when 0, as proto3 writes it), `None` for an event without one that
/// is not a scalar (the `file_version` event).
fn event_step(event: &[u8]) -> Option<i64> {
    let mut at = 0;
    let mut step = None;
    let mut has_summary = false;
    while at < event.len() {
        let key = read_varint(event, &mut at)?;
        match (key >> 3, key & 7) {
            (2, 0) => step = Some(read_varint(event, &mut at)? as i64),
            (field, 2) => {
                let len = read_varint(event, &mut at)? as usize;
                at = at.checked_add(len)?;
                has_summary |= field == 5;
            }
            (_, 0) => {
                read_varint(event, &mut at)?;
            }
            (_, 1) => at += 8,
            (_, 5) => at += 4,
            _ => return None,
        }
    }
    if has_summary {
        Some(step.unwrap_or(0))
    } else {
        step
    }
}

fn read_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// transformers' `rewrite_logs` for one key.
fn tag_for(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("eval_") {
        format!("eval/{rest}")
    } else if let Some(rest) = key.strip_prefix("test_") {
        format!("test/{rest}")
    } else {
        format!("train/{key}")
    }
}

/// The `Event` protobuf for one scalar: `{wall_time, step, summary {value {tag, simple_value}}}`.
fn scalar_event(wall_time: f64, tag: &str, value: f64, step: i64) -> Vec<u8> {
    let mut value_msg = Vec::new();
    if !tag.is_empty() {
        put_bytes(&mut value_msg, 1, tag.as_bytes());
    }
    put_key(&mut value_msg, 2, 5);
    value_msg.extend_from_slice(&(value as f32).to_le_bytes());
    let mut summary = Vec::new();
    put_bytes(&mut summary, 1, &value_msg);
    let mut event = Vec::new();
    put_double(&mut event, 1, wall_time);
    if step != 0 {
        put_key(&mut event, 2, 0);
        put_varint(&mut event, step as u64);
    }
    put_bytes(&mut event, 5, &summary);
    event
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// TFRecord's CRC32C mask: rotate right by 15 bits, add 0xa282ead8.
fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Seconds since the Unix epoch, like Python's `time.time()`.
fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

/// A proto3 `double`, left out when 0 as protobuf does.
fn put_double(buf: &mut Vec<u8>, field: u32, v: f64) {
    if v != 0.0 {
        put_key(buf, field, 1);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// A length-delimited field (string, bytes or sub-message).
fn put_bytes(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}
