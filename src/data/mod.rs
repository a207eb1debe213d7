//! Data: read rows (`source`) -> interpret them (`example`, `hh_rlhf`) -> token ids by TRL's rules
//! (`chat_template`, `tokenize`) -> the whole path with its accounting (`prepare`) -> batches (`collate`).

pub mod chat_template;
pub mod collate;
pub mod example;
pub mod hub;
pub mod hh_rlhf;
pub mod pack;
pub mod prepare;
pub mod source;
pub mod tokenize;
