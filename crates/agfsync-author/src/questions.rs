//! AGFSync stage 2 by an LLM: TIFA-style yes/no questions per prompt, each
//! with an element type and the element it asks about.
//!
//! Several calls per prompt are merged, then questions are dropped when
//! * malformed: no question text, an element type outside TIFA's twelve
//!   plus `other`, no element, or an answer other than "yes";
//! * duplicates: cosine >= 0.8 (AGFSync) to an earlier kept question, or
//!   the same text after case and punctuation folding;
//! * ungrounded: the element is not supported by the prompt ([`grounded`]);
//!
//! and a prompt left with fewer than `min_questions` (AGFSync: 5) is
//! dropped as a whole.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use agfsync_store::{PromptRecord, QuestionRecord};

use crate::embed::{dedup_indices, embed_checked, Embedder};
use crate::error::{AuthorError, Result};
use crate::json::extract_json;
use crate::llm::{chat_many, ChatRequest, JsonSchema, Llm};
use crate::prompts::{fnv, fold, AuthorStats, Provenance};
use crate::template::Template;

/// TIFA's element types, plus `other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    /// A thing.
    Object,
    /// A person.
    Human,
    /// An animal.
    Animal,
    /// Food or drink.
    Food,
    /// Something being done.
    Activity,
    /// A property (size, age, texture, ...).
    Attribute,
    /// A number of things.
    Counting,
    /// A colour.
    Color,
    /// What something is made of.
    Material,
    /// Where things are relative to each other.
    Spatial,
    /// Where the scene is.
    Location,
    /// A form.
    Shape,
    /// Anything else (time of day, style, weather).
    Other,
}

impl ElementType {
    /// Every type, in TIFA's order.
    pub const ALL: [ElementType; 13] = [
        Self::Object,
        Self::Human,
        Self::Animal,
        Self::Food,
        Self::Activity,
        Self::Attribute,
        Self::Counting,
        Self::Color,
        Self::Material,
        Self::Spatial,
        Self::Location,
        Self::Shape,
        Self::Other,
    ];

    /// The lower-case name TIFA files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Object => "object",
            Self::Human => "human",
            Self::Animal => "animal",
            Self::Food => "food",
            Self::Activity => "activity",
            Self::Attribute => "attribute",
            Self::Counting => "counting",
            Self::Color => "color",
            Self::Material => "material",
            Self::Spatial => "spatial",
            Self::Location => "location",
            Self::Shape => "shape",
            Self::Other => "other",
        }
    }

    /// Parses a type name, case-insensitively, with the spellings models
    /// use for the same thing (`colour`, `count`, `person`, `action`, ...).
    pub fn parse(name: &str) -> Option<Self> {
        let n = name.trim().to_lowercase();
        let n = n.trim_end_matches('s');
        Some(match n {
            "object" | "thing" | "entity" => Self::Object,
            "human" | "person" | "people" => Self::Human,
            "animal" => Self::Animal,
            "food" | "drink" | "beverage" | "food and beverage" => Self::Food,
            "activity" | "action" | "activitie" => Self::Activity,
            "attribute" | "property" => Self::Attribute,
            "counting" | "count" | "number" | "quantity" => Self::Counting,
            "color" | "colour" => Self::Color,
            "material" => Self::Material,
            "spatial" | "spatial relation" | "relation" => Self::Spatial,
            "location" | "place" | "scene" => Self::Location,
            "shape" => Self::Shape,
            "other" => Self::Other,
            _ => return None,
        })
    }
}

/// How strictly an element must be supported by its prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grounding {
    /// Every content word of the element matches a word of the prompt.
    AllContentWords,
    /// At least one content word does.
    AnyContentWord,
    /// No check.
    Off,
}

