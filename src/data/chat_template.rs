//! Hugging Face chat templates rendered through minijinja the way transformers' `apply_chat_template` renders
//! them with jinja2: trim_blocks + lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson`
//! that writes like Python's `json.dumps(ensure_ascii=False)`, and Python string/dict methods (pycompat).

use anyhow::{anyhow, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// A chat message; fields beyond role and content (tool calls, names…) are passed to the template as they are.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string(), extra: Default::default() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// whether the template has `{% generation %}` blocks (whose text the render marks)
    has_generation: bool,
    /// The tokenizer's special tokens (`bos_token`, `eos_token`, …), which transformers passes to every render.
    special_tokens: Vec<(String, String)>,
}

impl ChatTemplate {
    pub fn new(source: &str, special_tokens: Vec<(String, String)>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.expect("the default delimiters"));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime(chrono::Local::now().format(&format), &format));
        env.add_filter("tojson", tojson);
        env.add_filter(GENERATION_FILTER, |body: String| format!("{SPAN_START}{body}{SPAN_END}"));
        let rewritten = rewrite_generation_tags(source);
        let has_generation = rewritten != source;
        env.add_template_owned("chat", rewritten)
            .map_err(|e| anyhow!("the chat template does not parse: {}", template_error(&e)))?;
        Ok(Self { env, has_generation, special_tokens })
    }

    /// Makes `strftime_now` report `date` instead of today (templates like Llama 3.x print the date, so token ids
    /// depend on it; fixing it makes a run reproducible on another day).
    pub fn fix_date(&mut self, date: chrono::NaiveDate) {
        let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
        self.env.add_function("strftime_now", move |format: String| strftime(midnight.format(&format), &format));
    }

    /// Renders `messages` (with the assistant header appended when `add_generation_prompt`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        Ok(self.render_with_generation_spans(messages, add_generation_prompt)?.0)
    }

    /// Renders `messages`, and returns where the template's `{% generation %}` blocks put their text: (start, end)
    /// in characters of the rendered string, as transformers' `return_assistant_tokens_mask` finds them.
    pub fn render_with_generation_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<(usize, usize)>)> {
        let marked = self.render_marked(messages, add_generation_prompt)?;
        if !self.has_generation {
            return Ok((marked, Vec::new()));
        }
        if messages.iter().any(|m| m.content.contains([SPAN_START, SPAN_END])) {
            return Err(anyhow!("a message holds U+F8F0 or U+F8F1, which mark the template's generation blocks"));
        }
        let (mut text, mut spans, mut start, mut chars) = (String::with_capacity(marked.len()), Vec::new(), None, 0);
        for c in marked.chars() {
            match c {
                SPAN_START => start = Some(chars),
                SPAN_END => spans.push((start.take().unwrap_or(chars), chars)),
                c => {
                    text.push(c);
                    chars += 1;
                }
            }
        }
        Ok((text, spans))
    }

    /// The rendering with `{% generation %}` blocks between [`SPAN_START`] and [`SPAN_END`].
    fn render_marked(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new()");
        let mut context: std::collections::BTreeMap<&str, Value> =
            self.special_tokens.iter().map(|(k, v)| (k.as_str(), Value::from(v.as_str()))).collect();
        context.insert("messages", Value::from(minijinja::value::Serde(messages)));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // transformers passes these as None when unused; templates test them with `is none` / `is defined`.
        context.insert("tools", Value::from(()));
        context.insert("documents", Value::from(()));
        template.render(context).map_err(|e| anyhow!("chat template error: {}", template_error(&e)))
    }

    /// transformers' `continue_final_message=True`: render, then cut after the final message's (stripped)
    /// content so that the model continues it.
    pub fn render_continuing(&self, messages: &[Message]) -> Result<String> {
        let rendered = self.render(messages, false)?;
        let last = messages.last().map(|m| m.content.trim()).unwrap_or("");
        match rendered.rfind(last) {
            Some(at) => Ok(rendered[..at + last.len()].to_string()),
            None => Err(anyhow!("continue_final_message: the final message does not appear in the rendered chat")),
        }
    }
}

/// The filter a `{% generation %}` block becomes, and the private-use characters it puts around the block's text
/// (stripped again by every render).
const GENERATION_FILTER: &str = "prefalign_generation_span";
const SPAN_START: char = '\u{F8F0}';
const SPAN_END: char = '\u{F8F1}';

/// transformers' `{% generation %}…{% endgeneration %}` block (it renders its body and records where the body's
/// text is); minijinja has no such tag, so it becomes a filter block, with the same whitespace control, that marks
/// the text.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = source.to_string();
    let open_filter = format!("filter {GENERATION_FILTER}");
    for (tag, replacement) in [("endgeneration", "endfilter"), ("generation", open_filter.as_str())] {
        for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
            out = out.replace(&format!("{open} {tag} {close}"), &format!("{open} {replacement} {close}"));
        }
    }
    out
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`: ", " and ": " separators when compact.
fn tojson(value: Value, indent: Option<usize>) -> Result<Value, Error> {
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let indent = " ".repeat(n);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonCompact)),
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(String::from_utf8(out).expect("serde_json writes UTF-8")))
}

struct PythonCompact;

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `strftime_now(format)`: a time `formatted` with `format`, or a template error for a format chrono cannot use
/// (Python would raise too, for most of them); `to_string` would panic.
fn strftime(formatted: impl std::fmt::Display, format: &str) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{formatted}")
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: cannot format with {format:?}")))?;
    Ok(out)
}

/// A minijinja error as one line with its template line ("… (in chat:12)"). Not minijinja's alternate form, whose
/// excerpt of the template subtracts columns unchecked and, for some broken templates, asks for an enormous string
/// of carets (docs/RELIABILITY.md).
fn template_error(error: &Error) -> String {
    error.to_string()
}
