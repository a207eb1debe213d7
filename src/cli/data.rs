//! Dataset flags shared by every subcommand that reads preference data, and `prefalign data inspect`.

use crate::data::collate::TruncationMode;
use crate::data::hub;
use crate::data::pack::{Batching, PackOptions};
use crate::data::prepare::{prepare, tokenize_pairs, PrepareOptions, Prepared, RowFormat, Rules};
use crate::data::source::{read_rows, ReadRows};
use crate::data::tokenize::{PairTokenizer, TokenizedPair};
use crate::model::tokenizer::TextTokenizer;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// detected from the columns, as TRL does
    Auto,
    /// Anthropic HH-RLHF transcripts, cut at the last "\n\nAssistant:"
    HhRlhf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TruncationArg {
    KeepStart,
    KeepEnd,
}

#[derive(Args, Debug, Clone)]
pub struct DatasetArgs {
    /// A .jsonl/.json/.parquet file (optionally .gz), a folder of them, or a Hub dataset "org/name"
    #[arg(long, visible_alias = "dataset-name")]
    pub dataset: String,
    /// Hub dataset configuration (subset)
    #[arg(long)]
    pub dataset_config: Option<String>,
    /// Hub dataset split, optionally sliced as in `datasets`: "train[:300]", "train[300:]", "test[10%:20%]"
    /// (the slice applies to local files too)
    #[arg(long, default_value = "train")]
    pub dataset_split: String,
    #[arg(long, default_value = "prompt")]
    pub prompt_column: String,
    #[arg(long, default_value = "chosen")]
    pub chosen_column: String,
    #[arg(long, default_value = "rejected")]
    pub rejected_column: String,
    /// How rows are read
    #[arg(long, value_enum, default_value = "auto")]
    pub dataset_format: FormatArg,
    /// Skip (and count) rows that cannot be used instead of stopping at the first
    #[arg(long)]
    pub skip_invalid_rows: bool,
    /// Accept empty completions, as TRL does
    #[arg(long)]
    pub allow_empty_completions: bool,
    /// ORPO: keep pairs whose truncated completion is empty (TRL keeps them; their loss is NaN)
    #[arg(long)]
    pub keep_empty_completions: bool,
    /// Longest prompt+completion in tokens
    #[arg(long, value_parser = crate::cli::values::max_length, default_value_t = 1024)]
    pub max_length: usize,
    #[arg(long, value_enum, default_value = "keep-start")]
    pub truncation_mode: TruncationArg,
    /// Use only the first N rows
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DatasetArgs {
    pub fn truncation_mode(&self) -> TruncationMode {
        match self.truncation_mode {
            TruncationArg::KeepStart => TruncationMode::KeepStart,
            TruncationArg::KeepEnd => TruncationMode::KeepEnd,
        }
    }

    /// The rows of the dataset, from a local path or the Hub.
    pub fn read(&self) -> Result<ReadRows> {
        let (split, slice) = parse_split(&self.dataset_split)?;
        let mut read = if Path::new(&self.dataset).exists() || !hub::looks_like_repo_id(&self.dataset) {
            read_rows(Path::new(&self.dataset))?
        } else {
            let mut all = ReadRows::default();
            let files =
                hub::dataset_files(&hub::HubSettings::from_env(), &self.dataset, self.dataset_config.as_deref(), split)
                    .with_context(|| {
                        format!("{} is no local path, so it was read as a Hub dataset id", self.dataset)
                    })?;
            for file in files {
                let part = read_rows(&file)?;
                all.rows.extend(part.rows);
                all.invalid.extend(part.invalid);
            }
            all
        };
        if let Some((start, end)) = slice {
            let len = read.rows.len();
            let (start, end) = (start.resolve(len), end.map_or(len, |e| e.resolve(len)));
            read.rows = read.rows.drain(..).skip(start).take(end.saturating_sub(start)).collect();
        }
        if let Some(limit) = self.limit {
            read.rows.truncate(limit);
        }
        if read.rows.is_empty() && read.invalid.is_empty() {
            bail!("dataset {} has no rows", self.dataset);
        }
        Ok(read)
    }

    pub fn options(&self, rules: Rules) -> PrepareOptions {
        let mut options = PrepareOptions::new(rules);
        options.row_format = match self.dataset_format {
            FormatArg::Auto => RowFormat::Auto,
            FormatArg::HhRlhf => RowFormat::HhRlhf,
        };
        options.columns.prompt = self.prompt_column.clone();
        options.columns.chosen = self.chosen_column.clone();
        options.columns.rejected = self.rejected_column.clone();
        options.max_length = Some(self.max_length);
        options.truncation_mode = self.truncation_mode();
        options.skip_invalid_rows = self.skip_invalid_rows;
        options.validation.allow_empty_completions = self.allow_empty_completions;
        options.keep_empty_completions = self.keep_empty_completions;
        options
    }

    /// How these pairs are batched for `rules` (the truncation at collation is DPO's alone).
    pub fn batching(&self, rules: Rules, pad_id: i64, layout: PackOptions) -> Batching {
        Batching { pad_id, truncation: rules.truncation_at_collation(self.max_length, self.truncation_mode()), layout }
    }

    /// Reads and tokenizes the dataset for `rules`.
    pub fn prepare(&self, tokenizer: &TextTokenizer, rules: Rules) -> Result<Prepared> {
        let tok = PairTokenizer::new(tokenizer)?;
        prepare(self.read()?, &tok, &self.options(rules))
    }
}

/// A slice bound: a row index or a percentage of the rows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bound {
    Row(usize),
    Percent(f64),
}