/// Settings of question authoring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuestionAuthoring {
    /// Calls per prompt, merged.
    pub calls_per_prompt: usize,
    /// Questions asked for per call (`{count}`; AGFSync: at least 15).
    pub per_call: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus sampling mass.
    pub top_p: f32,
    /// Most tokens per answer.
    pub max_tokens: u32,
    /// Base seed of the calls.
    pub seed: Option<u64>,
    /// A question whose cosine to an earlier kept one is at least this is
    /// dropped (AGFSync: 0.8).
    pub dedup_threshold: f32,
    /// Prompts left with fewer questions are dropped (AGFSync: 5).
    pub min_questions: usize,
    /// The grounding rule.
    pub grounding: Grounding,
}

impl Default for QuestionAuthoring {
    fn default() -> Self {
        Self {
            calls_per_prompt: 2,
            per_call: 15,
            temperature: 0.9,
            top_p: 0.7,
            max_tokens: 4096,
            seed: Some(0),
            dedup_threshold: 0.8,
            min_questions: 5,
            grounding: Grounding::AllContentWords,
        }
    }
}

/// The JSON schema of a question-writing answer.
pub fn questions_schema() -> JsonSchema {
    let types: Vec<&str> = ElementType::ALL.iter().map(|t| t.as_str()).collect();
    JsonSchema {
        name: "questions".into(),
        schema: json!({
            "type": "object",
            "properties": {
                "questions": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "question": {"type": "string", "minLength": 1},
                            "element_type": {"type": "string", "enum": types},
                            "element": {"type": "string", "minLength": 1},
                            "answer": {"type": "string", "enum": ["yes"]}
                        },
                        "required": ["question", "element_type", "element", "answer"],
                        "additionalProperties": false
                    }
                }
            },
            "required": ["questions"],
            "additionalProperties": false
        }),
    }
}

/// One authored question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthoredQuestion {
    /// The question.
    pub question: String,
    /// Its element type.
    pub element_type: ElementType,
    /// The element it asks about.
    pub element: String,
    /// The answer the prompt implies (always "yes").
    pub answer: String,
    /// What wrote it.
    pub provenance: Provenance,
}

/// The questions of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct QuestionSet {
    /// The prompt's id.
    pub pid: String,
    /// Kept questions (also when the prompt is dropped, for inspection).
    pub questions: Vec<AuthoredQuestion>,
    /// True when the prompt has at least `min_questions` and is kept.
    pub kept: bool,
}

impl QuestionSet {
    /// The run store records of the questions (yes/no choices).
    pub fn to_records(&self) -> Vec<QuestionRecord> {
        self.questions
            .iter()
            .zip(0..)
            .map(|(q, idx)| QuestionRecord {
                pid: self.pid.clone(),
                idx,
                question: q.question.clone(),
                choices: vec!["yes".into(), "no".into()],
                answer: Some(q.answer.clone()),
                element_type: Some(q.element_type.as_str().into()),
                element: Some(q.element.clone()),
            })
            .collect()
    }

    /// The `source` value for the store's question set: the provenance of
    /// the first call.
    pub fn source(&self) -> String {
        self.questions
            .first()
            .map_or_else(|| "llm".into(), |q| q.provenance.source())
    }
}

/// Authored question sets, in prompt order, and what happened.
#[derive(Clone, Debug, PartialEq)]
pub struct QuestionsOutcome {
    /// One set per prompt given.
    pub sets: Vec<QuestionSet>,
    /// Counts over all prompts.
    pub stats: AuthorStats,
}

