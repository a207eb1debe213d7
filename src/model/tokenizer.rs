//! The tokenizer of a model (Hugging Face `tokenizers`) with its special tokens and chat template, read from a
//! Hugging Face folder or built from GGUF metadata, and written back as Hugging Face files.

use crate::model::gguf::reader::{GgufFile, Value};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};
use std::path::Path;
use tokenizers::Tokenizer;

pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub chat_template: Option<String>,
    pub add_bos_token: bool,
}

/// `"<s>"` or `{"content": "<s>", ...}` (how tokenizer_config.json spells a special token).
fn token_content(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(map) => map.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and, when present, `chat_template.jinja` (which wins
    /// over the config's `chat_template`, as in transformers).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!("no tokenizer.json in {}", dir.display());
        }
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{} is not a valid tokenizer: {e}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", config_path.display()))?
        } else {
            json!({})
        };
        let special = |key: &str| config.get(key).and_then(token_content);
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.exists() {
            Some(
                std::fs::read_to_string(&template_file)
                    .with_context(|| format!("cannot read {}", template_file.display()))?,
            )
        } else {
            match config.get("chat_template") {
                Some(Json::String(t)) => Some(t.clone()),
                // A list of named templates: transformers uses the one named "default".
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        Ok(Self {
            inner,
            bos_token: special("bos_token"),
            eos_token: special("eos_token"),
            pad_token: special("pad_token"),
            unk_token: special("unk_token"),
            chat_template,
            add_bos_token: config.get("add_bos_token").and_then(Json::as_bool).unwrap_or(false),
        })
    }

    /// Builds a byte-level BPE tokenizer from `tokenizer.ggml.*` (llama.cpp's "gpt2" tokenizer model).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let meta = |k: &str| file.get(&format!("tokenizer.ggml.{k}"));
        let model = meta("model").and_then(Value::as_str).context("GGUF metadata has no tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!("unsupported GGUF tokenizer model \"{model}\" (supported: gpt2, i.e. byte-level BPE)");
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            meta(k)
                .and_then(Value::as_array)
                .with_context(|| format!("GGUF metadata has no array tokenizer.ggml.{k}"))?
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).with_context(|| format!("tokenizer.ggml.{k} holds a non-string"))
                })
                .collect()
        };
        let tokens = strings("tokens")?;
        let merges = strings("merges")?;
        let token_types: Vec<i64> = meta("token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        let id = |k: &str| meta(k).and_then(Value::as_u64).map(|v| v as usize);
        let token_at = |k: &str| -> Result<Option<String>> {
            match id(k) {
                Some(i) => tokens.get(i).cloned().map(Some).with_context(|| {
                    format!("tokenizer.ggml.{k} = {i} is outside the vocabulary of {} tokens", tokens.len())
                }),
                None => Ok(None),
            }
        };
        // llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special).
        let added_tokens: Vec<Json> = token_types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": t != 3, "special": t == 3})
            })
            .collect();
        let vocab: serde_json::Map<String, Json> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let pre = meta("pre").and_then(Value::as_str).unwrap_or("default");
        if !KNOWN_PRE_TOKENIZERS.contains(&pre) {
            tracing::warn!("unknown GGUF pre-tokenizer \"{pre}\"; using GPT-2's byte-level split");
        }
        let add_bos_token = meta("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        let bos_token = token_at("bos_token_id")?;
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let post_processor = match (&bos_token, add_bos_token) {
            (Some(bos), true) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.as_str(): {"id": bos, "ids": [tokens.iter().position(|t| t == bos)], "tokens": [bos]}}
            }),
            _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(pre),
            "post_processor": post_processor,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        });
        let inner = Tokenizer::from_bytes(serde_json::to_vec(&spec)?)
            .map_err(|e| anyhow::anyhow!("cannot build a tokenizer from the GGUF metadata: {e}"))?;
        Ok(Self {
            inner,
            bos_token,
            eos_token: token_at("eos_token_id")?,
            pad_token: token_at("padding_token_id")?,
            unk_token: token_at("unknown_token_id")?,
            chat_template: file.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string),
            add_bos_token,
        })
    }

    /// The `tokenizer.ggml.*` metadata llama.cpp reads (what `from_gguf` builds a tokenizer from) and the chat
    /// template, with the vocabulary padded to `vocab_size` entries by `[PAD<id>]` tokens, as llama.cpp's
    /// converter pads it. Byte-level BPE tokenizers only (llama.cpp's "gpt2" model).
    pub fn gguf_metadata(&self, vocab_size: usize) -> Result<Vec<(String, Value)>> {
        let text = self.inner.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialize the tokenizer: {e}"))?;
        let spec: Json = serde_json::from_str(&text)?;
        let (model, decoder) = (&spec["model"], &spec["decoder"]["type"]);
        if model["type"] != "BPE" || decoder != "ByteLevel" {
            bail!(
                "only byte-level BPE tokenizers can be written to GGUF; this one is {} with a {} decoder",
                model["type"],
                decoder
            );
        }
        let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size.max(self.vocab_size())];
        let vocab = model["vocab"].as_object().context("the tokenizer's BPE model has no vocab")?;
        for (token, id) in vocab {
            let id = id.as_u64().context("a vocab id is not a number")? as usize;
            tokens[id] = Some((token.clone(), 1)); // normal
        }
        for (id, added) in self.inner.get_added_tokens_decoder() {
            // llama.cpp's token types: 3 = control (special), 4 = user-defined
            tokens[id as usize] = Some((added.content.clone(), if added.special { 3 } else { 4 }));
        }
        // 5 = unused, the converter's padding
        let tokens: Vec<(String, i32)> =
            tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), 5))).collect();
        let merges: Vec<Value> = model["merges"]
            .as_array()
            .context("the tokenizer's BPE model has no merges")?
            .iter()
            .map(|merge| match merge {
                Json::String(pair) => Ok(Value::String(pair.clone())),
                Json::Array(pair) if pair.len() == 2 => {
                    Ok(Value::String(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or(""))))
                }
                other => bail!("unexpected BPE merge {other}"),
            })
            .collect::<Result<_>>()?;
        let key = |k: &str| format!("tokenizer.ggml.{k}");
        let mut metadata = vec![
            (key("model"), Value::String("gpt2".into())),
            (key("pre"), Value::String(self.gguf_pre_tokenizer().into())),
            (key("tokens"), Value::Array(tokens.iter().map(|(t, _)| Value::String(t.clone())).collect())),
            (key("token_type"), Value::Array(tokens.iter().map(|(_, ty)| Value::I32(*ty)).collect())),
            (key("merges"), Value::Array(merges)),
        ];
        for (name, token) in [
            ("bos_token_id", &self.bos_token),
            ("eos_token_id", &self.eos_token),
            ("padding_token_id", &self.pad_token),
            ("unknown_token_id", &self.unk_token),
        ] {
            if let Some(id) = token.as_deref().and_then(|t| self.token_id(t)) {
                metadata.push((key(name), Value::U32(id as u32)));
            }
        }
        metadata.push((key("add_bos_token"), Value::Bool(self.add_bos_token)));
        if let Some(template) = &self.chat_template {
            metadata.push(("tokenizer.chat_template".into(), Value::String(template.clone())));
        }
        Ok(metadata)
    }

    /// The `tokenizer.ggml.pre` name of this tokenizer's pre-tokenizer: the known one that builds the same
    /// pre-tokenizer, or "default" (GPT-2's split) with a warning.
    fn gguf_pre_tokenizer(&self) -> &'static str {
        let ours = self.inner.get_pre_tokenizer().and_then(|p| serde_json::to_value(p).ok());
        for name in KNOWN_PRE_TOKENIZERS {
            let built = serde_json::from_value::<tokenizers::PreTokenizerWrapper>(pre_tokenizer(name)).ok();
            if built.and_then(|p| serde_json::to_value(p).ok()) == ours {
                return name;
            }
        }
        tracing::warn!("the tokenizer's pre-tokenizer is none llama.cpp names: written as \"default\" (GPT-2's split)");
        "default"
    }

    /// The special tokens as transformers passes them to chat templates.
    pub fn special_tokens(&self) -> Vec<(String, String)> {
        [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect()
    }

    /// The model's chat template, ready to render.
    pub fn chat_template(&self) -> Result<crate::data::chat_template::ChatTemplate> {
        let source = self.chat_template.as_deref().context("the tokenizer has no chat template")?;
        crate::data::chat_template::ChatTemplate::new(source, self.special_tokens())
    }

    /// The id batches are padded with: `pad_token`, else `eos_token` (as TRL falls back).
    pub fn pad_id(&self) -> Result<i64> {
        let pad = self
            .pad_token
            .as_deref()
            .or(self.eos_token.as_deref())
            .context("the tokenizer has neither pad_token nor eos_token")?;
        self.token_id(pad).with_context(|| format!("pad token {pad:?} is not in the vocabulary"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let encoding =
            self.inner.encode(text, add_special_tokens).map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner.decode(&ids, skip_special_tokens).map_err(|e| anyhow::anyhow!("detokenization failed: {e}"))
    }

    /// Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja.
    pub fn save_hf(&self, dir: &Path, model_max_length: usize) -> Result<()> {
        let path = dir.join("tokenizer.json");
        crate::files::write_atomically(&path, |tmp| self.inner.save(tmp, false).map_err(|e| anyhow::anyhow!("{e}")))?;
        let mut special = serde_json::Map::new();
        for (key, value) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            if let Some(token) = value {
                special.insert(key.to_string(), json!(token));
            }
        }
        let added_tokens_decoder: serde_json::Map<String, Json> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| {
                (
                    id.to_string(),
                    json!({"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                         "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}),
                )
            })
            .collect();
        let mut config = special.clone();
        config.insert("add_bos_token".into(), json!(self.add_bos_token));
        config.insert("add_prefix_space".into(), json!(false));
        config.insert("added_tokens_decoder".into(), Json::Object(added_tokens_decoder));
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        config.insert("model_max_length".into(), json!(model_max_length));
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        if let Some(template) = &self.chat_template {
            config.insert("chat_template".into(), json!(template));
            write(&dir.join("chat_template.jinja"), template)?;
        }
        write(&dir.join("tokenizer_config.json"), &serde_json::to_string_pretty(&Json::Object(config))?)?;
        write(&dir.join("special_tokens_map.json"), &serde_json::to_string_pretty(&Json::Object(special))?)
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    crate::files::write_file_atomically(path, text)
}

const KNOWN_PRE_TOKENIZERS: [&str; 7] = ["default", "gpt2", "gpt-2", "smollm", "llama3", "llama-bpe", "qwen2"];

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names (its `llama_vocab_pre_type`), as tokenizers JSON.
fn pre_tokenizer(pre: &str) -> Json {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    match pre {
        // SmolLM's tokenizer splits every digit before the GPT-2 byte-level split.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => byte_level(true),
    }
}
