//! Writing GGUF v3 files as gguf-py's `GGUFWriter` lays them out: header, metadata, tensor descriptors, then each
//! tensor's data at a multiple of `general.alignment` (32). Tensors are encoded one at a time while writing, so a
//! model is never held twice. Q8_0 is quantized as ggml's `quantize_row_q8_0_ref` (and gguf-py) does.

use super::dequant::GgmlType;
use super::reader::Value;
use crate::files::write_atomically;
use anyhow::{bail, Result};
use half::{bf16, f16};
use std::io::Write;
use std::path::Path;
use tch::{Kind, Tensor};

const ALIGNMENT: u64 = 32;

/// A GGUF file being assembled: metadata in insertion order and tensors to encode when written.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Tensor, GgmlType)>,
}

impl GgufWriter {
    pub fn add(&mut self, key: &str, value: Value) {
        self.metadata.push((key.to_string(), value));
    }

    /// `tensor` (PyTorch order of dimensions) to be stored as `ty` (F32, F16, BF16 or Q8_0).
    pub fn add_tensor(&mut self, name: &str, tensor: Tensor, ty: GgmlType) -> Result<()> {
        let (block, _) = ty.block();
        let cols = *tensor.size().last().unwrap_or(&1);
        if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0) {
            bail!("writing {} tensors is not supported", ty.name());
        }
        if cols % block as i64 != 0 {
            bail!("tensor {name}: rows of {cols} values do not fill whole {} blocks of {block}", ty.name());
        }
        self.tensors.push((name.to_string(), tensor, ty));
        Ok(())
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomically(path, |tmp| {
            let mut out = std::io::BufWriter::new(std::fs::File::create(tmp)?);
            out.write_all(b"GGUF")?;
            out.write_all(&3u32.to_le_bytes())?;
            out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
            out.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
            let mut header = Vec::new();
            for (key, value) in &self.metadata {
                put_string(&mut header, key);
                header.extend(value_type(value).to_le_bytes());
                put_value(&mut header, value);
            }
            let mut offset = 0u64;
            for (name, tensor, ty) in &self.tensors {
                put_string(&mut header, name);
                let dims: Vec<i64> = tensor.size().into_iter().rev().collect();
                header.extend((dims.len() as u32).to_le_bytes());
                for d in &dims {
                    header.extend((*d as u64).to_le_bytes());
                }
                header.extend(ty.id().to_le_bytes());
                header.extend(offset.to_le_bytes());
                offset = padded(offset + ty.byte_len(tensor.numel())? as u64);
            }
            out.write_all(&header)?;
            let written = 4 + 4 + 8 + 8 + header.len() as u64;
            out.write_all(&vec![0u8; (padded(written) - written) as usize])?;
            for (_, tensor, ty) in &self.tensors {
                let bytes = encode(tensor, *ty);
                out.write_all(&bytes)?;
                let len = bytes.len() as u64;
                out.write_all(&vec![0u8; (padded(len) - len) as usize])?;
            }
            out.flush()?;
            Ok(())
        })
    }
}

fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn value_type(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend(v.to_le_bytes()),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // an empty array is written as an array of strings, as gguf-py does
            out.extend(items.first().map_or(8, value_type).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// The bytes of `tensor` stored as `ty`.
fn encode(tensor: &Tensor, ty: GgmlType) -> Vec<u8> {
    let values = Vec::<f32>::try_from(tensor.to_kind(Kind::Float).to_device(tch::Device::Cpu).reshape([-1]))
        .expect("f32 values");
    match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => quantize_q8_0(&values),
        other => unreachable!("add_tensor refuses {other:?}"),
    }
}

/// ggml's `quantize_row_q8_0_ref`: per block of 32 a scale d = max|x| / 127 (stored as f16) and round(x / d),
/// halves away from zero.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|x| (x * inverse).round() as i8 as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::dequant::dequantize;
    use crate::model::gguf::reader::GgufFile;

    #[test]
    fn q8_0_rounds_to_within_half_a_step() {
        let values: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 31.5) * 0.013).collect();
        let back = dequantize(GgmlType::Q8_0, &quantize_q8_0(&values));
        for (block, restored) in values.chunks(32).zip(back.chunks(32)) {
            let step = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in block.iter().zip(restored) {
                assert!((x - y).abs() <= 0.5 * step * 1.01, "{x} -> {y}");
            }
        }
        assert_eq!(quantize_q8_0(&[0.0; 32])[2..], [0u8; 32], "a zero block");
    }

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut writer = GgufWriter::default();
        writer.add("general.architecture", Value::String("llama".into()));
        writer.add("test.list", Value::Array(vec![Value::I32(-1), Value::I32(2)]));
        let t = Tensor::arange(96, (Kind::Float, tch::Device::Cpu)).view([3, 32]) / 10.0;
        for (name, ty) in [("f32", GgmlType::F32), ("f16", GgmlType::F16), ("q8", GgmlType::Q8_0)] {
            writer.add_tensor(name, t.shallow_clone(), ty).unwrap();
        }
        writer.add_tensor("norm", Tensor::ones([5], (Kind::Float, tch::Device::Cpu)), GgmlType::F32).unwrap();
        writer.write(&path).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.get("test.list"), Some(&Value::Array(vec![Value::I32(-1), Value::I32(2)])));
        assert!(file.dequantize(file.tensor_info("f32").unwrap()).unwrap().equal(&t));
        assert!(file.dequantize(file.tensor_info("f16").unwrap()).unwrap().allclose(&t, 1e-3, 1e-3, false));
        assert!(file.dequantize(file.tensor_info("q8").unwrap()).unwrap().allclose(&t, 0.0, 0.04, false));
        assert_eq!(file.tensor_info("norm").unwrap().shape(), [5]);
    }
}
