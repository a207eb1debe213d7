//! Preference pairs to token ids exactly as TRL 1.16 builds them (docs/TRL_DATA_SPEC.md): DPO's three
//! whole-sequence tokenizations split at their common prefix, and ORPO's `tokenize_row` with its BOS/EOS and
//! answer-only truncation rules.

use crate::data::chat_template::{ChatTemplate, Message};
use crate::data::collate::TruncationMode;
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

    /// Token ids of a rendered chat and transformers' assistant mask for it: 1 on the tokens from the one holding
    /// each span's first character to the one holding its last (to the end when that is token 0 or none).
    pub(crate) fn encode_with_assistant_mask(&self, messages: &[Message]) -> Result<(Vec<i64>, Vec<i64>), RowError> {
        let template = self.template()?;
        let (text, spans) =
            template.render_with_generation_spans(messages, false).map_err(|e| RowError::Template(format!("{e:#}")))?;
        let encoding = self
            .tokenizer
            .inner
            .encode_char_offsets(text.as_str(), false)
            .map_err(|e| RowError::Encoding(e.to_string()))?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        let mut mask = vec![0; ids.len()];
        for (start, end) in spans {
            let Some(first) = encoding.char_to_token(start, 0) else { break };
            let last = match encoding.char_to_token(end.saturating_sub(1), 0) {
                Some(last) if last != 0 => last + 1,
                _ => ids.len(), // Python's `end_token + 1 if end_token else len(input_ids)`
            };
            mask[first..last].iter_mut().for_each(|m| *m = 1);
        }
        Ok((ids, mask))
    }

    /// SFTTrainer's and KTOTrainer's prompt-completion tokenization: the prompt and prompt+completion tokenized
    /// apart (text: the completion with EOS appended, special tokens by the tokenizer; messages: through the chat
    /// template, the prompt with the generation prompt); returns the latter's ids and where the completion starts,
    /// where the two diverge (TRL's `common_prefix_length`; earlier than the prompt's end when tokens merge).
    pub(crate) fn encode_prompt_completion(
        &self,
        prompt: &Turns,
        completion: &Turns,
    ) -> Result<(Vec<i64>, usize), RowError> {
        let (prompt_ids, ids) = match (prompt, completion) {
            (Turns::Text(prompt), Turns::Text(completion)) => {
                let completion = self.with_eos(completion);
                (self.encode(prompt, true)?, self.encode(&format!("{prompt}{completion}"), true)?)
            }
            (Turns::Messages(prompt), Turns::Messages(completion)) => (
                self.encode(&self.render(prompt, true)?, false)?,
                self.encode(&self.render(&concat(prompt, completion), false)?, false)?,
            ),
            _ => return Err(RowError::MixedTurns),
        };
        let prompt_len = common_prefix_len(&prompt_ids, &ids);
        Ok((ids, prompt_len))
    }

    /// `text` with the EOS token's text appended unless it already ends with it (TRL's `add_eos`).
    pub(crate) fn with_eos(&self, text: &str) -> String {
        if text.ends_with(&self.eos_token) {
            text.to_string()
        } else {
            format!("{text}{}", self.eos_token)
        }
    }

    /// The longest token of the vocabulary, in bytes of its string (at least the bytes of text it stands for).
    pub fn longest_token_bytes(&self) -> usize {
        self.longest_token_bytes
    }

    pub(crate) fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>, RowError> {
        self.tokenizer.encode(text, add_special_tokens).map_err(|e| RowError::Encoding(format!("{e:#}")))
    }

    fn template(&self) -> Result<&ChatTemplate, RowError> {
        self.template.as_ref().ok_or(RowError::NoChatTemplate)
    }

    pub(crate) fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, RowError> {
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
            (Turns::Text(prompt), Turns::Text(chosen), Turns::Text(rejected)) => (
                tok.encode(prompt, true)?,
                tok.encode(&format!("{prompt}{}", tok.with_eos(chosen)), true)?,
                tok.encode(&format!("{prompt}{}", tok.with_eos(rejected)), true)?,
            ),
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

/// `max_prompt_length` / `max_completion_length` in DPO as TRL ≤ 0.2x applied them after tokenizing: the prompt's
/// last `max_prompt` tokens, each completion's first `max_completion` (its EOS included).
pub fn cut_dpo_legacy(pair: &mut TokenizedPair, max_prompt: Option<usize>, max_completion: Option<usize>) {
    let keep_prompt = |prompt: &[i64]| prompt[prompt.len().saturating_sub(max_prompt.unwrap_or(usize::MAX))..].to_vec();
    let keep_completion =
        |completion: &[i64]| completion[..completion.len().min(max_completion.unwrap_or(usize::MAX))].to_vec();
    pair.prompt_ids = keep_prompt(&pair.prompt_ids);
    for seq in [&mut pair.chosen, &mut pair.rejected] {
        *seq = recut(seq, keep_prompt, keep_completion);
    }
}

/// `max_prompt_length` in ORPO and CPO as TRL ≤ 0.2x applied it to untruncated sequences: where the prompt and the
/// longer completion exceed `max_length`, the prompt is cut to `max_prompt` tokens (its start or its end, by
/// `mode`); where they still do, each completion is cut to `max_length - max_prompt` tokens.
pub fn cut_orpo_legacy(pair: &mut TokenizedPair, max_length: usize, max_prompt: usize, mode: TruncationMode) {
    let longer = pair.chosen.completion().len().max(pair.rejected.completion().len());
    let cut_prompt = |prompt: &[i64]| -> Vec<i64> {
        if prompt.len() + longer <= max_length {
            return prompt.to_vec();
        }
        match mode {
            TruncationMode::KeepStart => prompt[..prompt.len().min(max_prompt)].to_vec(),
            TruncationMode::KeepEnd => prompt[prompt.len().saturating_sub(max_prompt)..].to_vec(),
        }
    };
    pair.prompt_ids = cut_prompt(&pair.prompt_ids);
    for seq in [&mut pair.chosen, &mut pair.rejected] {
        let prompt = cut_prompt(&seq.ids[..seq.prompt_len]);
        let completion_keep =
            if prompt.len() + longer > max_length { max_length.saturating_sub(max_prompt) } else { usize::MAX };
        *seq = recut(seq, |_| prompt.clone(), |c| c[..c.len().min(completion_keep)].to_vec());
    }
}

/// `seq` with its prompt and its completion each replaced by what `prompt` and `completion` make of them.
fn recut(seq: &Sequence, prompt: impl Fn(&[i64]) -> Vec<i64>, completion: impl Fn(&[i64]) -> Vec<i64>) -> Sequence {
    let mut ids = prompt(&seq.ids[..seq.prompt_len]);
    let prompt_len = ids.len();
    ids.extend(completion(seq.completion()));
    Sequence { ids, prompt_len }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(prompt: &[i64], chosen: &[i64], rejected: &[i64]) -> TokenizedPair {
        let seq = |completion: &[i64]| Sequence { ids: [prompt, completion].concat(), prompt_len: prompt.len() };
        TokenizedPair {
            location: "x".into(),
            prompt_ids: prompt.to_vec(),
            chosen: seq(chosen),
            rejected: seq(rejected),
        }
    }

    #[test]
    fn legacy_dpo_cut_keeps_the_prompts_end_and_the_completions_start() {
        let mut p = pair(&[1, 2, 3, 4], &[10, 11, 12, 2], &[20, 2]);
        cut_dpo_legacy(&mut p, Some(2), Some(3));
        assert_eq!(p.prompt_ids, [3, 4]);
        assert_eq!(p.chosen, Sequence { ids: vec![3, 4, 10, 11, 12], prompt_len: 2 });
        assert_eq!(p.rejected, Sequence { ids: vec![3, 4, 20, 2], prompt_len: 2 });
        let mut untouched = pair(&[1, 2], &[3], &[4]);
        cut_dpo_legacy(&mut untouched, None, None);
        assert_eq!(untouched, pair(&[1, 2], &[3], &[4]));
    }

    #[test]
    fn legacy_orpo_cut_trims_the_prompt_then_the_completions() {
        // prompt 6 + longer completion 4 = 10 > max_length 8: the prompt goes to 3 tokens (start or end); 3 + 4
        // fits, so the completions stay
        let mut p = pair(&[1, 2, 3, 4, 5, 6], &[10, 11, 12, 13], &[20, 21]);
        cut_orpo_legacy(&mut p, 8, 3, TruncationMode::KeepStart);
        assert_eq!(p.prompt_ids, [1, 2, 3]);
        assert_eq!(p.chosen.ids, [1, 2, 3, 10, 11, 12, 13]);
        assert_eq!(p.rejected.ids, [1, 2, 3, 20, 21]);
        let mut p = pair(&[1, 2, 3, 4, 5, 6], &[10, 11, 12, 13, 14, 15, 16], &[20, 21]);
        cut_orpo_legacy(&mut p, 8, 3, TruncationMode::KeepEnd);
        // 3 + 7 > 8 still: both completions cut to 8 - 3 = 5 (the check uses the longer one's length)
        assert_eq!(p.chosen, Sequence { ids: vec![4, 5, 6, 10, 11, 12, 13, 14], prompt_len: 3 });
        assert_eq!(p.rejected, Sequence { ids: vec![4, 5, 6, 20, 21], prompt_len: 3 });
        // short enough: nothing changes
        let mut p = pair(&[1, 2], &[3], &[4]);
        cut_orpo_legacy(&mut p, 8, 1, TruncationMode::KeepStart);
        assert_eq!(p, pair(&[1, 2], &[3], &[4]));
    }
}
