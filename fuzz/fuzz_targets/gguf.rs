//! A GGUF file: the container (header, metadata, tensor infos), dequantization of every small tensor, and the import
//! of a model config and tokenizer from the metadata.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefalign::model::gguf::{GgufFile, GgufModel};

fuzz_target!(|data: &[u8]| {
    let path = prefalign_fuzz::scratch_file("model.gguf", data);
    if let Ok(file) = GgufFile::open(&path) {
        for info in &file.tensors {
            if info.element_count() <= 1 << 16 {
                let _ = file.dequantize(info);
            }
        }
    }
    let _ = GgufModel::open(&path);
});
