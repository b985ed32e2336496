//! Benchmark files as their authors publish them, and TIFA scoring.
//!
//! * TIFA v1.0 (`tifa_v1.0_question_answers.json`): a JSON list of question
//!   entries, each with `id` (the caption id), `caption`, `question`,
//!   `choices`, `answer`, `element_type`, `element` (other fields ignored).
//!   Score = mean over captions of the fraction of that caption's questions
//!   answered correctly; reported overall and per element type. Free-form
//!   answers are mapped to the nearest choice first ([`nearest_choice`]).
//! * HPSv2 (`benchmark_prompts/{anime,concept-art,paintings,photo}.json`):
//!   one JSON list of prompts per style; a folder holding those files, or
//!   one JSON object mapping style to its list.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// One TIFA question about a caption.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TifaQuestion {
    /// The question.
    pub question: String,
    /// Its choices (yes/no or multiple choice).
    pub choices: Vec<String>,
    /// The right choice.
    pub answer: String,
    /// TIFA element type.
    pub element_type: String,
    /// The element asked about.
    #[serde(default)]
    pub element: String,
}

/// A TIFA caption with its questions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TifaCaption {
    /// Caption id (`id` in the file).
    pub id: String,
    /// The caption (the prompt to generate from).
    pub caption: String,
    /// Its questions, in file order.
    pub questions: Vec<TifaQuestion>,
}

fn format_err(path: &Path, reason: String) -> EvalError {
    EvalError::Format {
        path: path.to_path_buf(),
        reason,
    }
}

/// The largest benchmark file read by default (256 MiB; TIFA v1.0 is 3 MB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 << 20;

fn read_json(path: &Path, max_bytes: u64) -> Result<serde_json::Value> {
    let io = |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > max_bytes {
        return Err(format_err(
            path,
            format!(
                "the file is {len} bytes, more than the {max_bytes} allowed; raise \
                 `[limits] max_input_file_bytes` in agfsync.toml if it is meant"
            ),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    parse_json(&text, path)
}

fn parse_json(text: &str, path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| format_err(path, format!("not JSON: {e}")))
}

/// Reads TIFA v1.0's question file, grouped by caption id in first-seen order.
pub fn read_tifa(path: &Path) -> Result<Vec<TifaCaption>> {
    read_tifa_with(path, DEFAULT_MAX_FILE_BYTES)
}

/// [`read_tifa`], refusing a file larger than `max_bytes`.
pub fn read_tifa_with(path: &Path, max_bytes: u64) -> Result<Vec<TifaCaption>> {
    parse_tifa_value(&read_json(path, max_bytes)?, path)
}

/// Parses the text of a TIFA v1.0 question file (`path` names it in errors).
pub fn parse_tifa(text: &str, path: &Path) -> Result<Vec<TifaCaption>> {
    parse_tifa_value(&parse_json(text, path)?, path)
}

fn parse_tifa_value(v: &serde_json::Value, path: &Path) -> Result<Vec<TifaCaption>> {
    let list = v.as_array().ok_or_else(|| {
        format_err(
            path,
            "expected a JSON list of question entries (tifa_v1.0_question_answers.json)".into(),
        )
    })?;
    let mut order: Vec<String> = Vec::new();
    let mut by_id: BTreeMap<String, TifaCaption> = BTreeMap::new();
    for (i, e) in list.iter().enumerate() {
        let field = |name: &str| -> Result<String> {
            match e.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) if name == "id" => Ok(n.to_string()),
                Some(other) => Err(format_err(
                    path,
                    format!("entry {i}: field `{name}` must be a string, found {other}"),
                )),
                None => Err(format_err(
                    path,
                    format!("entry {i}: missing field `{name}`"),
                )),
            }
        };
        let id = field("id")?;
        let choices: Vec<String> = match e.get("choices") {
            Some(serde_json::Value::Array(c)) => c
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        format_err(path, format!("entry {i}: `choices` must hold strings"))
                    })
                })
                .collect::<Result<_>>()?,
            _ => {
                return Err(format_err(
                    path,
                    format!("entry {i}: missing field `choices` (a list)"),
                ))
            }
        };
        let answer = field("answer")?;
        if !choices.iter().any(|c| normalise(c) == normalise(&answer)) {
            return Err(format_err(
                path,
                format!("entry {i}: `answer` {answer:?} is not one of its choices {choices:?}"),
            ));
        }
        let q = TifaQuestion {
            question: field("question")?,
            choices,
            answer,
            element_type: field("element_type")?,
            element: field("element").unwrap_or_default(),
        };
        let caption = field("caption")?;
        let entry = by_id.entry(id.clone()).or_insert_with(|| {
            order.push(id.clone());
            TifaCaption {
                id: id.clone(),
                caption,
                questions: Vec::new(),
            }
        });
        entry.questions.push(q);
    }
    if order.is_empty() {
        return Err(format_err(path, "no questions in the file".into()));
    }
    Ok(order
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .collect())
}