/// Writes questions for every prompt: `calls_per_prompt` calls each (at
/// most `llm.max_concurrency()` in flight), merged and filtered as the
/// module documentation says. Failed calls are counted and skipped; only
/// when every call fails is it an error.
pub fn author_questions<L: Llm + ?Sized, E: Embedder + ?Sized>(
    llm: &L,
    embedder: &E,
    template: &Template,
    prompts: &[PromptRecord],
    config: &QuestionAuthoring,
) -> Result<QuestionsOutcome> {
    if config.calls_per_prompt == 0 || config.per_call == 0 {
        return Err(AuthorError::Config(
            "calls_per_prompt and per_call must be at least 1".into(),
        ));
    }
    if !(0.0..=1.0).contains(&config.dedup_threshold) {
        return Err(AuthorError::Config(
            "dedup_threshold must lie in [0, 1]".into(),
        ));
    }
    let model = llm.identity();
    let count = config.per_call.to_string();
    let mut requests = Vec::new();
    let mut seeds = Vec::new();
    for p in prompts {
        for call in 0..config.calls_per_prompt {
            // Seeds from the prompt id: a shard asks what the whole run would.
            let seed = config
                .seed
                .map(|s| s.wrapping_add(fnv(&p.pid)).wrapping_add(call as u64));
            let mut request =
                ChatRequest::new(template.render(&[("prompt", &p.text), ("count", &count)]));
            request.temperature = config.temperature;
            request.top_p = config.top_p;
            request.max_tokens = config.max_tokens;
            request.seed = seed;
            request.json_schema = Some(questions_schema());
            requests.push(request);
            seeds.push(seed);
        }
    }
    let answers = chat_many(llm, &requests);
    let mut stats = AuthorStats {
        calls: requests.len(),
        ..AuthorStats::default()
    };
    let mut answers = answers.into_iter();
    let mut sets = Vec::with_capacity(prompts.len());
    for (pi, p) in prompts.iter().enumerate() {
        let mut candidates = Vec::new();
        for call in 0..config.calls_per_prompt {
            let Some(answer) = answers.next() else {
                break;
            };
            let text = match answer {
                Ok(r) => r.text,
                Err(e) => {
                    stats.failed_calls += 1;
                    stats.note_error(format!("prompt {} call {call}: {e}", p.pid));
                    tracing::warn!(pid = %p.pid, call, error = %e, "question call failed");
                    continue;
                }
            };
            let value = match extract_json(&text) {
                Ok(v) => v,
                Err(e) => {
                    stats.unparsable += 1;
                    stats.note_error(format!("prompt {} call {call}: {e}", p.pid));
                    continue;
                }
            };
            let provenance = Provenance {
                model: model.clone(),
                template_hash: template.hash().to_string(),
                temperature: config.temperature,
                top_p: config.top_p,
                seed: seeds[pi * config.calls_per_prompt + call],
                call_index: call,
            };
            for item in question_items(&value) {
                match item.and_then(|i| parse_question(i, &provenance)) {
                    Some(q)
                        if config.grounding == Grounding::Off
                            || grounded(&q.element, &p.text, config.grounding) =>
                    {
                        candidates.push(q)
                    }
                    Some(_) => stats.ungrounded += 1,
                    None => stats.malformed += 1,
                }
            }
        }
        let before = candidates.len();
        let questions = dedup_questions(embedder, candidates, config.dedup_threshold)?;
        stats.duplicates += before - questions.len();
        let kept = questions.len() >= config.min_questions;
        if kept {
            stats.kept += questions.len();
        } else {
            stats.dropped_prompts += 1;
        }
        sets.push(QuestionSet {
            pid: p.pid.clone(),
            questions,
            kept,
        });
    }
    if stats.failed_calls == stats.calls && stats.calls > 0 {
        return Err(AuthorError::AllCallsFailed {
            calls: stats.calls,
            first: stats.errors.first().cloned().unwrap_or_default(),
        });
    }
    Ok(QuestionsOutcome { sets, stats })
}

/// The items of an answer: `{"questions": [...]}` (or the one array field
/// of an object) or a bare array. `None` marks an item that is not an
/// object.
fn question_items(value: &Value) -> Vec<Option<&serde_json::Map<String, Value>>> {
    let list = match value {
        Value::Array(items) => Some(items),
        // One question on its own, not wrapped in a list.
        Value::Object(map) if map.contains_key("question") => return vec![Some(map)],
        Value::Object(map) => map.get("questions").and_then(Value::as_array).or_else(|| {
            let arrays: Vec<_> = map.values().filter_map(Value::as_array).collect();
            (arrays.len() == 1).then(|| arrays[0])
        }),
        _ => None,
    };
    match list {
        Some(items) => items.iter().map(Value::as_object).collect(),
        None => vec![None],
    }
}

