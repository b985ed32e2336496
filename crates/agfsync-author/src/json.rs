//! Defensive JSON extraction from a language model's text.
//!
//! Models asked for JSON answer with JSON most of the time, and the rest of
//! the time with JSON inside a Markdown code fence, after a sentence of
//! prose, with a trailing comma, with Python-style single quotes, or cut off
//! by the token limit. [`extract_json`] recovers a value from all of these:
//!
//! 1. a byte-order mark and surrounding whitespace are dropped, and text
//!    that already parses is returned as it is (valid JSON is never
//!    rewritten);
//! 2. otherwise the inside of the first code fence (closed by a fence at a
//!    line start) and the whole text are scanned from each `{` or `[` (at
//!    most [`MAX_STARTS`] of them) by a small repairing scanner; within a
//!    region the recovered value that covers the most text wins, so
//!    `here are [20] prompts: {...}` yields the object, not `[20]`; between
//!    regions a whole value beats one rebuilt from a cut-off text, then the
//!    longer one, then the fence;
//! 3. the scanner removes trailing commas, turns single-quoted strings into
//!    double-quoted ones where a quote can only open or close a string
//!    (after `{ [ , :` and before `, } ] :`), quotes bare object keys, maps
//!    `True/False/None` to JSON, escapes raw control characters inside
//!    strings, inserts a missing comma between array elements, and ignores
//!    prose after the value;
//! 4. several objects one after the other, separated only by blanks or
//!    commas (one JSON object per line, as models sometimes write a list),
//!    become an array of them;
//! 5. text cut off before the value closes keeps every complete element:
//!    the last incomplete one is dropped and open brackets are closed. An
//!    object inside an array is kept whole or not at all (a half object
//!    would pass as an element with fields missing).

use serde_json::Value;

use crate::error::{excerpt, AuthorError, Result};

/// Most `{`/`[` positions tried as the start of the JSON value.
pub const MAX_STARTS: usize = 64;

/// Deepest nesting the scanner follows.
const MAX_DEPTH: usize = 128;

/// How much of an unusable answer an error quotes.
const EXCERPT_CHARS: usize = 240;

/// A value recovered from a model's text, and whether repairs were needed.
#[derive(Clone, Debug, PartialEq)]
pub struct Extracted {
    /// The value.
    pub value: Value,
    /// True when the text was not valid JSON as received.
    pub repaired: bool,
    /// True when a truncated tail was dropped.
    pub truncated: bool,
}

/// The JSON value in `text` (see the module documentation for the repairs);
/// an error quotes the start of `text`.
pub fn extract_json(text: &str) -> Result<Value> {
    extract_json_detailed(text).map(|e| e.value)
}

/// [`extract_json`], also saying whether the text needed repairs.
pub fn extract_json_detailed(text: &str) -> Result<Extracted> {
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    let first_error = match serde_json::from_str::<Value>(trimmed) {
        Ok(value) => {
            return Ok(Extracted {
                value,
                repaired: false,
                truncated: false,
            })
        }
        Err(e) => e.to_string(),
    };
    let mut regions = Vec::new();
    if let Some(inside) = fenced(trimmed) {
        regions.push(inside);
    }
    regions.push(trimmed);
    // The best value over the regions: a whole one beats one rebuilt from a
    // truncated text (a fence marker inside a string cuts the fence short),
    // then the one covering more text; ties go to the fence.
    let mut winner: Option<(bool, usize, Extracted)> = None;
    for region in regions {
        let Some((consumed, extracted)) = best_in(region) else {
            continue;
        };
        let key = (!extracted.truncated, consumed);
        if winner.as_ref().is_none_or(|(w, c, _)| key > (*w, *c)) {
            winner = Some((key.0, key.1, extracted));
        }
    }
    winner.map(|(_, _, e)| e).ok_or_else(|| AuthorError::Json {
        reason: if trimmed.contains(['{', '[']) {
            format!("not repairable JSON ({first_error})")
        } else {
            "no '{' or '[' in the text".into()
        },
        received: excerpt(text, EXCERPT_CHARS),
    })
}

