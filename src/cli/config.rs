//! `--config recipe.yaml`: TRL / alignment-handbook YAML keys (snake_case, as written there) become the
//! subcommand's flags. They are placed before the command line's own flags, which therefore override them. The
//! command line itself may be spelled as TRL's (`--learning_rate 1e-5 --bf16 false`).

use crate::cli::recipe_keys::{self, KeyAnswer};
use anyhow::{bail, Context, Result};
use clap::error::ErrorKind;
use clap::{ArgAction, Command};
use serde_norway::Value;
use std::ffi::OsString;

/// Returns `argv` with `--config FILE` replaced by the flags the file sets, and the flags spelled as TRL's command
/// line spells them (`normalize`).
pub fn expand(argv: Vec<OsString>, cli: &Command) -> Result<Vec<OsString>> {
    let mut subcommand = cli.clone();
    let mut first_flag = 1;
    while let Some(next) =
        argv.get(first_flag).and_then(|a| subcommand.find_subcommand(a.to_string_lossy().as_ref()).cloned())
    {
        subcommand = next;
        first_flag += 1;
    }
    let Some(at) = argv.iter().position(|a| a == "--config" || a.to_string_lossy().starts_with("--config=")) else {
        return Ok(normalize(argv, first_flag, &subcommand));
    };
    let path = match argv[at].to_string_lossy().strip_prefix("--config=") {
        Some(path) => path.to_string(),
        None => argv.get(at + 1).map(|p| p.to_string_lossy().into_owned()).context("--config needs a file")?,
    };
    let consumed = if argv[at].to_string_lossy().starts_with("--config=") { 1 } else { 2 };
    let flags = flags_from_file(&path, &subcommand)?;
    let mut out: Vec<OsString> = argv[..first_flag].to_vec();
    out.extend(flags.into_iter().map(OsString::from));
    out.extend(argv[first_flag..at].iter().cloned());
    out.extend(argv[at + consumed..].iter().cloned());
    Ok(normalize(out, first_flag, &subcommand))
}

/// The flags from `argv[first_flag..]` as clap takes them, accepting what transformers' `HfArgumentParser` does:
/// snake_case names (`--learning_rate`), and a switch as `--bf16`, `--bf16 true|false`, `--bf16=false` or
/// `--no-bf16`. A switch turned off drops every earlier occurrence of it (the recipe's included), as the last
/// word wins there. Nothing after `--` is touched.
fn normalize(argv: Vec<OsString>, first_flag: usize, command: &Command) -> Vec<OsString> {
    let switch = |name: &str| {
        command.get_arguments().find(|a| {
            matches!(a.get_action(), ArgAction::SetTrue)
                && (a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|aliases| aliases.contains(&name)))
        })
    };
    let mut out: Vec<OsString> = argv.iter().take(first_flag).cloned().collect();
    let mut rest = argv.into_iter().skip(first_flag).peekable();
    while let Some(arg) = rest.next() {
        let text = arg.to_string_lossy().into_owned();
        if text == "--" {
            out.push(arg);
            out.extend(rest);
            break;
        }
        let Some(flag) = text.strip_prefix("--") else {
            out.push(arg);
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name.replace('_', "-"), Some(value.to_string())),
            None => (flag.replace('_', "-"), None),
        };
        let (target, on) = match (switch(&name), name.strip_prefix("no-").and_then(switch)) {
            (Some(arg), _) => {
                let word = value.or_else(|| {
                    let next = rest.peek()?.to_string_lossy().to_lowercase();
                    is_switch_word(&next).then(|| rest.next().expect("peeked").to_string_lossy().into_owned())
                });
                match word.map(|w| switch_value(&Value::String(w))) {
                    Some(Ok(on)) => (arg, on),
                    // not a boolean: left for clap to report
                    Some(Err(_)) | None => (arg, true),
                }
            }
            (None, Some(arg)) => (arg, false),
            (None, None) => {
                out.push(OsString::from(match value {
                    Some(value) => format!("--{name}={value}"),
                    None => format!("--{name}"),
                }));
                continue;
            }
        };
        let long = format!("--{}", target.get_long().expect("switches have long names"));
        let aliases: Vec<String> =
            target.get_all_aliases().unwrap_or_default().iter().map(|a| format!("--{a}")).collect();
        out.retain(|a| a.to_string_lossy() != long && !aliases.iter().any(|alias| a.to_string_lossy() == *alias));
        if on {
            out.push(OsString::from(long));
        }
    }
    out
}

/// Words transformers' `string_to_bool` reads as a boolean.
fn is_switch_word(word: &str) -> bool {
    matches!(word, "true" | "false" | "yes" | "no" | "y" | "n" | "t" | "f" | "1" | "0")
}