/// A question from one answer item, or `None` when it is malformed.
fn parse_question(
    item: &serde_json::Map<String, Value>,
    provenance: &Provenance,
) -> Option<AuthoredQuestion> {
    let field = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| item.get(*n).and_then(Value::as_str))
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|s| !s.is_empty())
    };
    let question = field(&["question", "q"])?;
    if question.chars().count() > 300 {
        return None;
    }
    let element_type = ElementType::parse(&field(&["element_type", "type"])?)?;
    let element = field(&["element"])?;
    // A missing answer means the model followed the "always yes" rule
    // silently; a present one must be yes.
    if let Some(answer) = item.get("answer") {
        let yes = answer
            .as_str()
            .is_some_and(|a| a.trim().trim_end_matches('.').eq_ignore_ascii_case("yes"));
        if !yes {
            return None;
        }
    }
    Some(AuthoredQuestion {
        question,
        element_type,
        element,
        answer: "yes".into(),
        provenance: provenance.clone(),
    })
}

/// Drops exact (folded) and near duplicates, keeping the first of each.
fn dedup_questions<E: Embedder + ?Sized>(
    embedder: &E,
    questions: Vec<AuthoredQuestion>,
    threshold: f32,
) -> Result<Vec<AuthoredQuestion>> {
    let mut seen = HashSet::new();
    let questions: Vec<_> = questions
        .into_iter()
        .filter(|q| seen.insert(fold(&q.question)))
        .collect();
    let texts: Vec<String> = questions.iter().map(|q| q.question.clone()).collect();
    let vectors = embed_checked(embedder, &texts)?;
    let keep = dedup_indices(&vectors, threshold);
    let mut questions: Vec<Option<AuthoredQuestion>> = questions.into_iter().map(Some).collect();
    Ok(keep
        .into_iter()
        .filter_map(|i| questions[i].take())
        .collect())
}

/// Function words that carry no content of their own.
const STOPWORDS: &[&str] = &[
    "a", "an", "the", "of", "in", "on", "at", "to", "for", "with", "and", "or", "is", "are", "was",
    "were", "be", "been", "being", "there", "this", "that", "these", "those", "it", "its", "by",
    "from", "as", "into", "onto", "some", "any", "very", "each", "has", "have", "their", "his",
    "her", "s",
];

/// Number words up to twenty, mapped to digits so "two" and "2" match.
const NUMBERS: &[&str] = &[
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// Whether `element` is supported by `prompt`.
///
/// The rule: both are lower-cased and split into words at every character
/// that is not a letter or digit (so "soft-boiled" is "soft" "boiled");
/// number words up to twenty become digits; each word is reduced to a stem
/// by a few suffix rules (possessive `'s`; plural `-ies`/`-es`/`-s`; `-ing`
/// and `-ed` with a doubled final consonant undone; final `y` -> `i`; final
/// `e` dropped), so "foxes"/"fox", "making"/"make", "puppies"/"puppy" and
/// "houses"/"house" meet. Two stems match when equal, or when both have at
/// least four letters and one extends the other by at most two ("snowy"
/// and "snow"). The element's content words are its words that are not
/// function words (articles, common prepositions, auxiliaries); with
/// [`Grounding::AllContentWords`] every one must match a prompt word, with
/// [`Grounding::AnyContentWord`] one must. An element made only of function
/// words ("on", "next to") needs all its words in the prompt. Synonyms and
/// hypernyms ("person" for "fisherman") are not grounded by this rule.
pub fn grounded(element: &str, prompt: &str, rule: Grounding) -> bool {
    if rule == Grounding::Off {
        return true;
    }
    let prompt_words: Vec<String> = words(prompt).iter().map(|w| stem(w)).collect();
    let element_words = words(element);
    if element_words.is_empty() {
        return false;
    }
    let content: Vec<&String> = element_words
        .iter()
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
        .collect();
    let matches = |w: &String| {
        let s = stem(w);
        prompt_words.iter().any(|p| stems_match(&s, p))
    };
    if content.is_empty() {
        return element_words.iter().all(matches);
    }
    match rule {
        Grounding::AnyContentWord => content.into_iter().any(matches),
        _ => content.into_iter().all(matches),
    }
}

/// Lower-case words, number words as digits.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .replace(['\u{2019}', '\''], "'")
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .map(|w| w.strip_suffix("'s").unwrap_or(w))
        .filter(|w| !w.is_empty())
        .map(|w| match NUMBERS.iter().position(|n| *n == w) {
            Some(i) => i.to_string(),
            None => w.to_string(),
        })
        .collect()
}

