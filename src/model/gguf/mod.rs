//! GGUF in and out: the container (`reader`, `writer`), ggml dequantization (`dequant`), and the mapping of
//! llama.cpp's metadata and tensor names onto a Hugging Face config, weights and tokenizer (`import`) and back
//! (`export`).

pub mod dequant;
pub mod export;
pub mod import;
pub mod reader;
pub mod writer;

pub use import::{GgufModel, GgufWeights};
pub use reader::GgufFile;