impl Bound {
    fn resolve(self, len: usize) -> usize {
        match self {
            Bound::Row(i) => i.min(len),
            Bound::Percent(p) => ((p / 100.0 * len as f64).round() as usize).min(len),
        }
    }
}

/// A split's slice: its start and, if given, its end.
type Slice = (Bound, Option<Bound>);

/// "train[300:]" -> ("train", Some((300, None))), as `datasets` slices splits.
fn parse_split(spec: &str) -> Result<(&str, Option<Slice>)> {
    let Some((name, rest)) = spec.split_once('[') else { return Ok((spec, None)) };
    let inner = rest.strip_suffix(']').with_context(|| format!("split \"{spec}\": missing ']'"))?;
    let bound = |text: &str| -> Result<Option<Bound>> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let bound = match text.strip_suffix('%') {
            Some(p) => Bound::Percent(p.parse().with_context(|| format!("split \"{spec}\": bad percentage {text:?}"))?),
            None => Bound::Row(text.parse().with_context(|| format!("split \"{spec}\": bad row index {text:?}"))?),
        };
        Ok(Some(bound))
    };
    let (start, end) = inner.split_once(':').with_context(|| format!("split \"{spec}\": expected [start:end]"))?;
    Ok((name, Some((bound(start)?.unwrap_or(Bound::Row(0)), bound(end)?))))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RulesArg {
    Dpo,
    Orpo,
}

impl RulesArg {
    pub fn rules(self) -> Rules {
        match self {
            RulesArg::Dpo => Rules::Dpo,
            RulesArg::Orpo => Rules::Orpo,
        }
    }
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    data: DatasetArgs,
    /// The model whose tokenizer and chat template apply (a Hugging Face folder, a .gguf file or a Hub id)
    #[arg(long, visible_alias = "model-name-or-path")]
    model: String,
    /// Whose tokenization rules to apply
    #[arg(long, value_enum, default_value = "dpo")]
    trainer: RulesArg,
    /// How many examples to print
    #[arg(long, default_value_t = 2)]
    examples: usize,
}

