//! AGFSync stage 1 by an LLM: visual descriptions per category, parsed
//! defensively, near duplicates within a category dropped.
//!
//! Every call gets its own seed, derived from the configured seed, the
//! category and the call index (not from the order calls are made), so a
//! category authored alone or in another run asks exactly the same calls.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use agfsync_store::{prompt_id, PromptRecord};

use crate::embed::{dedup_indices, embed_checked, Embedder};
use crate::error::{AuthorError, Result};
use crate::json::extract_json;
use crate::llm::{chat_many, ChatRequest, JsonSchema, Llm};
use crate::template::Template;

/// The twelve AGFSync prompt categories (AGFSync section 1); the pipeline's
/// built-in prompt set uses the same list.
pub const CATEGORIES: [&str; 12] = [
    "natural landscapes",
    "cities and architecture",
    "people",
    "animals",
    "plants",
    "food and beverages",
    "sports and fitness",
    "art and culture",
    "technology and industry",
    "everyday objects",
    "transportation",
    "abstract and conceptual",
];

/// Errors kept per stage for the report (the rest are only counted).
const KEPT_ERRORS: usize = 8;

/// What produced an authored record, so it can be reproduced and its data
/// compared across runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The LLM's identity ([`Llm::identity`]).
    pub model: String,
    /// The template's hash ([`Template::hash`]).
    pub template_hash: String,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus sampling mass.
    pub top_p: f32,
    /// The call's seed.
    pub seed: Option<u64>,
    /// The call's index within its category (prompts) or prompt
    /// (questions).
    pub call_index: usize,
}

impl Provenance {
    /// The `source` column of the run store: `llm:` and this record as
    /// JSON.
    pub fn source(&self) -> String {
        format!(
            "llm:{}",
            serde_json::to_string(self).unwrap_or_else(|_| self.model.clone())
        )
    }
}

/// Settings of prompt authoring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptAuthoring {
    /// Categories to write for.
    pub categories: Vec<String>,
    /// Descriptions asked for per call (`{count}`).
    pub per_call: usize,
    /// Calls per category.
    pub calls_per_category: usize,
    /// Sampling temperature (AGFSync: 0.9).
    pub temperature: f32,
    /// Nucleus sampling mass (AGFSync: 0.7).
    pub top_p: f32,
    /// Most tokens per answer.
    pub max_tokens: u32,
    /// Base seed of the calls (none: the backend's own randomness).
    pub seed: Option<u64>,
    /// A description whose cosine to an earlier kept one of its category
    /// is at least this is dropped (AGFSync: 0.90).
    pub dedup_threshold: f32,
    /// Shortest description kept, in characters.
    pub min_chars: usize,
    /// Longest description kept, in characters.
    pub max_chars: usize,
}

impl Default for PromptAuthoring {
    fn default() -> Self {
        Self {
            categories: CATEGORIES.iter().map(|c| c.to_string()).collect(),
            per_call: 20,
            calls_per_category: 1,
            temperature: 0.9,
            top_p: 0.7,
            max_tokens: 4096,
            seed: Some(0),
            dedup_threshold: 0.90,
            min_chars: 8,
            max_chars: 1000,
        }
    }
}

impl PromptAuthoring {
    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(AuthorError::Config(m.into()));
        if self.categories.iter().any(|c| c.trim().is_empty()) {
            return bad("an empty category name");
        }
        if self.per_call == 0 || self.calls_per_category == 0 {
            return bad("per_call and calls_per_category must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.dedup_threshold) || !(0.0..=1.0).contains(&self.top_p) {
            return bad("dedup_threshold and top_p must lie in [0, 1]");
        }
        if self.temperature.is_nan() || self.temperature < 0.0 {
            return bad("temperature must be >= 0");
        }
        Ok(())
    }
}

/// The JSON schema of a prompt-writing answer.
pub fn prompts_schema() -> JsonSchema {
    JsonSchema {
        name: "prompts".into(),
        schema: json!({
            "type": "object",
            "properties": {
                "prompts": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1
                }
            },
            "required": ["prompts"],
            "additionalProperties": false
        }),
    }
}

/// One authored description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthoredPrompt {
    /// Its category.
    pub category: String,
    /// The description.
    pub text: String,
    /// What wrote it.
    pub provenance: Provenance,
}

