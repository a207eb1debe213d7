//! `prefalign compare` end to end on the tiny fixture model: recipes (DPO, ORPO, a broken one) and a β grid,
//! each run a child process; the report's table, the plots, and a failed run reported as failed.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A two-step recipe on the fixture pairs, held out on the same file, with a `trainer:` key if given; `extra` is
/// appended.
fn recipe(dir: &Path, name: &str, trainer: Option<&str>, model: &Path, extra: &str) -> PathBuf {
    let data = common::fixture("trl_data/standard.jsonl");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "{}model_name_or_path: {}\ndataset_name: {}\neval_dataset: {}\nbeta: 0.1\n\
             learning_rate: 1.0e-3\nper_device_train_batch_size: 4\nmax_steps: 2\nlogging_steps: 1\nmax_length: 64\n\
             allow_empty_completions: true\ntrain_sampling_strategy: sequential\n{extra}",
            trainer.map_or(String::new(), |t| format!("trainer: {t}\n")),
            model.display(),
            data.display(),
            data.display()
        ),
    )
    .unwrap();
    path
}

fn compare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prefalign")).arg("compare").args(args).output().unwrap()
}

/// The table of report.md as rows of cells, the header first.
fn table(report: &str) -> Vec<Vec<String>> {
    report
        .lines()
        .filter(|l| l.starts_with("| "))
        .map(|l| l.trim_matches('|').split(" | ").map(|c| c.trim().to_string()).collect())
        .collect()
}

fn row<'a>(rows: &'a [Vec<String>], name: &str) -> &'a [String] {
    rows.iter().find(|r| r[0] == name).unwrap_or_else(|| panic!("no row {name:?} in {rows:?}"))
}

/// A PNG of the report's size with more than a blank canvas in it.
fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1100, 620), "{}", path.display());
    assert!(bytes.len() > 15_000, "{} is only {} bytes", path.display(), bytes.len());
}

const COLUMNS: [&str; 11] = [
    "run",
    "trainer",
    "status",
    "steps",
    "final loss",
    "held-out pref. acc. before → after (%)",
    "held-out reward margin (after)",
    "tokens/s",
    "train time (s)",
    "wall time (s)",
    "peak memory (MiB)",
];