/// The best value recovered from `region` and the bytes it covers: the
/// largest one, or the list of several adjacent objects.
fn best_in(region: &str) -> Option<(usize, Extracted)> {
    let mut best: Option<(usize, Extracted)> = None;
    // Every value recovered, as (start, end, value, truncated).
    let mut found: Vec<(usize, usize, Value, bool)> = Vec::new();
    let mut tried = 0;
    let mut skip_to = 0;
    for (at, c) in region.char_indices() {
        if at < skip_to || (c != '{' && c != '[') {
            continue;
        }
        if tried == MAX_STARTS {
            break;
        }
        tried += 1;
        let Some(scan) = repair(&region[at..]) else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(&scan.text) else {
            continue;
        };
        // Starts inside a value already recovered cannot cover more.
        skip_to = at + scan.consumed;
        found.push((at, skip_to, value.clone(), scan.truncated));
        let better = best.as_ref().is_none_or(|(span, _)| scan.consumed > *span);
        if better {
            best = Some((
                scan.consumed,
                Extracted {
                    value,
                    repaired: true,
                    truncated: scan.truncated,
                },
            ));
        }
    }
    if let Some(list) = object_sequence(region, &found) {
        let span = found.last().map_or(0, |f| f.1) - found.first().map_or(0, |f| f.0);
        return Some((span, list));
    }
    best
}

/// The recovered values as one array when there are several, all objects,
/// with nothing but blanks and commas between them.
fn object_sequence(region: &str, found: &[(usize, usize, Value, bool)]) -> Option<Extracted> {
    if found.len() < 2 || !found.iter().all(|(_, _, v, _)| v.is_object()) {
        return None;
    }
    let adjacent = found.windows(2).all(|w| {
        region[w[0].1..w[1].0]
            .chars()
            .all(|c| c.is_whitespace() || c == ',')
    });
    adjacent.then(|| Extracted {
        value: Value::Array(found.iter().map(|(_, _, v, _)| v.clone()).collect()),
        repaired: true,
        truncated: found.iter().any(|f| f.3),
    })
}

/// The inside of the first Markdown code fence (to the end of the text when
/// the closing fence was cut off).
fn fenced(text: &str) -> Option<&str> {
    let open = text.find("```")?;
    let after = &text[open + 3..];
    // Skip the info string (`json`, `JSON`, ...) up to the end of its line.
    let body = match after.find('\n') {
        Some(nl) => &after[nl + 1..],
        None => after.trim_start_matches(|c: char| c.is_ascii_alphanumeric()),
    };
    // The closing fence starts a line; JSON strings cannot hold a raw
    // newline, so "\n```" is never inside one.
    Some(match body.find("\n```") {
        Some(close) => &body[..close],
        None => body.strip_suffix("```").unwrap_or(body),
    })
}

/// What the scanner expects next inside a container.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Object: a key or `}` (after `{` or a comma).
    Key,
    /// Object: `:` after a key.
    Colon,
    /// Object: the member's value.
    Value,
    /// Array: an element or `]`.
    Element,
    /// Either: `,` or the closing bracket.
    CommaOrEnd,
}

/// The scanner's result.
struct Scan {
    /// Repaired JSON text.
    text: String,
    /// Bytes of the input the value spans.
    consumed: usize,
    /// True when an incomplete tail was dropped.
    truncated: bool,
}

/// A position where the output can be cut and closed: the output length
/// and the open brackets at that point.
struct Checkpoint {
    len: usize,
    open: Vec<char>,
}

/// True when the output may be cut with `open` brackets pending: not inside
/// an object that is itself inside an array (such objects are atomic).
fn cuttable(open: &[char]) -> bool {
    match open.iter().position(|&c| c == '[') {
        Some(first_array) => !open[first_array..].contains(&'{'),
        None => true,
    }
}

