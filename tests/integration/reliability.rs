//! Nothing lost, nothing silently coerced (docs/RELIABILITY.md): `kill -9` at seeded random moments, each followed by
//! a resume, ends exactly where an uninterrupted run ends; a second run into a busy folder is refused; a write
//! failure while resuming leaves the last checkpoint and the history whole; SIGINT and SIGTERM stop after a
//! checkpoint; bad flag values, recipe keys and hostile rows are refused, naming what is wrong.

use crate::common::{fixture, tiny_model_dir};
use crate::tensorboard::{decode_event, read_records};
use prefalign::train::checkpoint::list_checkpoints;
use rand::{Rng, SeedableRng};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 10;

/// prefalign on one thread, as every test here compares runs bit for bit.
fn prefalign() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_prefalign"));
    command.env("OMP_NUM_THREADS", "1");
    command
}

/// DPO on the fixture pairs with a checkpoint after every step (the newest two kept).
fn training(model: &Path, out: &Path, steps: usize) -> Command {
    let mut command = prefalign();
    command
        .args(["dpo", "--model", model.to_str().unwrap()])
        .args(["--dataset", fixture("trl_data/standard.jsonl").to_str().unwrap()])
        .args(["--max-length", "64", "--allow-empty-completions", "--per-device-train-batch-size", "2"])
        .args(["--max-steps", &steps.to_string(), "--logging-steps", "1", "--save-steps", "1"])
        .args(["--save-total-limit", "2", "--learning-rate", "1e-3", "--output-dir", out.to_str().unwrap()]);
    command
}

fn run(mut command: Command) -> Output {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{command:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    output
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// What a finished run leaves that must not depend on how often it was interrupted.
#[derive(Debug, PartialEq)]
struct Finished {
    model: Vec<u8>,
    last_checkpoint: PathBuf,
    optimizer: Vec<u8>,
    trainer_state: String,
    metrics: String,
    /// (tag, step, value bits) of every event of every event file, sorted
    scalars: Vec<(String, i64, u32)>,
}

fn finished(out: &Path) -> Finished {
    let read = |path: PathBuf| std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, checkpoint) = list_checkpoints(out).unwrap().pop().expect("a checkpoint");
    let mut scalars = Vec::new();
    for entry in std::fs::read_dir(out.join("runs")).unwrap() {
        for record in read_records(&entry.unwrap().path()) {
            let event = decode_event(&record);
            scalars.extend(event.values.into_iter().map(|(tag, value)| (tag, event.step, value.to_bits())));
        }
    }
    scalars.sort();
    Finished {
        model: read(out.join("model.safetensors")),
        last_checkpoint: checkpoint.strip_prefix(out).unwrap().to_path_buf(),
        optimizer: read(checkpoint.join("optimizer.safetensors")),
        trainer_state: String::from_utf8(read(checkpoint.join("trainer_state.json"))).unwrap(),
        metrics: String::from_utf8(read(out.join("metrics.jsonl"))).unwrap(),
        scalars,
    }
}

fn has_checkpoint(out: &Path) -> bool {
    out.exists() && !list_checkpoints(out).unwrap().is_empty()
}

#[test]
fn killed_and_resumed_runs_end_exactly_like_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let uninterrupted = dir.path().join("uninterrupted");
    let started = Instant::now();
    run(training(&model, &uninterrupted, STEPS));
    let duration = started.elapsed();

    let out = dir.path().join("interrupted");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(28);
    let (mut kills, mut starts) = (0, 0);
    while kills < 14 {
        starts += 1;
        assert!(starts < 60, "only {kills} of {starts} starts were killed before they finished");
        let mut command = training(&model, &out, STEPS);
        if has_checkpoint(&out) {
            command.args(["--resume-from-checkpoint", "last"]);
        }
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Every other kill lands early: while the process starts, resumes and rewrites its history.
        let window = if kills % 2 == 0 { duration / 5 } else { duration * 6 / 5 };
        std::thread::sleep(window.mul_f64(rng.random::<f64>()));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    let mut last = training(&model, &out, STEPS);
    if has_checkpoint(&out) {
        last.args(["--resume-from-checkpoint", "last"]);
    }
    run(last);

    let (a, b) = (finished(&uninterrupted), finished(&out));
    assert_eq!(a.last_checkpoint, b.last_checkpoint);
    assert!(a.model == b.model, "the final model differs after {kills} kills");
    assert!(a.optimizer == b.optimizer, "the optimizer state differs after {kills} kills");
    assert_eq!(a.trainer_state, b.trainer_state);
    assert_eq!(a.metrics.lines().count(), STEPS);
    assert_eq!(a.metrics, b.metrics, "metrics.jsonl differs after {kills} kills");
    assert_eq!(a.scalars, b.scalars, "the TensorBoard scalars differ after {kills} kills");
}

#[test]
fn a_second_run_into_a_busy_folder_is_refused_and_a_dead_runs_lock_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let out = dir.path().join("out");
    let mut command = training(&model, &out, 100_000);
    let mut first = command.args(["--save-steps", "0"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let lock = out.join(prefalign::files::LOCK_FILE);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&lock).ok().as_deref() != Some(first.id().to_string().as_str()) {
        assert!(Instant::now() < deadline, "the first run never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let second = training(&model, &out, 2).output().unwrap();
    assert!(!second.status.success());
    let message = stderr(&second);
    assert!(message.contains("in use by another prefalign run"), "{message}");
    assert!(
        message.contains(&format!("process {}", first.id())) && message.contains(out.to_str().unwrap()),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "refused at once");
    first.kill().unwrap();
    first.wait().unwrap();
    run(training(&model, &out, 2));
}

#[test]
fn a_write_failure_while_resuming_leaves_the_last_checkpoint_and_the_history_whole() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let out = dir.path().join("out");
    run(training(&model, &out, 4)); // keeps checkpoint-3 and the final checkpoint-4
    let checkpoint = out.join("checkpoint-4");
    let before: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&checkpoint)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();

    // Files may grow to 1 MiB only (the model's weights are larger): the disk fills while checkpoint-4 is rewritten.
    let mut resumed = training(&model, &out, 4);
    resumed.args(["--resume-from-checkpoint", out.join("checkpoint-3").to_str().unwrap()]);
    // SAFETY: setrlimit and signal are async-signal-safe, as a pre_exec closure needs.
    unsafe {
        resumed.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 1 << 20, rlim_max: 1 << 20 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN); // a write past the limit fails with EFBIG instead
            Ok(())
        });
    }
    let output = resumed.output().unwrap();
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("cannot write") && message.contains("checkpoint-4"), "{message}");
    for (path, bytes) in before {
        assert!(std::fs::read(&path).unwrap() == bytes, "{} changed", path.display());
    }
    prefalign::model::load(&checkpoint, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4], "the rows up to the checkpoint, then the resumed run's own");
    // The next start clears what the failed save left behind, and finishes.
    let mut again = training(&model, &out, 4);
    again.args(["--resume-from-checkpoint", "last"]);
    run(again);
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".partial")));
}

