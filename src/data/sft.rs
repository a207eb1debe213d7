//! Supervised fine-tuning rows to token ids exactly as TRL 1.16's `SFTTrainer._prepare_dataset` builds them
//! (rules with line references: tools/fixtures/make_sft_fixtures.py): language-modeling rows (`text`, or
//! conversational `messages`) and prompt-completion rows (text, or messages), EOS appended to text as TRL does,
//! `labels` with -100 outside the loss (the prompt under `completion_only_loss`), then `max_length` truncation and
//! TRL's drop of rows left with no label. Packing and `assistant_only_loss` are not here yet.

use crate::data::collate::TruncationMode;
use crate::data::example::{missing_column, parse_turns, Turns};
use crate::data::invalid::{InvalidRow, RowError};
use crate::data::prepare::Dropped;
use crate::data::source::{RawRow, ReadRows};
use crate::data::tokenize::PairTokenizer;

/// The label of a token outside the loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// One training sequence: its token ids and, per token, the id again or [`IGNORE`].
#[derive(Debug, Clone, PartialEq)]
pub struct SftSequence {
    pub location: String,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// The SFTConfig fields the data path reads, with TRL's defaults.
#[derive(Debug, Clone)]
pub struct SftOptions {
    pub dataset_text_field: String,
    /// `None`: on for prompt-completion rows, as TRL's default
    pub completion_only_loss: Option<bool>,
    pub max_length: Option<usize>,
    pub truncation_mode: TruncationMode,
}

impl Default for SftOptions {
    fn default() -> Self {
        Self {
            dataset_text_field: "text".into(),
            completion_only_loss: None,
            max_length: Some(1024),
            truncation_mode: TruncationMode::KeepStart,
        }
    }
}

/// The sequences TRL trains on, the rows that could not be used, and the rows truncation left without a label.
#[derive(Debug, Default)]
pub struct PreparedSft {
    pub sequences: Vec<SftSequence>,
    pub invalid: Vec<InvalidRow>,
    pub dropped: Vec<Dropped>,
}

/// Tokenizes every row as TRL's SFTTrainer does; the format is the first row's, as TRL decides it.
pub fn prepare_sft(read: ReadRows, tok: &PairTokenizer, options: &SftOptions) -> PreparedSft {
    let mut out = PreparedSft { invalid: read.invalid, ..Default::default() };
    for row in &read.rows {
        let sequence =
            tokenize_row(row, tok, options).map_err(|reason| InvalidRow { location: row.location.clone(), reason });
        let mut sequence = match sequence {
            Ok(sequence) => sequence,
            Err(invalid) => {
                out.invalid.push(invalid);
                continue;
            }
        };
        if let Some(max) = options.max_length {
            truncate(&mut sequence, max, options.truncation_mode);
            if sequence.labels.iter().all(|&l| l == IGNORE) {
                let reason = format!("no token left in the loss after truncation to max_length {max}");
                out.dropped.push(Dropped { location: sequence.location, reason });
                continue;
            }
        }
        out.sequences.push(sequence);
    }
    out
}

fn tokenize_row(row: &RawRow, tok: &PairTokenizer, options: &SftOptions) -> Result<SftSequence, RowError> {
    let location = row.location.clone();
    let column = |name: &str| -> Result<Turns, RowError> {
        let value = row.fields.get(name).ok_or_else(|| missing_column(row, name))?;
        parse_turns(value, value.is_array()).map_err(|e| RowError::column(name, e))
    };
    if row.fields.contains_key("prompt") {
        let (prompt_ids, ids) = match (column("prompt")?, column("completion")?) {
            (Turns::Text(prompt), Turns::Text(completion)) => {
                let completion = tok.with_eos(&completion);
                (tok.encode(&prompt, true)?, tok.encode(&format!("{prompt}{completion}"), true)?)
            }
            (Turns::Messages(prompt), Turns::Messages(completion)) => {
                let all: Vec<_> = prompt.iter().chain(&completion).cloned().collect();
                (tok.encode(&tok.render(&prompt, true)?, false)?, tok.encode(&tok.render(&all, false)?, false)?)
            }
            _ => return Err(RowError::MixedTurns),
        };
        // The completion starts where the two tokenizations diverge (TRL's common_prefix_length).
        let prompt_len = prompt_ids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        let completion_only = options.completion_only_loss.unwrap_or(true);
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| if completion_only && i < prompt_len { IGNORE } else { id })
            .collect();
        return Ok(SftSequence { location, input_ids: ids, labels });
    }
    let input_ids = match row.fields.get("messages") {
        Some(_) => match column("messages")? {
            Turns::Messages(messages) => tok.encode(&tok.render(&messages, false)?, false)?,
            Turns::Text(_) => unreachable!("parsed as messages"),
        },
        None => match column(&options.dataset_text_field)? {
            Turns::Text(text) => tok.encode(&tok.with_eos(&text), true)?,
            Turns::Messages(_) => return Err(RowError::MixedTurns),
        },
    };
    Ok(SftSequence { location, labels: input_ids.clone(), input_ids })
}

fn truncate(sequence: &mut SftSequence, max: usize, mode: TruncationMode) {
    let len = sequence.input_ids.len();
    if len <= max {
        return;
    }
    let range = match mode {
        TruncationMode::KeepStart => 0..max,
        TruncationMode::KeepEnd => len - max..len,
    };
    sequence.input_ids = sequence.input_ids[range.clone()].to_vec();
    sequence.labels = sequence.labels[range].to_vec();
}
