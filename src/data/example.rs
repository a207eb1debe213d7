//! Preference rows as TRL reads them: the format detected from the columns (standard strings, conversational
//! messages, or an implicit prompt shared by `chosen` and `rejected`), column mapping, validation that names
//! the row, and TRL's `extract_prompt` with its exact splitting rules.

use crate::data::chat_template::Message;
use crate::data::invalid::{ColumnError, InvalidRow, MessageError, RowError, ROLES};
use crate::data::source::{json_kind, RawRow};
use serde_json::{Map, Value};

/// A prompt or a completion: plain text, or chat messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

impl Turns {
    pub fn is_empty(&self) -> bool {
        match self {
            Turns::Text(t) => t.is_empty(),
            Turns::Messages(m) => m.is_empty(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// `prompt`, `chosen`, `rejected` strings
    Standard,
    /// the same columns as lists of `{role, content}` messages
    Conversational,
    /// only `chosen` and `rejected` strings; the prompt is their common prefix
    ImplicitStandard,
    /// only `chosen` and `rejected` conversations
    ImplicitConversational,
}

impl DatasetFormat {
    pub fn is_conversational(self) -> bool {
        matches!(self, Self::Conversational | Self::ImplicitConversational)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Standard => "standard (prompt/chosen/rejected strings)",
            Self::Conversational => "conversational (prompt/chosen/rejected messages)",
            Self::ImplicitStandard => "implicit prompt (chosen/rejected strings)",
            Self::ImplicitConversational => "implicit prompt (chosen/rejected messages)",
        }
    }
}

/// Which columns hold the prompt, the chosen and the rejected completion.
#[derive(Debug, Clone)]
pub struct Columns {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self { prompt: "prompt".into(), chosen: "chosen".into(), rejected: "rejected".into() }
    }
}

/// One preference pair; `prompt` is `None` until an implicit prompt is extracted.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub location: String,
    pub prompt: Option<Turns>,
    pub chosen: Turns,
    pub rejected: Turns,
}

/// Detects the format from the first row as TRL does (`is_conversational` on its values; a prompt column makes
/// it explicit).
pub fn detect_format(first: &RawRow, columns: &Columns) -> DatasetFormat {
    let conversational = first.fields.get(&columns.chosen).is_some_and(is_message_list);
    match (first.fields.contains_key(&columns.prompt), conversational) {
        (true, false) => DatasetFormat::Standard,
        (true, true) => DatasetFormat::Conversational,
        (false, false) => DatasetFormat::ImplicitStandard,
        (false, true) => DatasetFormat::ImplicitConversational,
    }
}

fn is_message_list(value: &Value) -> bool {
    value.as_array().and_then(|items| items.first()).is_some_and(|m| m.get("role").is_some())
}

/// Validation rules beyond the column types.
#[derive(Debug, Clone, Copy, Default)]
pub struct Validation {
    /// Accept empty completions as TRL does (DPO trains on a lone EOS; ORPO may produce NaN).
    pub allow_empty_completions: bool,
}