impl AuthoredPrompt {
    /// The run store's content id of this prompt.
    pub fn pid(&self) -> String {
        prompt_id(&self.category, &self.text)
    }

    /// The run store record at position `ord` of the prompt set.
    pub fn to_record(&self, ord: i64) -> PromptRecord {
        PromptRecord {
            pid: self.pid(),
            ord,
            category: self.category.clone(),
            text: self.text.clone(),
            source: self.provenance.source(),
        }
    }
}

/// Records for `prompts`, numbered from `first_ord`.
pub fn prompt_records(prompts: &[AuthoredPrompt], first_ord: i64) -> Vec<PromptRecord> {
    prompts
        .iter()
        .zip(first_ord..)
        .map(|(p, ord)| p.to_record(ord))
        .collect()
}

/// Counts of what happened to the LLM's output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthorStats {
    /// Calls made.
    pub calls: usize,
    /// Calls that failed (transport, status, backend).
    pub failed_calls: usize,
    /// Answers with no usable JSON.
    pub unparsable: usize,
    /// Items dropped as malformed (wrong type, empty, too short or long,
    /// wrong answer, unknown element type).
    pub malformed: usize,
    /// Items dropped as (near) duplicates.
    pub duplicates: usize,
    /// Questions dropped as not grounded in their prompt.
    pub ungrounded: usize,
    /// Prompts dropped for too few questions (questions only).
    pub dropped_prompts: usize,
    /// Items kept.
    pub kept: usize,
    /// The first few errors, for the log.
    pub errors: Vec<String>,
}

impl AuthorStats {
    pub(crate) fn note_error(&mut self, e: String) {
        if self.errors.len() < KEPT_ERRORS {
            self.errors.push(e);
        }
    }
}

/// Authored prompts and what happened on the way.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptsOutcome {
    /// Kept descriptions, category by category in configured order, each
    /// category in call and answer order.
    pub prompts: Vec<AuthoredPrompt>,
    /// Counts.
    pub stats: AuthorStats,
}

/// A 64-bit FNV-1a hash, to derive per-item seeds from names.
pub(crate) fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes prompts for every configured category: `calls_per_category`
/// calls each (at most `llm.max_concurrency()` in flight), answers parsed
/// with [`extract_json`], malformed items and near duplicates within a
/// category dropped. Failed calls are counted and skipped; only when every
/// call fails is it an error.
pub fn author_prompts<L: Llm + ?Sized, E: Embedder + ?Sized>(
    llm: &L,
    embedder: &E,
    template: &Template,
    config: &PromptAuthoring,
) -> Result<PromptsOutcome> {
    config.check()?;
    let model = llm.identity();
    let count = config.per_call.to_string();
    let mut requests = Vec::new();
    let mut origin = Vec::new();
    for category in &config.categories {
        for call in 0..config.calls_per_category {
            let seed = config
                .seed
                .map(|s| s.wrapping_add(fnv(category)).wrapping_add(call as u64));
            let mut request = ChatRequest::new(
                template.render(&[("category", category.as_str()), ("count", &count)]),
            );
            request.temperature = config.temperature;
            request.top_p = config.top_p;
            request.max_tokens = config.max_tokens;
            request.seed = seed;
            request.json_schema = Some(prompts_schema());
            requests.push(request);
            origin.push((category.clone(), call, seed));
        }
    }
    let answers = chat_many(llm, &requests);
    let mut stats = AuthorStats {
        calls: requests.len(),
        ..AuthorStats::default()
    };
    // Candidates per category, in call order.
    let mut candidates: Vec<Vec<AuthoredPrompt>> = vec![Vec::new(); config.categories.len()];
    for (i, answer) in answers.into_iter().enumerate() {
        let (category, call, seed) = &origin[i];
        let cat_index = i / config.calls_per_category;
        let text = match answer {
            Ok(r) => r.text,
            Err(e) => {
                stats.failed_calls += 1;
                stats.note_error(format!("{category} call {call}: {e}"));
                tracing::warn!(category = %category, call, error = %e, "prompt call failed");
                continue;
            }
        };
        let items = match extract_json(&text) {
            Ok(value) => prompt_items(&value),
            Err(e) => {
                stats.unparsable += 1;
                stats.note_error(format!("{category} call {call}: {e}"));
                continue;
            }
        };
        let provenance = Provenance {
            model: model.clone(),
            template_hash: template.hash().to_string(),
            temperature: config.temperature,
            top_p: config.top_p,
            seed: *seed,
            call_index: *call,
        };
        for item in items {
            match item.and_then(|t| clean_prompt(&t, config)) {
                Some(text) => candidates[cat_index].push(AuthoredPrompt {
                    category: category.clone(),
                    text,
                    provenance: provenance.clone(),
                }),
                None => stats.malformed += 1,
            }
        }
    }
    if stats.failed_calls == stats.calls && stats.calls > 0 {
        return Err(AuthorError::AllCallsFailed {
            calls: stats.calls,
            first: stats.errors.first().cloned().unwrap_or_default(),
        });
    }
    let mut prompts = Vec::new();
    for group in candidates {
        let before = group.len();
        let kept = dedup_group(embedder, group, config.dedup_threshold)?;
        stats.duplicates += before - kept.len();
        prompts.extend(kept);
    }
    stats.kept = prompts.len();
    Ok(PromptsOutcome { prompts, stats })
}

