//! The in-process backend on a tiny random Qwen2 chat model: schema
//! answers always parse and follow the schema, seeds reproduce, the chat
//! template renders as jinja2 would, the authoring stage runs end to end,
//! and broken model folders are reported with the file and the fix.
#![cfg(feature = "local")]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use agfsync_author::local::{tiny_qwen2_tokenizer_json, vocabulary_of, TINY_CHAT_TEMPLATE};
use agfsync_author::prompts::prompts_schema;
use agfsync_author::questions::questions_schema;
use agfsync_author::{
    author_prompts, chat_many, write_tiny_qwen2, BagOfWords, ChatRequest, ChatTemplate, Llm,
    LocalLlm, LocalLlmOptions, Message, PromptAuthoring, Template,
};
use agfsync_models::hub::ModelSource;
use serde_json::Value;

fn tiny(seed: u64) -> (tempfile::TempDir, LocalLlm) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), seed).unwrap();
    let llm = load(dir.path()).unwrap();
    (dir, llm)
}

fn load(dir: &Path) -> agfsync_author::Result<LocalLlm> {
    LocalLlm::load(&ModelSource::local(dir), &LocalLlmOptions::default())
}

fn request(text: &str, seed: Option<u64>, max_tokens: u32) -> ChatRequest {
    let mut r = ChatRequest::new(vec![
        Message::system("You write JSON."),
        Message::user(text),
    ]);
    r.seed = seed;
    r.max_tokens = max_tokens;
    r
}

/// Whether `v` follows `schema` (the subset `constrained` supports).
fn follows(v: &Value, schema: &Value) -> bool {
    let count = |k: &str| schema.get(k).and_then(Value::as_u64);
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(v) {
            return false;
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("string") | None => {
            let Some(s) = v.as_str() else { return false };
            let n = s.chars().count() as u64;
            count("minLength").is_none_or(|m| n >= m) && count("maxLength").is_none_or(|m| n <= m)
        }
        Some("array") => {
            let Some(a) = v.as_array() else { return false };
            let n = a.len() as u64;
            count("minItems").is_none_or(|m| n >= m)
                && count("maxItems").is_none_or(|m| n <= m)
                && a.iter().all(|x| follows(x, &schema["items"]))
        }
        Some("object") => {
            let Some(o) = v.as_object() else { return false };
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            o.len() == required.len()
                && required.iter().all(|k| {
                    o.get(*k)
                        .is_some_and(|x| follows(x, &schema["properties"][*k]))
                })
        }
        Some(_) => false,
    }
}

#[test]
fn schema_answers_parse_and_follow_the_schema_for_every_seed() {
    let (_dir, llm) = tiny(1);
    for schema in [prompts_schema(), questions_schema()] {
        for seed in 0..4u64 {
            for (temperature, top_p) in [(0.9, 0.7), (1.5, 1.0), (0.0, 1.0)] {
                let mut r = request("Write them.", Some(seed), 160);
                r.temperature = temperature;
                r.top_p = top_p;
                r.json_schema = Some(schema.clone());
                let answer = llm.chat(&r).unwrap();
                let v: Value = serde_json::from_str(&answer.text)
                    .unwrap_or_else(|e| panic!("{e}: {:?}", answer.text));
                assert!(
                    follows(&v, &schema.schema),
                    "{}: {}",
                    schema.name,
                    answer.text
                );
                assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
                assert!(answer.completion_tokens.unwrap() <= 160);
            }
        }
    }
    // The smallest budget that fits the smallest document still closes it;
    // one less is refused up front.
    let mut r = request("Write them.", Some(3), 17);
    r.json_schema = Some(prompts_schema());
    let v: Value = serde_json::from_str(&llm.chat(&r).unwrap().text).unwrap();
    assert!(follows(&v, &prompts_schema().schema));
    r.max_tokens = 16;
    let e = llm.chat(&r).unwrap_err().to_string();
    assert!(e.contains("max_tokens 16"), "{e}");
}

