//! Why a row cannot be used. Each problem names its column (and message), so that with the row's location a user
//! can find it; callers fail on the first invalid row or skip and count them all (`--skip-invalid-rows`).

use std::fmt;
use thiserror::Error;

/// The roles a message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// A row that cannot be used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRow {
    /// `file:line`, `file[index]` or `file row N`
    pub location: String,
    pub reason: RowError,
}

impl fmt::Display for InvalidRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum RowError {
    #[error("invalid UTF-8 at byte {0}")]
    InvalidUtf8(usize),
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("invalid CSV: {0}")]
    InvalidCsv(String),
    #[error("missing column \"{column}\" (the row has: {})", present.join(", "))]
    MissingColumn { column: String, present: Vec<String> },
    #[error("column \"{column}\": {problem}")]
    Column { column: String, problem: ColumnError },
    #[error("column \"{0}\" is empty")]
    EmptyColumn(String),
    #[error("chosen and rejected differ before their final assistant replies")]
    TranscriptsDiffer,
    #[error("chosen and rejected have different formats")]
    MixedFormats,
    #[error("chosen or rejected is empty, so no prompt can be extracted")]
    NoPromptToExtract,
    #[error("prompt, chosen and rejected mix text and messages")]
    MixedTurns,
    #[error("conversational data needs a chat template, and the tokenizer has none")]
    NoChatTemplate,
    /// The chat template failed to render (its message, e.g. a `raise_exception` of the template).
    #[error("{0}")]
    Template(String),
    /// The tokenizer failed to encode the text (its message).
    #[error("{0}")]
    Encoding(String),
    #[error("the prompt's last message has role {0:?}; TRL's ORPO needs user, tool or assistant")]
    PromptEndsWith(String),
    #[error("chosen and rejected prompt tokens differ by more than a merged last token")]
    PromptTokensDiffer,
    #[error("prompt+answer tokenizes shorter than the prompt alone")]
    AnswerShorterThanPrompt,
}

impl RowError {
    /// The column `column` of the row has `problem`.
    pub fn column(column: &str, problem: ColumnError) -> Self {
        RowError::Column { column: column.to_string(), problem }
    }
}

/// What is wrong with one column's value.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ColumnError {
    #[error("expected a string like the first row, found {0}")]
    ExpectedText(&'static str),
    #[error("expected a list of {{role, content}} messages like the first row, found {0}")]
    ExpectedMessages(&'static str),
    #[error("expected true or false, found {0}")]
    ExpectedBool(&'static str),
    #[error("message {index}: {problem}")]
    Message { index: usize, problem: MessageError },
    #[error("no messages")]
    NoMessages,
    #[error("message {0} is a system message; only the first message may be one")]
    SystemNotFirst(usize),
    #[error("the completion starts with a \"{0}\" message; expected \"assistant\"")]
    CompletionRole(String),
    #[error("expected an HH-RLHF transcript string, found {0}")]
    ExpectedTranscript(&'static str),
    #[error("no \"\\n\\nHuman:\" turn")]
    NoHumanTurn,
    #[error("text before the first \"\\n\\nHuman:\" turn")]
    TextBeforeFirstTurn,
    #[error("the final assistant reply is empty")]
    EmptyFinalReply,
    #[error("the transcript does not end with an assistant reply")]
    NoFinalReply,
}

/// What is wrong with one chat message.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MessageError {
    #[error("expected an object with \"role\" and \"content\", found {0}")]
    NotAnObject(&'static str),
    #[error("unknown role \"{0}\" (expected one of {roles})", roles = ROLES.join(", "))]
    UnknownRole(String),
    #[error("\"role\" is {0}, expected a string")]
    RoleNotText(&'static str),
    #[error("no \"role\"")]
    NoRole,
    #[error("\"content\" is {0}, expected a string")]
    ContentNotText(&'static str),
    #[error("no \"content\"")]
    NoContent,
}
