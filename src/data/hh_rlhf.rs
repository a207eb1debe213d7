//! Anthropic HH-RLHF transcripts (`"\n\nHuman: …\n\nAssistant: …"`, chosen and rejected sharing every turn but
//! the last reply) as conversational pairs. Cutting at the last "\n\nAssistant:" keeps whole answers, where
//! TRL's character-level `extract_prompt` would split inside them ("16" vs "17" gives the prompt "…1").

use crate::data::chat_template::Message;
use crate::data::example::{missing_column, Columns, PreferencePair, Turns};
use crate::data::invalid::{ColumnError, InvalidRow, RowError};
use crate::data::source::{json_kind, RawRow};

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// Splits a transcript into messages (user / assistant), each content trimmed of the space after the colon
/// and of surrounding whitespace.
fn parse_transcript(text: &str) -> Result<Vec<Message>, ColumnError> {
    let mut markers: Vec<(usize, &str, &str)> = text
        .match_indices(HUMAN)
        .map(|(i, m)| (i, m, "user"))
        .chain(text.match_indices(ASSISTANT).map(|(i, m)| (i, m, "assistant")))
        .collect();
    markers.sort_by_key(|(i, _, _)| *i);
    match markers.first() {
        None => return Err(ColumnError::NoHumanTurn),
        Some((start, _, _)) if !text[..*start].trim().is_empty() => return Err(ColumnError::TextBeforeFirstTurn),
        _ => {}
    }
    Ok(markers
        .iter()
        .enumerate()
        .map(|(k, &(start, marker, role))| {
            let end = markers.get(k + 1).map_or(text.len(), |(next, _, _)| *next);
            Message::new(role, text[start + marker.len()..end].trim())
        })
        .collect())
}

/// One HH-RLHF row as prompt (every turn before the final assistant reply), chosen and rejected replies.
pub fn convert_row(row: &RawRow, columns: &Columns) -> Result<PreferencePair, InvalidRow> {
    let invalid = |reason: RowError| InvalidRow { location: row.location.clone(), reason };
    let column_problem = |name: &str, problem: ColumnError| invalid(RowError::column(name, problem));
    let transcript = |name: &str| -> Result<Vec<Message>, InvalidRow> {
        match row.fields.get(name) {
            Some(serde_json::Value::String(text)) => parse_transcript(text).map_err(|e| column_problem(name, e)),
            Some(other) => Err(column_problem(name, ColumnError::ExpectedTranscript(json_kind(other)))),
            None => Err(invalid(missing_column(row, name))),
        }
    };
    let mut chosen = transcript(&columns.chosen)?;
    let mut rejected = transcript(&columns.rejected)?;
    let last_reply = |messages: &mut Vec<Message>, name: &str| match messages.pop() {
        Some(m) if m.role == "assistant" && !m.content.is_empty() => Ok(m),
        Some(m) if m.role == "assistant" => Err(column_problem(name, ColumnError::EmptyFinalReply)),
        _ => Err(column_problem(name, ColumnError::NoFinalReply)),
    };
    let chosen_reply = last_reply(&mut chosen, &columns.chosen)?;
    let rejected_reply = last_reply(&mut rejected, &columns.rejected)?;
    if chosen != rejected {
        return Err(invalid(RowError::TranscriptsDiffer));
    }
    Ok(PreferencePair {
        location: row.location.clone(),
        prompt: Some(Turns::Messages(chosen)),
        chosen: Turns::Messages(vec![chosen_reply]),
        rejected: Turns::Messages(vec![rejected_reply]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(chosen: &str, rejected: &str) -> RawRow {
        let fields = serde_json::json!({"chosen": chosen, "rejected": rejected});
        RawRow { location: "hh.jsonl:1".into(), fields: fields.as_object().unwrap().clone() }
    }

    #[test]
    fn cuts_at_the_last_assistant_turn() {
        let pair = convert_row(
            &row(
                "\n\nHuman: What is 4*4?\n\nAssistant: 16\n\nHuman: Sure?\n\nAssistant: Yes, 16.",
                "\n\nHuman: What is 4*4?\n\nAssistant: 16\n\nHuman: Sure?\n\nAssistant: Maybe 17.",
            ),
            &Columns::default(),
        )
        .unwrap();
        let roles = |t: &Turns| match t {
            Turns::Messages(m) => m.iter().map(|m| format!("{}:{}", m.role, m.content)).collect::<Vec<_>>(),
            Turns::Text(_) => unreachable!(),
        };
        assert_eq!(roles(pair.prompt.as_ref().unwrap()), ["user:What is 4*4?", "assistant:16", "user:Sure?"]);
        assert_eq!(roles(&pair.chosen), ["assistant:Yes, 16."]);
        assert_eq!(roles(&pair.rejected), ["assistant:Maybe 17."]);
    }

    #[test]
    fn rejects_broken_transcripts() {
        let columns = Columns::default();
        let err = convert_row(&row("\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant: Hello"), &columns)
            .unwrap_err();
        assert_eq!(err.reason.to_string(), "column \"chosen\": the final assistant reply is empty");
        let err =
            convert_row(&row("\n\nHuman: A\n\nAssistant: x", "\n\nHuman: B\n\nAssistant: y"), &columns).unwrap_err();
        assert!(err.reason.to_string().contains("differ before"), "{}", err.reason);
        let err = convert_row(&row("hello", "\n\nHuman: B\n\nAssistant: y"), &columns).unwrap_err();
        assert!(err.reason.to_string().contains("no \"\\n\\nHuman:\" turn"), "{}", err.reason);
    }
}
