//! SFT and KTO rows become exactly the token ids and labels TRL 1.16's SFTTrainer prepares (tests/fixtures/sft, by
//! tools/fixtures/make_sft_fixtures.py): text, prompt-completion (text and messages, completion-only loss) and
//! messages, with max_length truncation and TRL's drop of rows left without a label.

use crate::common::fixture;
use prefalign::data::collate::TruncationMode;
use prefalign::data::sft::{prepare_sft, SftOptions};
use prefalign::data::source::read_rows;
use prefalign::data::tokenize::PairTokenizer;
use prefalign::model::tokenizer::TextTokenizer;
use serde_json::Value;

fn ids(value: &Value) -> Vec<i64> {
    value.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

#[test]
fn sft_rows_equal_trls_prepared_dataset() {
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    for (name, data) in [
        ("sft_text", "text"),
        ("sft_prompt_completion", "prompt_completion"),
        ("sft_prompt_completion_conversational", "prompt_completion_conversational"),
        ("sft_messages", "messages"),
    ] {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(&format!("sft/{name}.json"))).unwrap()).unwrap();
        let settings = &expected["settings"];
        let options = SftOptions {
            max_length: settings["max_length"].as_u64().map(|m| m as usize),
            truncation_mode: match settings["truncation_mode"].as_str().unwrap() {
                "keep_end" => TruncationMode::KeepEnd,
                _ => TruncationMode::KeepStart,
            },
            ..SftOptions::default()
        };
        let read = read_rows(&fixture(&format!("sft/{data}.jsonl"))).unwrap();
        let prepared = prepare_sft(read, &tok, &options);
        assert!(prepared.invalid.is_empty(), "{name}: {:?}", prepared.invalid);
        let rows = expected["rows"].as_array().unwrap();
        assert_eq!(prepared.sequences.len(), rows.len(), "{name}");
        for (ours, theirs) in prepared.sequences.iter().zip(rows) {
            let line = theirs["row_index"].as_u64().unwrap() + 1;
            assert!(ours.location.ends_with(&format!("{data}.jsonl:{line}")), "{name}: {}", ours.location);
            assert_eq!(ours.input_ids, ids(&theirs["input_ids"]), "{name} {}", ours.location);
            assert_eq!(ours.labels, ids(&theirs["labels"]), "{name} {}", ours.location);
        }
        let dropped: Vec<u64> = expected["dropped"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        let ours: Vec<u64> = prepared
            .dropped
            .iter()
            .map(|d| d.location.rsplit(':').next().unwrap().parse::<u64>().unwrap() - 1)
            .collect();
        assert_eq!(ours, dropped, "{name}");
    }
}

/// Packing (TRL's default `bfd`): the same rows, in the same order, with the same sequences in each, as TRL packs
/// the messages fixture at max_length 96.
#[test]
fn bfd_packing_equals_trls() {
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sft/sft_packing_bfd.json")).unwrap()).unwrap();
    let seq_length = expected["settings"]["max_length"].as_u64().unwrap() as usize;
    // packing cuts sequences itself: no truncation before it
    let options = SftOptions { max_length: None, ..SftOptions::default() };
    let prepared = prepare_sft(read_rows(&fixture("sft/messages.jsonl")).unwrap(), &tok, &options);
    let packed = prefalign::data::sft::pack_bfd(prepared.sequences, seq_length);
    let rows = expected["rows"].as_array().unwrap();
    assert_eq!(packed.len(), rows.len());
    for (ours, theirs) in packed.iter().zip(rows) {
        assert_eq!(ours.input_ids, ids(&theirs["input_ids"]));
        assert_eq!(ours.labels, ids(&theirs["labels"]));
        let lengths: Vec<usize> = ids(&theirs["seq_lengths"]).into_iter().map(|l| l as usize).collect();
        assert_eq!(ours.seq_lengths, lengths);
        let sources: Vec<String> =
            ids(&theirs["source_rows"]).into_iter().map(|r| format!("messages.jsonl:{}", r + 1)).collect();
        assert!(
            ours.sources.iter().zip(&sources).all(|(a, b)| a.ends_with(b.as_str())),
            "{:?} {sources:?}",
            ours.sources
        );
    }
}

