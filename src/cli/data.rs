//! Dataset flags shared by every subcommand that reads preference data, and `prefalign data inspect`.

use crate::data::batches::KtoExamples;
use crate::data::collate::TruncationMode;
use crate::data::hub::Selection;
use crate::data::kto::prepare_kto;
use crate::data::mixture::{legacy_mixer, parse_mixer, Mixture};
use crate::data::pack::{Batching, PackOptions};
use crate::data::prepare::{
    prepare, to_pairs, tokenize_pairs, PrepareOptions, PrepareReport, Prepared, RowFormat, Rules,
};
use crate::data::sft::{chosen_as_prompt_completion, prepare_sft, SftOptions, SftRow};
use crate::data::source::{read_dataset, ReadRows};
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
    /// Anthropic HH-RLHF transcripts, cut at the last "\n\nAssistant:" (sft: the prompt and the chosen answer)
    HhRlhf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TruncationArg {
    #[value(alias = "keep_start")]
    KeepStart,
    #[value(alias = "keep_end")]
    KeepEnd,
}

#[derive(Args, Debug, Clone)]
pub struct DatasetArgs {
    /// A .jsonl/.json/.parquet file (optionally .gz), a folder of them (laid out as a Hub repo or not), or a Hub
    /// dataset "org/name"
    #[arg(long, visible_alias = "dataset-name", required_unless_present_any = ["dataset_mixture", "dataset_mixer"])]
    pub dataset: Option<String>,
    /// Dataset configuration (subset): a config of the card's `configs:`, else a folder of the repo
    #[arg(long)]
    pub dataset_config: Option<String>,
    /// A folder of the dataset repo (`datasets`' data_dir, e.g. harmless-base of Anthropic/hh-rlhf): its files,
    /// by split name, instead of the card's configs
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Data files of the dataset (`datasets`' data_files): glob patterns for the train split, comma-separated, or
    /// JSON {"train": "data/train-*.parquet", "test": [...]}; relative to --data-dir when given
    #[arg(long)]
    pub data_files: Option<String>,
    /// The training split, optionally sliced as in `datasets`: "train[:300]", "train[300:]", "test[10%:20%]"
    /// (a single file is one split; its slices apply)
    #[arg(long, visible_alias = "dataset-train-split", default_value = "train")]
    pub dataset_split: String,
    /// The alignment-handbook's mixture, as JSON (a recipe's `dataset_mixture:` mapping): {"datasets": [{"id",
    /// "config", "split", "columns", "weight"}], "seed", "test_split_size"}; replaces --dataset
    #[arg(long, conflicts_with_all = ["dataset", "dataset_mixer"])]
    pub dataset_mixture: Option<String>,
    /// The older handbook's mixer, as JSON: {"org/name": fraction, ...} over --dataset-splits; replaces --dataset
    #[arg(long, conflicts_with = "dataset")]
    pub dataset_mixer: Option<String>,
    /// With --dataset-mixer: the splits to read from each dataset (names holding "train" or "test")
    #[arg(long, value_delimiter = ',')]
    pub dataset_splits: Vec<String>,
    /// With --dataset-mixer: one config per dataset
    #[arg(long, value_delimiter = ',')]
    pub dataset_configs: Vec<String>,
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
    /// As the last TRL versions that had it (≤ 0.2x): DPO keeps the prompt's last N tokens; ORPO and CPO cut the
    /// prompt to N tokens (by --truncation-mode) when prompt + longer completion exceed --max-length, then the
    /// completions to --max-length − N
    #[arg(long, value_parser = crate::cli::values::at_least_one)]
    pub max_prompt_length: Option<usize>,
    /// DPO: keep the first N tokens of each completion (its EOS included), as TRL ≤ 0.2x did; ORPO and CPO: no
    /// effect on decoder-only models, as in TRL 1.16
    #[arg(long, value_parser = crate::cli::values::at_least_one)]
    pub max_completion_length: Option<usize>,
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

    /// What the data is, for messages: the dataset, or the mixture.
    pub fn describe(&self) -> String {
        match (&self.dataset, &self.dataset_mixture) {
            (Some(dataset), _) => dataset.clone(),
            (None, Some(_)) => "the dataset_mixture".into(),
            (None, None) => "the dataset_mixer".into(),
        }
    }

    /// For evaluation on the training dataset's test split (`implicit`: no --eval-dataset was given): refuses a
    /// single file, which is one split (`train`) to `datasets`, unless the split is sliced out of it.
    pub fn check_has_split(&self, implicit: bool) -> Result<()> {
        let (split, slice) = parse_split(&self.dataset_split)?;
        match &self.dataset {
            Some(dataset) if implicit && slice.is_none() && split != "train" && Path::new(dataset).is_file() => bail!(
                "evaluation needs held-out data: {dataset} is a single file (one split, train), so it has no split \
                 \"{split}\"; give --eval-dataset, or --dataset-test-split with a slice of the file (\"train[:100]\", \
                 and --dataset-split \"train[100:]\")"
            ),
            _ => Ok(()),
        }
    }

    /// The rows of the split, from a local path, the Hub or a mixture of datasets.
    pub fn read(&self) -> Result<ReadRows> {
        let (split, slice) = parse_split(&self.dataset_split)?;
        let load = |dataset: &str, config: Option<&str>, split: &str| {
            read_dataset(dataset, &Selection { config, ..Selection::default() }, split)
        };
        let mut read = match (&self.dataset, &self.dataset_mixture, &self.dataset_mixer) {
            (Some(dataset), _, _) => {
                let select = Selection {
                    config: self.dataset_config.as_deref(),
                    data_dir: self.data_dir.as_deref(),
                    data_files: self.data_files.as_deref(),
                };
                read_dataset(dataset, &select, split)?
            }
            (None, mixture, mixer) => {
                let mut splits = match (mixture, mixer) {
                    (Some(json), _) => Mixture::parse(json)?.build(load)?,
                    (None, Some(json)) => {
                        legacy_mixer(&parse_mixer(json)?, &self.dataset_splits, &self.dataset_configs, load)?
                    }
                    (None, None) => bail!("no data: give --dataset (dataset_name), dataset_mixture or dataset_mixer"),
                };
                let names: Vec<String> = splits.keys().cloned().collect();
                splits.remove(split).with_context(|| {
                    format!("{} has no split \"{split}\" (it has: {})", self.describe(), names.join(", "))
                })?
            }
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
            bail!("dataset {} has no rows", self.describe());
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
        options.max_prompt_length = self.max_prompt_length;
        options.max_completion_length = self.max_completion_length;
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

    /// Refuses the flags of preference data for `command` (sft, kto), which reads its own columns.
    pub fn check_no_pair_flags(&self, command: &str) -> Result<()> {
        let given = [
            ("--max-prompt-length", self.max_prompt_length.is_some()),
            ("--max-completion-length", self.max_completion_length.is_some()),
            ("--prompt-column", self.prompt_column != "prompt"),
            ("--chosen-column", self.chosen_column != "chosen"),
            ("--rejected-column", self.rejected_column != "rejected"),
            ("--keep-empty-completions", self.keep_empty_completions),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, given)| *given) {
            bail!("{flag} is a setting of preference data (dpo, orpo, cpo), not of `prefalign {command}`");
        }
        Ok(())
    }

    /// Reads and tokenizes the dataset as TRL's SFTTrainer does (`options`); returns the rows it trains on, each
    /// sequence or (with packing) each pack.
    pub fn prepare_sft(&self, tokenizer: &TextTokenizer, options: &SftOptions) -> Result<Vec<SftRow>> {
        let tok = PairTokenizer::new(tokenizer)?;
        let mut read = self.read()?;
        let rows_read = read.rows.len() + read.invalid.len();
        if let FormatArg::HhRlhf = self.dataset_format {
            // each transcript: the conversation up to the last assistant turn, and the chosen answer
            let (pairs, report) = to_pairs(read, &self.options(Rules::Dpo));
            read = ReadRows { rows: Vec::new(), invalid: report.invalid };
            chosen_as_prompt_completion(&pairs, &mut read);
        }
        let mut prepared = prepare_sft(read, &tok, options);
        let report = PrepareReport {
            rows_read,
            invalid: std::mem::take(&mut prepared.invalid),
            dropped: std::mem::take(&mut prepared.dropped),
            ..PrepareReport::default()
        };
        report.check_invalid(self.skip_invalid_rows)?;
        eprintln!(
            "{} sequences ({rows_read} rows read, {} invalid skipped, {} dropped: no label left after truncation to \
             max_length {})",
            prepared.sequences.len(),
            report.invalid.len(),
            report.dropped.len(),
            self.max_length
        );
        let rows = prepared.rows(options);
        if options.packing {
            eprintln!(
                "packed into {} rows of at most {} tokens ({})",
                rows.len(),
                self.max_length,
                options.packing_strategy.name()
            );
        }
        if rows.is_empty() {
            bail!("no sequence of {} is left to train on", self.describe());
        }
        Ok(rows)
    }

    /// Reads and tokenizes the dataset as TRL's KTOTrainer does (unpaired rows, or pairs unpaired), with the
    /// mismatched completions of the KL estimate rotated within batches of `batch_size`.
    pub fn prepare_kto(&self, tokenizer: &TextTokenizer, batch_size: usize) -> Result<KtoExamples> {
        let tok = PairTokenizer::new(tokenizer)?;
        let read = self.read()?;
        let rows_read = read.rows.len() + read.invalid.len();
        let prepared = prepare_kto(read, &tok, Some(self.max_length), batch_size);
        let report = PrepareReport {
            rows_read,
            invalid: prepared.invalid,
            dropped: prepared.dropped,
            ..PrepareReport::default()
        };
        report.check_invalid(self.skip_invalid_rows)?;
        let desirable = prepared.sequences.iter().filter(|s| s.label).count();
        eprintln!(
            "{} examples, {desirable} desirable and {} undesirable ({rows_read} rows read, {} invalid skipped, {} \
             dropped: prompt of at least max_length {} tokens)",
            prepared.sequences.len(),
            prepared.sequences.len() - desirable,
            report.invalid.len(),
            report.dropped.len(),
            self.max_length
        );
        if prepared.sequences.is_empty() {
            bail!("no example of {} is left to train on", self.describe());
        }
        Ok(KtoExamples::new(&prepared.sequences))
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
    println!("dataset      {}", args.data.describe());
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