/// Rewrites `s` (which starts with `{` or `[`) into valid JSON text where
/// the repairs of the module documentation allow it.
fn repair(s: &str) -> Option<Scan> {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let mut out = String::with_capacity(s.len());
    let mut open: Vec<char> = Vec::new();
    let mut expect: Vec<Expect> = Vec::new();
    let mut checkpoint: Option<Checkpoint> = None;
    let mut i = 0;
    // Whether a value may start at the top level (only the first one).
    let mut top_started = false;
    while i < chars.len() {
        let (_, c) = chars[i];
        if c.is_whitespace() || c == '\u{feff}' {
            if c != '\u{feff}' {
                out.push(c);
            }
            i += 1;
            continue;
        }
        let state = expect.last().copied();
        let wants_value = match state {
            None => !top_started,
            Some(Expect::Value) | Some(Expect::Element) => true,
            _ => false,
        };
        if state == Some(Expect::CommaOrEnd) {
            match c {
                ',' => {
                    out.push(',');
                    let top = expect.last_mut()?;
                    *top = if open.last() == Some(&'{') {
                        Expect::Key
                    } else {
                        Expect::Element
                    };
                    i += 1;
                    continue;
                }
                '}' | ']' => {}
                '{' | '[' | '"' | '\'' if open.last() == Some(&'[') => {
                    // A forgotten comma between array elements.
                    out.push(',');
                    *expect.last_mut()? = Expect::Element;
                    continue;
                }
                _ => return None,
            }
        }
        match c {
            '}' | ']' => {
                let want = if c == '}' { '{' } else { '[' };
                if open.last() != Some(&want) {
                    return None;
                }
                let ok_state = matches!(
                    state,
                    Some(Expect::CommaOrEnd) | Some(Expect::Key) | Some(Expect::Element)
                );
                if !ok_state {
                    return None;
                }
                // Drop a trailing comma (and the blanks after it).
                let kept = out.trim_end().len();
                if out[..kept].ends_with(',') {
                    out.truncate(kept - 1);
                }
                out.push(c);
                open.pop();
                expect.pop();
                i += 1;
                if finish_value(&mut open, &mut expect, &mut checkpoint, &out) {
                    return Some(Scan {
                        text: out,
                        consumed: chars.get(i).map_or(s.len(), |&(at, _)| at),
                        truncated: false,
                    });
                }
            }
            '{' | '[' if wants_value => {
                if open.len() == MAX_DEPTH {
                    return None;
                }
                top_started = true;
                out.push(c);
                open.push(c);
                expect.push(if c == '{' {
                    Expect::Key
                } else {
                    Expect::Element
                });
                i += 1;
                if cuttable(&open) {
                    checkpoint = Some(Checkpoint {
                        len: out.len(),
                        open: open.clone(),
                    });
                }
            }
            '"' | '\'' if wants_value || state == Some(Expect::Key) => {
                let Some(next) = read_string(&chars, i, &mut out) else {
                    break; // cut off inside the string
                };
                i = next;
                if state == Some(Expect::Key) {
                    *expect.last_mut()? = Expect::Colon;
                } else if finish_value(&mut open, &mut expect, &mut checkpoint, &out) {
                    return None; // a bare string is not what we look for
                }
            }
            ':' if state == Some(Expect::Colon) => {
                out.push(':');
                *expect.last_mut()? = Expect::Value;
                i += 1;
            }
            c if state == Some(Expect::Key) && (c.is_ascii_alphabetic() || c == '_') => {
                // A bare key: quote it.
                let start = i;
                while i < chars.len() && (chars[i].1.is_ascii_alphanumeric() || chars[i].1 == '_') {
                    i += 1;
                }
                if i == chars.len() {
                    break;
                }
                let key: String = chars[start..i].iter().map(|&(_, c)| c).collect();
                out.push('"');
                out.push_str(&key);
                out.push('"');
                *expect.last_mut()? = Expect::Colon;
            }
            c if wants_value && (c.is_ascii_alphanumeric() || c == '-' || c == '+' || c == '.') => {
                let start = i;
                while i < chars.len()
                    && (chars[i].1.is_ascii_alphanumeric() || matches!(chars[i].1, '-' | '+' | '.'))
                {
                    i += 1;
                }
                if i == chars.len() {
                    break; // a literal cut off: cannot know it is whole
                }
                let word: String = chars[start..i].iter().map(|&(_, c)| c).collect();
                out.push_str(match word.as_str() {
                    "True" => "true",
                    "False" => "false",
                    "None" => "null",
                    w => w,
                });
                if finish_value(&mut open, &mut expect, &mut checkpoint, &out) {
                    return None;
                }
            }
            _ => return None,
        }
    }
    // Input ended before the value closed: keep what was complete.
    let cp = checkpoint?;
    out.truncate(cp.len);
    let kept = out.trim_end().len();
    if out[..kept].ends_with(',') {
        out.truncate(kept - 1);
    }
    for b in cp.open.iter().rev() {
        out.push(if *b == '{' { '}' } else { ']' });
    }
    Some(Scan {
        text: out,
        consumed: s.len(),
        truncated: true,
    })
}

/// Marks the value just written as complete; returns true when it was the
/// top-level value.
fn finish_value(
    open: &mut [char],
    expect: &mut [Expect],
    checkpoint: &mut Option<Checkpoint>,
    out: &str,
) -> bool {
    match expect.last_mut() {
        None => true,
        Some(top) => {
            *top = Expect::CommaOrEnd;
            if cuttable(open) {
                *checkpoint = Some(Checkpoint {
                    len: out.len(),
                    open: open.to_vec(),
                });
            }
            false
        }
    }
}

