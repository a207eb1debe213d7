//! TensorBoard event files (src/train/tensorboard.rs): read back here (framing, both CRCs with a CRC32C written
//! out below rather than the writer's crate, protobuf fields), and against the reference: for the inputs in
//! tests/fixtures/tensorboard/inputs.json, `events.out.tfevents.fixture` is what this writer wrote and
//! `read_back.json` what tensorboard's EventAccumulator read from it, and whether torch's SummaryWriter driven by
//! transformers' TensorBoardCallback wrote the same events (tools/fixtures/check_tensorboard.py). The writer must
//! still write that file's records byte for byte, but for each event's wall_time.
//!
//! Regenerate: `cargo test --release --test integration -- --ignored tensorboard::write_fixture`, then
//! `.venv-fixtures/bin/python tools/fixtures/check_tensorboard.py`.

use prefalign::train::tensorboard::TensorBoardWriter;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard").join(name)
}

/// Bitwise CRC32C (Castagnoli, reflected polynomial 0x82f63b78).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records' data, checking the framing and both CRCs.
pub fn read_records(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert!(bytes.len() - at >= 12, "truncated header at {at}");
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(len_crc, masked_crc32c(len_bytes), "length CRC of the record at {at}");
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked_crc32c(data), "data CRC of the record at {at}");
        records.push(data.to_vec());
        at += 16 + len;
    }
    records
}

#[derive(Debug, Default, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    pub source_writer: Option<String>,
    /// (tag, simple_value)
    pub values: Vec<(String, f32)>,
}

fn varint(data: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = data[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
    }
    panic!("varint too long");
}

/// (field number, wire type, payload: the varint's bytes as u64 LE, the fixed bytes, or the delimited bytes)
fn fields(data: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let key = varint(data, &mut at);
        let payload = match key & 7 {
            0 => varint(data, &mut at).to_le_bytes().to_vec(),
            1 => {
                at += 8;
                data[at - 8..at].to_vec()
            }
            2 => {
                let len = varint(data, &mut at) as usize;
                at += len;
                data[at - len..at].to_vec()
            }
            5 => {
                at += 4;
                data[at - 4..at].to_vec()
            }
            other => panic!("wire type {other}"),
        };
        out.push((key >> 3, key & 7, payload));
    }
    out
}

pub fn decode_event(data: &[u8]) -> Event {
    let mut event = Event::default();
    let string = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    for (field, wire, payload) in fields(data) {
        match (field, wire) {
            (1, 1) => event.wall_time = f64::from_le_bytes(payload.try_into().unwrap()),
            (2, 0) => event.step = u64::from_le_bytes(payload.try_into().unwrap()) as i64,
            (3, 2) => event.file_version = Some(string(payload)),
            (10, 2) => {
                for (f, w, p) in fields(&payload) {
                    assert_eq!((f, w), (1, 2), "SourceMetadata field");
                    event.source_writer = Some(string(p));
                }
            }
            (5, 2) => {
                for (f, w, value) in fields(&payload) {
                    assert_eq!((f, w), (1, 2), "Summary field");
                    let (mut tag, mut simple_value) = (String::new(), None);
                    for (f, w, p) in fields(&value) {
                        match (f, w) {
                            (1, 2) => tag = string(p),
                            (2, 5) => simple_value = Some(f32::from_le_bytes(p.try_into().unwrap())),
                            other => panic!("Summary.Value field {other:?}"),
                        }
                    }
                    event.values.push((tag, simple_value.expect("simple_value")));
                }
            }
            other => panic!("Event field {other:?}"),
        }
    }
    event
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn only_event_file(dir: &Path) -> PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

#[test]
fn crc32c_known_answer() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn scalars_and_metrics_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("runs/a");
    let start = now();
    let mut writer = TensorBoardWriter::create(&dir).unwrap();
    assert_eq!(writer.path(), only_event_file(&dir));
    let name = writer.path().file_name().unwrap().to_str().unwrap().to_string();
    let parts: Vec<&str> = name.strip_prefix("events.out.tfevents.").unwrap().split('.').collect();
    assert_eq!(parts[0].len(), 10, "{name}");
    assert!((parts[0].parse::<f64>().unwrap() - start).abs() < 5.0, "{name}");
    assert_eq!(parts[parts.len() - 2], std::process::id().to_string(), "{name}");
    assert!(parts[parts.len() - 1].parse::<u64>().is_ok(), "{name}");

    writer.add_scalar("train/loss", 0.5, 1).unwrap();
    writer.add_scalar("eval/loss", 0.25, 0).unwrap();
    writer.add_scalar("train/loss", -3.0, 1 << 40).unwrap();
    writer.add_scalar("train/loss", 0.1, -7).unwrap();
    let row: Map<String, Value> = serde_json::from_str(
        r#"{"loss": 0.7, "rewards/chosen": -0.125, "eval_loss": 2, "test_accuracy": 1, "flag": false,
            "text": "hello", "none": null, "list": [1], "epoch": 0.5, "step": 12}"#,
    )
    .unwrap();
    writer.add_metrics(&row, 12).unwrap();
    writer.flush().unwrap();

    let events: Vec<Event> = read_records(writer.path()).iter().map(|r| decode_event(r)).collect();
    let first = &events[0];
    assert_eq!(first.file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(first.source_writer.as_deref(), Some("prefalign"));
    assert_eq!((first.step, first.values.len()), (0, 0));
    let expected: Vec<(&str, f32, i64)> = vec![
        ("train/loss", 0.5, 1),
        ("eval/loss", 0.25, 0),
        ("train/loss", -3.0, 1 << 40),
        ("train/loss", 0.1, -7),
        ("train/loss", 0.7, 12),
        ("train/rewards/chosen", -0.125, 12),
        ("eval/loss", 2.0, 12),
        ("test/accuracy", 1.0, 12),
        ("train/flag", 0.0, 12),
        ("train/epoch", 0.5, 12),
    ];
    assert_eq!(events.len(), 1 + expected.len());
    for (event, (tag, value, step)) in events[1..].iter().zip(expected) {
        assert_eq!(event.values, vec![(tag.to_string(), value)]);
        assert_eq!(event.step, step, "{tag}");
        assert_eq!((event.file_version.as_ref(), event.source_writer.as_ref()), (None, None));
    }
    for event in &events {
        assert!(event.wall_time >= start - 1.0 && event.wall_time <= now() + 1.0, "{}", event.wall_time);
    }

    // A second writer in the same directory gets its own file.
    let second = TensorBoardWriter::create(&dir).unwrap();
    assert_ne!(second.path(), writer.path());
}

