//! Hub downloads against a local server that answers the Hub's URL paths with the Hub's headers (`fake`), and
//! pushes to it (`push`).
//! The tests pass `HubSettings` (what HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE / HF_TOKEN give) instead of setting
//! those variables for the whole test process.

use prefalign::data::hub::{dataset_files, looks_like_repo_id, model_dir, split_files, HubSettings, Selection};
use std::collections::HashMap;
use std::path::Path;

mod fake;

fn sel<'a>(config: Option<&'a str>, data_dir: Option<&'a str>) -> Selection<'a> {
    Selection { config, data_dir, data_files: None }
}
mod push;

use fake::{err_text, read, settings, FakeHub};

const TRAIN: &[u8] = b"{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n";
const TEST: &[u8] = b"{\"prompt\":\"x\",\"chosen\":\"y\",\"rejected\":\"z\"}\n";

fn prefs_hub() -> FakeHub {
    let files: &[(&str, &[u8])] = &[
        ("README.md", b"# prefs"),
        ("data/train-00000-of-00001.jsonl", TRAIN),
        ("data/test-00000-of-00001.jsonl", TEST),
    ];
    FakeHub::default()
        .repo("dataset", "org/prefs", "main", "c0ffee01", files)
        .missing("/api/datasets/org/prefs/revision/refs%2Fconvert%2Fparquet", "RevisionNotFound")
}

#[test]
fn dataset_split_downloads_into_the_python_cache_layout_and_works_offline() {
    let home = tempfile::tempdir().unwrap();
    let server = prefs_hub().serve();
    let mut hub = settings(&server.url(), home.path());

    let files = dataset_files(&hub, "org/prefs", &sel(None, None), "train").unwrap();
    let repo_dir = home.path().join("hub/datasets--org--prefs");
    assert_eq!(files, vec![repo_dir.join("snapshots/c0ffee01/data/train-00000-of-00001.jsonl")]);
    assert_eq!(read(&files[0]), TRAIN);
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), "c0ffee01");
    assert!(std::fs::symlink_metadata(&files[0]).unwrap().file_type().is_symlink(), "snapshots link to blobs/");
    let test = dataset_files(&hub, "org/prefs", &sel(None, None), "test").unwrap();
    assert_eq!(read(&test[0]), TEST);

    // A second call lists the repo again but downloads nothing.
    server.take_log();
    assert_eq!(dataset_files(&hub, "org/prefs", &sel(None, None), "train").unwrap(), files);
    assert_eq!(server.take_log(), vec!["/api/datasets/org/prefs/revision/main"]);

    // Offline, with no server at all: served from the cache.
    drop(server);
    hub.offline = true;
    assert_eq!(dataset_files(&hub, "org/prefs", &sel(None, None), "train").unwrap(), files);
    let text = err_text(dataset_files(&hub, "org/prefs", &sel(None, None), "validation"));
    assert!(text.contains("validation") && text.contains("train") && text.contains("HF_HUB_OFFLINE"), "{text}");
    let text = err_text(dataset_files(&hub, "org/other", &sel(None, None), "train"));
    assert!(text.contains("dataset org/other is not in the cache"), "{text}");
    let text = err_text(model_dir(&hub, "org/tiny", None));
    assert!(text.contains("model org/tiny is not in the cache"), "{text}");
}

#[test]
fn dataset_config_selects_a_folder_of_gzipped_jsonl() {
    let home = tempfile::tempdir().unwrap();
    let files: &[(&str, &[u8])] = &[
        ("harmless-base/train.jsonl.gz", b"harmless train"),
        ("harmless-base/test.jsonl.gz", b"harmless test"),
        ("helpful-base/train.jsonl.gz", b"helpful train"),
    ];
    let server = FakeHub::default().repo("dataset", "org/hh", "main", "abc123", files).serve();
    let hub = settings(&server.url(), home.path());

    let harmless = dataset_files(&hub, "org/hh", &sel(Some("harmless-base"), None), "train").unwrap();
    assert_eq!(harmless.len(), 1);
    assert_eq!(read(&harmless[0]), b"harmless train");
    let all: Vec<Vec<u8>> =
        dataset_files(&hub, "org/hh", &sel(None, None), "train").unwrap().iter().map(|p| read(p)).collect();
    assert_eq!(all, vec![b"harmless train".to_vec(), b"helpful train".to_vec()]);
}