fn percentiles(mut lengths: Vec<usize>) -> String {
    lengths.sort_unstable();
    let at = |q: f64| lengths[((lengths.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {:>5}  p50 {:>5}  p90 {:>5}  p99 {:>5}  max {:>5}",
        lengths[0],
        at(0.5),
        at(0.9),
        at(0.99),
        lengths[lengths.len() - 1]
    )
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let tokenizer = crate::model::load_tokenizer(&crate::cli::resolve_model(&args.model)?)?;
    let rules = args.trainer.rules();
    let prepared = args.data.prepare(&tokenizer, rules)?;
    let report = &prepared.report;
    println!("dataset      {}", args.data.dataset);
    println!("rows read    {}", report.rows_read);
    println!("format       {}", report.format.map_or("unknown", |f| f.name()));
    println!("pairs kept   {}", prepared.pairs.len());
    println!("invalid      {} (skipped)", report.invalid.len());
    for invalid in report.invalid.iter().take(5) {
        println!("  {invalid}");
    }
    println!(
        "dropped      {} by the {} rules at max_length {}",
        report.dropped.len(),
        rules.name(),
        args.data.max_length
    );
    for dropped in report.dropped.iter().take(5) {
        println!("  {}: {}", dropped.location, dropped.reason);
    }
    println!("truncated    {} pairs have a sequence longer than max_length {}", report.truncated, args.data.max_length);
    let pairs = &prepared.pairs;
    println!("tokens       (prompt / chosen / rejected completion)");
    println!("  prompt     {}", percentiles(pairs.iter().map(|p| p.prompt_ids.len()).collect()));
    println!("  chosen     {}", percentiles(pairs.iter().map(|p| p.chosen.completion().len()).collect()));
    println!("  rejected   {}", percentiles(pairs.iter().map(|p| p.rejected.completion().len()).collect()));
    for pair in pairs.iter().take(args.examples) {
        print_example(&tokenizer, pair)?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    data: DatasetArgs,
    /// The JSONL file to write: one {"prompt", "chosen", "rejected"} object per pair (text or message lists)
    #[arg(long)]
    output: PathBuf,
    /// Tokenize with this model's tokenizer and chat template and leave out the pairs that --trainer's rules drop at
    /// --max-length, so that the file holds exactly the pairs a run trains on (a Hugging Face folder, a .gguf file or
    /// a Hub id)
    #[arg(long, visible_alias = "model-name-or-path")]
    model: Option<String>,
    /// Whose tokenization rules decide the drops (with --model)
    #[arg(long, value_enum, default_value = "dpo", requires = "model")]
    trainer: RulesArg,
}

pub fn export(args: ExportArgs) -> Result<()> {
    let options = args.data.options(args.trainer.rules());
    let (mut pairs, mut report) = crate::data::prepare::to_pairs(args.data.read()?, &options);
    report.check_invalid(args.data.skip_invalid_rows)?;
    if let Some(model) = &args.model {
        let tokenizer = crate::model::load_tokenizer(&crate::cli::resolve_model(model)?)?;
        let (kept, tokenized) = tokenize_pairs(&pairs, report, &PairTokenizer::new(&tokenizer)?, &options)?;
        report = tokenized;
        let mut keep = vec![false; pairs.len()];
        for (index, _) in &kept {
            keep[*index] = true;
        }
        let mut keep = keep.into_iter();
        pairs.retain(|_| keep.next() == Some(true));
    }
    let turns = |t: &crate::data::example::Turns| match t {
        crate::data::example::Turns::Text(text) => serde_json::Value::from(text.as_str()),
        crate::data::example::Turns::Messages(messages) => serde_json::to_value(messages).expect("messages serialize"),
    };
    crate::files::write_atomically(&args.output, |tmp| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        for pair in &pairs {
            let mut row = serde_json::Map::new();
            if let Some(prompt) = &pair.prompt {
                row.insert("prompt".into(), turns(prompt));
            }
            row.insert("chosen".into(), turns(&pair.chosen));
            row.insert("rejected".into(), turns(&pair.rejected));
            writeln!(out, "{}", serde_json::Value::Object(row))?;
        }
        Ok(out.flush()?)
    })?;
    let dropped = match &args.model {
        Some(_) => format!(
            ", {} dropped by the {} rules at max_length {}",
            report.dropped.len(),
            args.trainer.rules().name(),
            args.data.max_length
        ),
        None => String::new(),
    };
    eprintln!(
        "wrote {} pairs to {} ({} invalid rows skipped{dropped})",
        pairs.len(),
        args.output.display(),
        report.invalid.len()
    );
    Ok(())
}

fn print_example(tokenizer: &TextTokenizer, pair: &TokenizedPair) -> Result<()> {
    println!("\n--- {} ---", pair.location);
    println!("[prompt]\n{}", tokenizer.decode(&pair.chosen.ids[..pair.chosen.prompt_len], false)?);
    println!("[chosen]\n{}", tokenizer.decode(pair.chosen.completion(), false)?);
    println!("[rejected]\n{}", tokenizer.decode(pair.rejected.completion(), false)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_slices_like_datasets() {
        assert_eq!(parse_split("train").unwrap(), ("train", None));
        assert_eq!(parse_split("train[300:]").unwrap(), ("train", Some((Bound::Row(300), None))));
        assert_eq!(parse_split("test[:10%]").unwrap(), ("test", Some((Bound::Row(0), Some(Bound::Percent(10.0))))));
        assert_eq!(Bound::Percent(10.0).resolve(2312), 231);
        assert!(parse_split("train[3").is_err());
        assert!(parse_split("train[a:]").is_err());
    }
}
