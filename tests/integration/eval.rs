//! `evaluate` against TRL 1.16 on tiny models (fixtures: tools/fixtures/make_eval_fixtures.py): per-example
//! summed (DPO) and averaged (ORPO) completion log-probs, and the metrics of `Trainer.evaluate()`.

use crate::common::fixture;
use prefalign::data::collate::TruncationMode;
use prefalign::data::pack::{Batching, PackOptions};
use prefalign::data::prepare::{prepare, PrepareOptions, Rules};
use prefalign::data::source::read_rows;
use prefalign::data::tokenize::PairTokenizer;
use prefalign::model::lm_head::Precision;
use prefalign::model::{self, tokenizer::TextTokenizer};
use prefalign::objective::{DpoParams, Objective, OrpoParams};
use prefalign::train::evaluate::{evaluate, EvalOptions, EvalReference};
use serde_json::Value;
use tch::{Device, Kind};

fn close(ours: f64, theirs: f64, what: &str) {
    let tolerance = 1e-4 * theirs.abs().max(1.0);
    assert!((ours - theirs).abs() <= tolerance, "{what}: ours {ours}, TRL {theirs}");
}

fn check(trainer: &str, data: &str) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("eval/{trainer}_{data}.json"))).unwrap())
            .unwrap();
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let (rules, objective) = if trainer == "dpo" {
        (Rules::Dpo, Objective::Dpo(DpoParams::default()))
    } else {
        (Rules::Orpo, Objective::Orpo(OrpoParams::default()))
    };
    let mut options = PrepareOptions::new(rules);
    options.max_length = Some(64);
    options.validation.allow_empty_completions = true;
    let prepared = prepare(read_rows(&fixture(&format!("trl_data/{data}.jsonl"))).unwrap(), &tok, &options).unwrap();
    let policy = model::load(&fixture("eval/tiny_policy"), Device::Cpu, Kind::Float).unwrap();
    let reference =
        (trainer == "dpo").then(|| model::load(&fixture("eval/tiny_ref"), Device::Cpu, Kind::Float).unwrap());
    let batching = Batching {
        pad_id: 2,
        truncation: rules.truncation_at_collation(64, TruncationMode::KeepStart),
        layout: PackOptions::TRL,
    };
    let eval_options = EvalOptions { batch_size: 4, batching, precision: Precision::default() };
    let result = evaluate(
        &policy.model,
        reference.as_ref().map(|r| EvalReference::Model(&r.model)),
        &prepared.pairs,
        &objective,
        &eval_options,
    );

    // ORPO rows whose completion truncation empties are dropped by default (TRL would score NaN for them).
    let rows: Vec<&Value> =
        expected["rows"].as_array().unwrap().iter().filter(|r| !r["chosen_logps"].is_null()).collect();
    assert_eq!(result.examples.len(), rows.len(), "{trainer}_{data}: examples");
    for (ours, row) in result.examples.iter().zip(&rows) {
        let at = format!("{trainer}_{data} {}", ours.location);
        let (c, r) = if trainer == "dpo" {
            (ours.chosen_logps, ours.rejected_logps)
        } else {
            (ours.chosen_logps_avg, ours.rejected_logps_avg)
        };
        close(c, row["chosen_logps"].as_f64().unwrap(), &format!("{at} chosen_logps"));
        close(r, row["rejected_logps"].as_f64().unwrap(), &format!("{at} rejected_logps"));
        assert_eq!(ours.chosen_tokens, row["chosen_tokens"].as_i64().unwrap(), "{at} chosen_tokens");
        assert_eq!(ours.rejected_tokens, row["rejected_tokens"].as_i64().unwrap(), "{at} rejected_tokens");
        if trainer == "dpo" {
            close(
                ours.ref_chosen_logps.unwrap(),
                row["ref_chosen_logps"].as_f64().unwrap(),
                &format!("{at} ref_chosen_logps"),
            );
            close(
                ours.ref_rejected_logps.unwrap(),
                row["ref_rejected_logps"].as_f64().unwrap(),
                &format!("{at} ref_rejected_logps"),
            );
        }
    }
    let metrics = if trainer == "dpo" { &expected["metrics"] } else { &expected["metrics_without_nan_rows"] };
    let mut compared = 0;
    for (name, value) in metrics.as_object().unwrap() {
        let Some(theirs) = value.as_f64() else { continue };
        if ["epoch", "eval_num_tokens"].contains(&name.as_str()) {
            continue; // not evaluation quantities
        }
        let ours = *result.metrics.get(name).unwrap_or_else(|| panic!("{trainer}_{data}: metric {name} missing"));
        close(ours, theirs, &format!("{trainer}_{data} {name}"));
        compared += 1;
    }
    assert!(compared >= 10, "{compared} metrics compared");
}

#[test]
fn dpo_standard_matches_trl() {
    check("dpo", "standard");
}

#[test]
fn dpo_conversational_matches_trl() {
    check("dpo", "conversational");
}

#[test]
fn orpo_standard_matches_trl() {
    check("orpo", "standard");
}

#[test]
fn orpo_conversational_matches_trl() {
    check("orpo", "conversational");
}
