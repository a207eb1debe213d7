//! Data: read rows (`source`, which checks a Parquet file's sizes first: `parquet_check`; `saved` for save_to_disk
//! folders; or the Hub: `hub`; several datasets mixed: `mixture`) -> interpret them (`example`, `hh_rlhf`; what is
//! wrong with a row: `invalid`) -> token ids by TRL's rules (`chat_template`, `tokenize`; SFT and KTO rows: `sft`,
//! `kto`) -> the whole path with its accounting (`prepare`) -> TRL's batches (`collate`) -> the model's input
//! layout (`pack`); what a training step consumes of each objective: `batches`.

pub mod batches;
pub mod chat_template;
pub mod collate;
pub mod example;
pub mod hh_rlhf;
pub mod hub;
pub mod invalid;
pub mod kto;
pub mod mixture;
pub mod pack;
mod parquet_check;
pub mod prepare;
pub mod saved;
pub mod sft;
pub mod source;
pub mod tokenize;
