//! Data-parallel training on c10d's Gloo (CPU): 2 ranks with per-device batch 2 train as TRL 1.16 does under
//! accelerate with 2 processes (fixtures: tools/fixtures/make_ddp_fixtures.py, torchrun + Gloo), and DPO as 1
//! process with batch 4 (every logged metric and the final weights); `prefalign launch` and torchrun's environment
//! give the same run; a rank that dies or stalls stops the other with an error naming it, and the run resumes from
//! its last checkpoint bit for bit. (ORPO's and CPO's NLL terms are token means per rank, in TRL too, so 2 ranks
//! of them differ from 1 process.)

use crate::common::{fixture, read_tensors, tiny_model_dir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    policy: PathBuf,
    reference: PathBuf,
    cache: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    Setup {
        policy: tiny_model_dir(&root, "tiny_policy"),
        reference: tiny_model_dir(&root, "tiny_ref"),
        cache: root.join("cache"),
        root,
        _dir: dir,
    }
}

/// `command` on the fixture pairs (the first 12: whole global batches of 4), 5 steps at lr 1e-3, sequential.
fn training_args(s: &Setup, command: &str, out: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let data = fixture("trl_data/standard.jsonl");
    let mut args: Vec<String> = [command, "--model", s.policy.to_str().unwrap(), "--dataset", data.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    let batch = batch.to_string();
    args.extend(
        [
            "--output-dir",
            out.to_str().unwrap(),
            "--per-device-train-batch-size",
            &batch,
            "--learning-rate",
            "1e-3",
            "--lr-scheduler-type",
            "constant",
            "--max-steps",
            "5",
            "--logging-steps",
            "1",
            "--train-sampling-strategy",
            "sequential",
            "--max-length",
            "128",
            "--allow-empty-completions",
            "--limit",
            "12",
            "--ddp-timeout",
            "60",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `prefalign launch` of 2 processes (on a free port) running `training` (a command and its flags).
fn launch_two(training: Vec<String>) -> Vec<String> {
    let port = free_port().to_string();
    let launch = ["launch", "--nproc-per-node", "2", "--master-port", &port, "--"].map(String::from);
    launch.into_iter().chain(training).collect()
}

/// A file of the fixture pairs' rows `rows` (0-based lines of trl_data/standard.jsonl).
fn standard_rows(s: &Setup, rows: std::ops::Range<usize>) -> PathBuf {
    let path = s.root.join(format!("rows{}-{}.jsonl", rows.start, rows.end));
    let text = std::fs::read_to_string(fixture("trl_data/standard.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().skip(rows.start).take(rows.len()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn command(s: &Setup, args: &[String]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prefalign"));
    command.args(args).env("OMP_NUM_THREADS", "1").env("PREFALIGN_CACHE", &s.cache);
    for name in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
        command.env_remove(name);
    }
    command
}

fn succeed(output: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{what}: {stderr}");
    stderr
}

/// One process with batch 4, and `prefalign launch` of 2 with batch 2.
fn one_and_two(s: &Setup, name: &str, cmd: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    one_and_two_with(s, name, cmd, extra, (&[], &[]))
}

/// [`one_and_two`], with flags for only one of the runs (one process's, the ranks').
fn one_and_two_with(s: &Setup, name: &str, cmd: &str, extra: &[&str], only: (&[&str], &[&str])) -> (PathBuf, PathBuf) {
    let (one, two) = (s.root.join(format!("{name}-1")), s.root.join(format!("{name}-2")));
    let one_flags = [extra, only.0].concat();
    succeed(command(s, &training_args(s, cmd, &one, 4, &one_flags)).output().unwrap(), "one process");
    let launch = launch_two(training_args(s, cmd, &two, 2, &[extra, only.1].concat()));
    succeed(command(s, &launch).output().unwrap(), "launch");
    (one, two)
}

fn rows(out: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap().as_object().unwrap().clone())
        .collect()
}

/// Every metric of every row within 1e-5 relative (1e-6 absolute for values near 0, such as a margin between two
/// rewards of the first steps), the same keys; the final weights within 1e-5 of their largest magnitude.
fn assert_same_training(what: &str, one: &Path, two: &Path) {
    let (a, b) = (rows(one), rows(two));
    assert_eq!(a.len(), b.len(), "{what}: rows");
    for (x, y) in a.iter().zip(&b) {
        let keys = |r: &serde_json::Map<String, Value>| r.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(x), keys(y), "{what}: keys");
        for (key, value) in x {
            let (p, q) = (value.as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (p - q).abs() <= 1e-5 * p.abs().max(q.abs()) + 1e-6,
                "{what}, step {}: {key} {p} vs {q}",
                x["step"]
            );
        }
    }
    // the trained weights: the model, or a LoRA run's adapter
    let file = ["adapter_model.safetensors", "model.safetensors"].into_iter().find(|f| one.join(f).exists()).unwrap();
    let (wa, wb) = (read_tensors(&one.join(file)), read_tensors(&two.join(file)));
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        let scale = t.abs().max().double_value(&[]).max(1e-12);
        let diff = (t - &wb[name]).abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * scale, "{what}: {name} differs by {diff} (largest {scale})");
    }
}