/// Drops exact (after case and blank folding) and near duplicates, keeping
/// the first of each.
fn dedup_group<E: Embedder + ?Sized>(
    embedder: &E,
    group: Vec<AuthoredPrompt>,
    threshold: f32,
) -> Result<Vec<AuthoredPrompt>> {
    let mut seen = std::collections::HashSet::new();
    let group: Vec<_> = group
        .into_iter()
        .filter(|p| seen.insert(fold(&p.text)))
        .collect();
    let texts: Vec<String> = group.iter().map(|p| p.text.clone()).collect();
    let vectors = embed_checked(embedder, &texts)?;
    let keep = dedup_indices(&vectors, threshold);
    let mut group: Vec<Option<AuthoredPrompt>> = group.into_iter().map(Some).collect();
    Ok(keep.into_iter().filter_map(|i| group[i].take()).collect())
}

/// Lower case, alphanumeric words joined by single spaces.
pub(crate) fn fold(text: &str) -> String {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The descriptions in an answer: `{"prompts": [...]}` (or the one array
/// field of an object) or a bare array; items are strings or objects with
/// a `prompt`/`text`/`description` string. `None` marks a malformed item.
fn prompt_items(value: &Value) -> Vec<Option<String>> {
    let list = match value {
        Value::Array(items) => Some(items),
        Value::Object(map) => ["prompts", "descriptions", "items"]
            .iter()
            .find_map(|k| map.get(*k).and_then(Value::as_array))
            .or_else(|| {
                let arrays: Vec<_> = map.values().filter_map(Value::as_array).collect();
                (arrays.len() == 1).then(|| arrays[0])
            }),
        _ => None,
    };
    let Some(list) = list else {
        return vec![None];
    };
    list.iter()
        .map(|item| match item {
            Value::String(s) => Some(s.clone()),
            Value::Object(m) => ["prompt", "text", "description"]
                .iter()
                .find_map(|k| m.get(*k).and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        })
        .collect()
}

/// A description tidied (blanks collapsed, a leading list number removed),
/// or `None` when it is out of the length bounds.
fn clean_prompt(text: &str, config: &PromptAuthoring) -> Option<String> {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // Models number their list items despite the rules ("1. a red fox").
    let digits = text.chars().take_while(char::is_ascii_digit).count();
    let text = if digits > 0 && digits <= 3 {
        let rest = &text[digits..];
        match rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
            Some(r) => r.to_string(),
            None => text,
        }
    } else {
        text
    };
    let n = text.chars().count();
    (n >= config.min_chars && n <= config.max_chars).then_some(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::embed::BagOfWords;
    use crate::llm::FakeLlm;

    fn category_of(r: &ChatRequest) -> String {
        let last = &r.messages.last().unwrap().content;
        let start = last.find("category \"").unwrap() + 10;
        let end = start + last[start..].find('"').unwrap();
        last[start..end].to_string()
    }

    #[test]
    fn authors_each_category_with_provenance_and_dedup() {
        let llm = FakeLlm::from_fn(|r| {
            let c = category_of(r);
            let seed = r.seed.unwrap();
            Ok(match c.as_str() {
                "animals" => format!(
                    "Here you go:\n```json\n{{\"prompts\": [\"two red foxes playing in fresh snow\", \
                     \"Two red foxes playing in fresh snow!\", \"1. a heron standing in a misty pond {seed}\", \
                     \"ok\", 42, \"a dog\",]}}\n```"
                ),
                "plants" => "[\"a potted cactus with pink flowers\", {\"prompt\": \"sunflowers by a wooden fence\"}]"
                    .to_string(),
                _ => "I'm sorry, I can't.".to_string(),
            })
        })
        .with_name("fake:model-a")
        .with_concurrency(3);
        let config = PromptAuthoring {
            categories: vec!["animals".into(), "plants".into(), "people".into()],
            calls_per_category: 2,
            ..PromptAuthoring::default()
        };
        let template = Template::default_prompts().unwrap();
        let out = author_prompts(&llm, &BagOfWords::default(), &template, &config).unwrap();
        let animals: Vec<_> = out
            .prompts
            .iter()
            .filter(|p| p.category == "animals")
            .map(|p| p.text.as_str())
            .collect();
        // The exclamation copy is an exact duplicate after folding, and so
        // is the second call's fox; the second call's heron differs only by
        // its seed number: a near duplicate (bag-of-words cosine 10/11).
        assert_eq!(
            animals,
            vec![
                "two red foxes playing in fresh snow".to_string(),
                format!(
                    "a heron standing in a misty pond {}",
                    out.prompts[1].provenance.seed.unwrap()
                ),
            ]
        );
        assert_eq!(out.stats.duplicates, 6);
        assert_eq!(out.stats.calls, 6);
        assert_eq!(out.stats.unparsable, 2);
        // "ok" (too short), 42 and "a dog" per animal call.
        assert_eq!(out.stats.malformed, 6);
        let p = &out.prompts[0];
        assert_eq!(p.provenance.model, "fake:model-a");
        assert_eq!(p.provenance.template_hash, template.hash());
        assert_eq!(p.provenance.temperature, 0.9);
        assert_eq!(p.provenance.call_index, 0);
        let r = p.to_record(7);
        assert_eq!(r.ord, 7);
        assert_eq!(r.pid, prompt_id("animals", &p.text));
        let source: Value = serde_json::from_str(r.source.strip_prefix("llm:").unwrap()).unwrap();
        assert_eq!(source["model"], "fake:model-a");
        // Requests carry the sampling settings and the schema.
        let req = &llm.requests()[0];
        assert_eq!(req.top_p, 0.7);
        assert!(req.json_schema.is_some());
        assert!(req.messages.last().unwrap().content.contains("Write 20 "));
    }

    #[test]
    fn seeds_depend_on_category_and_call_not_order() {
        let run = |cats: Vec<String>| {
            let llm = FakeLlm::from_fn(|_| Ok("[]".into()));
            let config = PromptAuthoring {
                categories: cats,
                calls_per_category: 2,
                ..PromptAuthoring::default()
            };
            let t = Template::default_prompts().unwrap();
            author_prompts(&llm, &BagOfWords::default(), &t, &config).unwrap();
            let mut seeds: Vec<(String, u64)> = llm
                .requests()
                .iter()
                .map(|r| (category_of(r), r.seed.unwrap()))
                .collect();
            seeds.sort();
            seeds
        };
        let a = run(vec!["animals".into(), "plants".into()]);
        let b = run(vec!["plants".into()]);
        assert!(b.iter().all(|s| a.contains(s)));
    }

    #[test]
    fn all_calls_failing_is_an_error_and_bad_config_is_refused() {
        let llm = FakeLlm::from_fn(|_| Err("down".into()));
        let t = Template::default_prompts().unwrap();
        let e = author_prompts(
            &llm,
            &BagOfWords::default(),
            &t,
            &PromptAuthoring::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("all 12") && e.contains("down"), "{e}");
        let config = PromptAuthoring {
            per_call: 0,
            ..PromptAuthoring::default()
        };
        assert!(author_prompts(&llm, &BagOfWords::default(), &t, &config).is_err());
    }
}