fn flags_from_file(path: &str, command: &Command) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {path}"))?;
    let value: Value = serde_norway::from_str(&text).with_context(|| format!("{path} is not valid YAML"))?;
    let Value::Mapping(map) = value else {
        bail!("{path}: expected a mapping of keys to values at the top level");
    };
    let mut flags = Vec::new();
    let mut without_effect = Vec::new();
    for (key, value) in map {
        let key = key.as_str().with_context(|| format!("{path}: a key is not a string"))?.to_string();
        let in_file = || format!("{path}: key \"{key}\"");
        // lr_scheduler_kwargs: {min_lr_rate: 0.1} is the flag --min-lr-rate
        if let (Value::Mapping(kwargs), "lr_scheduler_kwargs") = (&value, key.as_str()) {
            for (name, value) in kwargs {
                match name.as_str() {
                    Some("min_lr_rate") => flags.extend(["--min-lr-rate".to_string(), scalar(value)?]),
                    _ => bail!(
                        "{}: lr_scheduler_kwargs {} is not supported: only min_lr_rate is taken (cosine_with_min_lr)",
                        in_file(),
                        serde_json::to_string(name).unwrap_or_default()
                    ),
                }
            }
            continue;
        }
        let long = key.replace('_', "-");
        let Some(arg) = command.get_arguments().find(|a| {
            a.get_long() == Some(long.as_str())
                || a.get_all_aliases().is_some_and(|aliases| aliases.contains(&long.as_str()))
        }) else {
            let json = serde_json::to_value(&value).with_context(in_file)?;
            match recipe_keys::answer(command.get_name(), &key, &json) {
                KeyAnswer::Accepted => without_effect.push(key),
                KeyAnswer::Refused(why) => bail!("{path}: {why}"),
                KeyAnswer::Unknown => bail!("{path}: unknown key \"{key}\"{}", suggestion(&key, command)),
            }
            continue;
        };
        let flag = format!("--{}", arg.get_long().expect("found by its long name"));
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            if switch_value(&value).with_context(in_file)? {
                flags.push(flag);
            }
            continue;
        }
        let text = match value {
            Value::Null => continue,
            // a mapping (dataset_mixture, dataset_mixer) travels as JSON, in the recipe's order
            Value::Mapping(_) => serde_json::to_string(&value).with_context(in_file)?,
            Value::Sequence(items) => {
                items.iter().map(scalar).collect::<Result<Vec<_>>>().with_context(in_file)?.join(",")
            }
            other => scalar(&other).with_context(in_file)?,
        };
        check_value(command, &flag, &text).with_context(in_file)?;
        flags.extend([flag, text]);
    }
    if !without_effect.is_empty() {
        eprintln!(
            "note: {path}: accepted without effect in prefalign (docs/TRAINING.md, \"Recipe keys\"): {}",
            without_effect.join(", ")
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn expanded(args: &[&str]) -> Vec<String> {
        let argv = std::iter::once("prefalign").chain(args.iter().copied()).map(OsString::from).collect();
        let out = expand(argv, &crate::cli::Cli::command()).unwrap();
        out.into_iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn trl_spellings_of_the_command_line_become_clap_flags() {
        assert_eq!(
            expanded(&[
                "dpo",
                "--model_name_or_path",
                "m",
                "--learning_rate=1e-5",
                "--per_device_train_batch_size",
                "2"
            ]),
            ["dpo", "--model-name-or-path", "m", "--learning-rate=1e-5", "--per-device-train-batch-size", "2"]
        );
        assert_eq!(expanded(&["dpo", "--bf16", "--use_peft", "True"]), ["dpo", "--bf16", "--use-peft"]);
        assert_eq!(expanded(&["dpo", "--bf16", "--bf16", "false"]), ["dpo"]);
        assert_eq!(expanded(&["dpo", "--bf16=yes", "--gradient_checkpointing=0"]), ["dpo", "--bf16"]);
        assert_eq!(expanded(&["dpo", "--bf16", "--no-bf16", "--no_packing"]), ["dpo", "--no-packing"]);
        // a switch's value that is no boolean is left for clap to refuse; after "--" nothing changes
        assert_eq!(expanded(&["dpo", "--bf16", "maybe"]), ["dpo", "--bf16", "maybe"]);
        assert_eq!(expanded(&["dpo", "--x", "--", "--a_b"]), ["dpo", "--x", "--", "--a_b"]);
    }

    #[test]
    fn the_command_line_turns_off_a_switch_the_recipe_turned_on() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.yaml");
        std::fs::write(&recipe, "bf16: true\ngradient_checkpointing: true\nlearning_rate: 1.0e-6\n").unwrap();
        let recipe = recipe.to_str().unwrap();
        assert_eq!(
            expanded(&["dpo", "--config", recipe, "--no-bf16", "--learning_rate", "2e-6"]),
            ["dpo", "--gradient-checkpointing", "--learning-rate", "1e-6", "--learning-rate", "2e-6"]
        );
        assert_eq!(expanded(&["dpo", "--config", recipe, "--bf16", "False"])[..2], ["dpo", "--gradient-checkpointing"]);
    }
}
