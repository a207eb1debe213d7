//! Pushes to the fake Hub: `push_folder` (repo creation, regular and LFS files, basic and multipart transfers,
//! what is left out, unchanged files, errors) and `--push-to-hub` on training runs (the output folder with its
//! model card, at the end and at each checkpoint; the errors that come before training).

use super::fake::{err_text, read, settings, sha256, FakeHub, Server};
use crate::common::{fixture, tiny_model_dir};
use prefalign::data::hub::model_dir;
use prefalign::model::push::push_folder;
use prefalign::train::history::python_g4;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const TOKEN: &str = "hf_write_token";

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn pushing_hub() -> Server {
    let mut fake = FakeHub::default();
    fake.token = Some(TOKEN.into());
    fake.serve()
}

#[test]
fn push_folder_round_trip_with_regular_and_lfs_files() {
    let (home, folder) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let weights: Vec<u8> = (0..400_000u32).flat_map(|i| (i * 7919).to_le_bytes()).collect(); // 1.6 MB: multipart
    let adapter: Vec<u8> = (0..=255u8).cycle().take(3000).collect(); // binary, small: one PUT
    let config = br#"{"model_type":"llama","vocab_size":49152}"#;
    write(folder.path(), "config.json", config);
    write(folder.path(), "model.safetensors", &weights);
    write(folder.path(), "adapter.bin", &adapter);
    write(folder.path(), "logs/notes.txt", b"step 1\n");
    write(folder.path(), "empty.txt", b"");
    write(folder.path(), "checkpoint-1/model.safetensors", b"a checkpoint");
    write(folder.path(), "_private/x", b"left out");
    write(folder.path(), ".prefalign.lock", b"123");
    write(folder.path(), ".git/HEAD", b"ref: refs/heads/main");
    let server = pushing_hub();
    let mut hub = settings(&server.url(), home.path());

    let text = err_text(push_folder(&hub, "org/tiny", folder.path(), true, "Upload"));
    assert!(text.contains("token") && text.contains("HF_TOKEN") && text.contains("--hub-token"), "{text}");
    assert!(server.take_log().is_empty(), "nothing is sent without a token");

    hub.token = Some(TOKEN.into());
    let info = push_folder(&hub, "org/tiny", folder.path(), true, "Upload").unwrap();
    assert_eq!((info.repo_id.as_str(), info.committed, info.unchanged), ("org/tiny", 5, 0));
    assert_eq!(info.commit_url, format!("{}/org/tiny/commit/{}", server.url(), info.oid));
    let log = server.take_log();
    assert_eq!(log.iter().filter(|p| p.contains("/part/")).count(), 4, "{log:?}");
    assert!(log.contains(&format!("/storage/{}", sha256(&adapter))), "{log:?}");
    assert_eq!(log.iter().filter(|p| *p == "/lfs-verify").count(), 2, "verify on HF_ENDPOINT: {log:?}");
    {
        let state = server.hub();
        assert_eq!(state.created, vec![("org/tiny".to_string(), Some("private".to_string()))]);
        assert_eq!(state.commits.len(), 1);
        assert_eq!(state.commits[0].summary, "Upload");
        let files = &state.files["org/tiny"];
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(names, ["adapter.bin", "config.json", "empty.txt", "logs/notes.txt", "model.safetensors"]);
        for (name, bytes) in files {
            assert_eq!(bytes, &read(&folder.path().join(name)), "{name}");
        }
    }

    // Downloaded back through hf-hub, as `--model org/tiny` would.
    let dir = model_dir(&hub, "org/tiny", None).unwrap();
    assert_eq!(read(&dir.join("config.json")), config);
    assert_eq!(read(&dir.join("model.safetensors")), weights);

    // The same folder again: nothing changed, so no upload and no commit.
    let again = push_folder(&hub, "org/tiny", folder.path(), false, "Again").unwrap();
    assert_eq!((again.committed, again.unchanged, &again.oid), (0, 5, &info.oid));
    let log = server.take_log();
    assert!(!log.iter().any(|p| p.starts_with("/storage/") || p.contains("/commit/")), "{log:?}");
    assert_eq!(server.hub().commits.len(), 1);

    // One file changed and a copy of the weights: the Hub has their content, so only the commit carries them.
    write(folder.path(), "config.json", br#"{"model_type":"llama"}"#);
    write(folder.path(), "copy/model.safetensors", &weights);
    let third = push_folder(&hub, "org/tiny", folder.path(), false, "Change").unwrap();
    assert_eq!((third.committed, third.unchanged), (2, 4));
    assert!(!server.take_log().iter().any(|p| p.starts_with("/storage/")));
    let state = server.hub();
    assert_eq!(state.commits[1].paths, ["config.json", "copy/model.safetensors"]);
    assert_eq!(state.files["org/tiny"]["copy/model.safetensors"], weights);
    assert_eq!(state.created.len(), 1, "the repo existed (409)");
}

#[test]
fn push_errors_name_the_repo_and_the_status() {
    let (home, folder) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(folder.path(), "config.json", b"{}");
    let mut fake = FakeHub::default();
    (fake.token, fake.fail_commit) = (Some(TOKEN.into()), Some(403));
    let server = fake.serve();
    let mut hub = settings(&server.url(), home.path());

    hub.token = Some("hf_wrong".into());
    let text = err_text(push_folder(&hub, "org/tiny", folder.path(), false, "Upload"));
    assert!(text.contains("cannot create the model repo org/tiny") && text.contains("HTTP 401"), "{text}");
    assert!(text.contains("Invalid credentials in Authorization header") && !text.contains("hf_wrong"), "{text}");

    hub.token = Some(TOKEN.into());
    let text = err_text(push_folder(&hub, "org/tiny", folder.path(), false, "Upload"));
    assert!(text.contains("cannot commit 1 file(s) to org/tiny") && text.contains("HTTP 403"), "{text}");
    assert!(text.contains("You don't have the rights to create a commit in org/tiny"), "{text}");
    assert!(server.hub().commits.is_empty());

    // $HF_HOME/token, as `hf auth login` writes it, when HF_TOKEN is not set; a bare name lands in its namespace.
    drop(server);
    let server = pushing_hub();
    hub.endpoint = server.url();
    hub.token = None;
    std::fs::write(home.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let info = push_folder(&hub, "tiny", folder.path(), false, "Upload").unwrap();
    assert_eq!(info.repo_id, "tester/tiny");
    assert_eq!(server.hub().created, vec![("tester/tiny".to_string(), None)]);

    hub.offline = true;
    let text = err_text(push_folder(&hub, "tiny", folder.path(), false, "Upload"));
    assert!(text.contains("HF_HUB_OFFLINE"), "{text}");
}

/// `prefalign dpo` on the tiny model (full fine-tuning), 2 steps, with the Hub variables pointing at `server`.
fn train(server: &str, home: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let model = tiny_model_dir(home, "tiny_policy");
    let data = fixture("trl_data/standard.jsonl");
    let mut args = vec!["dpo", "--model", model.to_str().unwrap(), "--dataset", data.to_str().unwrap()];
    args.extend(["--output-dir", out.to_str().unwrap(), "--max-steps", "2", "--per-device-train-batch-size", "4"]);
    args.extend(["--learning-rate", "1e-2", "--logging-steps", "1", "--seed", "3", "--skip-invalid-rows"]);
    args.extend(extra);
    let cache = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_prefalign"));
    command.args(&args).env("OMP_NUM_THREADS", "1").env("PREFALIGN_CACHE", cache.path());
    command.env("HF_ENDPOINT", server).env("HF_HOME", home.join("hf")).env_remove("HF_TOKEN");
    command.env_remove("HF_HUB_OFFLINE").envs(env.iter().copied());
    command.output().unwrap()
}

fn succeeded(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    stderr
}

fn failed(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    stderr
}

/// Files under `dir` that a push sends: all but checkpoints and prefalign's lock.
fn local_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if relative.starts_with("checkpoint-") || relative == ".prefalign.lock" {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(relative, read(&path));
            }
        }
    }
    out
}