#[test]
fn sigint_and_sigterm_stop_after_a_checkpoint_that_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    for (signal, name, code) in [(libc::SIGINT, "SIGINT", 130), (libc::SIGTERM, "SIGTERM", 143)] {
        let out = dir.path().join(name);
        let mut command = training(&model, &out, 100_000);
        command.args(["--save-steps", "0"]).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
            assert!(Instant::now() < deadline, "no training rows");
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let output = child.wait_with_output().unwrap();
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(code), "{message}");
        assert!(message.contains(&format!("stopped by {name} after step")), "{message}");
        assert!(message.contains("--resume-from-checkpoint"), "{message}");
        let (step, checkpoint) = list_checkpoints(&out).unwrap().pop().expect("the stop's checkpoint");
        assert!(message.contains(checkpoint.to_str().unwrap()), "{message}");
        let mut resumed = training(&model, &out, step + 2);
        resumed.args(["--resume-from-checkpoint", "last"]);
        run(resumed);
    }
    // Outside a training run the first signal ends the process at once.
    let mut bench = prefalign();
    let shape = fixture("models/llama/config.json");
    bench.args(["bench", "--shape", shape.to_str().unwrap(), "--steps", "100000"]).stderr(Stdio::piped());
    let mut child = bench.spawn().unwrap();
    // The reader lives until the child is gone: a closed pipe would fail its next line (exit 101, not 130).
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first_line = String::new();
    while !first_line.starts_with("step 1") {
        first_line.clear();
        assert_ne!(std::io::BufRead::read_line(&mut reader, &mut first_line).unwrap(), 0, "no step 1 line");
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    drop(reader);
}

/// `prefalign dpo` with `args` (and no model or data that exist): its stderr and exit code.
fn refused(args: &[&str]) -> (String, Option<i32>) {
    let output = prefalign().args(["dpo", "--model", "no-model", "--dataset", "no-data"]).args(args).output().unwrap();
    (stderr(&output), output.status.code())
}

