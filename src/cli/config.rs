//! `--config recipe.yaml`: TRL / alignment-handbook YAML keys (snake_case, as written there) become the
//! subcommand's flags. They are placed before the command line's own flags, which therefore override them.

use anyhow::{bail, Context, Result};
use clap::error::ErrorKind;
use clap::{ArgAction, Command};
use serde_norway::Value;
use std::ffi::OsString;

/// Keys of TRL / alignment-handbook recipes that have no effect here (Hub uploads, integrations, worker
/// counts); accepted with a warning so that recipes run unchanged.
const IGNORED_KEYS: [&str; 15] = [
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_private_repo",
    "log_level",
    "logging_first_step",
    "overwrite_output_dir",
    "remove_unused_columns",
    "dataloader_num_workers",
    "preprocessing_num_workers",
    "dataset_num_proc",
    "run_name",
    "do_eval",
    // PyTorch's reentrant vs non-reentrant checkpointing; prefalign recomputes layers its own way
    "gradient_checkpointing_kwargs",
];

/// Returns `argv` with `--config FILE` replaced by the flags the file sets.
pub fn expand(argv: Vec<OsString>, cli: &Command) -> Result<Vec<OsString>> {
    let Some(at) = argv.iter().position(|a| a == "--config" || a.to_string_lossy().starts_with("--config=")) else {
        return Ok(argv);
    };
    let path = match argv[at].to_string_lossy().strip_prefix("--config=") {
        Some(path) => path.to_string(),
        None => argv.get(at + 1).map(|p| p.to_string_lossy().into_owned()).context("--config needs a file")?,
    };
    let consumed = if argv[at].to_string_lossy().starts_with("--config=") { 1 } else { 2 };
    let mut subcommand = cli.clone();
    let mut first_flag = 1;
    while let Some(next) =
        argv.get(first_flag).and_then(|a| subcommand.find_subcommand(a.to_string_lossy().as_ref()).cloned())
    {
        subcommand = next;
        first_flag += 1;
    }
    let flags = flags_from_file(&path, &subcommand)?;
    let mut out: Vec<OsString> = argv[..first_flag].to_vec();
    out.extend(flags.into_iter().map(OsString::from));
    out.extend(argv[first_flag..at].iter().cloned());
    out.extend(argv[at + consumed..].iter().cloned());
    Ok(out)
}

fn flags_from_file(path: &str, command: &Command) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {path}"))?;
    let value: Value = serde_norway::from_str(&text).with_context(|| format!("{path} is not valid YAML"))?;
    let Value::Mapping(map) = value else {
        bail!("{path}: expected a mapping of keys to values at the top level");
    };
    let mut flags = Vec::new();
    for (key, value) in map {
        let key = key.as_str().with_context(|| format!("{path}: a key is not a string"))?.to_string();
        if IGNORED_KEYS.contains(&key.as_str()) {
            eprintln!("warning: {path}: \"{key}\" has no effect in prefalign; ignored");
            continue;
        }
        let long = key.replace('_', "-");
        let Some(arg) = command.get_arguments().find(|a| {
            a.get_long() == Some(long.as_str())
                || a.get_all_aliases().is_some_and(|aliases| aliases.contains(&long.as_str()))
        }) else {
            bail!("{path}: unknown key \"{key}\"{}", suggestion(&key, command));
        };
        let flag = format!("--{}", arg.get_long().expect("found by its long name"));
        let in_file = || format!("{path}: key \"{key}\"");
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            if switch_value(&value).with_context(in_file)? {
                flags.push(flag);
            }
            continue;
        }
        let text = match value {
            Value::Null => continue,
            Value::Sequence(items) => {
                items.iter().map(scalar).collect::<Result<Vec<_>>>().with_context(in_file)?.join(",")
            }
            other => scalar(&other).with_context(in_file)?,
        };
        check_value(command, &flag, &text).with_context(in_file)?;
        flags.extend([flag, text]);
    }
    Ok(flags)
}

/// A switch's YAML value: a boolean, or what transformers' `string_to_bool` reads as one.
fn switch_value(value: &Value) -> Result<bool> {
    let text = match value {
        Value::Null => return Ok(false),
        Value::Bool(b) => return Ok(*b),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.to_lowercase(),
        _ => bail!("expected true or false"),
    };
    match text.as_str() {
        "true" | "yes" | "y" | "t" | "1" => Ok(true),
        "false" | "no" | "n" | "f" | "0" => Ok(false),
        _ => bail!("expected true or false, found {text:?}"),
    }
}

/// Runs the flag's own value parser on `text` (clap's checks and prefalign's ranges), so that a bad value is
/// reported with the key and the file it came from.
fn check_value(command: &Command, flag: &str, text: &str) -> Result<()> {
    let Err(error) = command.clone().try_get_matches_from(["prefalign", flag, text]) else { return Ok(()) };
    if !matches!(error.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
        return Ok(()); // e.g. the other required flags, which this check leaves out
    }
    let reason = match std::error::Error::source(&error) {
        Some(source) => source.to_string(),
        None => error.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string(),
    };
    bail!("invalid value '{text}': {reason}")
}

fn scalar(value: &Value) -> Result<String> {
    Ok(match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => bail!("expected a string, number, boolean or list of them"),
    })
}

/// "; did you mean \"x\"?" for the known key closest to `key`.
fn suggestion(key: &str, command: &Command) -> String {
    let best = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|long| long.replace('-', "_"))
        .map(|name| (strsim::jaro_winkler(key, &name), name))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, name)) if score > 0.7 => format!("; did you mean \"{name}\"?"),
        _ => " (see --help for the keys this command takes)".to_string(),
    }
}