#[test]
fn a_run_pushes_its_output_folder_with_a_model_card() {
    let dir = tempfile::tempdir().unwrap();
    let server = pushing_hub();
    let out = dir.path().join("out");
    let extra = ["--push-to-hub", "--hub-model-id", "org/tiny", "--hub-token", TOKEN, "--hub-private-repo"];
    let extra = [&extra[..], &["--save-strategy", "no"]].concat();
    let stderr = succeeded(&train(&server.url(), dir.path(), &out, &extra, &[]));
    assert!(stderr.contains("to org/tiny") && stderr.contains("(End of training)"), "{stderr}");

    let state = server.hub();
    assert_eq!(state.created, vec![("org/tiny".to_string(), Some("private".to_string()))]);
    let summaries: Vec<&str> = state.commits.iter().map(|c| c.summary.as_str()).collect();
    assert_eq!(summaries, ["End of training"]);
    let pushed = &state.files["org/tiny"];
    let local = local_files(&out);
    assert_eq!(pushed.keys().collect::<Vec<_>>(), local.keys().collect::<Vec<_>>());
    assert_eq!(pushed, &local, "pushed files equal the output folder's");
    for name in ["config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.jsonl"] {
        assert!(pushed.contains_key(name), "{name}: {:?}", pushed.keys());
    }

    let card = String::from_utf8(pushed["README.md"].clone()).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap()).unwrap();
    let final_loss = python_g4(summary["final_loss"].as_f64().unwrap());
    for expected in [
        "library_name: transformers\nmodel_name: tiny\ntags:\n- generated_from_trainer\n- trl\n- dpo\n- prefalign\n",
        "fine-tuned version of `tiny_policy` on the `standard.jsonl` dataset.\n",
        "- learning_rate: 0.01\n",
        "- train_batch_size: 4\n",
        "- training_steps: 2\n",
        "- beta: 0.1\n- loss_type: sigmoid\n",
        &format!("- loss: {final_loss}\n"),
        "- step: 2\n",
        &format!("- prefalign: {}", env!("CARGO_PKG_VERSION")),
        "pipeline(\"text-generation\", model=\"org/tiny\"",
    ] {
        assert!(card.contains(expected), "{expected:?} in\n{card}");
    }
    drop(state);

    // The pushed model loads back from the Hub as trained.
    let mut hub = settings(&server.url(), &dir.path().join("cache"));
    hub.token = Some(TOKEN.into());
    let downloaded = model_dir(&hub, "org/tiny", None).unwrap();
    assert_eq!(read(&downloaded.join("model.safetensors")), read(&out.join("model.safetensors")));
}

