//! Folders written by `datasets`' `save_to_disk`, read as `load_from_disk` reads them: a `Dataset` folder
//! (`state.json` listing its Arrow files, each an Arrow IPC stream) or a `DatasetDict` folder (`dataset_dict.json`
//! naming a folder per split). Rows arrive as JSON objects, like every other source's.

use crate::data::source::{RawRow, ReadRows};
use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use serde_json::{Map, Value};
use std::path::Path;

/// Whether `dir` was written by `save_to_disk`.
pub fn is_saved_dataset(dir: &Path) -> bool {
    dir.join("state.json").is_file() || dir.join("dataset_dict.json").is_file()
}

/// The rows of `split` (a `DatasetDict` folder) or of the whole `Dataset` folder.
pub fn read_saved(dir: &Path, split: &str) -> Result<ReadRows> {
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        let text = std::fs::read_to_string(&dict).with_context(|| format!("cannot read {}", dict.display()))?;
        let json: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", dict.display()))?;
        let splits: Vec<&str> = json["splits"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        if !splits.contains(&split) {
            bail!("{} has no split \"{split}\" (it has: {})", dir.display(), splits.join(", "));
        }
        return read_saved(&dir.join(split), split);
    }
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", state_path.display()))?;
    let files = state["_data_files"]
        .as_array()
        .with_context(|| format!("{}: no \"_data_files\" list", state_path.display()))?;
    let mut out = ReadRows::default();
    for file in files {
        let name =
            file["filename"].as_str().with_context(|| format!("{}: a data file has no name", state_path.display()))?;
        let path = dir.join(name);
        // as parquet's, arrow's readers may panic on a malformed file instead of failing
        let rows = std::panic::catch_unwind(|| read_arrow_stream(&path)).unwrap_or_else(|panic| {
            let what = crate::data::parquet_check::panic_message(&panic);
            bail!("{}: the Arrow reader cannot read this file ({what}); is it corrupt?", path.display())
        })?;
        out.rows.extend(rows);
    }
    Ok(out)
}

/// Every row of one Arrow IPC stream file, located as `file row N`.
fn read_arrow_stream(path: &Path) -> Result<Vec<RawRow>> {
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    // Every stored row takes at least a bit of the file (a validity bit or a value): a batch that claims more rows
    // is corrupt, and would otherwise be expanded into that many rows (a fuzzer's file claimed 7e16).
    let most_rows = file.metadata().map_or(0, |m| m.len()).saturating_mul(8);
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)
        .with_context(|| format!("{shown}: not an Arrow IPC stream (as save_to_disk writes)"))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.with_context(|| format!("{shown}: a record batch does not read"))?;
        let schema = batch.schema();
        if schema.fields().is_empty() || batch.num_rows() as u64 > most_rows {
            bail!(
                "{shown}: a record batch claims {} rows in {} columns; is the file corrupt?",
                batch.num_rows(),
                schema.fields().len()
            );
        }
        for i in 0..batch.num_rows() {
            let mut fields = Map::new();
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                let value = to_json(column.as_ref(), i)
                    .with_context(|| format!("{shown} row {}: column \"{}\"", rows.len(), field.name()))?;
                fields.insert(field.name().clone(), value);
            }
            rows.push(RawRow { location: format!("{shown} row {}", rows.len()), fields });
        }
    }
    Ok(rows)
}

/// Element `i` of an Arrow array as JSON: the types `datasets` stores text, numbers, flags and message lists in.
fn to_json(array: &dyn Array, i: usize) -> Result<Value> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    let number = |n: f64| serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number);
    Ok(match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => array.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float32 => number(f64::from(array.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => number(array.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => array.as_string::<i32>().value(i).into(),
        DataType::LargeUtf8 => array.as_string::<i64>().value(i).into(),
        DataType::Utf8View => array.as_string_view().value(i).into(),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let parts = array.as_struct();
            let mut object = Map::new();
            for (field, column) in fields.iter().zip(parts.columns()) {
                object.insert(field.name().clone(), to_json(column.as_ref(), i)?);
            }
            Value::Object(object)
        }
        other => bail!("Arrow type {other} is not read (text, numbers, booleans, lists and structs are)"),
    })
}

fn list(items: &dyn Array) -> Result<Value> {
    Ok(Value::Array((0..items.len()).map(|j| to_json(items, j)).collect::<Result<_>>()?))
}