#[test]
fn two_ranks_train_as_one_process_with_their_global_batch() {
    let s = setup();
    let reference = s.reference.to_str().unwrap().to_string();
    let cases: [(&str, Vec<&str>); 5] = [
        ("dpo-ref", vec!["--ref-model", &reference]),
        // LoRA: the adapters are what the ranks average; the reference is the policy with them off
        ("dpo-lora", vec!["--use-peft", "--lora-target-modules", "all-linear"]),
        // many buckets, each all-reduced during the backward pass as soon as it is final
        ("dpo-small-buckets", vec!["--ref-model", &reference, "--ddp-bucket-cap-mb", "0.002"]),
        ("dpo-precomputed", vec!["--ref-model", &reference, "--precompute-ref-log-probs"]),
        ("dpo-accumulation", vec!["--ref-model", &reference, "--gradient-accumulation-steps", "2"]),
    ];
    for (name, extra) in cases {
        let (one, two) = one_and_two(&s, name, "dpo", &extra);
        assert_same_training(name, &one, &two);
    }
}

/// Evaluation in shares: each rank scores its part of every global evaluation batch, and the row equals one
/// process's with the global batch. A set that is no whole number of global batches is completed with its first
/// pairs, as accelerate does: the loss and preference accuracy still count each pair once.
#[test]
fn evaluation_runs_in_shares_and_gives_one_process_row() {
    let s = setup();
    let reference = s.reference.to_str().unwrap().to_string();
    let twelve = standard_rows(&s, 0..12);
    let eval = |file: &Path| -> Vec<String> {
        [
            "--ref-model",
            &reference,
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "5",
            "--eval-dataset",
            file.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let batches: (&[&str], &[&str]) = (&["--per-device-eval-batch-size", "4"], &["--per-device-eval-batch-size", "2"]);
    let flags = eval(&twelve);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (one, two) = one_and_two_with(&s, "eval", "dpo", &flags, batches);
    assert!(rows_with(&two, "eval_loss") == 1, "one evaluation row");
    assert_same_training("evaluation", &one, &two);
    // with the reference log-probs precomputed for the evaluation pairs too (each rank reads its pairs' values)
    let flags: Vec<&str> = flags.into_iter().chain(["--precompute-ref-log-probs"]).collect();
    let (one, two) = one_and_two_with(&s, "eval-precomputed", "dpo", &flags, batches);
    assert_same_training("evaluation, reference precomputed", &one, &two);
    // 14 pairs: the last global batch holds 2 of them and 2 completing ones
    let flags = eval(&fixture("trl_data/standard.jsonl"));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (one, two) = one_and_two_with(&s, "eval14", "dpo", &flags, batches);
    let last = |out: &Path| rows(out).into_iter().find(|r| r.contains_key("eval_loss")).unwrap();
    let (a, b) = (last(&one), last(&two));
    for key in ["eval_loss", "eval_preference_accuracy"] {
        let (p, q) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((p - q).abs() <= 1e-5 * p.abs(), "{key}: {p} vs {q}");
    }
}

fn rows_with(out: &Path, key: &str) -> usize {
    rows(out).iter().filter(|r| r.contains_key(key)).count()
}

/// SIGTERM to `prefalign launch` reaches every rank; they stop after the same step, rank 0 writes a checkpoint, the
/// launch exits with 143, and the run resumes from that checkpoint bit for bit.
#[test]
fn a_stop_signal_stops_every_rank_at_one_checkpoint() {
    let s = setup();
    let reference = s.reference.to_str().unwrap().to_string();
    let extra = ["--max-steps", "150", "--save-steps", "25", "--save-total-limit", "2", "--ref-model", &reference];
    let launch = |out: &Path, more: &[&str]| -> Vec<String> {
        launch_two(training_args(&s, "dpo", out, 2, &[&extra[..], more].concat()))
    };
    let whole = s.root.join("whole");
    succeed(command(&s, &launch(&whole, &[])).output().unwrap(), "uninterrupted");
    let stopped = s.root.join("stopped");
    let child = command(&s, &launch(&stopped, &[])).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(&stopped.join("checkpoint-25"));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    // the newest checkpoint is where both ranks stopped: rank 0 logged no step after it
    let newest = std::fs::read_dir(&stopped)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok()?.strip_prefix("checkpoint-")?.parse::<u64>().ok())
        .max()
        .unwrap();
    assert!(newest < 150, "the run ended before the signal; {stderr}");
    assert_eq!(rows(&stopped).last().unwrap()["step"].as_u64(), Some(newest), "{stderr}");
    succeed(command(&s, &launch(&stopped, &["--resume-from-checkpoint", "last"])).output().unwrap(), "resumed");
    assert_eq!(rows(&whole), rows(&stopped));
}

/// `--shard-optimizer-state` (ZeRO-1): each rank keeps and updates a share of AdamW's state, and the run is DDP's
/// bit for bit; its checkpoints hold every moment (gathered on rank 0), and it resumes from them bit for bit.
#[test]
fn a_sharded_optimizer_state_trains_and_resumes_as_ddp() {
    let s = setup();
    let reference = s.reference.to_str().unwrap().to_string();
    let run = |out: &Path, more: &[&str]| {
        let flags = [&["--ref-model", &reference, "--save-steps", "5"], more].concat();
        let args = launch_two(training_args(&s, "dpo", out, 2, &flags));
        succeed(command(&s, &args).output().unwrap(), &out.display().to_string());
    };
    let (ddp, sharded) = (s.root.join("ddp"), s.root.join("sharded"));
    run(&ddp, &[]);
    run(&sharded, &["--shard-optimizer-state"]);
    assert_eq!(rows(&ddp), rows(&sharded));
    for file in ["model.safetensors", "checkpoint-5/optimizer.safetensors"] {
        let (a, b) = (read_tensors(&ddp.join(file)), read_tensors(&sharded.join(file)));
        assert_eq!(a.len(), b.len(), "{file}");
        for (name, t) in &a {
            assert!(t.equal(&b[name]), "{file}: {name} differs");
        }
    }
    let whole = s.root.join("whole");
    run(&whole, &["--shard-optimizer-state", "--max-steps", "8"]);
    run(&sharded, &["--shard-optimizer-state", "--max-steps", "8", "--resume-from-checkpoint", "last"]);
    assert_eq!(rows(&whole), rows(&sharded));
}

/// A non-finite loss on one rank stops every rank at that step: that rank names its rows, the others name it.
#[test]
fn a_nonfinite_loss_on_one_rank_is_named_by_every_rank() {
    let s = setup();
    // ORPO keeps the 4th pair (line 8) with its completion truncated away at max_length 80: a NaN loss on rank 1
    let data = standard_rows(&s, 4..8);
    let out = s.root.join("out");
    let training = [
        "orpo",
        "--model",
        s.policy.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--per-device-train-batch-size",
        "2",
        "--max-length",
        "80",
        "--keep-empty-completions",
        "--allow-empty-completions",
        "--max-steps",
        "1",
        "--train-sampling-strategy",
        "sequential",
    ];
    let args = launch_two(training.map(String::from).to_vec());
    let output = command(&s, &args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("non-finite loss NaN at step 1 (batch rows: ") && stderr.contains("rows4-8.jsonl:4"),
        "{stderr}"
    );
    assert!(stderr.contains("non-finite loss on rank(s) [1]"), "{stderr}");
}

/// TRL 1.16 with 2 processes under torchrun and Gloo, 5 steps: every logged metric within 1e-4 relative and the
/// final weights, for DPO with a reference model, ORPO and CPO.
#[test]
fn two_ranks_train_as_trl_under_accelerate() {
    let s = setup();
    let reference = s.reference.to_str().unwrap().to_string();
    // ORPO and CPO in TRL's layout: their logits/* average padding too, which prefalign's packed layout does not
    // compute
    let trl_layout = vec!["--no-prefix-sharing", "--no-packing"];
    let cases = [
        ("dpo_ddp_ref_model", "dpo", vec!["--ref-model", &reference]),
        ("orpo_ddp", "orpo", trl_layout.clone()),
        ("cpo_ddp", "cpo", trl_layout),
    ];
    for (name, cmd, extra) in cases {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(&format!("distributed/{name}.json"))).unwrap())
                .unwrap();
        assert_eq!(expected["settings"]["world_size"], 2);
        let out = s.root.join(name);
        succeed(command(&s, &launch_two(training_args(&s, cmd, &out, 2, &extra))).output().unwrap(), name);
        crate::training::assert_history(name, &rows(&out), &expected, &|_| false);
        let weights = read_tensors(&out.join("model.safetensors"));
        for (param, stats) in expected["final_params"].as_object().unwrap() {
            let ours = weights[param].to_kind(tch::Kind::Double);
            let (sum, norm) = (ours.sum(tch::Kind::Double).double_value(&[]), ours.norm().double_value(&[]));
            let (want_sum, want_norm) = (stats[0].as_f64().unwrap(), stats[1].as_f64().unwrap());
            let tolerance = 1e-4 * want_norm.abs().max(1.0);
            assert!((norm - want_norm).abs() <= tolerance, "{name}: {param} norm {norm} vs {want_norm}");
            assert!((sum - want_sum).abs() <= tolerance, "{name}: {param} sum {sum} vs {want_sum}");
        }
    }
}