#[test]
fn every_save_pushes_at_each_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let server = pushing_hub();
    let out = dir.path().join("every");
    let extra = ["--push-to-hub", "--hub-token", TOKEN, "--save-steps", "1", "--max-steps", "3"];
    succeeded(&train(&server.url(), dir.path(), &out, &extra, &[]));
    {
        // No --hub-model-id: the output folder's name, in the token owner's namespace.
        let state = server.hub();
        let summaries: Vec<(&str, &str)> =
            state.commits.iter().map(|c| (c.repo.as_str(), c.summary.as_str())).collect();
        assert_eq!(
            summaries,
            [
                ("tester/every", "Training in progress, step 1"),
                ("tester/every", "Training in progress, step 2"),
                // transformers saves after the last step too, and pushes that save
                ("tester/every", "Training in progress, step 3"),
                ("tester/every", "End of training")
            ]
        );
        assert!(state.commits[0].paths.contains(&"model.safetensors".to_string()));
        assert!(state.commits[0].paths.contains(&"README.md".to_string()));
        assert!(!state.commits.iter().flat_map(|c| &c.paths).any(|p| p.starts_with("checkpoint-")));
        assert_eq!(state.files["tester/every"], local_files(&out));
    }

    // all_checkpoints: each checkpoint in its own folder too; end: once.
    let all = dir.path().join("all");
    let extra = ["--push-to-hub", "--hub-token", TOKEN, "--save-steps", "1", "--hub-strategy", "all_checkpoints"];
    succeeded(&train(&server.url(), dir.path(), &all, &extra, &[]));
    let end = dir.path().join("end");
    let extra = ["--push-to-hub", "--hub-token", TOKEN, "--save-steps", "1", "--hub-strategy", "end"];
    succeeded(&train(&server.url(), dir.path(), &end, &extra, &[]));
    let state = server.hub();
    let summaries = |repo: &str| -> Vec<String> {
        state.commits.iter().filter(|c| c.repo == repo).map(|c| c.summary.clone()).collect()
    };
    assert_eq!(
        summaries("tester/all"),
        [
            "Training in progress, step 1",
            "Training in progress, step 1, checkpoint",
            "Training in progress, step 2",
            "Training in progress, step 2, checkpoint",
            "End of training"
        ]
    );
    assert_eq!(summaries("tester/end"), ["End of training"]);
    let files = &state.files["tester/all"];
    assert_eq!(files["checkpoint-1/model.safetensors"], read(&all.join("checkpoint-1/model.safetensors")));
    assert!(
        files.contains_key("checkpoint-1/optimizer.safetensors")
            && files.contains_key("checkpoint-1/trainer_state.json")
    );
}

