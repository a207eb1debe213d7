//! prefalign: align causal language models with human preferences (DPO, ORPO, SimPO) on libtorch.
//!
//! The path of data: `data/` (rows, chat templates) -> `model/` (config, architectures, weights, tokenizer)
//! -> `cli/`.

pub mod cli;
pub mod data;
pub mod files;
pub mod model;
pub mod objective;
pub mod report;
pub mod runtime;
pub mod train;