#[test]
fn seeds_reproduce_and_greedy_is_deterministic() {
    let (_dir, llm) = tiny(2);
    for schema in [None, Some(prompts_schema())] {
        let run = |seed: u64, temperature: f32| {
            let mut r = request("Say something.", Some(seed), 40);
            r.temperature = temperature;
            r.top_p = 1.0;
            r.json_schema = schema.clone();
            llm.chat(&r).unwrap().text
        };
        assert_eq!(run(5, 1.0), run(5, 1.0));
        let texts: std::collections::HashSet<String> = (0..4).map(|s| run(s, 1.0)).collect();
        assert!(texts.len() > 1, "four seeds gave one text: {texts:?}");
        assert_eq!(run(1, 0.0), run(2, 0.0));
    }
    // Batches (prompts of different lengths, left-padded into one
    // forward pass per token, rows finishing at different steps; with and
    // without a schema) give what one request at a time gives.
    let requests: Vec<_> = (0..7u64)
        .map(|s| {
            let text = format!("Say something{}", " more".repeat(s as usize));
            // Request 0's budget is below the schema's smallest document:
            // it must fail alone.
            let mut r = request(&text, Some(s), if s == 0 { 12 } else { 18 + 6 * s as u32 });
            if s % 3 != 2 {
                r.json_schema = Some(prompts_schema());
            }
            if s == 4 {
                r.temperature = 0.0;
            }
            r
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 2).unwrap();
    let parallel = LocalLlm::load(
        &ModelSource::local(dir.path()),
        &LocalLlmOptions {
            max_concurrency: 3,
            ..LocalLlmOptions::default()
        },
    )
    .unwrap();
    let a: Vec<Result<String, String>> = chat_many(&parallel, &requests)
        .into_iter()
        .map(|r| r.map(|x| x.text).map_err(|e| e.to_string()))
        .collect();
    let b: Vec<Result<String, String>> = requests
        .iter()
        .map(|r| llm.chat(r).map(|x| x.text).map_err(|e| e.to_string()))
        .collect();
    assert!(a[0].is_err() && a[1..].iter().all(Result::is_ok), "{a:?}");
    assert_eq!(a, b);
}

#[test]
fn chat_template_renders_as_jinja2_does() {
    let t = ChatTemplate::new(TINY_CHAT_TEMPLATE, &[]).unwrap();
    let two = [Message::system("Be brief."), Message::user("Hi \"there\"")];
    assert_eq!(
        t.render(&two, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi \"there\"<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&[Message::user("Hi")], false).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n"
    );
    // raise_exception, Python string methods, loop variables, the special
    // token globals and trim_blocks/lstrip_blocks.
    let t = ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}\n  {% if m.content.startswith('!') %}\
         {{ raise_exception('no bangs: ' + m.content) }}{% endif %}\n\
         {{ m.role.upper() }}{% if not loop.last %},{% endif %}\n{% endfor %}",
        &[("bos_token", "<s>".into())],
    )
    .unwrap();
    assert_eq!(t.render(&two, true).unwrap(), "<s>SYSTEM,USER");
    let e = t
        .render(&[Message::user("!go")], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no bangs: !go"), "{e}");
    let e = ChatTemplate::new("{% for %}", &[]).unwrap_err().to_string();
    assert!(e.contains("chat_template"), "{e}");
}

/// Rendering equals transformers' `apply_chat_template` (jinja2) for the
/// Qwen2.5-Instruct template and for `tojson` and string methods; the
/// expected strings come from tools/parity/make_chat_template_fixture.py.
#[test]
fn chat_template_matches_transformers() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_template_parity.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for family in fixture.as_array().unwrap() {
        let t = ChatTemplate::new(family["template"].as_str().unwrap(), &[]).unwrap();
        for case in family["cases"].as_array().unwrap() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let add = case["add_generation_prompt"].as_bool().unwrap();
            assert_eq!(
                t.render(&messages, add).unwrap(),
                case["expected"].as_str().unwrap(),
                "{} {messages:?} {add}",
                family["name"]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn vocabulary_follows_byte_level_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, tiny_qwen2_tokenizer_json().to_string()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
    let vocab = vocabulary_of(&tok, tok.token_to_id("<|im_end|>"));
    let piece = |t: &str| {
        vocab
            .piece(tok.token_to_id(t).unwrap())
            .unwrap()
            .to_string()
    };
    assert_eq!(piece("Ġred"), " red");
    assert_eq!(piece("{\""), "{\"");
    assert_eq!(piece("Ċ"), "\n");
    assert_eq!(piece("Ã©"), "é");
    // Half a character, and special tokens, are never allowed.
    assert_eq!(piece("Ã"), "");
    assert_eq!(piece("<|im_start|>"), "");
    // Encoding then concatenating pieces gives the text back.
    let text = "{\"prompts\":[\"a red cat\",\"é\"]}";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    let joined: String = ids.iter().map(|&i| vocab.piece(i).unwrap()).collect();
    assert_eq!(joined, text);
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
}

#[test]
fn author_prompts_runs_end_to_end_on_the_tiny_model() {
    let (_dir, llm) = tiny(3);
    let config = PromptAuthoring {
        categories: vec!["animals".into(), "food".into()],
        per_call: 3,
        max_tokens: 120,
        min_chars: 1,
        ..PromptAuthoring::default()
    };
    let out = author_prompts(
        &llm,
        &BagOfWords::default(),
        &Template::default_prompts().unwrap(),
        &config,
    )
    .unwrap();
    assert_eq!(out.stats.calls, 2);
    assert_eq!(out.stats.failed_calls, 0, "{:?}", out.stats.errors);
    assert_eq!(out.stats.unparsable, 0, "{:?}", out.stats.errors);
    assert!(!out.prompts.is_empty(), "{:?}", out.stats);
    assert!(out.prompts[0].provenance.model.starts_with("local:"));
}

#[test]
fn broken_folders_name_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 0).unwrap();
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();

    // No chat template anywhere.
    let mut no_template = config.clone();
    no_template.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        no_template.to_string(),
    )
    .unwrap();
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("chat_template") && e.contains("save_pretrained"),
        "{e}"
    );
    // ... but a chat_template.jinja next to it is found.
    std::fs::write(dir.path().join("chat_template.jinja"), TINY_CHAT_TEMPLATE).unwrap();
    load(dir.path()).unwrap();

    // A template that does not compile.
    std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("chat template does not compile"), "{e}");
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();

    // No tokenizer.json.
    std::fs::rename(
        dir.path().join("tokenizer.json"),
        dir.path().join("tokenizer.json.bak"),
    )
    .unwrap();
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("save_pretrained"),
        "{e}"
    );
    // A damaged one.
    std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::rename(
        dir.path().join("tokenizer.json.bak"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();

    // An architecture the backend does not run.
    let config_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        original.replace("Qwen2ForCausalLM", "MistralForCausalLM"),
    )
    .unwrap();
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("MistralForCausalLM") && e.contains("HTTP backend"),
        "{e}"
    );
    std::fs::write(&config_path, original).unwrap();

    // No weights.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}