#[test]
fn dataset_without_matching_files_falls_back_to_the_parquet_conversion() {
    let home = tempfile::tempdir().unwrap();
    let main: &[(&str, &[u8])] = &[("README.md", b"# scripted"), ("scripted.py", b"import datasets")];
    let converted: &[(&str, &[u8])] =
        &[("default/train/0000.parquet", b"PAR1 train PAR1"), ("default/test/0000.parquet", b"PAR1 test PAR1")];
    let server = FakeHub::default()
        .repo("dataset", "org/scripted", "main", "main0001", main)
        .repo("dataset", "org/scripted", "refs/convert/parquet", "conv0001", converted)
        .serve();
    let mut hub = settings(&server.url(), home.path());

    let files = dataset_files(&hub, "org/scripted", &sel(None, None), "train").unwrap();
    let repo_dir = home.path().join("hub/datasets--org--scripted");
    assert_eq!(files, vec![repo_dir.join("snapshots/conv0001/default/train/0000.parquet")]);
    assert_eq!(read(&files[0]), b"PAR1 train PAR1");
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/refs/convert/parquet")).unwrap(), "conv0001");

    let text = err_text(dataset_files(&hub, "org/scripted", &sel(None, None), "validation"));
    assert!(text.contains("validation") && text.contains("splits that seem available: test, train"), "{text}");

    drop(server);
    hub.offline = true;
    assert_eq!(dataset_files(&hub, "org/scripted", &sel(None, None), "train").unwrap(), files);
}

#[test]
fn missing_repo_names_the_repo_and_the_endpoint() {
    let home = tempfile::tempdir().unwrap();
    let server = FakeHub::default().serve();
    let hub = settings(&server.url(), home.path());

    let text = err_text(dataset_files(&hub, "org/nope", &sel(None, None), "train"));
    assert!(text.contains("dataset org/nope") && text.contains(&server.url()), "{text}");
    let text = err_text(model_dir(&hub, "org/nope", Some("v2")));
    assert!(text.contains("model org/nope (revision v2)") && text.contains(&server.url()), "{text}");
}

#[test]
fn missing_split_lists_the_available_splits() {
    let home = tempfile::tempdir().unwrap();
    let files: &[(&str, &[u8])] = &[
        ("data/train_prefs-00000-of-00001.parquet", b"1"),
        ("data/test_prefs-00000-of-00001.parquet", b"2"),
        ("data/train_sft-00000-of-00001.parquet", b"3"),
    ];
    let server = prefs_hub()
        .repo("dataset", "org/uf", "main", "d00d", files)
        .missing("/api/datasets/org/uf/revision/refs%2Fconvert%2Fparquet", "RevisionNotFound")
        .serve();
    let hub = settings(&server.url(), home.path());

    let text = err_text(dataset_files(&hub, "org/prefs", &sel(None, None), "validation"));
    assert!(text.contains("\"validation\"") && text.contains("splits that seem available: test, train"), "{text}");
    assert!(text.contains("data/test-00000-of-00001.jsonl"), "{text}");
    // "train" must not silently mix train_prefs and train_sft.
    let text = err_text(dataset_files(&hub, "org/uf", &sel(None, None), "train"));
    assert!(text.contains("test_prefs, train_prefs, train_sft"), "{text}");
    assert_eq!(dataset_files(&hub, "org/uf", &sel(None, None), "train_prefs").unwrap().len(), 1);
}

