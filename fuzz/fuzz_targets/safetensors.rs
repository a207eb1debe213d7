//! A safetensors file: its header, and every tensor it lists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefalign::model::weights::{SafetensorsFiles, WeightSource};

fuzz_target!(|data: &[u8]| {
    let path = prefalign_fuzz::scratch_file("model.safetensors", data);
    if let Ok(files) = SafetensorsFiles::open_dir_file(&path) {
        for name in files.names() {
            let _ = files.tensor(&name);
        }
    }
});