#[test]
fn every_bad_value_is_refused_naming_its_flag_or_key() {
    for (flag, value) in [
        ("--per-device-train-batch-size", "0"),
        ("--per-device-eval-batch-size", "0"),
        ("--gradient-accumulation-steps", "0"),
        ("--logging-steps", "0"),
        ("--save-total-limit", "0"),
        ("--max-grad-norm", "NaN"),
        ("--max-grad-norm", "-1"),
        ("--adam-beta1", "1.5"),
        ("--adam-beta2", "-0.1"),
        ("--adam-epsilon", "inf"),
        ("--weight-decay", "-0.01"),
        ("--warmup-ratio", "2"),
        ("--learning-rate", "NaN"),
        ("--learning-rate", "-1e-5"),
        ("--beta", "NaN"),
        ("--beta", "0"),
        ("--label-smoothing", "0.5"),
        ("--loss-weights", "1,NaN"),
        ("--max-length", "0"),
        ("--num-train-epochs", "-1"),
    ] {
        let (message, code) = refused(&[&format!("{flag}={value}")]);
        assert_eq!(code, Some(2), "{flag} {value}: {message}");
        assert!(message.contains(flag) && message.contains("invalid value"), "{flag} {value}: {message}");
    }
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("recipe.yaml");
    for (key, value, expected) in [
        ("adam_beta1", "1.5", "must be in [0, 1)"),
        ("per_device_train_batch_size", "0", "at least 1"),
        ("learning_rate", ".nan", "is not"),
        ("bf16", "\"maybe\"", "expected true or false"),
        ("max_steps", "[1, 2]", "invalid value"),
    ] {
        std::fs::write(&recipe, format!("model_name_or_path: m\ndataset_name: d\n{key}: {value}\n")).unwrap();
        let output = prefalign().args(["dpo", "--config", recipe.to_str().unwrap()]).output().unwrap();
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{key}: {message}");
        assert!(message.contains(recipe.to_str().unwrap()), "{key}: {message}");
        assert!(message.contains(&format!("key \"{key}\"")) && message.contains(expected), "{key}: {message}");
    }
    // What transformers' string_to_bool takes is taken: the run gets as far as the model.
    let out = dir.path().join("out");
    let text = format!("model_name_or_path: no-model\ndataset_name: d\noutput_dir: {}\nbf16: \"yes\"\n", out.display());
    std::fs::write(&recipe, text).unwrap();
    let message = stderr(&prefalign().args(["dpo", "--config", recipe.to_str().unwrap()]).output().unwrap());
    assert!(message.contains("no-model does not exist"), "{message}");

    // Settings that only fail with the data: 0 training steps; prompts longer than --max-length.
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let data = fixture("trl_data/standard.jsonl");
    for (args, expected) in [
        (vec!["--num-train-epochs", "0"], "--num-train-epochs 0 gives 0 training steps"),
        (vec!["--max-length", "2"], "raise --max-length"),
    ] {
        let output = prefalign()
            .args(["dpo", "--model", model.to_str().unwrap(), "--dataset", data.to_str().unwrap()])
            .args(["--output-dir", out.to_str().unwrap(), "--allow-empty-completions"])
            .args(&args)
            .output()
            .unwrap();
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {message}");
        assert!(message.contains(expected), "{args:?}: {message}");
    }
}