/// Copies the string starting at `chars[i]` (a `"` or `'`) to `out` as a
/// JSON string; returns the index after it, or `None` when it never closes.
fn read_string(chars: &[(usize, char)], i: usize, out: &mut String) -> Option<usize> {
    let quote = chars[i].1;
    let mut buf = String::from('"');
    let mut j = i + 1;
    while j < chars.len() {
        let c = chars[j].1;
        match c {
            '\\' => {
                let next = chars.get(j + 1)?.1;
                match next {
                    '\'' => buf.push('\''),
                    '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' | 'u' => {
                        buf.push('\\');
                        buf.push(next);
                    }
                    // An unknown escape: keep the character literally.
                    other => buf.push(other),
                }
                j += 2;
                continue;
            }
            c if c == quote => {
                // A single quote closes only where a string may end, so
                // apostrophes inside ('it's') survive.
                if quote == '\'' && !closes_here(chars, j + 1) {
                    buf.push('\'');
                    j += 1;
                    continue;
                }
                buf.push('"');
                out.push_str(&buf);
                return Some(j + 1);
            }
            '"' => buf.push_str("\\\""),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            '\t' => buf.push_str("\\t"),
            c if (c as u32) < 0x20 => buf.push_str(&format!("\\u{:04x}", c as u32)),
            c => buf.push(c),
        }
        j += 1;
    }
    None
}