#[test]
fn truncated_download_fails_naming_the_file_and_is_completed_next_time() {
    let home = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let files: &[(&str, &[u8])] = &[("data/train-00000-of-00001.parquet", &big)];
    let fake = || FakeHub::default().repo("dataset", "org/big", "main", "beef", files);
    let server = fake().truncating().serve();
    let mut hub = settings(&server.url(), home.path());

    let text = err_text(dataset_files(&hub, "org/big", &sel(None, None), "train"));
    assert!(text.contains("data/train-00000-of-00001.parquet") && text.contains("org/big"), "{text}");
    let repo_dir = home.path().join("hub/datasets--org--big");
    assert!(!repo_dir.join("snapshots/beef/data/train-00000-of-00001.parquet").exists(), "not linked as complete");
    let blobs: Vec<String> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(blobs.iter().all(|b| b.ends_with(".part") || b.ends_with(".lock")), "{blobs:?}");
    drop(server);

    let server = fake().serve();
    hub.endpoint = server.url();
    let files = dataset_files(&hub, "org/big", &sel(None, None), "train").unwrap();
    assert_eq!(read(&files[0]), big);
}

#[test]
fn private_repo_uses_hf_token() {
    let home = tempfile::tempdir().unwrap();
    let files: &[(&str, &[u8])] = &[("train.jsonl", TRAIN)];
    let mut fake = FakeHub::default().repo("dataset", "org/private", "main", "5ec4e7", files);
    fake.token = Some("hf_secret".into());
    let server = fake.serve();
    let mut hub = settings(&server.url(), home.path());

    let text = err_text(dataset_files(&hub, "org/private", &sel(None, None), "train"));
    assert!(text.contains("org/private") && text.contains("HF_TOKEN"), "{text}");
    hub.token = Some("hf_secret".into());
    assert_eq!(read(&dataset_files(&hub, "org/private", &sel(None, None), "train").unwrap()[0]), TRAIN);
}

