//! Reading preference rows from JSONL, JSON (an array of objects) or Parquet (a file or a folder of shards), each
//! optionally gzipped where the format allows. Every row keeps its location (`file:line`, `file[index]`,
//! `file row N`) so that later errors can name it.

use crate::data::hub::Selection;
use crate::data::invalid::{InvalidRow, RowError};
use crate::data::parquet_check;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// One row as read, before any interpretation.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub location: String,
    pub fields: Map<String, Value>,
}

/// Rows of a dataset, with the lines that could not be read as rows (bad JSON, invalid UTF-8).
#[derive(Debug, Default)]
pub struct ReadRows {
    pub rows: Vec<RawRow>,
    pub invalid: Vec<InvalidRow>,
}

impl ReadRows {
    /// Adds `other`'s rows and invalid rows after these.
    pub fn append(&mut self, other: ReadRows) {
        self.rows.extend(other.rows);
        self.invalid.extend(other.invalid);
    }
}

/// Reads every row of a file, or of every data file in a folder (sorted by name).
pub fn read_rows(path: &Path) -> Result<ReadRows> {
    if !path.exists() {
        bail!("dataset {} does not exist", path.display());
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && DataFormat::of(p).is_ok())
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no .parquet, .jsonl, .json or .csv files in {}", path.display());
        }
        return read_files(&files);
    }
    read_file(path)
}

/// One split of one dataset: a local file or folder, or a Hub dataset id; `select` as `datasets`' `load_dataset`
/// takes `name`, `data_dir` and `data_files`.
pub fn read_dataset(dataset: &str, select: &Selection, split: &str) -> Result<ReadRows> {
    if Path::new(dataset).exists() || !crate::data::hub::looks_like_repo_id(dataset) {
        return read_local(Path::new(dataset), select, split);
    }
    let files = crate::data::hub::dataset_files(&crate::data::hub::HubSettings::from_env(), dataset, select, split)
        .with_context(|| format!("{dataset} is no local path, so it was read as a Hub dataset id"))?;
    read_files(&files)
}

/// A local file (one split: every split name reads it whole, so that it can be sliced), or a folder: one that
/// `save_to_disk` wrote; laid out as a Hub repo (files named or foldered by split, as `datasets` finds them), the
/// split's files; else every data file.
fn read_local(path: &Path, select: &Selection, split: &str) -> Result<ReadRows> {
    if !path.is_dir() {
        return read_rows(path);
    }
    if crate::data::saved::is_saved_dataset(path) {
        return crate::data::saved::read_saved(path, split);
    }
    // the older handbook's fallback: load_from_disk(os.path.join(dataset, split))
    if crate::data::saved::is_saved_dataset(&path.join(split)) {
        return crate::data::saved::read_saved(&path.join(split), split);
    }
    let files = crate::data::hub::local_split_files(path, select, split)?;
    if files.is_empty() {
        return read_rows(path);
    }
    read_files(&files)
}

/// The rows of several files, one after the other.
fn read_files(files: &[PathBuf]) -> Result<ReadRows> {
    let mut all = ReadRows::default();
    for file in files {
        all.append(read_file(file)?);
    }
    Ok(all)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataFormat {
    JsonLines,
    JsonArray,
    Parquet,
    Csv,
}

impl DataFormat {
    fn of(path: &Path) -> Result<Self> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let name = name.strip_suffix(".gz").unwrap_or(name);
        Ok(match name.rsplit_once('.').map(|(_, ext)| ext) {
            Some("jsonl" | "ndjson") => Self::JsonLines,
            Some("json") => Self::JsonArray,
            Some("parquet") => Self::Parquet,
            Some("csv") => Self::Csv,
            _ => {
                bail!(
                    "{}: unknown dataset format (expected .jsonl, .json, .parquet or .csv, optionally .gz)",
                    path.display()
                )
            }
        })
    }
}

fn open_maybe_gzip(path: &Path) -> Result<Box<dyn Read>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// The UTF-8 byte order mark, which some editors put at the start of a file; JSON does not allow it.
const BOM: &[u8] = b"\xEF\xBB\xBF";

fn read_file(path: &Path) -> Result<ReadRows> {
    let shown = path.display();
    let mut format = DataFormat::of(path)?;
    if format != DataFormat::Parquet {
        let mut start = Vec::new();
        open_maybe_gzip(path)?.take(4096).read_to_end(&mut start).with_context(|| format!("cannot read {shown}"))?;
        if start.starts_with(BOM) {
            bail!("{shown} starts with a UTF-8 byte order mark (BOM), which JSON does not allow; save it as UTF-8 without a BOM");
        }
        // A .json file that opens with an object holds JSON Lines, as `datasets`' `to_json` writes them (and its
        // json loader reads them first).
        if format == DataFormat::JsonArray && start.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            format = DataFormat::JsonLines;
        }
    }
    match format {
        DataFormat::JsonLines => {
            let mut reader = std::io::BufReader::new(open_maybe_gzip(path)?);
            let mut out = ReadRows::default();
            let mut line = Vec::new();
            for number in 1.. {
                line.clear();
                if reader.read_until(b'\n', &mut line).with_context(|| format!("{shown}:{number}: read error"))? == 0 {
                    break;
                }
                let location = format!("{shown}:{number}");
                let parsed =
                    std::str::from_utf8(&line).map_err(|e| RowError::InvalidUtf8(e.valid_up_to())).and_then(|text| {
                        if text.trim().is_empty() {
                            return Ok(None);
                        }
                        let value: Value =
                            serde_json::from_str(text).map_err(|e| RowError::InvalidJson(e.to_string()))?;
                        into_object(value).map(Some)
                    });
                match parsed {
                    Ok(Some(fields)) => out.rows.push(RawRow { location, fields }),
                    Ok(None) => {}
                    Err(reason) => out.invalid.push(InvalidRow { location, reason }),
                }
            }
            Ok(out)
        }
        DataFormat::JsonArray => {
            let mut bytes = Vec::new();
            open_maybe_gzip(path)?.read_to_end(&mut bytes).with_context(|| format!("cannot read {shown}"))?;
            let text = std::str::from_utf8(&bytes)
                .map_err(|e| anyhow::anyhow!("{shown}: invalid UTF-8 at byte {}", e.valid_up_to()))?;
            let value: Value = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{shown}: invalid JSON: {e}"))?;
            let Value::Array(items) = value else {
                bail!("{shown}: expected a JSON array of objects, or one object per line");
            };
            let mut out = ReadRows::default();
            for (i, item) in items.into_iter().enumerate() {
                let location = format!("{shown}[{i}]");
                match into_object(item) {
                    Ok(fields) => out.rows.push(RawRow { location, fields }),
                    Err(reason) => out.invalid.push(InvalidRow { location, reason }),
                }
            }
            Ok(out)
        }
        DataFormat::Parquet => read_parquet(path),
        DataFormat::Csv => read_csv(path),
    }
}

