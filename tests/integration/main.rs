//! The integration tests: one binary (libtorch is linked once), one module per concern. They read committed
//! fixtures (tests/fixtures, made by tools/fixtures) and the SmolLM2 GGUF that scripts/setup.sh fetches; none
//! needs Python or the Hugging Face Hub.

mod common;

mod chat_templates;
mod cli;
mod compare;
mod compute;
mod data_input;
mod distributed;
mod errors;
mod eval;
mod gguf_export;
mod gguf_import;
mod hub;
mod lora;
mod losses;
mod model_parity;
mod quantized;
mod recipes;
mod reliability;
mod sft_kto_data;
mod sft_kto_training;
mod tensorboard;
mod training;
mod trl_data;
