//! Preference pairs to token ids exactly as TRL 1.16 builds them (docs/TRL_DATA_SPEC.md): DPO's three
//! whole-sequence tokenizations split at their common prefix, and ORPO's `tokenize_row` with its BOS/EOS and
//! answer-only truncation rules.

use crate::data::chat_template::{ChatTemplate, Message};
use crate::data::example::{extract_prompt, PreferencePair, Turns};
use crate::data::invalid::RowError;
use crate::model::tokenizer::TextTokenizer;
use anyhow::{Context, Result};

/// A prompt followed by one completion; `ids[prompt_len..]` is the completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<i64>,
    pub prompt_len: usize,
}

impl Sequence {
    pub fn completion(&self) -> &[i64] {
        &self.ids[self.prompt_len..]
    }
}

/// A tokenized pair. DPO's sequences are untruncated (the collator truncates); ORPO's are final.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub location: String,
    /// The prompt alone (DPO's `prompt_ids`, ORPO's `prompt_input_ids`).
    pub prompt_ids: Vec<i64>,
    pub chosen: Sequence,
    pub rejected: Sequence,
}

/// The tokenizer, chat template and special tokens the pair tokenization needs.
pub struct PairTokenizer<'a> {
    tokenizer: &'a TextTokenizer,
    template: Option<ChatTemplate>,
    eos_token: String,
    eos_id: i64,
    bos_id: Option<i64>,
    longest_token_bytes: usize,
}

impl<'a> PairTokenizer<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Result<Self> {
        let eos_token = tokenizer.eos_token.clone().context("the tokenizer has no eos_token")?;
        let eos_id = tokenizer
            .token_id(&eos_token)
            .with_context(|| format!("eos_token {eos_token:?} is not in the vocabulary"))?;
        let bos_id = tokenizer.bos_token.as_deref().and_then(|t| tokenizer.token_id(t));
        let template = match tokenizer.chat_template {
            Some(_) => Some(tokenizer.chat_template()?),
            None => None,
        };
        let longest_token_bytes = tokenizer.inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1);
        Ok(Self { tokenizer, template, eos_token, eos_id, bos_id, longest_token_bytes })
    }

    /// The longest token of the vocabulary, in bytes of its string (at least the bytes of text it stands for).
    pub fn longest_token_bytes(&self) -> usize {
        self.longest_token_bytes
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>, RowError> {
        self.tokenizer.encode(text, add_special_tokens).map_err(|e| RowError::Encoding(format!("{e:#}")))
    }

    fn template(&self) -> Result<&ChatTemplate, RowError> {
        self.template.as_ref().ok_or(RowError::NoChatTemplate)
    }

    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, RowError> {
        self.template()?.render(messages, add_generation_prompt).map_err(|e| RowError::Template(format!("{e:#}")))
    }

    /// Renders a conversational pair to strings as TRL's `apply_chat_template` does for ORPO.
    fn render_pair(
        &self,
        prompt: &[Message],
        chosen: &[Message],
        rejected: &[Message],
    ) -> Result<(String, String, String), RowError> {
        let rendered_prompt = match prompt.last().map(|m| m.role.as_str()) {
            Some("user" | "tool") => self.render(prompt, true)?,
            Some("assistant") => {
                self.template()?.render_continuing(prompt).map_err(|e| RowError::Template(format!("{e:#}")))?
            }
            other => return Err(RowError::PromptEndsWith(other.unwrap_or("").to_string())),
        };
        let prompt_chosen = self.render(&concat(prompt, chosen), false)?;
        let prompt_rejected = self.render(&concat(prompt, rejected), false)?;
        // The prompt is cut to its character-wise common prefix with both renderings.
        let common = |a: &str, b: &str| {
            a.chars().zip(b.chars()).take_while(|(x, y)| x == y).map(|(x, _)| x.len_utf8()).sum::<usize>()
        };
        let mut prompt_len = common(&rendered_prompt, &prompt_chosen);
        prompt_len = common(&rendered_prompt[..prompt_len], &prompt_rejected);
        Ok((
            rendered_prompt[..prompt_len].to_string(),
            prompt_chosen[prompt_len..].to_string(),
            prompt_rejected[prompt_len..].to_string(),
        ))
    }
}

fn concat(a: &[Message], b: &[Message]) -> Vec<Message> {
    a.iter().chain(b).cloned().collect()
}