/// Reads one row in `format`; every problem names the column and the row.
pub fn parse_row(
    row: &RawRow,
    format: DatasetFormat,
    columns: &Columns,
    rules: Validation,
) -> Result<PreferencePair, InvalidRow> {
    let invalid = |reason: RowError| InvalidRow { location: row.location.clone(), reason };
    let column_problem = |name: &str, problem: ColumnError| invalid(RowError::column(name, problem));
    let conversational = format.is_conversational();
    let column = |name: &str| -> Result<Turns, InvalidRow> {
        let value = row.fields.get(name).ok_or_else(|| invalid(missing_column(row, name)))?;
        parse_turns(value, conversational).map_err(|e| column_problem(name, e))
    };
    let prompt = match format {
        DatasetFormat::Standard | DatasetFormat::Conversational => Some(column(&columns.prompt)?),
        _ => None,
    };
    let chosen = column(&columns.chosen)?;
    let rejected = column(&columns.rejected)?;
    for (name, turns) in [(&columns.chosen, &chosen), (&columns.rejected, &rejected)] {
        if turns.is_empty() && !rules.allow_empty_completions {
            return Err(invalid(RowError::EmptyColumn(name.clone())));
        }
    }
    if let Some(Turns::Messages(messages)) = &prompt {
        check_prompt_roles(messages).map_err(|e| column_problem(&columns.prompt, e))?;
        for (name, turns) in [(&columns.chosen, &chosen), (&columns.rejected, &rejected)] {
            if let Turns::Messages(m) = turns {
                check_completion_roles(m).map_err(|e| column_problem(name, e))?;
            }
        }
    }
    if format == DatasetFormat::ImplicitConversational {
        for (name, turns) in [(&columns.chosen, &chosen), (&columns.rejected, &rejected)] {
            if let Turns::Messages(m) = turns {
                check_prompt_roles(m).map_err(|e| column_problem(name, e))?;
            }
        }
    }
    Ok(PreferencePair { location: row.location.clone(), prompt, chosen, rejected })
}

/// The row has no column `name`: the error lists the columns it has.
pub fn missing_column(row: &RawRow, name: &str) -> RowError {
    let mut present: Vec<String> = row.fields.keys().cloned().collect();
    present.sort();
    RowError::MissingColumn { column: name.to_string(), present }
}

pub(crate) fn parse_turns(value: &Value, conversational: bool) -> Result<Turns, ColumnError> {
    match (value, conversational) {
        (Value::String(text), false) => Ok(Turns::Text(text.clone())),
        (Value::Array(items), true) => items
            .iter()
            .enumerate()
            .map(|(index, item)| parse_message(item).map_err(|problem| ColumnError::Message { index, problem }))
            .collect::<Result<_, _>>()
            .map(Turns::Messages),
        (other, false) => Err(ColumnError::ExpectedText(json_kind(other))),
        (other, true) => Err(ColumnError::ExpectedMessages(json_kind(other))),
    }
}

fn parse_message(value: &Value) -> Result<Message, MessageError> {
    let Value::Object(map) = value else {
        return Err(MessageError::NotAnObject(json_kind(value)));
    };
    let role = match map.get("role") {
        Some(Value::String(role)) if ROLES.contains(&role.as_str()) => role.clone(),
        Some(Value::String(role)) => return Err(MessageError::UnknownRole(role.clone())),
        Some(other) => return Err(MessageError::RoleNotText(json_kind(other))),
        None => return Err(MessageError::NoRole),
    };
    let content = match map.get("content") {
        Some(Value::String(content)) => content.clone(),
        Some(other) => return Err(MessageError::ContentNotText(json_kind(other))),
        None => return Err(MessageError::NoContent),
    };
    let extra: Map<String, Value> =
        map.iter().filter(|(k, _)| *k != "role" && *k != "content").map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(Message { role, content, extra })
}

/// A prompt (or a whole implicit conversation) needs a message, and `system` only first.
fn check_prompt_roles(messages: &[Message]) -> Result<(), ColumnError> {
    if messages.is_empty() {
        return Err(ColumnError::NoMessages);
    }
    if let Some(i) = messages.iter().skip(1).position(|m| m.role == "system") {
        return Err(ColumnError::SystemNotFirst(i + 1));
    }
    Ok(())
}

/// A completion answers the prompt: it starts with an assistant message.
fn check_completion_roles(messages: &[Message]) -> Result<(), ColumnError> {
    match messages.first() {
        Some(first) if first.role != "assistant" => Err(ColumnError::CompletionRole(first.role.clone())),
        _ => Ok(()),
    }
}

