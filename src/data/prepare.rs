//! The whole data path for one objective: rows -> pairs (format detection or the HH-RLHF converter) -> token
//! ids by TRL's rules -> TRL's drops. Nothing disappears silently: invalid rows fail the run (or, with
//! `skip_invalid_rows`, are counted), and every dropped pair is listed with its reason.

use crate::data::collate::TruncationMode;
use crate::data::example::{detect_format, parse_row, Columns, DatasetFormat, PreferencePair, Turns, Validation};
use crate::data::hh_rlhf;
use crate::data::invalid::InvalidRow;
use crate::data::source::ReadRows;
use crate::data::tokenize::{
    cut_dpo_legacy, cut_orpo_legacy, tokenize_dpo, tokenize_orpo, with_prompt, PairTokenizer, TokenizedPair,
};
use anyhow::{bail, Result};

/// Whose tokenization rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    /// DPOTrainer (also CPO/SimPO-style objectives that share its data path)
    Dpo,
    /// ORPOTrainer
    Orpo,
}

impl Rules {
    pub fn name(self) -> &'static str {
        match self {
            Rules::Dpo => "DPO",
            Rules::Orpo => "ORPO",
        }
    }

    /// The truncation a batch of these pairs gets at collation: DPO's collator truncates to `max_length`; ORPO's
    /// pairs arrive truncated.
    pub fn truncation_at_collation(self, max_length: usize, mode: TruncationMode) -> Option<(usize, TruncationMode)> {
        match self {
            Rules::Dpo => Some((max_length, mode)),
            Rules::Orpo => None,
        }
    }
}

/// How rows are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// detected from the columns, as TRL does
    Auto,
    /// Anthropic HH-RLHF transcripts, cut at the last assistant turn
    HhRlhf,
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub rules: Rules,
    pub row_format: RowFormat,
    pub columns: Columns,
    /// `None`: no truncation and no drop (DPO); ORPO uses 512 then, as TRL does.
    pub max_length: Option<usize>,
    pub truncation_mode: TruncationMode,
    /// TRL ≤ 0.2x's `max_prompt_length` / `max_completion_length` (`cut_dpo_legacy`, `cut_orpo_legacy`)
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: Option<usize>,
    pub skip_invalid_rows: bool,
    pub validation: Validation,
    /// ORPO: keep pairs whose completion truncation empties (TRL keeps them; their loss is NaN).
    pub keep_empty_completions: bool,
}

impl PrepareOptions {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            row_format: RowFormat::Auto,
            columns: Columns::default(),
            max_length: Some(1024),
            truncation_mode: TruncationMode::KeepStart,
            max_prompt_length: None,
            max_completion_length: None,
            skip_invalid_rows: false,
            validation: Validation::default(),
            keep_empty_completions: false,
        }
    }
}

/// A pair left out by a trainer's rules, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub location: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct PrepareReport {
    pub rows_read: usize,
    pub format: Option<DatasetFormat>,
    /// Rows that could not be used (skipped with `skip_invalid_rows`).
    pub invalid: Vec<InvalidRow>,
    /// Pairs left out: DPO drops those whose prompt fills max_length, as TRL does; ORPO those that truncation
    /// leaves with an empty completion, which TRL keeps and trains on as NaN.
    pub dropped: Vec<Dropped>,
    /// Pairs with at least one completion cut by max_length (at collation for DPO).
    pub truncated: usize,
}

impl PrepareReport {
    /// "N rows read, N invalid skipped, N dropped by the DPO rules", for a one-line summary.
    pub fn counts(&self, rules: Rules) -> String {
        format!(
            "{} rows read, {} invalid skipped, {} dropped by the {} rules",
            self.rows_read,
            self.invalid.len(),
            self.dropped.len(),
            rules.name()
        )
    }

    /// Fails on the first invalid row (naming how many more there are) unless they are to be skipped and counted.
    pub fn check_invalid(&self, skip_invalid_rows: bool) -> Result<()> {
        let Some(first) = self.invalid.first() else { return Ok(()) };
        if skip_invalid_rows {
            return Ok(());
        }
        let more = self.invalid.len() - 1;
        bail!(
            "{first}{}; fix the data or pass --skip-invalid-rows to skip and count such rows",
            if more > 0 { format!(" (and {more} more invalid rows)") } else { String::new() }
        )
    }
}

pub struct Prepared {
    pub pairs: Vec<TokenizedPair>,
    pub report: PrepareReport,
}

/// Rows as preference pairs (before tokenization), with the invalid ones set aside.
pub fn to_pairs(read: ReadRows, options: &PrepareOptions) -> (Vec<PreferencePair>, PrepareReport) {
    let mut report =
        PrepareReport { rows_read: read.rows.len() + read.invalid.len(), invalid: read.invalid, ..Default::default() };
    let mut pairs = Vec::new();
    let format = read.rows.first().map(|first| detect_format(first, &options.columns));
    for row in &read.rows {
        let parsed = match (options.row_format, format) {
            (RowFormat::HhRlhf, _) => hh_rlhf::convert_row(row, &options.columns),
            (RowFormat::Auto, Some(format)) => parse_row(row, format, &options.columns, options.validation),
            (RowFormat::Auto, None) => unreachable!("there is a first row"),
        };
        match parsed {
            Ok(pair) => pairs.push(pair),
            Err(invalid) => report.invalid.push(invalid),
        }
    }
    report.format = match options.row_format {
        RowFormat::HhRlhf => Some(DatasetFormat::Conversational),
        RowFormat::Auto => format,
    };
    (pairs, report)
}