#[test]
fn recipes_are_compared_and_a_broken_one_is_reported_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model_dir(dir.path(), "tiny_policy");
    let dpo = recipe(dir.path(), "dpo", Some("dpo"), &model, "");
    let orpo = recipe(dir.path(), "orpo", Some("orpo"), &model, "");
    let broken = recipe(dir.path(), "broken", Some("dpo"), &model, "betaa: 0.2\n");
    let out = dir.path().join("report");
    let output = compare(&[
        "--recipe",
        dpo.to_str().unwrap(),
        "--recipe",
        orpo.to_str().unwrap(),
        "--recipe",
        broken.to_str().unwrap(),
        "--name",
        "DPO",
        "--name",
        "ORPO",
        "--name",
        "broken",
        "--held-out",
        common::fixture("trl_data/standard.jsonl").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "a failed run makes compare fail:\n{stderr}");
    assert!(stderr.contains("1 of 3 runs failed"), "{stderr}");

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let rows = table(&report);
    assert_eq!(rows[0], COLUMNS, "{report}");
    assert_eq!(rows.len(), 4, "{report}");
    for rows in &rows {
        assert_eq!(rows.len(), COLUMNS.len(), "{rows:?}");
    }
    for (name, trainer) in [("DPO", "dpo"), ("ORPO", "orpo")] {
        let r = row(&rows, name);
        assert_eq!((r[1].as_str(), r[2].as_str(), r[3].as_str()), (trainer, "ok", "2"), "{r:?}");
        assert!(r[4].parse::<f64>().unwrap().is_finite(), "final loss {r:?}");
        let (before, after) = r[5].split_once(" → ").unwrap();
        for pct in [before, after] {
            assert!((0.0..=100.0).contains(&pct.parse::<f64>().unwrap()), "{r:?}");
        }
        assert!(r[6].parse::<f64>().is_ok(), "margin {r:?}");
        assert!(r[7].parse::<f64>().unwrap() > 0.0, "tokens/s {r:?}");
        assert!(r[9].parse::<f64>().unwrap() >= r[8].parse::<f64>().unwrap(), "wall ≥ train time {r:?}");
        assert!(r[10].parse::<f64>().unwrap() > 10.0, "peak MiB {r:?}");
        let run = out.join("runs").join(name);
        assert!(run.join("model.safetensors").exists() && run.join("metrics.jsonl").exists());
        // The recipe as trained: `trainer` removed, so that `prefalign <trainer> --config` takes it.
        let trained = std::fs::read_to_string(run.join("recipe.yaml")).unwrap();
        assert!(!trained.contains("trainer") && trained.contains("max_steps: 2"), "{trained}");
    }
    let failed = row(&rows, "broken");
    assert!(
        failed[2].starts_with("**failed**:") && failed[2].contains(r#"unknown key "betaa"; did you mean "beta"?"#),
        "{failed:?}"
    );
    assert_eq!(failed[4], "–");
    // The base model is scored once per set of tokenization rules: DPO's (shared by two runs) and ORPO's.
    assert_eq!(std::fs::read_dir(out.join("baseline")).unwrap().count(), 2);
    assert_eq!(row(&rows, "DPO")[5].split(" → ").next(), failed[5].split(" → ").next());

    for png in ["loss.png", "reward_accuracy.png", "heldout_accuracy.png"] {
        assert!(report.contains(&format!("]({png})")), "{png} is not embedded:\n{report}");
        assert_png(&out.join(png));
    }
}

#[test]
fn a_grid_runs_the_recipe_once_per_value() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model_dir(dir.path(), "tiny_policy");
    // A recipe as `prefalign orpo --config` takes it (no `trainer:` key), the command given by --trainer.
    let orpo = recipe(dir.path(), "orpo", None, &model, "");
    let out = dir.path().join("grid");
    let output = compare(&[
        "--recipe",
        orpo.to_str().unwrap(),
        "--trainer",
        "orpo",
        "--grid",
        "beta=0.05,0.5",
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("| beta=0.05 | orpo | ok |"), "the table is printed too:\n{stdout}");

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let rows = table(&report);
    assert_eq!(rows.len(), 3, "{report}");
    let (small, large) = (row(&rows, "beta=0.05"), row(&rows, "beta=0.5"));
    assert_eq!((small[2].as_str(), large[2].as_str()), ("ok", "ok"));
    // Each value reaches its run, which then differs: ORPO's loss is NLL + β·odds-ratio term.
    for (name, beta) in [("beta=0.05", "0.05"), ("beta=0.5", "0.5")] {
        let trained = std::fs::read_to_string(out.join("runs").join(name).join("recipe.yaml")).unwrap();
        assert!(
            trained.contains(&format!("beta: '{beta}'")) || trained.contains(&format!("beta: {beta}")),
            "{trained}"
        );
        assert!(!trained.contains("beta: 0.1"), "{trained}");
    }
    assert_ne!(small[4], large[4]);
    assert_ne!(small[6], large[6], "the held-out margin is scaled by β");
    // One baseline serves the whole grid; held-out accuracy before training is the same for every value.
    assert_eq!(std::fs::read_dir(out.join("baseline")).unwrap().count(), 1);
    assert_eq!(small[5].split(" → ").next(), large[5].split(" → ").next());
    assert!(report.contains("Grid over `beta`: 0.05, 0.5."), "{report}");
    assert!(report.contains("split `test` (11 pairs with ORPO rules"), "{report}");
    for png in ["loss.png", "reward_accuracy.png", "heldout_accuracy.png"] {
        assert_png(&out.join(png));
    }
}

#[test]
fn bad_arguments_fail_before_any_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let output = compare(&[
        "--recipe",
        "a.yaml",
        "--recipe",
        "b.yaml",
        "--name",
        "only-one",
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 --name for 2 --recipe"));
    let output = compare(&["--recipe", "a.yaml", "--grid", "beta", "--output-dir", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected KEY=V1,V2"));
    let output = compare(&[
        "--recipe",
        "a.yaml",
        "--recipe",
        "b.yaml",
        "--recipe",
        "c.yaml",
        "--trainer",
        "dpo",
        "--trainer",
        "orpo",
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("2 --trainer for 3 --recipe"));
    assert!(!out.exists());
}

/// The `loss` of every training row of a run's metrics.jsonl.
fn losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64()).collect()
}

#[test]
fn comparing_again_reuses_finished_runs_and_resumes_interrupted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model_dir(dir.path(), "tiny_policy");
    let dpo = recipe(dir.path(), "dpo", Some("dpo"), &model, "save_steps: 1\n");
    let orpo = recipe(dir.path(), "orpo", Some("orpo"), &model, "");
    let out = dir.path().join("out");
    let args =
        ["--recipe", dpo.to_str().unwrap(), "--recipe", orpo.to_str().unwrap(), "--output-dir", out.to_str().unwrap()];
    let first = compare(&args);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let (dpo_run, orpo_run) = (out.join("runs/dpo"), out.join("runs/orpo"));
    let trained_losses = losses(&dpo_run);
    assert_eq!(trained_losses.len(), 2);
    let train_log = std::fs::read_to_string(dpo_run.join("train.log")).unwrap();

    // Everything finished: nothing is trained or scored again, and the report is the same.
    let again = compare(&args);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(stderr.matches("reusing the finished run").count(), 2, "{stderr}");
    let reused = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(table(&reused), table(&report));
    assert!(reused.contains("`dpo` is the finished run of the same recipe in `runs/dpo`, reused"), "{reused}");
    assert_eq!(std::fs::read_to_string(dpo_run.join("train.log")).unwrap(), train_log, "not trained again");

    // A DPO run killed after its first checkpoint (before the final one) resumes from it and ends where the
    // uninterrupted run did.
    for file in ["compare_finished.json", "train_summary.json", "heldout_after.json"] {
        std::fs::remove_file(dpo_run.join(file)).unwrap();
    }
    std::fs::remove_dir_all(dpo_run.join("checkpoint-2")).unwrap();
    let resumed = compare(&args);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from") && stderr.contains("checkpoint-1"), "{stderr}");
    assert_eq!(stderr.matches("reusing the finished run").count(), 1, "ORPO is reused: {stderr}");
    assert_eq!(losses(&dpo_run), trained_losses);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("`dpo` resumed from its `checkpoint-1`"), "{report}");
    assert_eq!(row(&table(&report), "dpo")[5], row(&table(&reused), "dpo")[5], "same held-out scores");

    // A changed recipe is trained again, the unchanged one reused; --rerun retrains everything.
    std::fs::write(&orpo, std::fs::read_to_string(&orpo).unwrap().replace("beta: 0.1", "beta: 0.3")).unwrap();
    let changed = compare(&args);
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert!(changed.status.success(), "{stderr}");
    assert_eq!(stderr.matches("reusing the finished run").count(), 1, "only DPO is reused: {stderr}");
    assert!(std::fs::read_to_string(orpo_run.join("recipe.yaml")).unwrap().contains("beta: 0.3"));
    let rerun = compare(&[&args[..], &["--rerun"]].concat());
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success() && !stderr.contains("reusing") && !stderr.contains("resuming"), "{stderr}");
    assert_eq!(losses(&dpo_run), trained_losses);
    assert!(dpo_run.join("checkpoint-1").exists(), "the rerun saves its own checkpoint");

    // Another report from these runs: --reuse-runs finds the same recipe, here as a grid point (its key order
    // differs), and trains nothing.
    let other = dir.path().join("other");
    let from_grid = compare(&[
        "--recipe",
        orpo.to_str().unwrap(),
        "--grid",
        "beta=0.3",
        "--reuse-runs",
        out.to_str().unwrap(),
        "--output-dir",
        other.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&from_grid.stderr);
    assert!(from_grid.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("reusing the finished run in {}", orpo_run.display())), "{stderr}");
    assert!(!other.join("runs/beta=0.3/train.log").exists());
    let report = std::fs::read_to_string(other.join("report.md")).unwrap();
    let earlier = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(row(&table(&report), "beta=0.3")[4..], row(&table(&earlier), "orpo")[4..], "{report}");
}