#[test]
fn messages_point_at_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let data = fixture("trl_data/standard.jsonl");
    let dpo = |extra: &[&str]| {
        let output = prefalign()
            .args(["dpo", "--dataset", data.to_str().unwrap(), "--output-dir", dir.path().join("o").to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        stderr(&output)
    };
    // A reference whose vocabulary is not the policy's is named, with its path.
    let llama = fixture("models/llama");
    let message = dpo(&["--model", model.to_str().unwrap(), "--ref-model", llama.to_str().unwrap()]);
    assert!(message.contains("the reference model") && message.contains(llama.to_str().unwrap()), "{message}");
    assert!(message.contains("256 tokens") && message.contains("49152"), "{message}");
    // A path that looks local is not looked up on the Hub.
    for path in ["./no/such/model", "/no/such/model", "~/no-model"] {
        let message = dpo(&["--model", path]);
        assert!(message.contains("does not exist") && !message.contains("huggingface.co"), "{path}: {message}");
    }
    // A UTF-8 byte order mark is named as one.
    let bom = dir.path().join("bom.jsonl");
    std::fs::write(&bom, b"\xEF\xBB\xBF{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n").unwrap();
    let error = prefalign::data::source::read_rows(&bom).expect_err("refused");
    assert!(format!("{error:#}").contains("byte order mark"), "{error:#}");
}

/// A NaN in a weight is reported as the weight's, not as a problem of the batch's rows.
#[test]
fn a_nonfinite_weight_is_named_instead_of_the_data_rows() {
    use prefalign::data::prepare::{prepare, PrepareOptions, Rules};
    use prefalign::data::tokenize::PairTokenizer;
    use prefalign::model::tokenizer::TextTokenizer;
    use prefalign::objective::{DpoParams, Objective};
    use prefalign::train::{train, Reference, TrainInputs, TrainerConfig};
    let tokenizer = TextTokenizer::from_hf_dir(&fixture("trl_data/tokenizer")).unwrap();
    let tok = PairTokenizer::new(&tokenizer).unwrap();
    let mut options = PrepareOptions::new(Rules::Dpo);
    options.max_length = Some(64);
    options.validation.allow_empty_completions = true;
    let rows = prefalign::data::source::read_rows(&fixture("trl_data/standard.jsonl")).unwrap();
    let pairs = prepare(rows, &tok, &options).unwrap().pairs;
    let load = |name: &str| prefalign::model::load(&fixture(name), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let policy = load("eval/tiny_policy");
    let reference = load("eval/tiny_ref");
    let weight = "model.layers.1.mlp.up_proj.weight";
    tch::no_grad(|| {
        let _ = policy.vs.variables()[weight].narrow(0, 0, 1).fill_(f64::NAN);
    });
    let out = tempfile::tempdir().unwrap();
    let config = TrainerConfig { output_dir: out.path().to_path_buf(), max_steps: 2, ..TrainerConfig::default() };
    let objective = Objective::Dpo(DpoParams::default());
    let inputs = TrainInputs {
        policy: &policy,
        reference: Reference::Model(&reference),
        train: (&pairs).into(),
        eval: None,
        objective: &objective,
    };
    let message = format!("{:#}", train(&inputs, &config).unwrap_err());
    assert!(message.contains(&format!("the policy's weight {weight} holds NaN")), "{message}");
    assert!(!message.contains("batch rows"), "{message}");
}

/// A row of 50 MB whose prompt cannot fit max_length is dropped before tokenization, in little time and memory.
#[test]
fn a_50_mb_prompt_is_dropped_without_being_tokenized() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(dir.path(), "tiny_policy");
    let data = dir.path().join("hostile.jsonl");
    let prompt = "word ".repeat(10_000_000);
    let rows = [
        serde_json::json!({"prompt": prompt, "chosen": " yes", "rejected": " no"}),
        serde_json::json!({"prompt": "Say yes.", "chosen": " yes", "rejected": " no"}),
    ];
    std::fs::write(&data, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    drop(prompt);
    let started = Instant::now();
    let child = prefalign()
        .args(["data", "inspect", "--dataset", data.to_str().unwrap(), "--model", model.to_str().unwrap()])
        .args(["--max-length", "512"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut child = child;
    let mut stdout_pipe = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout_pipe, &mut text).unwrap();
        text
    });
    // The child's own peak, VmHWM of its memory after exec, read until it exits: its rusage would count this test
    // process's resident set too (Linux carries the spawning process's peak over the exec).
    let mut peak_kib = 0u64;
    let mut status: libc::c_int = 0;
    loop {
        let hwm = std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        });
        peak_kib = peak_kib.max(hwm.unwrap_or(0));
        // SAFETY: waitpid on our own child, not yet waited for.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let stdout = reader.join().unwrap();
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{stdout}");
    let peak_bytes = peak_kib * 1024;
    assert!(peak_bytes > 0 && peak_bytes < 2 << 30, "peak RSS {} MiB", peak_bytes >> 20);
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    assert!(stdout.contains("hostile.jsonl:1") && stdout.contains("not tokenized"), "{stdout}");
}

