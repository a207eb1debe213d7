//! A YAML recipe given to `prefalign dpo --config`: its keys mapped to flags and parsed with the flags' checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = prefalign_fuzz::scratch_file("recipe.yaml", data);
    for command in ["dpo", "orpo", "cpo"] {
        let _ = prefalign::cli::parse_args(
            ["prefalign", command, "--config", path.to_str().unwrap()].map(Into::into).to_vec(),
        );
    }
});