/// KTO rows (unpaired, and pairs unpaired by TRL's helper) become TRL 1.16's prompt, completion and mismatched KL
/// completion ids (tests/fixtures/kto, by tools/fixtures/make_kto_fixtures.py).
#[test]
fn kto_rows_equal_trls_prepared_dataset() {
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    for (name, data) in
        [("kto_unpaired_ref_model", "kto/unpaired.jsonl"), ("kto_from_paired", "trl_data/standard.jsonl")]
    {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(&format!("kto/{name}.json"))).unwrap()).unwrap();
        let settings = &expected["settings"];
        let max_length = settings["max_length"].as_u64().map(|m| m as usize);
        let batch_size = settings["per_device_train_batch_size"].as_u64().unwrap() as usize;
        let prepared =
            prefalign::data::kto::prepare_kto(read_rows(&fixture(data)).unwrap(), &tok, max_length, batch_size);
        assert!(prepared.invalid.is_empty() && prepared.dropped.is_empty(), "{name}");
        let rows = expected["rows"].as_array().unwrap();
        assert_eq!(prepared.sequences.len(), rows.len(), "{name}");
        for (ours, theirs) in prepared.sequences.iter().zip(rows) {
            let line = theirs["row_index"].as_u64().unwrap() + 1;
            assert!(ours.location.ends_with(&format!(":{line}")), "{name}: {}", ours.location);
            assert_eq!(ours.label, theirs["label"].as_bool().unwrap(), "{name} {}", ours.location);
            assert_eq!(ours.prompt_ids, ids(&theirs["prompt_ids"]), "{name} {}", ours.location);
            assert_eq!(ours.completion_ids, ids(&theirs["completion_ids"]), "{name} {}", ours.location);
            assert_eq!(ours.kl_completion_ids, ids(&theirs["KL_completion_ids"]), "{name} {}", ours.location);
        }
    }
}

/// `assistant_only_loss`: the loss covers the text of the template's `{% generation %}` blocks, as transformers'
/// assistant mask gives it (the fixture template marks each assistant turn's content and its `<|im_end|>\n`).
#[test]
fn assistant_only_loss_labels_equal_trls() {
    let mut tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    tokenizer.chat_template = Some(std::fs::read_to_string(fixture("sft/chat_template_generation.jinja")).unwrap());
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sft/sft_assistant_only_loss.json")).unwrap()).unwrap();
    let options = SftOptions {
        max_length: expected["settings"]["max_length"].as_u64().map(|m| m as usize),
        assistant_only_loss: true,
        ..SftOptions::default()
    };
    let prepared = prepare_sft(read_rows(&fixture("sft/messages.jsonl")).unwrap(), &tok, &options);
    assert!(prepared.invalid.is_empty(), "{:?}", prepared.invalid);
    let rows = expected["rows"].as_array().unwrap();
    assert_eq!(prepared.sequences.len(), rows.len());
    for (ours, theirs) in prepared.sequences.iter().zip(rows) {
        assert_eq!(ours.input_ids, ids(&theirs["input_ids"]), "{}", ours.location);
        assert_eq!(ours.labels, ids(&theirs["labels"]), "{}", ours.location);
    }
    // the template renders as the fixture tokenizer's own (the generation markers leave no trace)
    let plain = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let messages = [
        prefalign::data::chat_template::Message::new("user", "Hi"),
        prefalign::data::chat_template::Message::new("assistant", "Hello!"),
    ];
    assert_eq!(
        tokenizer.chat_template().unwrap().render(&messages, false).unwrap(),
        plain.chat_template().unwrap().render(&messages, false).unwrap()
    );
}