/// What the fuzzers found (tests/fixtures/fuzz/<target>/, docs/RELIABILITY.md) is an error naming the file, not a
/// panic.
#[test]
fn fuzzer_findings_are_errors() {
    use prefalign::model::gguf::{GgufFile, GgufModel};
    for name in ["dims-product-overflow.gguf", "dim-beyond-i64.gguf"] {
        let path = fixture(&format!("fuzz/gguf/{name}"));
        let Err(error) = GgufFile::open(&path) else { panic!("{name} opened") };
        let message = format!("{error:#}");
        assert!(message.contains("larger than any file holds") && message.contains(name), "{message}");
        assert!(GgufModel::open(&path).is_err(), "{name}");
    }
    // The second file is the first with `attention.key_length` added, which took another path to a division.
    for name in ["zero-attention-heads.gguf", "zero-attention-heads-with-key-length.gguf"] {
        let Err(error) = GgufModel::open(&fixture(&format!("fuzz/gguf/{name}"))) else { panic!("{name} opened") };
        assert!(format!("{error:#}").contains("num_attention_heads is 0"), "{error:#}");
    }
    let source =
        String::from_utf8_lossy(&std::fs::read(fixture("fuzz/chat_template/invalid-strftime-format.jinja")).unwrap())
            .into_owned();
    let special = vec![("bos_token".to_string(), "<s>".to_string())];
    let template = prefalign::data::chat_template::ChatTemplate::new(&source, special).unwrap();
    let messages = [prefalign::data::chat_template::Message::new("user", "Hi!")];
    let error = template.render(&messages, true).expect_err("an invalid strftime format");
    assert!(format!("{error:#}").contains("strftime_now"), "{error:#}");
    let zone = prefalign::data::chat_template::ChatTemplate::new("{{ strftime_now('%Y %z') }}", Vec::new()).unwrap();
    assert!(zone.render(&messages, true).is_ok_and(|text| text.len() == "2026 +0000".len()), "today's time zone");
    // minijinja's excerpt of this broken template subtracted columns unchecked.
    let source = std::fs::read(fixture("fuzz/chat_template/error-excerpt-column-underflow.jinja")).unwrap();
    let result = prefalign::data::chat_template::ChatTemplate::new(&String::from_utf8_lossy(&source), Vec::new())
        .and_then(|t| t.render(&messages, true));
    let error = result.map(|_| ()).expect_err("a broken template");
    assert!(format!("{error:#}").len() < 1000, "{error:#}");
    // minijinja 2 indexed past the end when slicing an empty sequence backwards, and `[:0:-1]` kept the first item.
    let source = std::fs::read(fixture("fuzz/chat_template/reverse-slice-of-empty-sequence.jinja")).unwrap();
    let _ = prefalign::data::chat_template::ChatTemplate::new(&String::from_utf8_lossy(&source), Vec::new())
        .and_then(|t| t.render(&messages, true));
    let slices = "{{ ''[::-2] }}|{{ [][::-1] }}|{{ [1, 2, 3][:0:-1] }}|{{ [1, 2, 3][5:1:-1] }}|{{ 'abc'[::-1] }}";
    let rendered =
        prefalign::data::chat_template::ChatTemplate::new(slices, Vec::new()).unwrap().render(&messages, true);
    assert_eq!(rendered.unwrap(), "|[]|[3, 2]|[3]|cba", "Python's slices");
    // The parquet crate panics on the first file, through a plain file reader spins on the second, asks for more
    // memory than any machine has on the third, and spins skipping lists of booleans on the last two.
    for name in [
        "dictionary-page-overrun.parquet",
        "page-header-skip-past-end.parquet",
        "dictionary-count-beyond-bytes.parquet",
        "footer-boolean-list-spin.parquet",
        "page-header-spin.parquet",
    ] {
        let started = Instant::now();
        let error = prefalign::data::source::read_rows(&fixture(&format!("fuzz/parquet/{name}"))).expect_err(name);
        assert!(format!("{error:#}").contains(name), "{error:#}");
        assert!(started.elapsed() < Duration::from_secs(5), "{name}: {:?}", started.elapsed());
    }
    // An Arrow stream (a save_to_disk folder) whose record batch claims 7e16 rows of no columns.
    let dir = fixture("fuzz/saved/huge-row-count");
    let started = Instant::now();
    let error = prefalign::data::saved::read_saved(&dir, "train").expect_err("a corrupt batch");
    assert!(format!("{error:#}").contains("claims 72057593937264646 rows"), "{error:#}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // The crate reads a footer field it knows by its declared type, so this footer's skipped list of booleans is
    // not where an untyped walk sees it: its decoding gets a deadline instead. Run in a process of its own, whose
    // end stops the spinning thread.
    let name = "footer-known-field-spin.parquet";
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_prefalign"))
        .args(["data", "export", "--dataset", fixture(&format!("fuzz/parquet/{name}")).to_str().unwrap()])
        .args(["--output", out.path().join("rows.jsonl").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains(name) && stderr.contains("to decode"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}
