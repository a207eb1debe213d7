//! GGUF v2/v3 container: metadata key/values and tensor descriptors over a memory-mapped file.
//! Layout: magic "GGUF", version u32, tensor count u64, kv count u64, kvs, tensor infos, padding to
//! `general.alignment`, tensor data. All little-endian.

use super::dequant::{dequantize, GgmlType};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// One tensor's descriptor: ggml dims are innermost-first (`dims[0]` is the row length).
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

impl TensorInfo {
    /// The number of elements (the parser has checked that it fits an i64).
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The PyTorch shape (outermost first).
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// How deep arrays may nest in the metadata.
const MAX_ARRAY_DEPTH: usize = 8;

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    mmap: Mmap,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!("unexpected end of file at byte {} (wanted {n} more bytes)", self.pos);
        };
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()? as usize;
        let at = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).with_context(|| format!("string at byte {at} is not valid UTF-8"))
    }

    fn value(&mut self, value_type: u32) -> Result<Value> {
        self.value_nested(value_type, 0)
    }

    /// A value inside `depth` arrays (GGUF's arrays of arrays are rare; deep ones only exhaust the stack).
    fn value_nested(&mut self, value_type: u32, depth: usize) -> Result<Value> {
        Ok(match value_type {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {}", self.pos);
                }
                let item_type = self.u32()?;
                let len = self.u64()?;
                // every item takes at least a byte
                if len > (self.bytes.len() - self.pos) as u64 {
                    bail!("array length {len} at byte {} exceeds the rest of the file", self.pos);
                }
                (0..len).map(|_| self.value_nested(item_type, depth + 1)).collect::<Result<_>>().map(Value::Array)?
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown GGUF value type {other} at byte {}", self.pos),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(path, mmap).with_context(|| format!("{} is not a valid GGUF file", path.display()))
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut cur = Cursor { bytes: &mmap, pos: 0 };
        if cur.take(4).ok() != Some(b"GGUF".as_slice()) {
            bail!("missing GGUF magic");
        }
        let version = cur.u32()?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (supported: 2, 3)");
        }
        let tensor_count = cur.u64()?;
        let kv_count = cur.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = cur.string()?;
            let value_type = cur.u32()?;
            let value = cur.value(value_type).with_context(|| format!("metadata key {key}"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::new();
        for _ in 0..tensor_count {
            let name = cur.string()?;
            let n_dims = cur.u32()?;
            if n_dims > 4 {
                bail!("tensor {name} has {n_dims} dimensions (at most 4)");
            }
            let dims = (0..n_dims).map(|_| cur.u64()).collect::<Result<Vec<_>>>()?;
            let elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).filter(|&n| n <= i64::MAX as u64);
            if elements.is_none() || dims.iter().any(|&d| d > i64::MAX as u64) {
                bail!("tensor {name} has dimensions {dims:?}, larger than any file holds");
            }
            let ggml_type = cur.u32()?;
            let offset = cur.u64()?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32);
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            bail!("general.alignment is {alignment}; expected a power of two up to 1 MiB");
        }
        let data_start = cur.pos.div_ceil(alignment as usize) * alignment as usize;
        Ok(Self { path: path.to_path_buf(), version, metadata, tensors, data_start, mmap })
    }

    /// The bytes of a tensor, checked against the file size.
    pub fn tensor_bytes(&self, info: &TensorInfo, byte_len: usize) -> Result<&[u8]> {
        let start = usize::try_from(info.offset).ok().and_then(|offset| self.data_start.checked_add(offset));
        let range = start.and_then(|start| Some(start..start.checked_add(byte_len)?));
        range
            .and_then(|range| self.mmap.get(range))
            .with_context(|| format!("tensor {} in {} runs past the end of the file", info.name, self.path.display()))
    }

    /// The tensor as f32 in its PyTorch shape.
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Tensor> {
        let ty = GgmlType::from_id(info.ggml_type).with_context(|| format!("tensor {}", info.name))?;
        let byte_len = ty.byte_len(info.element_count() as usize).with_context(|| format!("tensor {}", info.name))?;
        let values = dequantize(ty, self.tensor_bytes(info, byte_len)?);
        Ok(Tensor::from_slice(&values).reshape(info.shape().as_slice()))
    }

    /// The tensor's bytes as stored, u8 [rows, bytes per row] for a tensor of PyTorch shape [rows, …], with its type.
    pub fn raw(&self, info: &TensorInfo) -> Result<(GgmlType, Tensor)> {
        let ty = GgmlType::from_id(info.ggml_type).with_context(|| format!("tensor {}", info.name))?;
        let byte_len = ty.byte_len(info.element_count() as usize).with_context(|| format!("tensor {}", info.name))?;
        let bytes = self.tensor_bytes(info, byte_len)?;
        let shape = info.shape();
        let cols = shape.last().copied().unwrap_or(1);
        if cols % ty.block().0 as i64 != 0 {
            bail!("tensor {}: rows of {cols} values do not fill whole {} blocks", info.name, ty.name());
        }
        let rows = shape.first().copied().unwrap_or(1).max(1);
        Ok((ty, Tensor::from_slice(bytes).view([rows, -1])))
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}