/// After a resume from step 2, the events of later steps and a torn record at the end go; other files stay.
#[test]
fn keeping_the_events_up_to_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let mut writer = TensorBoardWriter::create(tmp.path()).unwrap();
    for step in 1..=4 {
        writer.add_scalar("train/loss", step as f64, step).unwrap();
    }
    writer.flush().unwrap();
    let path = writer.path().to_path_buf();
    drop(writer);
    let mut bytes = std::fs::read(&path).unwrap();
    let whole = bytes.len();
    bytes.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0, 1, 2]); // a record torn by a kill
    std::fs::write(&path, &bytes).unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "not an event file").unwrap();

    prefalign::train::tensorboard::keep_events_up_to(tmp.path(), 2).unwrap();
    let steps: Vec<i64> = read_records(&path).iter().map(|r| decode_event(r).step).collect();
    assert_eq!(steps, [0, 1, 2], "the file_version event, then steps 1 and 2");
    assert!(std::fs::read(&path).unwrap().len() < whole);
    assert_eq!(std::fs::read_to_string(tmp.path().join("notes.txt")).unwrap(), "not an event file");
    prefalign::train::tensorboard::keep_events_up_to(tmp.path(), 0).unwrap();
    assert!(!path.exists(), "a fresh run removes a file that would keep only its file_version event");
}

/// Writes the inputs of inputs.json with `writer`.
fn write_inputs(writer: &mut TensorBoardWriter) {
    let inputs: Value = serde_json::from_str(&std::fs::read_to_string(fixture("inputs.json")).unwrap()).unwrap();
    for s in inputs["scalars"].as_array().unwrap() {
        writer
            .add_scalar(s["tag"].as_str().unwrap(), s["value"].as_f64().unwrap(), s["step"].as_i64().unwrap())
            .unwrap();
    }
    for m in inputs["metrics"].as_array().unwrap() {
        writer.add_metrics(m["row"].as_object().unwrap(), m["step"].as_i64().unwrap()).unwrap();
    }
    writer.flush().unwrap();
}

fn write_inputs_to(dir: &Path) -> PathBuf {
    let mut writer = TensorBoardWriter::create(dir).unwrap();
    write_inputs(&mut writer);
    writer.path().to_path_buf()
}

/// An event's data without its wall_time field (field 1, double: the first 9 bytes).
fn without_wall_time(record: &[u8]) -> &[u8] {
    assert_eq!(record[0], 0x09, "the event starts with wall_time");
    &record[9..]
}

#[test]
#[ignore = "regenerates tests/fixtures/tensorboard/events.out.tfevents.fixture"]
fn write_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let written = write_inputs_to(tmp.path());
    std::fs::copy(written, fixture("events.out.tfevents.fixture")).unwrap();
}

#[test]
fn matches_fixture_and_tensorboard_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = read_records(&write_inputs_to(tmp.path()));
    let committed = read_records(&fixture("events.out.tfevents.fixture"));
    assert_eq!(ours.len(), committed.len());
    for (i, (a, b)) in ours.iter().zip(&committed).enumerate() {
        assert_eq!(without_wall_time(a), without_wall_time(b), "record {i}");
    }

    let read_back: Value = serde_json::from_str(&std::fs::read_to_string(fixture("read_back.json")).unwrap()).unwrap();
    assert_eq!(read_back["records"].as_u64(), Some(ours.len() as u64));
    assert_eq!(read_back["summary_writer_identical"], Value::Bool(true), "{read_back}");
    let events: Vec<Event> = ours.iter().map(|r| decode_event(r)).collect();
    assert_eq!(events[0].file_version.as_deref(), read_back["file_version"].as_str());
    let mut scalars: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for event in &events[1..] {
        for (tag, value) in &event.values {
            scalars.entry(tag.clone()).or_default().push((event.step, *value));
        }
    }
    let mut expected: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for (tag, points) in read_back["scalars"].as_object().unwrap() {
        let points = points
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32))
            .collect();
        expected.insert(tag.clone(), points);
    }
    assert_eq!(scalars, expected);
}
