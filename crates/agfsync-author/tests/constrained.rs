//! Constrained decoding driven by a random "model": seeded random logits
//! over a small vocabulary of JSON-ish pieces, sampling only allowed
//! tokens. Every generation must end, parse, and follow the schema.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;

use agfsync_author::constrained::{JsonConstraint, Vocabulary};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// Pieces a BPE vocabulary might have: single characters (so every valid
/// prefix can be continued), multi-character runs that cross structure,
/// and pieces that are never valid (control characters, whitespace,
/// unicode escapes, digits).
fn vocabulary() -> Arc<Vocabulary> {
    let mut pieces: Vec<String> = "{}[]\",:\\abcdefghijklmnopqrstuvwxyz?é"
        .chars()
        .map(|c| c.to_string())
        .collect();
    for p in [
        "{\"",
        "\":\"",
        "\",\"",
        "\"]",
        "\"}",
        "\"]}",
        "},{",
        "}]}",
        "\":[",
        "\":[{\"",
        "question",
        "questions",
        "element",
        "_type",
        "element_type",
        "answer",
        "yes",
        "no",
        "obj",
        "ect",
        "object",
        "color",
        "hu",
        "man",
        "Is there a cat?",
        " ",
        "\n",
        "\t",
        "\\n",
        "\\\"",
        "\\u00e9",
        "12",
        "true",
        "null",
        "x\"",
        "",
    ] {
        pieces.push(p.to_string());
    }
    let eos = pieces.len() as u32;
    pieces.push(String::new());
    Arc::new(Vocabulary::new(pieces, Some(eos)))
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "questions": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "question": {"type": "string", "minLength": 1, "maxLength": 12},
                        "element_type": {"type": "string", "enum": ["object", "color", "human"]},
                        "element": {"type": "string", "maxLength": 6},
                        "answer": {"enum": ["yes"]},
                        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}
                    },
                    "required": ["question", "element_type", "element", "answer", "tags"]
                }
            },
            "note": {"type": "string"}
        },
        "required": ["questions"]
    })
}

/// An independent check of the schema subset.
fn conforms(v: &Value, s: &Value) -> bool {
    if let Some(values) = s.get("enum") {
        return values.as_array().unwrap().contains(v);
    }
    let n = |k: &str| s.get(k).and_then(Value::as_u64).map(|x| x as usize);
    match s["type"].as_str().unwrap() {
        "string" => {
            let Some(t) = v.as_str() else { return false };
            let len = t.chars().count();
            len >= n("minLength").unwrap_or(0) && len <= n("maxLength").unwrap_or(usize::MAX)
        }
        "array" => {
            let Some(items) = v.as_array() else {
                return false;
            };
            items.len() >= n("minItems").unwrap_or(0)
                && items.len() <= n("maxItems").unwrap_or(usize::MAX)
                && items.iter().all(|i| conforms(i, &s["items"]))
        }
        "object" => {
            let Some(map) = v.as_object() else {
                return false;
            };
            let required: Vec<&str> = s["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            map.len() == required.len()
                && required.iter().all(|k| {
                    map.get(*k)
                        .is_some_and(|x| conforms(x, &s["properties"][*k]))
                })
        }
        _ => false,
    }
}

#[test]
fn random_generations_always_parse_and_follow_the_schema() {
    let vocab = vocabulary();
    let constraint = JsonConstraint::new(&schema(), vocab.clone()).unwrap();
    let eos = vocab.eos().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(20240313);
    let mut lengths = Vec::new();
    for generation in 0..200 {
        let mut state = constraint.start();
        let mut steps = 0;
        while !state.ended() {
            steps += 1;
            assert!(steps < 5000, "generation {generation} does not end");
            let allowed = constraint.allowed_tokens(&state);
            // Random logits, softmax over the allowed tokens only (what a
            // decoder does by setting the others to -inf).
            let weights: Vec<f64> = allowed
                .iter()
                .map(|&a| {
                    let logit: f64 = rng.gen_range(-4.0..4.0);
                    if a {
                        logit.exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = weights.iter().sum();
            assert!(
                total > 0.0,
                "generation {generation}: no token allowed after {:?}",
                state.text()
            );
            let mut r = rng.gen_range(0.0..total);
            let mut token = weights.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if *w > 0.0 && r < *w {
                    token = i;
                    break;
                }
                r -= w;
            }
            if !allowed[token] {
                token = allowed.iter().rposition(|a| *a).unwrap();
            }
            constraint.advance(&mut state, token as u32).unwrap();
            if token as u32 == eos {
                assert!(constraint.is_complete(&state));
            }
        }
        let text = state.text();
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("generation {generation}: {e}: {text}"));
        assert!(
            conforms(&value, &schema()),
            "generation {generation}: {text}"
        );
        lengths.push(text.len());
    }
    // The generations differ (the test would be weak if they did not).
    lengths.sort();
    lengths.dedup();
    assert!(lengths.len() > 20, "{lengths:?}");
}

#[test]
fn disallowed_tokens_are_refused_without_changing_state() {
    let vocab = vocabulary();
    let constraint = JsonConstraint::new(&schema(), vocab.clone()).unwrap();
    let mut state = constraint.start();
    let id = |p: &str| {
        (0..vocab.len() as u32)
            .find(|&i| vocab.piece(i) == Some(p))
            .unwrap()
    };
    constraint.advance(&mut state, id("{\"")).unwrap();
    let before = state.clone();
    for bad in [" ", "\n", "12", "true", "}", "answer"] {
        let e = constraint
            .advance(&mut state, id(bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains("may not follow"), "{e}");
        assert_eq!(state, before);
    }
    constraint.advance(&mut state, id("questions")).unwrap();
    constraint.advance(&mut state, id("\":[{\"")).unwrap();
    assert!(constraint
        .advance(&mut state, vocab.len() as u32 + 5)
        .is_err());
    assert!(constraint
        .advance(&mut state, vocab.eos().unwrap())
        .is_err());
}