#[test]
fn sharded_model_with_tokenizer_files() {
    let home = tempfile::tempdir().unwrap();
    let index = br#"{"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}"#;
    let files: &[(&str, &[u8])] = &[
        (".gitattributes", b"*.safetensors filter=lfs"),
        ("README.md", b"# tiny"),
        ("config.json", br#"{"model_type":"llama"}"#),
        ("generation_config.json", b"{}"),
        ("tokenizer.json", b"{\"model\":{}}"),
        ("tokenizer_config.json", b"{}"),
        ("special_tokens_map.json", b"{}"),
        ("chat_template.jinja", b"{{ messages }}"),
        ("model.safetensors.index.json", index),
        ("model-00001-of-00002.safetensors", b"shard one"),
        ("model-00002-of-00002.safetensors", b"shard two"),
        ("pytorch_model.bin", b"not wanted"),
    ];
    let server = FakeHub::default().repo("model", "org/tiny", "main", "feed", files).serve();
    let mut hub = settings(&server.url(), home.path());

    let dir = model_dir(&hub, "org/tiny", None).unwrap();
    assert_eq!(dir, home.path().join("hub/models--org--tiny/snapshots/feed"));
    for (name, bytes) in &files[2..11] {
        assert_eq!(read(&dir.join(name)), *bytes, "{name}");
    }
    let log = server.take_log();
    assert!(!log.iter().any(|p| p.ends_with("pytorch_model.bin") || p.ends_with("README.md")), "{log:?}");

    drop(server);
    hub.offline = true;
    assert_eq!(model_dir(&hub, "org/tiny", None).unwrap(), dir);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let text = err_text(model_dir(&hub, "org/tiny", None));
    assert!(text.contains("model-00002-of-00002.safetensors") && text.contains("org/tiny"), "{text}");
}

#[test]
fn split_file_selection() {
    let files: Vec<String> = [
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/test-00000-of-00001.parquet",
        "train.jsonl",
        "train_0.json",
        "train_prefs.jsonl",
        "pretrain-notes.jsonl",
        "default/train/0000.parquet",
        "cfg/validation.json.gz",
        "train.csv",
        "train/state.json",
        "train/dataset_info.json",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(
        split_files(&files, None, "train"),
        vec![
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "default/train/0000.parquet",
            "train.csv",
            "train.jsonl",
            "train_0.json",
        ]
    );
    assert_eq!(split_files(&files, Some("default"), "train"), vec!["default/train/0000.parquet"]);
    assert_eq!(split_files(&files, Some("cfg"), "validation"), vec!["cfg/validation.json.gz"]);
    assert!(split_files(&files, Some("cfg"), "train").is_empty());
}

#[test]
fn repo_id_detection() {
    for id in [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Anthropic/hh-rlhf",
        "Qwen/Qwen2.5-0.5B",
        "trl-lib/ultrafeedback_binarized",
    ] {
        assert!(looks_like_repo_id(id), "{id}");
    }
    for arg in
        ["gpt2", "/abs/path", "./x/y", "a/b/c", "data/prefs.jsonl", "models/m.gguf", "org/-bad", "org/a--b", "org/"]
    {
        assert!(!looks_like_repo_id(arg), "{arg}");
    }
    // An existing local folder wins over the repo reading (tests run in the package root).
    assert!(Path::new("tests/fixtures").is_dir() && !looks_like_repo_id("tests/fixtures"));
}

#[test]
fn settings_read_the_variables_as_huggingface_hub_does() {
    let vars = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubSettings::from_lookup(|name| map.get(name).cloned())
    };
    let defaults = vars(&[("HOME", "/home/u")]);
    assert_eq!(defaults.endpoint, "https://huggingface.co");
    assert_eq!(defaults.home, Path::new("/home/u/.cache/huggingface"));
    assert!(!defaults.offline && defaults.token.is_none());
    let set = vars(&[
        ("HF_ENDPOINT", " http://localhost:8080/ "),
        ("HF_HOME", "/data/hf"),
        ("HF_HUB_OFFLINE", "YES"),
        ("HF_TOKEN", " hf_x \n"),
    ]);
    assert_eq!(set.endpoint, "http://localhost:8080");
    assert_eq!(set.home, Path::new("/data/hf"));
    assert!(set.offline);
    assert_eq!(set.token.as_deref(), Some("hf_x"));
    assert!(!vars(&[("HF_HUB_OFFLINE", "0"), ("HF_TOKEN", "  ")]).offline);
    assert!(vars(&[("HF_TOKEN", "  ")]).token.is_none());
}

/// `data_dir` (Anthropic/hh-rlhf's harmless-base/) and a dataset card's `configs:` (as HuggingFaceH4/
/// ultrafeedback_binarized's README.md maps train_prefs / test_prefs to files), resolved as `datasets` does.
#[test]
fn data_dir_and_card_configs_choose_the_files_on_the_hub() {
    let home = tempfile::tempdir().unwrap();
    let card = b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n    path: data/train_prefs-*\n\
                 \x20 - split: test_prefs\n    path: data/test_prefs-*\n- config_name: sft\n  data_dir: sft\n  data_files: \
                 train-*.jsonl\n---\n# card\n";
    let hh: &[(&str, &[u8])] = &[
        ("README.md", b"# hh"),
        ("harmless-base/train.jsonl.gz", b"harmless train"),
        ("harmless-base/test.jsonl.gz", b"harmless test"),
        ("helpful-base/train.jsonl.gz", b"helpful train"),
    ];
    let uf: &[(&str, &[u8])] = &[
        ("README.md", card),
        ("data/train_prefs-00000-of-00002.parquet", b"prefs 0"),
        ("data/train_prefs-00001-of-00002.parquet", b"prefs 1"),
        ("data/test_prefs-00000-of-00001.parquet", b"test prefs"),
        ("data/train_sft-00000-of-00001.parquet", b"sft"),
        ("sft/train-0.jsonl", b"sft jsonl"),
    ];
    let server = FakeHub::default()
        .repo("dataset", "org/hh", "main", "abc123", hh)
        .repo("dataset", "org/uf", "main", "def456", uf)
        .serve();
    let hub = settings(&server.url(), home.path());
    let contents = |files: Vec<std::path::PathBuf>| -> Vec<Vec<u8>> { files.iter().map(|p| read(p)).collect() };

    let harmless = dataset_files(&hub, "org/hh", &sel(None, Some("harmless-base")), "test").unwrap();
    assert_eq!(contents(harmless), [b"harmless test".to_vec()]);
    let text = err_text(dataset_files(&hub, "org/hh", &sel(None, Some("helpful-base")), "test"));
    assert!(text.contains("no data files for split \"test\"") && text.contains("train"), "{text}");

    let train = dataset_files(&hub, "org/uf", &sel(None, None), "train_prefs").unwrap();
    assert_eq!(contents(train), [b"prefs 0".to_vec(), b"prefs 1".to_vec()]);
    let test = dataset_files(&hub, "org/uf", &sel(Some("default"), None), "test_prefs").unwrap();
    assert_eq!(contents(test), [b"test prefs".to_vec()]);
    let sft = dataset_files(&hub, "org/uf", &sel(Some("sft"), None), "train").unwrap();
    assert_eq!(contents(sft), [b"sft jsonl".to_vec()]);
    let text = err_text(dataset_files(&hub, "org/uf", &sel(None, None), "train"));
    assert!(text.contains("no split \"train\"") && text.contains("train_prefs, test_prefs"), "{text}");
    let text = err_text(dataset_files(&hub, "org/uf", &sel(Some("nope"), None), "train"));
    assert!(text.contains("no config \"nope\"") && text.contains("default, sft"), "{text}");

    // Offline, the cached snapshots answer the same way: the card's configs and data_dir apply there too.
    drop(server);
    let hub = HubSettings { offline: true, ..hub };
    let train = dataset_files(&hub, "org/uf", &sel(None, None), "train_prefs").unwrap();
    assert_eq!(contents(train), [b"prefs 0".to_vec(), b"prefs 1".to_vec()]);
    let harmless = dataset_files(&hub, "org/hh", &sel(None, Some("harmless-base")), "test").unwrap();
    assert_eq!(contents(harmless), [b"harmless test".to_vec()]);
}

/// The HH recipes' data in its Hub form (`dataset_name: Anthropic/hh-rlhf`, `data_dir: harmless-base`, as the
/// recipes' comments write it) reads the same pairs as the in-repo copy: here the repo holds the copy as
/// harmless-base/test.jsonl.gz, as the Hub's does.
#[test]
fn hh_recipe_data_from_the_hub_form_equals_the_in_repo_copy() {
    let dir = tempfile::tempdir().unwrap();
    let copy = crate::common::repo_path("data/hh-rlhf/harmless-base-test.jsonl.gz");
    let bytes = std::fs::read(&copy).unwrap();
    let files: &[(&str, &[u8])] = &[
        ("README.md", b"---\nlicense: mit\n---\n# hh-rlhf"),
        ("harmless-base/test.jsonl.gz", &bytes),
        ("helpful-base/test.jsonl.gz", b"not this one"),
    ];
    let server = FakeHub::default().repo("dataset", "Anthropic/hh-rlhf", "main", "0123abcd", files).serve();
    let export = |source: &[&str], out: &str| {
        let out = dir.path().join(out);
        let mut args = vec!["data", "export", "--dataset-format", "hh-rlhf", "--skip-invalid-rows"];
        args.extend(["--dataset-split", "test[310:]", "--output", out.to_str().unwrap()]);
        args.extend(source);
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_prefalign"))
            .args(&args)
            .env("HF_ENDPOINT", server.url())
            .env("HF_HOME", dir.path().join("hf"))
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        std::fs::read_to_string(out).unwrap()
    };
    let from_hub = export(&["--dataset", "Anthropic/hh-rlhf", "--data-dir", "harmless-base"], "hub.jsonl");
    let from_copy = export(&["--dataset", copy.to_str().unwrap()], "copy.jsonl");
    assert_eq!(from_hub.lines().count(), 1994, "the 2,002 rows the recipe trains on, less 8 invalid ones");
    assert_eq!(from_hub, from_copy);
}
