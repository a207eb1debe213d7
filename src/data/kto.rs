//! KTO rows to token ids exactly as TRL 1.16's `KTOTrainer` prepares them (rules with line references:
//! tools/fixtures/make_kto_fixtures.py): unpaired `prompt`/`completion`/`label` rows, or preference pairs unpaired
//! as TRL's `unpair_preference_dataset` does; EOS appended to text completions; the completion where the tokenized
//! prompt and prompt+completion diverge; rows whose prompt fills `max_length` dropped; and the mismatched
//! completions of the KL estimate, rotated by one inside each training batch.

use crate::data::example::{missing_column, parse_turns, PreferencePair, Turns};
use crate::data::invalid::{ColumnError, InvalidRow, RowError};
use crate::data::prepare::{to_pairs, Dropped, PrepareOptions, Rules};
use crate::data::source::{json_kind, ReadRows};
use crate::data::tokenize::{with_prompt, PairTokenizer};
use serde_json::Value;

/// One unpaired example: a completion marked desirable (`label`) or not.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedExample {
    pub location: String,
    pub prompt: Turns,
    pub completion: Turns,
    pub label: bool,
}

/// An example as KTO trains on it.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoSequence {
    pub location: String,
    pub label: bool,
    pub prompt_ids: Vec<i64>,
    pub completion_ids: Vec<i64>,
    /// the completion the KL estimate pairs with this prompt: the previous example's in its batch
    pub kl_completion_ids: Vec<i64>,
}

#[derive(Debug, Default)]
pub struct PreparedKto {
    pub sequences: Vec<KtoSequence>,
    pub invalid: Vec<InvalidRow>,
    pub dropped: Vec<Dropped>,
}

/// `datasets`' batch size for `map(batched=True)`, which `unpair_preference_dataset` runs with.
const MAP_BATCH: usize = 1000;

/// TRL's `unpair_preference_dataset`: per thousand pairs, every chosen completion (desirable), then every rejected.
pub fn unpair(pairs: &[PreferencePair]) -> Vec<UnpairedExample> {
    let mut out = Vec::with_capacity(2 * pairs.len());
    for chunk in pairs.chunks(MAP_BATCH) {
        for (label, pick) in [(true, 0), (false, 1)] {
            for pair in chunk {
                let completion = if pick == 0 { &pair.chosen } else { &pair.rejected };
                out.push(UnpairedExample {
                    location: pair.location.clone(),
                    prompt: pair.prompt.clone().expect("with_prompt gave every pair a prompt"),
                    completion: completion.clone(),
                    label,
                });
            }
        }
    }
    out
}

/// Reads unpaired rows, or pairs (with an implicit prompt extracted as TRL does) unpaired; tokenizes them; drops
/// those whose prompt fills `max_length`; and adds each batch's mismatched KL completions (`batch_size`:
/// `per_device_train_batch_size`).
pub fn prepare_kto(read: ReadRows, tok: &PairTokenizer, max_length: Option<usize>, batch_size: usize) -> PreparedKto {
    let mut out = PreparedKto::default();
    let paired =
        read.rows.first().is_some_and(|r| r.fields.contains_key("chosen") && r.fields.contains_key("rejected"));
    let examples: Vec<UnpairedExample> = if paired {
        let mut options = PrepareOptions::new(Rules::Dpo);
        options.validation.allow_empty_completions = true; // TRL unpairs them as they are
        let (pairs, report) = to_pairs(read, &options);
        out.invalid = report.invalid;
        let mut with_prompts = Vec::new();
        for pair in &pairs {
            match with_prompt(pair) {
                Ok(pair) => with_prompts.push(pair),
                Err(reason) => out.invalid.push(InvalidRow { location: pair.location.clone(), reason }),
            }
        }
        unpair(&with_prompts)
    } else {
        out.invalid = read.invalid;
        let mut examples = Vec::new();
        for row in &read.rows {
            let column = |name: &str| -> Result<&Value, RowError> {
                row.fields.get(name).ok_or_else(|| missing_column(row, name))
            };
            let parsed = (|| {
                let prompt = column("prompt")?;
                let turns = |name: &str, value: &Value| {
                    parse_turns(value, value.is_array()).map_err(|e| RowError::column(name, e))
                };
                let label = match column("label")? {
                    Value::Bool(label) => *label,
                    other => return Err(RowError::column("label", ColumnError::ExpectedBool(json_kind(other)))),
                };
                Ok(UnpairedExample {
                    location: row.location.clone(),
                    prompt: turns("prompt", prompt)?,
                    completion: turns("completion", column("completion")?)?,
                    label,
                })
            })();
            match parsed {
                Ok(example) => examples.push(example),
                Err(reason) => out.invalid.push(InvalidRow { location: row.location.clone(), reason }),
            }
        }
        examples
    };
    let mut kept = Vec::new();
    for example in examples {
        match tokenize(&example, tok) {
            Ok((prompt_ids, _)) if max_length.is_some_and(|max| prompt_ids.len() >= max) => {
                let reason = format!(
                    "the prompt has {} tokens, at least max_length ({})",
                    prompt_ids.len(),
                    max_length.unwrap_or(0)
                );
                out.dropped.push(Dropped { location: example.location, reason });
            }
            Ok((prompt_ids, completion_ids)) => kept.push(KtoSequence {
                location: example.location,
                label: example.label,
                prompt_ids,
                kl_completion_ids: Vec::new(),
                completion_ids,
            }),
            Err(reason) => out.invalid.push(InvalidRow { location: example.location, reason }),
        }
    }
    // (x1, y1) ... (xn, yn) -> (x1, yn), (x2, y1), ..., (xn, yn-1) within each batch
    for batch in kept.chunks_mut(batch_size.max(1)) {
        let completions: Vec<Vec<i64>> = batch.iter().map(|s| s.completion_ids.clone()).collect();
        for (i, sequence) in batch.iter_mut().enumerate() {
            sequence.kl_completion_ids = completions[(i + completions.len() - 1) % completions.len()].clone();
        }
    }
    out.sequences = kept;
    out
}

/// The prompt's tokens up to where it and prompt+completion diverge, and the rest: the completion.
fn tokenize(example: &UnpairedExample, tok: &PairTokenizer) -> Result<(Vec<i64>, Vec<i64>), RowError> {
    let (mut ids, prompt_len) = tok.encode_prompt_completion(&example.prompt, &example.completion)?;
    let completion_ids = ids.split_off(prompt_len);
    Ok((ids, completion_ids))
}