fn spawn_rank(s: &Setup, args: &[String], rank: usize, port: u16) -> Child {
    command(s, args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// torchrun's environment (as `torchrun --no-python` sets it) and `prefalign launch` give the same run.
#[test]
fn launch_and_torchruns_environment_give_the_same_run() {
    let s = setup();
    let (_, launched) = one_and_two(&s, "launched", "orpo", &[]);
    let out = s.root.join("env");
    let args = training_args(&s, "orpo", &out, 2, &[]);
    let port = free_port();
    let ranks: Vec<Child> = (0..2).map(|rank| spawn_rank(&s, &args, rank, port)).collect();
    for child in ranks {
        succeed(child.wait_with_output().unwrap(), "a rank");
    }
    assert_eq!(rows(&launched), rows(&out));
}

/// Waits until `path` exists (or panics after a minute).
fn wait_for(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// kill -9 of one rank mid-run: the other stops with an error naming it; resuming both from the last checkpoint
/// gives the uninterrupted run bit for bit. A stalled rank (SIGSTOP) is named within --ddp-timeout too, and a
/// checkpoint cannot be resumed by another number of processes.
#[test]
fn a_dead_or_stalled_rank_is_named_and_the_run_resumes_bit_for_bit() {
    let s = setup();
    let long = ["--max-steps", "200", "--save-steps", "10", "--save-total-limit", "2", "--ref-model"];
    let mut extra: Vec<&str> = long.to_vec();
    let reference = s.reference.to_str().unwrap().to_string();
    extra.push(&reference);
    let whole = s.root.join("whole");
    let port = free_port();
    let whole_args = training_args(&s, "dpo", &whole, 2, &extra);
    for child in (0..2).map(|rank| spawn_rank(&s, &whole_args, rank, port)).collect::<Vec<_>>() {
        succeed(child.wait_with_output().unwrap(), "uninterrupted");
    }

    let killed = s.root.join("killed");
    let args = training_args(&s, "dpo", &killed, 2, &extra);
    let port = free_port();
    let mut ranks: Vec<Child> = (0..2).map(|rank| spawn_rank(&s, &args, rank, port)).collect();
    wait_for(&killed.join("checkpoint-20"));
    let mut victim = ranks.pop().unwrap();
    unsafe { libc::kill(victim.id() as i32, libc::SIGKILL) };
    victim.wait().unwrap();
    let started = Instant::now();
    let output = ranks.pop().unwrap().wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "rank 0 went on without rank 1");
    assert!(started.elapsed() < Duration::from_secs(60), "rank 0 took {:?}", started.elapsed());
    assert!(stderr.contains("rank 1 stopped responding"), "{stderr}");
    assert!(!stderr.contains("frame #"), "a C++ stack trace: {stderr}");

    let port = free_port();
    let resume: Vec<String> = args.iter().cloned().chain(["--resume-from-checkpoint".into(), "last".into()]).collect();
    for child in (0..2).map(|rank| spawn_rank(&s, &resume, rank, port)).collect::<Vec<_>>() {
        succeed(child.wait_with_output().unwrap(), "resumed");
    }
    let (a, b) = (rows(&whole), rows(&killed));
    assert_eq!(a, b, "the resumed run's history");
    let (wa, wb) = (read_tensors(&whole.join("model.safetensors")), read_tensors(&killed.join("model.safetensors")));
    for (name, t) in &wa {
        assert!(t.equal(&wb[name]), "{name} differs after the resume");
    }

    // one process cannot continue what two began
    let one = command(&s, &resume).output().unwrap();
    let stderr = String::from_utf8_lossy(&one.stderr);
    assert!(!one.status.success() && stderr.contains("resume it with as many"), "{stderr}");

    // a stalled rank: the other gives up after --ddp-timeout and names it
    let stalled = s.root.join("stalled");
    let mut args = training_args(&s, "dpo", &stalled, 2, &extra);
    let at = args.iter().position(|a| a == "--ddp-timeout").unwrap();
    args[at + 1] = "5".into();
    let port = free_port();
    let mut ranks: Vec<Child> = (0..2).map(|rank| spawn_rank(&s, &args, rank, port)).collect();
    wait_for(&stalled.join("checkpoint-10"));
    let mut sleeper = ranks.pop().unwrap();
    unsafe { libc::kill(sleeper.id() as i32, libc::SIGSTOP) };
    let started = Instant::now();
    let output = ranks.pop().unwrap().wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    unsafe { libc::kill(sleeper.id() as i32, libc::SIGKILL) };
    sleeper.wait().unwrap();
    assert!(!output.status.success());
    assert!(started.elapsed() < Duration::from_secs(30), "rank 0 took {:?}", started.elapsed());
    assert!(stderr.contains("rank 1 stopped responding"), "{stderr}");
}
