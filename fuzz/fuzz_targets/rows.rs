//! Rows as JSON Lines, as a JSON array and as CSV: reading, format detection, HH-RLHF transcripts, and TRL's DPO,
//! ORPO, SFT (with both packing strategies) and KTO tokenization through the fixture tokenizer and its chat template.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefalign::data::kto::prepare_kto;
use prefalign::data::prepare::{prepare, PrepareOptions, RowFormat, Rules};
use prefalign::data::sft::{prepare_sft, PackingStrategy, SftOptions};
use prefalign::data::source::read_rows;
use prefalign::data::tokenize::PairTokenizer;

fuzz_target!(|data: &[u8]| {
    let tok = PairTokenizer::new(prefalign_fuzz::tokenizer()).expect("fixture tokenizer");
    for name in ["rows.jsonl", "rows.json", "rows.csv"] {
        let path = prefalign_fuzz::scratch_file(name, data);
        for (rules, row_format) in
            [(Rules::Dpo, RowFormat::Auto), (Rules::Orpo, RowFormat::Auto), (Rules::Dpo, RowFormat::HhRlhf)]
        {
            let Ok(read) = read_rows(&path) else { continue };
            let mut options = PrepareOptions::new(rules);
            options.row_format = row_format;
            options.max_length = Some(64);
            options.skip_invalid_rows = true;
            let _ = prepare(read, &tok, &options);
        }
        for packing_strategy in [PackingStrategy::Bfd, PackingStrategy::Wrapped] {
            let Ok(read) = read_rows(&path) else { continue };
            let options = SftOptions { max_length: Some(64), packing: true, packing_strategy, ..SftOptions::default() };
            let _ = prepare_sft(read, &tok, &options).rows(&options);
        }
        if let Ok(read) = read_rows(&path) {
            let sequences = prepare_kto(read, &tok, Some(64), 3).sequences;
            let _ = prefalign::data::batches::KtoExamples::new(&sequences);
        }
    }
});