/// SFT and KTO recipes are compared like the preference ones: trained, and scored on held-out pairs before and
/// after (KTO against its reference).
#[test]
fn sft_and_kto_runs_are_scored_on_held_out_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model_dir(dir.path(), "tiny_policy");
    let sft = dir.path().join("sft.yaml");
    std::fs::write(
        &sft,
        format!(
            "trainer: sft\nmodel_name_or_path: {}\ndataset_name: {}\nlearning_rate: 1.0e-3\n\
             per_device_train_batch_size: 4\nmax_steps: 2\nlogging_steps: 1\nmax_length: 64\n\
             allow_empty_completions: true\n",
            model.display(),
            common::fixture("sft/prompt_completion.jsonl").display()
        ),
    )
    .unwrap();
    let kto = recipe(dir.path(), "kto", Some("kto"), &model, "");
    let out = dir.path().join("report");
    let held_out = common::fixture("trl_data/standard.jsonl");
    let output = compare(&[
        "--recipe",
        sft.to_str().unwrap(),
        "--recipe",
        kto.to_str().unwrap(),
        "--held-out",
        held_out.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let rows = table(&report);
    for (name, trainer) in [("sft", "sft"), ("kto", "kto")] {
        let r = row(&rows, name);
        assert_eq!((r[1].as_str(), r[2].as_str(), r[3].as_str()), (trainer, "ok", "2"), "{r:?}");
        let (before, after) = r[5].split_once(" → ").unwrap();
        for pct in [before, after] {
            assert!((0.0..=100.0).contains(&pct.parse::<f64>().unwrap()), "{r:?}");
        }
    }
}
