//! GGUF import: the container (`reader`), ggml dequantization (`dequant`), and the mapping of llama.cpp's
//! metadata and tensor names onto a Hugging Face config, weights and tokenizer (`import`).

pub mod dequant;
pub mod import;
pub mod reader;

pub use import::{GgufModel, GgufWeights};
pub use reader::GgufFile;
