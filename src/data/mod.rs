//! Data: chat templates (and, later, preference rows, tokenization and collation).

pub mod chat_template;
pub mod source;
