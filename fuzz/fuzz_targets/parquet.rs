//! A Parquet file of preference rows: reading it as JSON rows, and the pairs they make.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefalign::data::prepare::{to_pairs, PrepareOptions, Rules};
use prefalign::data::source::read_rows;

fuzz_target!(|data: &[u8]| {
    // A panic that escapes prefalign's catch is a finding: libfuzzer-sys aborts on it.
    prefalign_fuzz::silence_parquet_panics();
    let path = prefalign_fuzz::scratch_file("rows.parquet", data);
    if let Ok(read) = read_rows(&path) {
        let _ = to_pairs(read, &PrepareOptions::new(Rules::Dpo));
    }
});
