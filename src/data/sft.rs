//! Supervised fine-tuning rows to token ids exactly as TRL 1.16's `SFTTrainer._prepare_dataset` builds them
//! (rules with line references: tools/fixtures/make_sft_fixtures.py): language-modeling rows (`text`, or
//! conversational `messages`) and prompt-completion rows (text, or messages), EOS appended to text as TRL does,
//! `labels` with -100 outside the loss (the prompt under `completion_only_loss`), then `max_length` truncation and
//! TRL's drop of rows left with no label; `assistant_only_loss` through the template's `{% generation %}` blocks
//! (conversational language-modeling rows), and TRL's `bfd` packing.

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
    /// loss on the text of the template's `{% generation %}` blocks only (conversational rows)
    pub assistant_only_loss: bool,
    /// TRL's `packing`: sequences packed into rows of `max_length` tokens, by `packing_strategy`
    pub packing: bool,
    pub packing_strategy: PackingStrategy,
    /// `shuffle_dataset` with TRL's seed: the rows shuffled as `datasets`' `shuffle(seed)` does
    pub shuffle_seed: Option<u64>,
}

/// SFTConfig's `packing_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackingStrategy {
    /// Best Fit Decreasing: whole sequences (cut to max_length), each attending only to itself
    #[default]
    Bfd,
    /// every token of a thousand rows in a row, cut every max_length tokens: a row's tokens attend to each other
    /// across the sequences' boundaries, as in pretraining
    Wrapped,
}

impl PackingStrategy {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "bfd" => Ok(PackingStrategy::Bfd),
            "wrapped" => Ok(PackingStrategy::Wrapped),
            "bfd_split" => anyhow::bail!("packing_strategy bfd_split is not implemented: use bfd or wrapped"),
            other => anyhow::bail!("unknown packing_strategy \"{other}\": expected bfd or wrapped"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PackingStrategy::Bfd => "bfd",
            PackingStrategy::Wrapped => "wrapped",
        }
    }
}

