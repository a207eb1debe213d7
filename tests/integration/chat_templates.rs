//! Chat templates rendered exactly as transformers' `apply_chat_template(tokenize=False)` renders them, for the
//! real templates in tests/fixtures/chat_templates/templates (fixture: tools/fixtures/make_chat_template_fixtures.py).

use crate::common;

use prefalign::data::chat_template::{ChatTemplate, Message};
use serde_json::Value;

#[test]
fn renderings_equal_transformers() {
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("chat_templates/renderings.json")).unwrap())
            .unwrap();
    let templates = common::repo_path(fixture["templates_dir"].as_str().unwrap());
    let date = chrono::NaiveDate::parse_from_str(fixture["fixed_date"].as_str().unwrap(), "%Y-%m-%d").unwrap();
    let (mut checked, mut failures) = (0, Vec::new());
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(templates.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let special: Vec<(String, String)> = case["context"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let label =
            format!("{name} / {} / add_generation_prompt={generation_prompt}", case["conversation"].as_str().unwrap());
        let result = ChatTemplate::new(&source, special).and_then(|mut t| {
            t.fix_date(date);
            t.render(&messages, generation_prompt)
        });
        match (result, case.get("rendered").and_then(Value::as_str), case.get("error").and_then(Value::as_str)) {
            (Ok(ours), Some(theirs), _) if ours == theirs => {}
            (Ok(ours), Some(theirs), _) => {
                failures.push(format!("{label}: rendered\n{ours:?}\ntransformers:\n{theirs:?}"))
            }
            (Err(e), None, Some(_)) if case["error_type"] == "TemplateError" => {
                let message = case["error"].as_str().unwrap();
                if !format!("{e:#}").contains(message) {
                    failures.push(format!("{label}: error {e:#}, transformers raised {message:?}"));
                }
            }
            (Err(_), None, Some(_)) => {} // an undefined-attribute error in jinja2 and in minijinja alike
            (Ok(ours), None, Some(err)) => {
                failures.push(format!("{label}: rendered {ours:?}, transformers raised {err:?}"))
            }
            (Err(e), Some(_), _) => failures.push(format!("{label}: {e:#}")),
            (_, None, None) => panic!("{label}: case without outcome"),
        }
        checked += 1;
    }
    assert!(failures.is_empty(), "{} of {checked} renderings differ:\n{}", failures.len(), failures.join("\n\n"));
    assert!(checked >= 300);
}