#[test]
fn push_errors_come_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let server = pushing_hub();
    let out = dir.path().join("out");
    let stderr = failed(&train(&server.url(), dir.path(), &out, &["--push-to-hub"], &[]));
    assert!(stderr.contains("--push-to-hub") && stderr.contains("HF_TOKEN"), "{stderr}");
    assert!(!out.join("metrics.jsonl").exists() && !stderr.contains("pairs"), "no training: {stderr}");

    let stderr = failed(&train(&server.url(), dir.path(), &out, &["--push-to-hub"], &[("HF_HUB_OFFLINE", "1")]));
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");

    let extra = ["--push-to-hub", "--hub-model-id", "org/tiny", "--hub-token", "hf_wrong"];
    let stderr = failed(&train(&server.url(), dir.path(), &out, &extra, &[]));
    assert!(stderr.contains("org/tiny") && stderr.contains("HTTP 401"), "{stderr}");
    assert!(!out.join("metrics.jsonl").exists());

    let stderr = failed(&train(&server.url(), dir.path(), &out, &["--hub-strategy", "sometimes"], &[]));
    assert!(stderr.contains("every_save") && stderr.contains("all_checkpoints"), "{stderr}");
}

#[test]
fn a_lora_run_pushes_its_adapter_with_peft_card_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = pushing_hub();
    let out = dir.path().join("adapter");
    let extra = ["--push-to-hub", "--hub-model-id", "org/tiny-lora", "--hub-token", TOKEN, "--use-peft"];
    succeeded(&train(&server.url(), dir.path(), &out, &[&extra[..], &["--lora-r", "4", "--merge"]].concat(), &[]));
    let state = server.hub();
    let files = &state.files["org/tiny-lora"];
    assert_eq!(files, &local_files(&out));
    for name in ["adapter_config.json", "adapter_model.safetensors", "README.md", "merged/model.safetensors"] {
        assert!(files.contains_key(name), "{name}: {:?}", files.keys());
    }
    assert!(!files.contains_key("model.safetensors"));
    let card = String::from_utf8(files["README.md"].clone()).unwrap();
    assert!(
        card.contains("library_name: peft\n") && card.contains("- lora\n") && card.contains("- lora_r: 4\n"),
        "{card}"
    );
}