/// A crude stem (see [`grounded`]); both sides get the same treatment,
/// which matters more than linguistic accuracy.
fn stem(word: &str) -> String {
    let w: Vec<char> = word.chars().collect();
    let n = w.len();
    let ends = |s: &str| word.ends_with(s);
    let mut s: Vec<char> = if n > 4 && ends("ies") {
        let mut v = w[..n - 3].to_vec();
        v.push('i');
        v
    } else if n > 5 && ends("ing") {
        undouble(w[..n - 3].to_vec())
    } else if n > 4 && ends("ed") {
        undouble(w[..n - 2].to_vec())
    } else if n > 3
        && ends("es")
        && ["s", "x", "z", "ch", "sh"]
            .iter()
            .any(|e| word[..word.len() - 2].ends_with(e))
    {
        w[..n - 2].to_vec()
    } else if n > 3 && ends("s") && !ends("ss") && !ends("us") && !ends("is") {
        w[..n - 1].to_vec()
    } else {
        w
    };
    if s.len() > 2 && s.last() == Some(&'y') {
        let last = s.len() - 1;
        s[last] = 'i';
    }
    if s.len() > 3 && s.last() == Some(&'e') {
        s.pop();
    }
    s.into_iter().collect()
}

/// "runn" -> "run": a doubled final consonant left by `-ing`/`-ed`.
fn undouble(mut v: Vec<char>) -> Vec<char> {
    let n = v.len();
    if n >= 3 && v[n - 1] == v[n - 2] && !"aeiouls".contains(v[n - 1]) {
        v.pop();
    }
    v
}

