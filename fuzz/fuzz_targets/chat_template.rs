//! A chat template: parsing it, and rendering a short conversation with and without the generation prompt.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefalign::data::chat_template::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    let special = vec![("bos_token".to_string(), "<s>".to_string()), ("eos_token".to_string(), "</s>".to_string())];
    let Ok(template) = ChatTemplate::new(&source, special) else { return };
    let messages =
        [Message::new("system", "Be brief."), Message::new("user", "Hi!"), Message::new("assistant", "Hello.")];
    for add_generation_prompt in [false, true] {
        let _ = template.render(&messages, add_generation_prompt);
    }
    let _ = template.render_continuing(&messages);
});
