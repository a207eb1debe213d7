//! `prefalign generate`: text from a model, through its chat template unless `--raw`.

use crate::cli::ModelArgs;
use crate::data::chat_template::Message;
use crate::model::generate::{generate, SamplingOptions};
use anyhow::{bail, Result};
use clap::Args;
use std::io::Write;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user message (or, with --raw, the text to continue)
    #[arg(long)]
    prompt: String,
    /// A system message placed before the prompt
    #[arg(long)]
    system: Option<String>,
    /// Feed the prompt as is, without the chat template
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Always take the most likely token
    #[arg(long)]
    greedy: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let tokenizer = loaded.tokenizer()?;
    let prompt_ids = if args.raw {
        tokenizer.encode(&args.prompt, true)?
    } else {
        if tokenizer.chat_template.is_none() {
            bail!("{} has no chat template; pass --raw to continue plain text", args.model.model);
        }
        let template = tokenizer.chat_template()?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        // The template writes the special tokens itself, as transformers' apply_chat_template(tokenize=True).
        tokenizer.encode(&template.render(&messages, true)?, false)?
    };
    let mut stop_ids = loaded.config().eos_token_ids();
    stop_ids.extend(tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_id(t)));
    let options = SamplingOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        greedy: args.greedy,
        seed: args.seed,
    };
    // Stream the text: decode everything generated so far and print what is new.
    let mut ids = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout().lock();
    generate(&loaded.model, &prompt_ids, &stop_ids, &options, |id| {
        ids.push(id);
        let text = tokenizer.decode(&ids, true)?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            write!(stdout, "{}", &text[printed..])?;
            stdout.flush()?;
            printed = text.len();
        }
        Ok(())
    })?;
    writeln!(stdout)?;
    Ok(())
}