/// The four HPSv2 benchmark styles, in the benchmark's order.
pub const HPS_STYLES: [&str; 4] = ["anime", "concept-art", "paintings", "photo"];

/// Reads HPSv2 benchmark prompts: a folder with `<style>.json` files (a
/// list of strings each) or one JSON object `{style: [prompts]}`.
pub fn read_hps_prompts(path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    read_hps_prompts_with(path, DEFAULT_MAX_FILE_BYTES)
}

/// [`read_hps_prompts`], refusing a file larger than `max_bytes`.
pub fn read_hps_prompts_with(path: &Path, max_bytes: u64) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    if path.is_dir() {
        for style in HPS_STYLES {
            let f = path.join(format!("{style}.json"));
            if f.is_file() {
                out.insert(
                    style.to_string(),
                    hps_strings(&read_json(&f, max_bytes)?, &f, style)?,
                );
            }
        }
        if out.is_empty() {
            return Err(format_err(
                path,
                format!(
                    "no HPSv2 style files here (expected {})",
                    HPS_STYLES.map(|s| format!("{s}.json")).join(", ")
                ),
            ));
        }
    } else {
        out = parse_hps_prompts(&read_json(path, max_bytes)?, path)?;
    }
    Ok(out)
}

/// Parses one HPSv2 prompt file's JSON: `{style: [prompts]}` (`path`
/// names it in errors).
pub fn parse_hps_prompts(
    v: &serde_json::Value,
    path: &Path,
) -> Result<BTreeMap<String, Vec<String>>> {
    let obj = v.as_object().ok_or_else(|| {
        format_err(
            path,
            "expected an object mapping each style to its prompts".into(),
        )
    })?;
    let mut out = BTreeMap::new();
    for (style, list) in obj {
        out.insert(style.clone(), hps_strings(list, path, style)?);
    }
    Ok(out)
}

/// Parses the text of one HPSv2 prompt file (`{style: [prompts]}`).
pub fn parse_hps_prompts_text(text: &str, path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    parse_hps_prompts(&parse_json(text, path)?, path)
}

fn hps_strings(v: &serde_json::Value, file: &Path, style: &str) -> Result<Vec<String>> {
    v.as_array()
        .ok_or_else(|| format_err(file, format!("style `{style}`: expected a list of prompts")))?
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.as_str().map(str::to_string).ok_or_else(|| {
                format_err(file, format!("style `{style}`, prompt {i}: not a string"))
            })
        })
        .collect()
}

/// Lower-cases and trims punctuation and whitespace.
pub fn normalise(s: &str) -> String {
    s.trim()
        .trim_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
        .to_lowercase()
}

/// Maps a free-form answer to the nearest choice (index): an exact match
/// after normalisation; else the choice that appears as a whole-word
/// sequence in the answer (the longest if several); else the choice with the
/// most words in common (ties: the earlier choice). `None` when nothing is
/// shared.
pub fn nearest_choice(answer: &str, choices: &[String]) -> Option<usize> {
    let a = normalise(answer);
    if let Some(i) = choices.iter().position(|c| normalise(c) == a) {
        return Some(i);
    }
    let words: Vec<&str> = a
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let contains = |choice: &str| {
        let cw: Vec<String> = normalise(choice)
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        !cw.is_empty()
            && words
                .windows(cw.len())
                .any(|w| w.iter().zip(&cw).all(|(a, b)| *a == b))
    };
    let mut best: Option<(usize, usize)> = None;
    for (i, c) in choices.iter().enumerate() {
        if contains(c) && best.is_none_or(|(_, len)| c.len() > len) {
            best = Some((i, c.len()));
        }
    }
    if let Some((i, _)) = best {
        return Some(i);
    }
    let mut best: Option<(usize, usize)> = None;
    for (i, c) in choices.iter().enumerate() {
        let n = normalise(c)
            .split(|ch: char| !ch.is_alphanumeric())
            .filter(|w| !w.is_empty() && words.contains(w))
            .count();
        if n > 0 && best.is_none_or(|(_, m)| n > m) {
            best = Some((i, n));
        }
    }
    best.map(|(i, _)| i)
}

/// TIFA results: overall and per element type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TifaScore {
    /// Mean over captions of the fraction answered correctly.
    pub score: f64,
    /// Per caption (in input order): the fraction answered correctly.
    pub per_caption: Vec<f64>,
    /// Element type -> accuracy over its questions.
    pub per_element_type: BTreeMap<String, f64>,
    /// Questions answered.
    pub questions: usize,
}