fn common_prefix_len(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Fills in an implicit prompt (TRL's `extract_prompt`) when the pair has none.
pub fn with_prompt(pair: &PreferencePair) -> Result<PreferencePair, RowError> {
    match pair.prompt {
        Some(_) => Ok(pair.clone()),
        None => extract_prompt(pair),
    }
}

/// DPOTrainer's `tokenize_fn`: prompt, prompt+chosen and prompt+rejected tokenized whole, split where all three
/// agree. Text completions get the EOS text appended first; conversations are closed by their template.
pub fn tokenize_dpo(pair: &PreferencePair, tok: &PairTokenizer) -> Result<TokenizedPair, RowError> {
    let pair = with_prompt(pair)?;
    let (prompt_ids, prompt_chosen, prompt_rejected) =
        match (pair.prompt.as_ref().expect("with_prompt"), &pair.chosen, &pair.rejected) {
            (Turns::Text(prompt), Turns::Text(chosen), Turns::Text(rejected)) => {
                let with_eos = |text: &str| {
                    if text.ends_with(&tok.eos_token) {
                        text.to_string()
                    } else {
                        format!("{text}{}", tok.eos_token)
                    }
                };
                (
                    tok.encode(prompt, true)?,
                    tok.encode(&format!("{prompt}{}", with_eos(chosen)), true)?,
                    tok.encode(&format!("{prompt}{}", with_eos(rejected)), true)?,
                )
            }
            (Turns::Messages(prompt), Turns::Messages(chosen), Turns::Messages(rejected)) => (
                tok.encode(&tok.render(prompt, true)?, false)?,
                tok.encode(&tok.render(&concat(prompt, chosen), false)?, false)?,
                tok.encode(&tok.render(&concat(prompt, rejected), false)?, false)?,
            ),
            _ => return Err(RowError::MixedTurns),
        };
    let prompt_len =
        common_prefix_len(&prompt_ids, &prompt_chosen).min(common_prefix_len(&prompt_ids, &prompt_rejected));
    Ok(TokenizedPair {
        location: pair.location.clone(),
        prompt_ids: prompt_ids[..prompt_len].to_vec(),
        chosen: Sequence { ids: prompt_chosen, prompt_len },
        rejected: Sequence { ids: prompt_rejected, prompt_len },
    })
}

/// ORPOTrainer's data path: `maybe_extract_prompt`, `maybe_apply_chat_template`, then `tokenize_row` (BOS
/// prepended when missing, EOS id appended when missing, the answer cut to fit `max_length`; the prompt is
/// never cut).
pub fn tokenize_orpo(pair: &PreferencePair, tok: &PairTokenizer, max_length: usize) -> Result<TokenizedPair, RowError> {
    let pair = with_prompt(pair)?;
    let (prompt, chosen, rejected) = match (pair.prompt.as_ref().expect("with_prompt"), &pair.chosen, &pair.rejected) {
        (Turns::Text(p), Turns::Text(c), Turns::Text(r)) => (p.clone(), c.clone(), r.clone()),
        (Turns::Messages(p), Turns::Messages(c), Turns::Messages(r)) => tok.render_pair(p, c, r)?,
        _ => return Err(RowError::MixedTurns),
    };
    let prompt_tokens = tok.encode(&prompt, false)?;
    let (chosen_prompt, chosen_answer) = split_answer(tok, &prompt, &prompt_tokens, &chosen)?;
    let (rejected_prompt, rejected_answer) = split_answer(tok, &prompt, &prompt_tokens, &rejected)?;
    let prompt_len = chosen_prompt.len().min(rejected_prompt.len());
    let differing = chosen_prompt.iter().zip(&rejected_prompt).filter(|(a, b)| a != b).count();
    if differing > 1 || chosen_prompt.len().abs_diff(rejected_prompt.len()) > 1 {
        return Err(RowError::PromptTokensDiffer);
    }
    let mut prompt_ids = prompt_tokens[..prompt_len.min(prompt_tokens.len())].to_vec();
    let finish = |mut prompt_part: Vec<i64>, mut answer: Vec<i64>| {
        if let Some(bos) = tok.bos_id {
            if prompt_part.first() != Some(&bos) {
                prompt_part.insert(0, bos);
            }
        }
        if answer.last() != Some(&tok.eos_id) {
            answer.push(tok.eos_id);
        }
        if prompt_part.len() + answer.len() > max_length {
            answer.truncate(max_length.saturating_sub(prompt_part.len()));
        }
        let prompt_len = prompt_part.len();
        prompt_part.extend(answer);
        Sequence { ids: prompt_part, prompt_len }
    };
    if let Some(bos) = tok.bos_id {
        if prompt_ids.first() != Some(&bos) {
            prompt_ids.insert(0, bos);
        }
    }
    Ok(TokenizedPair {
        location: pair.location.clone(),
        prompt_ids,
        chosen: finish(chosen_prompt, chosen_answer),
        rejected: finish(rejected_prompt, rejected_answer),
    })
}

/// ORPO's `build_tokenized_answer`: tokenize prompt+answer and split at the prompt's length, one token earlier
/// when the prompt's last token merged into the answer.
fn split_answer(
    tok: &PairTokenizer,
    prompt: &str,
    prompt_tokens: &[i64],
    answer: &str,
) -> Result<(Vec<i64>, Vec<i64>), RowError> {
    let full = tok.encode(&format!("{prompt}{answer}"), false)?;
    if full.len() < prompt_tokens.len() {
        return Err(RowError::AnswerShorterThanPrompt);
    }
    let mut start = prompt_tokens.len();
    if full[..start] != *prompt_tokens {
        start -= 1;
    }
    Ok((full[..start].to_vec(), full[start..].to_vec()))
}
