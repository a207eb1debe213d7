//! A folder written by `datasets`' save_to_disk: its Arrow IPC stream file read as JSON rows, and the pairs they
//! make.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefalign::data::prepare::{to_pairs, PrepareOptions, Rules};
use prefalign::data::saved::read_saved;

const STATE: &[u8] = br#"{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}"#;

fuzz_target!(|data: &[u8]| {
    prefalign_fuzz::silence_parquet_panics(); // arrow's panics are caught and reported the same way
    prefalign_fuzz::scratch_file("state.json", STATE);
    let path = prefalign_fuzz::scratch_file("data-00000-of-00001.arrow", data);
    if let Ok(read) = read_saved(path.parent().expect("scratch folder"), "train") {
        let _ = to_pairs(read, &PrepareOptions::new(Rules::Dpo));
    }
});