/// Scores TIFA from the model's answers: `answers[c][q]` is the free-form
/// answer to question `q` of caption `c`.
pub fn tifa_score(captions: &[TifaCaption], answers: &[Vec<String>]) -> Result<TifaScore> {
    if captions.len() != answers.len() {
        return Err(EvalError::Invalid(format!(
            "{} captions but answers for {}",
            captions.len(),
            answers.len()
        )));
    }
    let mut per_caption = Vec::with_capacity(captions.len());
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut questions = 0;
    for (c, ans) in captions.iter().zip(answers) {
        if c.questions.len() != ans.len() || ans.is_empty() {
            return Err(EvalError::Invalid(format!(
                "caption {}: {} questions but {} answers",
                c.id,
                c.questions.len(),
                ans.len()
            )));
        }
        let mut right = 0;
        for (q, a) in c.questions.iter().zip(ans) {
            let ok = nearest_choice(a, &q.choices)
                .is_some_and(|i| normalise(&q.choices[i]) == normalise(&q.answer));
            right += usize::from(ok);
            let e = by_type.entry(q.element_type.clone()).or_default();
            e.0 += usize::from(ok);
            e.1 += 1;
            questions += 1;
        }
        per_caption.push(right as f64 / c.questions.len() as f64);
    }
    Ok(TifaScore {
        score: crate::stats::mean(&per_caption),
        per_caption,
        per_element_type: by_type
            .into_iter()
            .map(|(k, (r, n))| (k, r as f64 / n as f64))
            .collect(),
        questions,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn q(question: &str, choices: &[&str], answer: &str, et: &str) -> TifaQuestion {
        TifaQuestion {
            question: question.into(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
            answer: answer.into(),
            element_type: et.into(),
            element: String::new(),
        }
    }

    fn sample() -> Vec<TifaCaption> {
        vec![
            TifaCaption {
                id: "1".into(),
                caption: "two red apples on a table".into(),
                questions: vec![
                    q("are there apples?", &["yes", "no"], "yes", "object"),
                    q("how many apples?", &["1", "2", "3"], "2", "counting"),
                    q(
                        "what color are the apples?",
                        &["red", "green"],
                        "red",
                        "color",
                    ),
                    q("is there a table?", &["yes", "no"], "yes", "object"),
                ],
            },
            TifaCaption {
                id: "2".into(),
                caption: "a dog".into(),
                questions: vec![q("is there a dog?", &["yes", "no"], "yes", "animal")],
            },
        ]
    }

    #[test]
    fn one_wrong_answer_lowers_the_score_by_its_share() {
        let caps = sample();
        let right = vec![
            vec!["Yes".to_string(), "2".into(), "red".into(), "yes.".into()],
            vec!["yes".to_string()],
        ];
        let s = tifa_score(&caps, &right).unwrap();
        assert_eq!(s.score, 1.0);
        let mut one_wrong = right.clone();
        one_wrong[0][1] = "3".into();
        let s = tifa_score(&caps, &one_wrong).unwrap();
        // Caption 1 drops to 3/4; the mean over two captions drops by 1/8.
        assert!((s.score - (0.75 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(s.per_element_type["counting"], 0.0);
        assert_eq!(s.per_element_type["object"], 1.0);
        assert_eq!(s.questions, 5);
    }

    #[test]
    fn free_answers_map_to_the_nearest_choice() {
        let ch = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            nearest_choice("Yes, there is.", &ch(&["yes", "no"])),
            Some(0)
        );
        assert_eq!(nearest_choice("nobody knows", &ch(&["yes", "no"])), None);
        assert_eq!(
            nearest_choice("it is dark green", &ch(&["green", "dark green", "red"])),
            Some(1)
        );
        assert_eq!(nearest_choice("two", &ch(&["1", "2"])), None);
        assert_eq!(
            nearest_choice("a wooden chair", &ch(&["metal", "wood chair"])),
            Some(1)
        );
    }

    #[test]
    fn tifa_file_errors_name_the_entry_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tifa.json");
        std::fs::write(&f, r#"[{"id":"1","caption":"c","question":"q","choices":["yes","no"],"answer":"maybe","element_type":"object"}]"#).unwrap();
        let err = read_tifa(&f).unwrap_err().to_string();
        assert!(err.contains("entry 0") && err.contains("maybe"), "{err}");
        std::fs::write(&f, r#"[{"id":"1","caption":"c","choices":["yes","no"],"answer":"yes","element_type":"object"}]"#).unwrap();
        let err = read_tifa(&f).unwrap_err().to_string();
        assert!(err.contains("`question`"), "{err}");
        std::fs::write(&f, r#"{"not":"a list"}"#).unwrap();
        assert!(read_tifa(&f).unwrap_err().to_string().contains("JSON list"));
    }

    #[test]
    fn hps_prompts_from_a_folder_or_one_object() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("anime.json"), r#"["a", "b"]"#).unwrap();
        std::fs::write(dir.path().join("photo.json"), r#"["c"]"#).unwrap();
        let p = read_hps_prompts(dir.path()).unwrap();
        assert_eq!(p["anime"].len(), 2);
        assert_eq!(p.len(), 2);
        let f = dir.path().join("all.json");
        std::fs::write(&f, r#"{"paintings": ["x", 3]}"#).unwrap();
        let err = read_hps_prompts(&f).unwrap_err().to_string();
        assert!(
            err.contains("paintings") && err.contains("prompt 1"),
            "{err}"
        );
    }
}