/// A CSV file with a header row, as `datasets`' csv loader (pandas) reads text columns: each cell a string, an
/// empty cell null. A record that does not parse (a wrong number of fields, invalid UTF-8) is an invalid row
/// named by its line.
fn read_csv(path: &Path) -> Result<ReadRows> {
    let shown = path.display();
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(open_maybe_gzip(path)?);
    let headers = reader.headers().with_context(|| format!("{shown}: cannot read the CSV header"))?.clone();
    let mut out = ReadRows::default();
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let location = format!("{shown}:{}", record.position().map_or(line, |p| p.line()));
                let fields = headers
                    .iter()
                    .zip(record.iter())
                    .map(|(name, cell)| {
                        let value = if cell.is_empty() { Value::Null } else { Value::String(cell.to_string()) };
                        (name.to_string(), value)
                    })
                    .collect();
                out.rows.push(RawRow { location, fields });
            }
            Err(error) => {
                let line = error.position().map_or(line, |p| p.line());
                let location = format!("{shown}:{line}");
                let reason = match error.kind() {
                    csv::ErrorKind::Utf8 { err, .. } => RowError::InvalidUtf8(err.valid_up_to()),
                    csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                        RowError::InvalidCsv(format!("{len} fields where the header has {expected_len}"))
                    }
                    csv::ErrorKind::Io(e) => bail!("{location}: read error: {e}"),
                    _ => RowError::InvalidCsv(error.to_string()),
                };
                out.invalid.push(InvalidRow { location, reason });
            }
        }
    }
    Ok(out)
}

fn into_object(value: Value) -> Result<Map<String, Value>, RowError> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(RowError::NotAnObject(json_kind(&other))),
    }
}

pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Parquet rows as JSON objects through parquet's record reader, so nested columns (lists of messages) arrive as JSON
/// too. Null fields are left out, as a JSON Lines row would leave them out.
fn read_parquet(path: &Path) -> Result<ReadRows> {
    // The record reader panics on some schemas (INTERVAL columns, malformed LIST/MAP groups) instead of failing.
    std::panic::catch_unwind(|| read_parquet_rows(path)).unwrap_or_else(|panic| {
        let what = parquet_check::panic_message(&panic);
        bail!("{}: the Parquet reader cannot read this file ({what}); is it corrupt?", path.display())
    })
}

fn read_parquet_rows(path: &Path) -> Result<ReadRows> {
    use parquet::file::reader::FileReader;
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {shown}"))?;
    let bytes = bytes::Bytes::from(bytes);
    let reader = parquet_check::open(StrictParquet(bytes.clone()), &bytes)
        .with_context(|| format!("{shown} is not a valid Parquet file"))?;
    parquet_check::check_pages(&reader, &bytes).with_context(|| format!("{shown}: cannot read its rows"))?;
    let mut out = ReadRows::default();
    for row in reader.get_row_iter(None).with_context(|| format!("{shown}: cannot read its rows"))? {
        let location = format!("{shown} row {}", out.rows.len());
        let row = row.with_context(|| format!("{location}: cannot decode"))?;
        let fields = into_object(without_nulls(row.to_json_value())).map_err(|e| anyhow::anyhow!("{location}: {e}"))?;
        out.rows.push(RawRow { location, fields });
    }
    Ok(out)
}

/// `value` without the object fields whose value is null, at every depth.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, without_nulls(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

/// A Parquet file in memory whose readers fail at its end instead of reporting 0 bytes read: the parquet crate
/// skips page-header fields it does not know with `io::copy`, which on a plain reader at the end of the data
/// "skips" a corrupt length for free, up to 2^31 times per list (docs/RELIABILITY.md).
struct StrictParquet(bytes::Bytes);

/// A reader of a `StrictParquet` from some offset.
struct StrictRead(bytes::Bytes);

impl Read for StrictRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.0.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file ends inside a page"));
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = self.0.slice(n..);
        Ok(n)
    }
}

impl parquet::file::reader::Length for StrictParquet {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

impl parquet::file::reader::ChunkReader for StrictParquet {
    type T = StrictRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<StrictRead> {
        Ok(StrictRead(self.0.get_bytes(start, (self.0.len() as u64).saturating_sub(start) as usize)?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        self.0.get_bytes(start, length)
    }
}
