//! Reading and writing weights as safetensors (single file or sharded with `model.safetensors.index.json`),
//! and copying named tensors into a `VarStore` with precise errors.

use crate::files::{write_atomically, write_file_atomically};
use crate::model::gguf::dequant::GgmlType;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Kind, Tensor};

/// Where a model's named tensors come from: safetensors files, or a GGUF file imported on the fly. Tensors are
/// produced one at a time so that loading needs memory for the model plus one tensor.
pub trait WeightSource {
    /// The file(s) the tensors come from, for error messages.
    fn describe(&self) -> String;
    /// Every tensor name the source holds (Hugging Face names).
    fn names(&self) -> Vec<String>;
    /// The named tensor on CPU, in its stored (or dequantized) dtype.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>>;
    /// The named matrix as a GGUF file stores it: its ggml type and bytes, u8 [rows, bytes per row]. None where
    /// the source is not GGUF.
    fn raw(&self, _name: &str) -> Result<Option<(GgmlType, Tensor)>> {
        Ok(None)
    }
}

/// The safetensors files of a checkpoint, memory-mapped.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

impl SafetensorsFiles {
    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = json["weight_map"]
                .as_object()
                .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
            let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            bail!("no model.safetensors or model.safetensors.index.json in {}", dir.display());
        };
        Self::open_files(paths)
    }

    /// Opens one safetensors file of any name.
    pub fn open_dir_file(path: &Path) -> Result<Self> {
        Self::open_files(vec![path.to_path_buf()])
    }

    fn open_files(paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensor_index = BTreeMap::new();
        for path in paths {
            let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the mapping is read-only; a checkpoint changing under a running process is not supported.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let st = SafeTensors::deserialize(&mmap)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
            for name in st.names() {
                tensor_index.insert(name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(Self { files, index: tensor_index })
    }
}

impl WeightSource for SafetensorsFiles {
    fn describe(&self) -> String {
        match self.files.as_slice() {
            [(path, _)] => path.display().to_string(),
            files => format!("{} (and {} more shards)", files[0].0.display(), files.len() - 1),
        }
    }

    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(&file) = self.index.get(name) else { return Ok(None) };
        let (path, mmap) = &self.files[file];
        let view = SafeTensors::deserialize(mmap)?.tensor(name)?;
        view_to_tensor(&view).with_context(|| format!("tensor {name} in {}", path.display())).map(Some)
    }
}

fn view_to_tensor(view: &TensorView) -> Result<Tensor> {
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        other => bail!("unsupported dtype {other:?}"),
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_data_size(view.data(), &shape, kind))
}

/// Copies every variable of `vs` from `source` (converting dtype and device). A variable the source lacks, or
/// a shape mismatch, is an error naming the tensor; the names of tensors no variable took are returned.
pub fn load_into(vs: &VarStore, source: &dyn WeightSource) -> Result<Vec<String>> {
    let variables = vs.variables();
    let mut unused: BTreeMap<String, ()> = source.names().into_iter().map(|n| (n, ())).collect();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let mut var = variables[name].shallow_clone();
            let Some(tensor) = source.tensor(name)? else {
                bail!("tensor {name} is missing from {}", source.describe());
            };
            if tensor.size() != var.size() {
                bail!(
                    "tensor {name} in {} has shape {:?}, the model config expects {:?}",
                    source.describe(),
                    tensor.size(),
                    var.size()
                );
            }
            var.copy_(&tensor);
            unused.remove(name);
        }
        Ok(())
    })?;
    Ok(unused.into_keys().filter(|n| !is_ignorable_extra(n)).collect())
}

/// Tensors that checkpoints carry without being parameters (rotary caches of older exports).
pub fn is_ignorable_extra(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// A tensor as safetensors writes it. Its bytes are read only when written, one tensor at a time, so saving never
/// holds a second copy of the whole model or optimizer state (a contiguous CPU tensor is not copied at all).
struct SavedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    tensor: Tensor,
}

impl safetensors::View for &SavedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.tensor.device() == tch::Device::Cpu && self.tensor.is_contiguous() {
            // SAFETY: a contiguous CPU tensor holds data_len() bytes from data_ptr(), alive while self.tensor is.
            let bytes = unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.data_len()) };
            return std::borrow::Cow::Borrowed(bytes);
        }
        let tensor = self.tensor.to_device(tch::Device::Cpu).contiguous();
        let mut data = vec![0u8; self.data_len()];
        tensor.copy_data_u8(&mut data, tensor.numel());
        std::borrow::Cow::Owned(data)
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

fn saved_tensor(tensor: &Tensor) -> Result<SavedTensor> {
    let dtype = match tensor.kind() {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Int64 => Dtype::I64,
        other => bail!("cannot save a tensor of kind {other:?}"),
    };
    let shape = tensor.size().iter().map(|&d| d as usize).collect();
    Ok(SavedTensor { dtype, shape, tensor: tensor.detach() })
}

/// Writes `tensors` as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards plus
/// `model.safetensors.index.json` when they exceed `max_shard_bytes` (transformers' layout).
pub fn save_safetensors(dir: &Path, tensors: &[(String, Tensor)], max_shard_bytes: usize) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<Vec<(&String, SavedTensor)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut total_bytes = 0usize;
    for (name, tensor) in tensors {
        let view = saved_tensor(tensor).with_context(|| format!("tensor {name}"))?;
        let size = safetensors::View::data_len(&&view);
        if shard_bytes > 0 && shard_bytes + size > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += size;
        total_bytes += size;
        shards.last_mut().expect("at least one shard").push((name, view));
    }
    let count = shards.len();
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let path = dir.join(&file_name);
        write_views(&path, shard)?;
        for (name, _) in shard {
            weight_map.insert((*name).clone(), serde_json::Value::String(file_name.clone()));
        }
        written.push(path);
    }
    if count > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total_bytes }, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        write_file_atomically(&path, serde_json::to_string_pretty(&index)?)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes `tensors` into the single safetensors file `path`.
pub fn save_safetensors_file(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, tensor)| Ok((name, saved_tensor(tensor).with_context(|| format!("tensor {name}"))?)))
        .collect::<Result<Vec<_>>>()?;
    write_views(path, &views)
}

fn write_views(path: &Path, views: &[(&String, SavedTensor)]) -> Result<()> {
    let metadata: Option<std::collections::HashMap<String, String>> =
        Some([("format".to_string(), "pt".to_string())].into());
    write_atomically(path, |tmp| {
        safetensors::serialize_to_file(views.iter().map(|(n, v)| (n.as_str(), v)), metadata, tmp)
            .map_err(anyhow::Error::from)
    })
}