/// True when the next non-blank character after `j` can follow a string.
fn closes_here(chars: &[(usize, char)], j: usize) -> bool {
    match chars[j..]
        .iter()
        .map(|&(_, c)| c)
        .find(|c| !c.is_whitespace())
    {
        None => true,
        Some(c) => matches!(c, ',' | '}' | ']' | ':'),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(text: &str) -> Value {
        extract_json(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn valid_json_passes_through_unchanged() {
        for text in [
            r#"{"prompts": ["a", "b"]}"#,
            r#"[1, 2.5, -3e2, true, false, null, "x\"y\\z", {"k": []}]"#,
            r#"{"s": "it's {not} [json], really: yes"}"#,
            r#""just a string""#,
            "42",
        ] {
            let got = extract_json_detailed(text).unwrap();
            assert_eq!(got.value, serde_json::from_str::<Value>(text).unwrap());
            assert!(!got.repaired, "{text}");
        }
    }

    #[test]
    fn code_fences() {
        let v = ok("```json\n{\"prompts\": [\"a red fox\"]}\n```");
        assert_eq!(v, json!({"prompts": ["a red fox"]}));
        let v = ok("Sure!\n```\n[1, 2]\n```\nHope that helps.");
        assert_eq!(v, json!([1, 2]));
        let v = ok("```JSON\n{\"a\": [\"x\", \"y\"");
        assert_eq!(v, json!({"a": ["x", "y"]}));
    }

    #[test]
    fn prose_before_and_after() {
        let v = ok("Here are [3] prompts for you: {\"prompts\": [\"a\", \"b\", \"c\"]} Enjoy!");
        assert_eq!(v, json!({"prompts": ["a", "b", "c"]}));
        let v = ok("Output:\n[{\"q\": \"Is there a cat?\"}]\n\nNote: all answers are yes.");
        assert_eq!(v, json!([{"q": "Is there a cat?"}]));
    }

    #[test]
    fn trailing_commas() {
        assert_eq!(ok(r#"{"a": [1, 2, ], }"#), json!({"a": [1, 2]}));
        assert_eq!(ok("[\"x\",\n]"), json!(["x"]));
    }

    #[test]
    fn single_quotes_where_unambiguous() {
        assert_eq!(
            ok("{'prompts': ['a cat's toy', 'say \"hi\"']}"),
            json!({"prompts": ["a cat's toy", "say \"hi\""]})
        );
        assert_eq!(ok("['it\\'s', 'b']"), json!(["it's", "b"]));
    }

    #[test]
    fn python_literals_and_bare_keys() {
        assert_eq!(
            ok("{ok: True, missing: None, bad: False}"),
            json!({"ok": true, "missing": null, "bad": false})
        );
    }

    #[test]
    fn truncated_final_element_is_dropped() {
        let got = extract_json_detailed(r#"{"prompts": ["a red fox", "a blue ca"#).unwrap();
        assert_eq!(got.value, json!({"prompts": ["a red fox"]}));
        assert!(got.truncated);
        // A half object inside an array is dropped whole.
        assert_eq!(
            ok(r#"[{"q": "a", "e": "b"}, {"q": "c", "e"#),
            json!([{"q": "a", "e": "b"}])
        );
        assert_eq!(
            ok(r#"{"questions": [{"q": "a"}, {"q": "c"}"#),
            json!({"questions": [{"q": "a"}, {"q": "c"}]})
        );
        // A cut-off literal is not trusted.
        assert_eq!(ok("[1, 2, tr"), json!([1, 2]));
        assert_eq!(
            ok("{\"a\": [\"x\"], \"b\": \"unfinish"),
            json!({"a": ["x"]})
        );
        assert_eq!(ok("{\"prompts\": ["), json!({"prompts": []}));
    }

    #[test]
    fn bom_and_control_characters() {
        assert_eq!(ok("\u{feff}{\"a\": 1}"), json!({"a": 1}));
        assert_eq!(
            ok("{\"a\": \"line one\nline two\"}"),
            json!({"a": "line one\nline two"})
        );
    }

    #[test]
    fn one_object_per_line_becomes_a_list() {
        assert_eq!(
            ok("{\"q\": \"a\"}\n{\"q\": \"b\"},\n{'q': 'c'}"),
            json!([{"q": "a"}, {"q": "b"}, {"q": "c"}])
        );
        // Prose between objects: the largest one, not a list.
        assert_eq!(
            ok("{\"q\": \"a\"} and also {\"q\": \"bb\"}"),
            json!({"q": "bb"})
        );
    }

    #[test]
    fn missing_comma_between_elements() {
        assert_eq!(ok("[{\"a\": 1} {\"a\": 2}]"), json!([{"a": 1}, {"a": 2}]));
    }

    #[test]
    fn errors_quote_bounded_input() {
        let e = extract_json("I cannot help with that.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("I cannot help with that."), "{e}");
        let long = format!("nonsense {}", "x".repeat(10_000));
        let e = extract_json(&long).unwrap_err().to_string();
        assert!(e.len() < 600, "{}", e.len());
        assert!(e.contains("10009 characters"), "{e}");
        let e = extract_json("{\"a\": }").unwrap_err().to_string();
        assert!(e.contains("not repairable"), "{e}");
    }

    /// Random strings with the characters that trip repairs up.
    fn random_text(rng: &mut impl rand::Rng) -> String {
        const ALPHABET: &[char] = &[
            'a', 'b', ' ', '"', '\'', ',', '{', '}', '[', ']', ':', '\\', '\n', 'é', '`',
        ];
        let n = rng.gen_range(0..12);
        (0..n)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
            .collect()
    }

    #[test]
    fn wrapped_documents_round_trip_and_truncation_keeps_whole_elements() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..300 {
            let items: Vec<String> = (0..rng.gen_range(1..6))
                .map(|_| random_text(&mut rng))
                .collect();
            let doc = json!({"prompts": items});
            let text = if rng.gen_bool(0.5) {
                serde_json::to_string(&doc).unwrap()
            } else {
                serde_json::to_string_pretty(&doc).unwrap()
            };
            assert_eq!(ok(&text), doc);
            assert_eq!(
                ok(&format!("Sure! Here:\n```json\n{text}\n```\nDone.")),
                doc
            );
            // A trailing comma before the array's closing bracket (the last
            // ']': earlier ones may be inside strings).
            let close = text.rfind(']').unwrap();
            assert_eq!(ok(&format!("{},{}", &text[..close], &text[close..])), doc);
            // Cut anywhere: an error, or whole elements in order.
            let cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            for &cut in cuts.iter().step_by(3) {
                let Ok(v) = extract_json(&text[..cut]) else {
                    continue;
                };
                let Some(kept) = v.get("prompts").and_then(Value::as_array) else {
                    assert!(
                        v == json!({}) || v.is_array(),
                        "{v} from {:?}",
                        &text[..cut]
                    );
                    continue;
                };
                assert!(kept.len() <= items.len());
                for (k, want) in kept.iter().zip(&items) {
                    assert_eq!(k.as_str().unwrap(), want, "cut {:?}", &text[..cut]);
                }
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            "{",
            "[",
            "}",
            "]]",
            "{'",
            "['",
            "{\"a\"",
            "{\"a\":",
            "[\"\\",
            "```",
            "```json",
            "{{{{",
            "[[[[",
            "\u{feff}",
            "{:}",
            "[,]",
            "'''",
            "{\"a\": 'x' 'y'}",
            "é{ü: 'ß'",
        ] {
            let _ = extract_json(text);
        }
        let deep = "[".repeat(10_000);
        let _ = extract_json(&deep);
    }
}
