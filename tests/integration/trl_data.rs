//! Token ids and batches identical to TRL 1.16's for every row of the fixture datasets, in all formats and for
//! both trainers (fixtures: tools/fixtures/make_trl_data_fixtures.py; rules: docs/TRL_DATA_SPEC.md).

use crate::common::{fixture, to_vec_i64};
use prefalign::data::collate::{collate, TruncationMode};
use prefalign::data::prepare::{prepare, PrepareOptions, Rules};
use prefalign::data::source::read_rows;
use prefalign::data::tokenize::{PairTokenizer, TokenizedPair};
use prefalign::model::tokenizer::TextTokenizer;
use serde_json::Value;

fn ids(value: &Value) -> Vec<i64> {
    value.as_array().unwrap_or_else(|| panic!("not a list: {value}")).iter().map(|v| v.as_i64().unwrap()).collect()
}

fn matrix(value: &Value) -> Vec<Vec<i64>> {
    value.as_array().unwrap().iter().map(ids).collect()
}

fn tensor_rows(t: &tch::Tensor) -> Vec<Vec<i64>> {
    (0..t.size()[0]).map(|i| to_vec_i64(&t.get(i))).collect()
}

/// Row number (0-based) of a `file:line` location.
fn row_index(location: &str) -> i64 {
    location.rsplit(':').next().unwrap().parse::<i64>().unwrap() - 1
}

fn check(trainer: &str, data: &str, truncation_mode: TruncationMode) {
    let name = match truncation_mode {
        TruncationMode::KeepStart => format!("{trainer}_{data}"),
        TruncationMode::KeepEnd => format!("{trainer}_{data}_keep_end"),
    };
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("trl_data/{name}.json"))).unwrap()).unwrap();
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let rules = if trainer == "dpo" { Rules::Dpo } else { Rules::Orpo };
    let mut options = PrepareOptions::new(rules);
    options.max_length = Some(expected["settings"]["max_length"].as_u64().unwrap() as usize);
    options.truncation_mode = truncation_mode;
    options.validation.allow_empty_completions = true; // TRL accepts an empty completion (standard row 5)
    options.keep_empty_completions = true; // TRL keeps ORPO rows whose completion truncation empties
    let read = read_rows(&fixture(&format!("trl_data/{data}.jsonl"))).unwrap();
    let prepared = prepare(read, &tok, &options).unwrap_or_else(|e| panic!("{name}: {e:#}"));

    let dropped: Vec<i64> = prepared.report.dropped.iter().map(|d| row_index(&d.location)).collect();
    assert_eq!(dropped, ids(&expected["dropped"]), "{name}: dropped rows");
    let rows = expected["rows"].as_array().unwrap();
    assert_eq!(prepared.pairs.len(), rows.len(), "{name}: kept rows");
    for (pair, row) in prepared.pairs.iter().zip(rows) {
        let index = row["row_index"].as_i64().unwrap();
        assert_eq!(row_index(&pair.location), index);
        let at = format!("{name} row {index}");
        if trainer == "dpo" {
            assert_eq!(pair.prompt_ids, ids(&row["prompt_ids"]), "{at}: prompt_ids");
            assert_eq!(pair.chosen.completion(), ids(&row["chosen_ids"]), "{at}: chosen_ids");
            assert_eq!(pair.rejected.completion(), ids(&row["rejected_ids"]), "{at}: rejected_ids");
            assert_eq!(pair.chosen.ids[..pair.chosen.prompt_len], pair.prompt_ids[..], "{at}: chosen prompt");
        } else {
            assert_eq!(pair.prompt_ids, ids(&row["prompt_input_ids"]), "{at}: prompt_input_ids");
            for (seq, side) in [(&pair.chosen, "chosen"), (&pair.rejected, "rejected")] {
                assert_eq!(seq.ids, ids(&row[format!("{side}_input_ids")]), "{at}: {side}_input_ids");
                let labels: Vec<i64> =
                    seq.ids.iter().enumerate().map(|(i, &id)| if i < seq.prompt_len { -100 } else { id }).collect();
                assert_eq!(labels, ids(&row[format!("{side}_labels")]), "{at}: {side}_labels");
            }
        }
    }

    // Batches of 4 in dataset order (train_sampling_strategy="sequential").
    let batches: Vec<&Value> = std::iter::once(&expected)
        .chain(expected["later_batches"].as_array().map(|b| b.iter()).into_iter().flatten())
        .collect();
    let pad = tokenizer.token_id(tokenizer.pad_token.as_deref().unwrap()).unwrap();
    for (b, want) in batches.iter().enumerate() {
        let chunk: Vec<&TokenizedPair> = prepared.pairs.iter().skip(4 * b).take(4).collect();
        let truncation = match rules {
            Rules::Dpo => Some((options.max_length.unwrap(), truncation_mode)),
            Rules::Orpo => None, // ORPO truncates in tokenize_row
        };
        let batch = collate(&chunk, pad, truncation);
        let at = format!("{name} batch {b}");
        if trainer == "dpo" {
            assert_eq!(tensor_rows(&batch.input_ids), matrix(&want["batch"]["input_ids"]), "{at}: input_ids");
            assert_eq!(
                tensor_rows(&batch.attention_mask),
                matrix(&want["batch"]["attention_mask"]),
                "{at}: attention_mask"
            );
            assert_eq!(
                tensor_rows(&batch.completion_mask),
                matrix(&want["batch"]["completion_mask"]),
                "{at}: completion_mask"
            );
        } else {
            let derived = &want["derived"];
            assert_eq!(tensor_rows(&batch.input_ids), matrix(&derived["concatenated_input_ids"]), "{at}: input_ids");
            assert_eq!(
                tensor_rows(&batch.attention_mask),
                matrix(&derived["concatenated_attention_mask"]),
                "{at}: attention_mask"
            );
            let labels = batch
                .input_ids
                .where_self(&batch.completion_mask.to_kind(tch::Kind::Bool), &tch::Tensor::from(-100i64));
            assert_eq!(tensor_rows(&labels), matrix(&derived["concatenated_labels"]), "{at}: labels");
        }
    }
}

#[test]
fn dpo_standard() {
    check("dpo", "standard", TruncationMode::KeepStart);
}

#[test]
fn dpo_standard_keep_end() {
    check("dpo", "standard", TruncationMode::KeepEnd);
}

#[test]
fn dpo_conversational() {
    check("dpo", "conversational", TruncationMode::KeepStart);
}

#[test]
fn dpo_implicit_standard() {
    check("dpo", "implicit_standard", TruncationMode::KeepStart);
}

#[test]
fn dpo_implicit_conversational() {
    check("dpo", "implicit_conversational", TruncationMode::KeepStart);
}

#[test]
fn orpo_standard() {
    check("orpo", "standard", TruncationMode::KeepStart);
}

#[test]
fn orpo_conversational() {
    check("orpo", "conversational", TruncationMode::KeepStart);
}

#[test]
fn orpo_implicit_standard() {
    check("orpo", "implicit_standard", TruncationMode::KeepStart);
}

#[test]
fn orpo_implicit_conversational() {
    check("orpo", "implicit_conversational", TruncationMode::KeepStart);
}