/// Equal stems, or stems of at least four letters one of which extends the
/// other by at most two.
fn stems_match(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    short.len() >= 4 && long.starts_with(short) && long.len() - short.len() <= 2
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::embed::BagOfWords;
    use crate::llm::FakeLlm;
    use agfsync_store::prompt_id;

    #[test]
    fn grounding_rule() {
        let p = "Two red foxes were playing in the snowy woods near an old fisherman's soft-boiled eggs";
        for e in [
            "foxes",
            "fox",
            "two",
            "2",
            "red",
            "playing",
            "play",
            "snow",
            "woods",
            "wood",
            "fisherman",
            "soft-boiled",
            "egg",
            "the red fox",
            "in",
            "near",
        ] {
            assert!(grounded(e, p, Grounding::AllContentWords), "{e}");
        }
        for e in ["person", "three", "blue fox", "car", "on", ""] {
            assert!(!grounded(e, p, Grounding::AllContentWords), "{e}");
        }
        assert!(grounded("blue fox", p, Grounding::AnyContentWord));
        assert!(grounded("person", p, Grounding::Off));
        assert!(grounded(
            "puppy",
            "three puppies",
            Grounding::AllContentWords
        ));
        assert!(grounded(
            "houses",
            "a yellow house",
            Grounding::AllContentWords
        ));
        assert!(grounded(
            "making",
            "people make bread",
            Grounding::AllContentWords
        ));
        assert!(grounded(
            "running",
            "a dog runs",
            Grounding::AllContentWords
        ));
    }

    #[test]
    fn element_types_parse_with_aliases() {
        for t in ElementType::ALL {
            assert_eq!(ElementType::parse(t.as_str()), Some(t));
        }
        assert_eq!(ElementType::parse(" Colour "), Some(ElementType::Color));
        assert_eq!(ElementType::parse("objects"), Some(ElementType::Object));
        assert_eq!(ElementType::parse("count"), Some(ElementType::Counting));
        assert_eq!(ElementType::parse("vibe"), None);
    }

    fn q(question: &str, t: &str, e: &str) -> Value {
        json!({"question": question, "element_type": t, "element": e, "answer": "yes"})
    }

    fn record(category: &str, text: &str) -> PromptRecord {
        PromptRecord {
            pid: prompt_id(category, text),
            ord: 0,
            category: category.into(),
            text: text.into(),
            source: "test".into(),
        }
    }

    #[test]
    fn merges_calls_and_drops_bad_questions_and_thin_prompts() {
        let fox = record("animals", "two red foxes playing in fresh snow");
        let cactus = record("plants", "a potted cactus on a windowsill");
        let fox_text = fox.text.clone();
        let fox_pid = fox.pid.clone();
        let llm = FakeLlm::from_fn(move |r| {
            let last = &r.messages.last().unwrap().content;
            if !last.contains(&fox_text) {
                // Only two usable questions for the cactus.
                return Ok(json!({"questions": [
                    q("Is there a cactus?", "object", "cactus"),
                    q("Is there a windowsill?", "object", "windowsill"),
                    q("Is there a cat?", "animal", "cat"),
                ]})
                .to_string());
            }
            let call = r.seed.unwrap().wrapping_sub(fnv(&fox_pid));
            Ok(if call == 0 {
                format!(
                    "```json\n{}\n```",
                    json!({"questions": [
                        q("Are there foxes?", "animal", "foxes"),
                        q("Are exactly two foxes shown?", "counting", "two"),
                        q("Are the foxes red?", "colour", "red"),
                        q("Is there a person?", "human", "person"),
                        {"question": "Is it night?", "element_type": "other", "element": "snow", "answer": "no"},
                        {"question": "", "element_type": "object", "element": "snow"},
                        {"question": "Is it cute?", "element_type": "vibe", "element": "fox"},
                        "Is there snow?",
                    ]})
                )
            } else {
                json!([
                    q("Are there FOXES?", "animal", "fox"),
                    q("Are the foxes playing?", "activity", "playing"),
                    {"question": "Is there snow?", "type": "object", "element": "snow"},
                    q("Is the snow fresh?", "attribute", "fresh"),
                ])
                .to_string()
            })
        })
        .with_concurrency(2);
        // Seeds are base (0) + hash(pid) + call index.
        let config = QuestionAuthoring::default();
        let t = Template::default_questions().unwrap();
        let out = author_questions(
            &llm,
            &BagOfWords::default(),
            &t,
            &[fox.clone(), cactus.clone()],
            &config,
        )
        .unwrap();
        assert_eq!(out.sets.len(), 2);
        let fox_set = &out.sets[0];
        assert!(fox_set.kept);
        let texts: Vec<_> = fox_set
            .questions
            .iter()
            .map(|q| q.question.as_str())
            .collect();
        assert!(texts.contains(&"Are there foxes?"));
        assert!(texts.contains(&"Are the foxes playing?"));
        assert!(texts.contains(&"Is the snow fresh?"));
        assert!(!texts.contains(&"Is there a person?"));
        assert!(!texts.contains(&"Are there FOXES?"));
        assert_eq!(texts.len(), 6, "{texts:?}");
        assert!(!out.sets[1].kept);
        assert_eq!(out.sets[1].questions.len(), 2);
        assert_eq!(out.stats.dropped_prompts, 1);
        assert_eq!(out.stats.ungrounded, 1 + 2);
        assert_eq!(out.stats.malformed, 4);
        let records = fox_set.to_records();
        assert_eq!(records[0].pid, fox.pid);
        assert_eq!(records[0].choices, vec!["yes", "no"]);
        assert_eq!(records[0].answer.as_deref(), Some("yes"));
        assert_eq!(records[2].element_type.as_deref(), Some("color"));
        assert_eq!(
            records.iter().map(|r| r.idx).collect::<Vec<_>>(),
            (0..6).collect::<Vec<_>>()
        );
        assert!(fox_set.source().starts_with("llm:"));
    }
}