/// TRL's `extract_prompt`: the longest common prefix of chosen and rejected (characters for text, whole
/// messages for conversations) becomes the prompt. TRL's quirks are kept on purpose, for identical token ids:
/// a space before the first difference moves into the completions; when no difference is found the split
/// falls one element before the end of the shorter side; when the very first element differs Python's
/// `chosen[-1]` is consulted, which can make the split index -1.
pub fn extract_prompt(pair: &PreferencePair) -> Result<PreferencePair, RowError> {
    let (prompt, chosen, rejected) = match (&pair.chosen, &pair.rejected) {
        (Turns::Text(c), Turns::Text(r)) => {
            let (c, r): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let idx = split_index(&c, &r, |x| *x == ' ')?;
            let (p, c, r) =
                (py_slice(&c, None, Some(idx)), py_slice(&c, Some(idx), None), py_slice(&r, Some(idx), None));
            (Turns::Text(p.iter().collect()), Turns::Text(c.iter().collect()), Turns::Text(r.iter().collect()))
        }
        (Turns::Messages(c), Turns::Messages(r)) => {
            // A message is never equal to " ", so the space rule never applies.
            let idx = split_index(c, r, |_| false)?;
            (
                Turns::Messages(py_slice(c, None, Some(idx)).to_vec()),
                Turns::Messages(py_slice(c, Some(idx), None).to_vec()),
                Turns::Messages(py_slice(r, Some(idx), None).to_vec()),
            )
        }
        _ => return Err(RowError::MixedFormats),
    };
    Ok(PreferencePair { location: pair.location.clone(), prompt: Some(prompt), chosen, rejected })
}

/// The loop of TRL's `extract_prompt`, returning Python's `idx` (possibly -1).
fn split_index<T: PartialEq>(chosen: &[T], rejected: &[T], is_space: impl Fn(&T) -> bool) -> Result<isize, RowError> {
    let shortest = chosen.len().min(rejected.len());
    if shortest == 0 {
        return Err(RowError::NoPromptToExtract);
    }
    for idx in 0..shortest {
        if chosen[idx] != rejected[idx] {
            let before = if idx == 0 { chosen.last() } else { chosen.get(idx - 1) };
            return Ok(if before.is_some_and(&is_space) { idx as isize - 1 } else { idx as isize });
        }
    }
    Ok(shortest as isize - 1)
}

/// Python's `items[start:end]` for the non-negative-or-minus-one indices `extract_prompt` produces.
fn py_slice<T>(items: &[T], start: Option<isize>, end: Option<isize>) -> &[T] {
    let resolve =
        |i: isize| if i < 0 { items.len().saturating_sub(i.unsigned_abs()) } else { (i as usize).min(items.len()) };
    let start = start.map_or(0, resolve);
    let end = end.map_or(items.len(), resolve);
    if start >= end {
        &items[0..0]
    } else {
        &items[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_pair(chosen: &str, rejected: &str) -> PreferencePair {
        PreferencePair {
            location: "t".into(),
            prompt: None,
            chosen: Turns::Text(chosen.into()),
            rejected: Turns::Text(rejected.into()),
        }
    }

    fn split(chosen: &str, rejected: &str) -> (String, String, String) {
        let p = extract_prompt(&text_pair(chosen, rejected)).unwrap();
        let text = |t: Option<&Turns>| match t {
            Some(Turns::Text(s)) => s.clone(),
            _ => unreachable!(),
        };
        (text(p.prompt.as_ref()), text(Some(&p.chosen)), text(Some(&p.rejected)))
    }

    #[test]
    fn extract_prompt_reproduces_trl_quirks() {
        let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(
            split("Q: sky? A: It is blue.", "Q: sky? A: It is green."),
            s("Q: sky? A: It is", " blue.", " green.")
        );
        assert_eq!(split("The answer is blue", "The answer is black"), s("The answer is bl", "ue", "ack"));
        assert_eq!(split("Say OK. OK", "Say OK."), s("Say OK", ". OK", "."));
        assert_eq!(split("Yes ", "No"), s("Yes", " ", "o"));
        assert_eq!(
            split("日本の首都は？東京です。", "日本の首都は？大阪です。"),
            s("日本の首都は？", "東京です。", "大阪です。")
        );
        assert!(extract_prompt(&text_pair("", "x")).is_err());
    }
}