/// Reads, validates and tokenizes a dataset for `options.rules`.
pub fn prepare(read: ReadRows, tok: &PairTokenizer, options: &PrepareOptions) -> Result<Prepared> {
    let (pairs, report) = to_pairs(read, options);
    let (kept, report) = tokenize_pairs(&pairs, report, tok, options)?;
    Ok(Prepared { pairs: kept.into_iter().map(|(_, pair)| pair).collect(), report })
}

/// Tokenizes `pairs` by `options.rules` and applies TRL's drops, adding to `report`: the kept pairs, each with
/// its index in `pairs`.
pub fn tokenize_pairs(
    pairs: &[PreferencePair],
    mut report: PrepareReport,
    tok: &PairTokenizer,
    options: &PrepareOptions,
) -> Result<(Vec<(usize, TokenizedPair)>, PrepareReport)> {
    let mut tokenized = Vec::with_capacity(pairs.len());
    for (index, pair) in pairs.iter().enumerate() {
        let result = with_prompt(pair).and_then(|pair| {
            if let Some(reason) = prompt_too_long_to_tokenize(&pair, tok, options) {
                return Ok(Err(Dropped { location: pair.location.clone(), reason }));
            }
            let max_length = options.max_length.unwrap_or(512);
            match (options.rules, options.max_prompt_length) {
                (Rules::Dpo, _) => tokenize_dpo(&pair, tok).map(|mut pair| {
                    cut_dpo_legacy(&mut pair, options.max_prompt_length, options.max_completion_length);
                    pair
                }),
                (Rules::Orpo, Some(max_prompt)) => tokenize_orpo(&pair, tok, usize::MAX).map(|mut pair| {
                    cut_orpo_legacy(&mut pair, max_length, max_prompt, options.truncation_mode);
                    pair
                }),
                (Rules::Orpo, None) => tokenize_orpo(&pair, tok, max_length),
            }
            .map(Ok)
        });
        match result {
            Ok(t) => tokenized.push((index, t)),
            Err(reason) => report.invalid.push(InvalidRow { location: pair.location.clone(), reason }),
        }
    }
    report.check_invalid(options.skip_invalid_rows)?;
    let mut kept = Vec::with_capacity(tokenized.len());
    for (index, pair) in tokenized {
        let pair = match pair {
            Ok(pair) => pair,
            Err(dropped) => {
                report.dropped.push(dropped);
                continue;
            }
        };
        match drop_reason(&pair, options) {
            Some(reason) => report.dropped.push(Dropped { location: pair.location.clone(), reason }),
            None => {
                let limit = options.max_length.unwrap_or(usize::MAX);
                report.truncated += usize::from(pair.chosen.ids.len() > limit || pair.rejected.ids.len() > limit);
                kept.push((index, pair));
            }
        }
    }
    if kept.is_empty() {
        let hint = match (options.max_length, report.dropped.first()) {
            (Some(max), Some(first)) if report.invalid.is_empty() => format!(
                "; every pair was dropped at max_length {max} (the first, {}: {}): raise --max-length",
                first.location, first.reason
            ),
            _ => String::new(),
        };
        bail!(
            "no usable preference pairs ({} rows read, {} invalid, {} dropped){hint}",
            report.rows_read,
            report.invalid.len(),
            report.dropped.len()
        );
    }
    Ok((kept, report))
}

/// Whether the pair's prompt is so long that the pair would be dropped for length whatever its tokens: then it is
/// dropped before it is tokenized, which for a row of megabytes would take minutes and gigabytes. A text of n bytes
/// has at least n / (the longest token's bytes) tokens.
fn prompt_too_long_to_tokenize(pair: &PreferencePair, tok: &PairTokenizer, options: &PrepareOptions) -> Option<String> {
    let max = options.max_length?;
    let drops_long_prompts = match options.rules {
        _ if options.max_prompt_length.is_some() => false, // the prompt is cut instead
        Rules::Dpo => options.truncation_mode == TruncationMode::KeepStart,
        Rules::Orpo => !options.keep_empty_completions,
    };
    let bytes = match pair.prompt.as_ref()? {
        // trimmed: a chat template may trim what it renders
        Turns::Text(text) => text.trim().len(),
        Turns::Messages(messages) => messages.iter().map(|m| m.content.trim().len()).sum(),
    };
    let at_least = bytes / tok.longest_token_bytes().max(1);
    // one token of slack: ORPO's prompt may lose its last token to the answer
    (drops_long_prompts && at_least > max).then(|| {
        format!(
            "the prompt is {bytes} bytes, so at least {at_least} tokens, more than max_length ({max}); not tokenized"
        )
    })
}

fn drop_reason(pair: &TokenizedPair, options: &PrepareOptions) -> Option<String> {
    match (options.rules, options.max_length) {
        // DPOTrainer's filter: with keep_start, a prompt that fills max_length leaves nothing to score.
        (Rules::Dpo, Some(max))
            if options.truncation_mode == TruncationMode::KeepStart && pair.prompt_ids.len() >= max =>
        {
            Some(format!("the prompt has {} tokens, at least max_length ({max})", pair.prompt_ids.len()))
        }
        (Rules::Orpo, _)
            if !options.keep_empty_completions
                && (pair.chosen.completion().is_empty() || pair.rejected.completion().is_empty()) =>
        {
            Some("truncation to max_length leaves an empty completion (TRL would train on a NaN loss)".into())
        }
        _ => None,
    }
}