impl Default for SftOptions {
    fn default() -> Self {
        Self {
            dataset_text_field: "text".into(),
            completion_only_loss: None,
            max_length: Some(1024),
            truncation_mode: TruncationMode::KeepStart,
            assistant_only_loss: false,
            packing: false,
            packing_strategy: PackingStrategy::Bfd,
            shuffle_seed: None,
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
        // packing cuts the sequences itself, and keeps those left without a label
        if let Some(max) = options.max_length.filter(|_| !options.packing) {
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

/// Preference pairs as SFT's prompt-completion rows: the prompt (extracted as TRL does when implicit) and the chosen
/// completion, the way SFT on a preference set's preferred answers is usually set up (e.g. HH-RLHF transcripts
/// before DPO on them). A pair whose prompt cannot be extracted is an invalid row.
pub fn chosen_as_prompt_completion(pairs: &[crate::data::example::PreferencePair], into: &mut ReadRows) {
    use serde_json::Value;
    let json = |turns: &Turns| match turns {
        Turns::Text(text) => Value::String(text.clone()),
        Turns::Messages(messages) => serde_json::to_value(messages).expect("messages serialize"),
    };
    for pair in pairs {
        match crate::data::tokenize::with_prompt(pair) {
            Ok(pair) => {
                let mut fields = serde_json::Map::new();
                fields.insert("prompt".into(), json(pair.prompt.as_ref().expect("with_prompt gives a prompt")));
                fields.insert("completion".into(), json(&pair.chosen));
                into.rows.push(RawRow { location: pair.location.clone(), fields });
            }
            Err(reason) => into.invalid.push(InvalidRow { location: pair.location.clone(), reason }),
        }
    }
}

impl PreparedSft {
    /// The rows of the dataset TRL trains on: the sequences, or with `packing` their packs of `max_length`; with
    /// `shuffle_seed` shuffled as TRL does (the sequences, and again the packs).
    pub fn rows(&self, options: &SftOptions) -> Vec<SftRow> {
        let sequences = shuffled(self.sequences.clone(), options.shuffle_seed);
        let rows = match (options.max_length.filter(|_| options.packing), options.packing_strategy) {
            (Some(max), PackingStrategy::Bfd) => pack_bfd(sequences, max),
            (Some(max), PackingStrategy::Wrapped) => pack_wrapped(&sequences, max),
            (None, _) => return sequences.into_iter().map(SftRow::from).collect(),
        };
        shuffled(rows, options.shuffle_seed)
    }
}

/// `items` in the order of `datasets`' `shuffle(seed)` (NumPy's permutation), or as they are without a seed.
fn shuffled<T>(items: Vec<T>, seed: Option<u64>) -> Vec<T> {
    let Some(seed) = seed else { return items };
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    let order = crate::data::mixture::numpy_permutation(slots.len(), seed);
    order.into_iter().map(|i| slots[i].take().expect("a permutation takes each item once")).collect()
}

fn tokenize_row(row: &RawRow, tok: &PairTokenizer, options: &SftOptions) -> Result<SftSequence, RowError> {
    let location = row.location.clone();
    let column = |name: &str| -> Result<Turns, RowError> {
        let value = row.fields.get(name).ok_or_else(|| missing_column(row, name))?;
        parse_turns(value, value.is_array()).map_err(|e| RowError::column(name, e))
    };
    if row.fields.contains_key("prompt") {
        let (ids, prompt_len) = tok.encode_prompt_completion(&column("prompt")?, &column("completion")?)?;
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
            Turns::Messages(messages) if options.assistant_only_loss => {
                let (ids, mask) = tok.encode_with_assistant_mask(&messages)?;
                if !mask.contains(&1) {
                    return Err(RowError::Template(
                        "assistant_only_loss: no assistant token (does the chat template mark them with {% generation \
                         %}?)"
                            .into(),
                    ));
                }
                let labels = ids.iter().zip(&mask).map(|(&id, &m)| if m == 1 { id } else { IGNORE }).collect();
                return Ok(SftSequence { location, input_ids: ids, labels });
            }
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

/// A row of the dataset SFT trains on: one sequence, or with TRL's packing several (`seq_lengths`: the lengths of
/// the sequences in it, in order), each of which attends only to itself.
#[derive(Debug, Clone, PartialEq)]
pub struct SftRow {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub seq_lengths: Vec<usize>,
    /// the location of each packed sequence
    pub sources: Vec<String>,
}

impl From<SftSequence> for SftRow {
    fn from(sequence: SftSequence) -> Self {
        SftRow {
            seq_lengths: vec![sequence.input_ids.len()],
            sources: vec![sequence.location],
            input_ids: sequence.input_ids,
            labels: sequence.labels,
        }
    }
}

impl SftRow {
    /// Each sequence as (token ids, 1 where its label is in the loss).
    pub fn sequences(&self) -> Vec<(Vec<i64>, Vec<i64>)> {
        let mut start = 0;
        self.seq_lengths
            .iter()
            .map(|&n| {
                let range = start..start + n;
                start += n;
                let scored = self.labels[range.clone()].iter().map(|&l| i64::from(l != IGNORE)).collect();
                (self.input_ids[range].to_vec(), scored)
            })
            .collect()
    }
}

/// `datasets`' batch size for `map(batched=True)`: TRL packs each thousand rows on their own.
const MAP_BATCH: usize = 1000;

/// TRL's `pack_dataset(strategy="bfd")`: in each thousand sequences, empty ones dropped and each cut to
/// `seq_length`, Best Fit Decreasing: longest first (ties in order), each into the open row with the least room
/// that fits it (of equal rooms, the one that got that room first), else a new row.
pub fn pack_bfd(sequences: Vec<SftSequence>, seq_length: usize) -> Vec<SftRow> {
    use std::collections::{BTreeSet, HashMap, VecDeque};
    let mut out = Vec::new();
    let mut rest = sequences.into_iter().filter(|s| !s.input_ids.is_empty()).peekable();
    while rest.peek().is_some() {
        let mut chunk: Vec<SftSequence> = rest.by_ref().take(MAP_BATCH).collect();
        for sequence in &mut chunk {
            sequence.input_ids.truncate(seq_length);
            sequence.labels.truncate(seq_length);
        }
        let mut order: Vec<usize> = (0..chunk.len()).collect();
        order.sort_by(|&a, &b| chunk[b].input_ids.len().cmp(&chunk[a].input_ids.len())); // stable
                                                                                         // rooms left in open rows, and which rows have each (first come, first served)
        let mut rooms = BTreeSet::from([seq_length]);
        let mut rows_with_room: HashMap<usize, VecDeque<usize>> = HashMap::new();
        let mut bins: Vec<Vec<usize>> = Vec::new();
        for index in order {
            let length = chunk[index].input_ids.len();
            let room = *rooms.range(length..).next().expect("an empty row always fits");
            let bin = if room < seq_length {
                let waiting = rows_with_room.get_mut(&room).expect("a row has this room");
                let bin = waiting.pop_front().expect("a row has this room");
                if waiting.is_empty() {
                    rooms.remove(&room);
                }
                bin
            } else {
                bins.push(Vec::new());
                bins.len() - 1
            };
            bins[bin].push(index);
            let left = room - length;
            rows_with_room.entry(left).or_default().push_back(bin);
            if left > 0 {
                rooms.insert(left);
            }
        }
        for bin in bins {
            let mut row =
                SftRow { input_ids: Vec::new(), labels: Vec::new(), seq_lengths: Vec::new(), sources: Vec::new() };
            for index in bin {
                let sequence = &chunk[index];
                row.input_ids.extend(&sequence.input_ids);
                row.labels.extend(&sequence.labels);
                row.seq_lengths.push(sequence.input_ids.len());
                row.sources.push(sequence.location.clone());
            }
            out.push(row);
        }
    }
    out
}

/// TRL's `pack_dataset(strategy="wrapped")`: in each thousand sequences, every token in order, cut into rows of
/// `seq_length` (the last of each thousand shorter). A row is one sequence to the model: it attends across the
/// boundaries of the sequences it holds, whose labels it keeps.
pub fn pack_wrapped(sequences: &[SftSequence], seq_length: usize) -> Vec<SftRow> {
    let mut out = Vec::new();
    for chunk in sequences.chunks(MAP_BATCH) {
        let ids: Vec<i64> = chunk.iter().flat_map(|s| s.input_ids.iter().copied()).collect();
        let labels: Vec<i64> = chunk.iter().flat_map(|s| s.labels.iter().copied()).collect();
        // the sequence each token came from, for messages
        let owners: Vec<usize> =
            chunk.iter().enumerate().flat_map(|(i, s)| std::iter::repeat_n(i, s.input_ids.len())).collect();
        for start in (0..ids.len()).step_by(seq_length.max(1)) {
            let end = (start + seq_length).min(ids.len());
            let mut sources: Vec<String> = Vec::new();
            for &owner in &owners[start..end] {
                if sources.last() != Some(&chunk[owner].location) {
                    sources.push(chunk[owner].location.clone());
                }
            }
            out.push(SftRow {
                input_ids: ids[start..end].to_vec(),
                labels: labels[start..end].to_vec(),
                seq_lengths: vec![end - start],
                sources,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfd_packs_trls_docstring_example() {
        // trl.data_utils.pack_dataset's example: [[1..5], [6, 7], [8, 9, 10], [11]] at seq_length 4
        let sequences: Vec<SftSequence> = [vec![1, 2, 3, 4, 5], vec![6, 7], vec![8, 9, 10], vec![11], vec![]]
            .into_iter()
            .enumerate()
            .map(|(i, ids)| SftSequence { location: format!("row {i}"), labels: ids.clone(), input_ids: ids })
            .collect();
        let packed = pack_bfd(sequences, 4);
        let rows: Vec<(Vec<i64>, Vec<usize>)> = packed.into_iter().map(|p| (p.input_ids, p.seq_lengths)).collect();
        assert_eq!(rows, [(vec![1, 2, 3, 4], vec![4]), (vec![8, 9, 10, 11], vec![3, 1]), (vec![6, 7], vec![2])]);
    }

    #[test]
    fn wrapped_packing_cuts_the_concatenation_every_seq_length_tokens() {
        // trl.data_utils.pack_dataset(..., strategy="wrapped") on the docstring's rows at seq_length 4 gives
        // [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
        let sequences: Vec<SftSequence> = [vec![1, 2, 3, 4, 5], vec![6, 7], vec![8, 9, 10], vec![11]]
            .into_iter()
            .enumerate()
            .map(|(i, ids)| SftSequence { location: format!("row {i}"), labels: ids.clone(), input_ids: ids })
            .collect();
        let packed = pack_wrapped(&sequences, 4);
        let rows: Vec<Vec<i64>> = packed.iter().map(|p| p.input_ids.clone()).collect();
        assert_eq!(rows, [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10, 11]]);
        assert_eq!(packed[1].sources, ["row 0", "row 1", "row 2"]);
        assert!(packed.iter().all(|p| p.seq_lengths == [p.input_ids.len()]));
    }
}
