//! What the fuzz targets share: the input written to a file (the parsers read files, as users give them), and
//! the fixture tokenizer.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Writes `data` to `name` in this process's scratch folder (in memory where /dev/shm exists) and returns its path.
pub fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        remove_dead_scratch(&base);
        let dir = base.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    });
    let path = dir.join(name);
    std::fs::write(&path, data).expect("scratch file");
    path
}

const SCRATCH_PREFIX: &str = "prefalign-fuzz-";

/// Removes the scratch folders of processes that have ended: fork mode starts a process per job, and a crashing
/// one cannot clean up after itself.
fn remove_dead_scratch(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(SCRATCH_PREFIX) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Silences the panics raised inside the parquet crate, which prefalign catches and reports as errors
/// (`data::source::read_parquet`); any other panic is printed as usual (and is a finding).
pub fn silence_parquet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|l| l.file().contains("/parquet-") || l.file().contains("/arrow-")) {
                default(info);
            }
        }));
    });
}

/// The SmolLM2 tokenizer of the test fixtures (with its chat template).
pub fn tokenizer() -> &'static prefalign::model::tokenizer::TextTokenizer {
    static TOKENIZER: OnceLock<prefalign::model::tokenizer::TextTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trl_data/tokenizer");
        prefalign::model::tokenizer::TextTokenizer::from_hf_dir(&dir).expect("fixture tokenizer")
    })
}
