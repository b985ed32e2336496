//! The prompts and questions stages' inputs: the built-in set (one prompt
//! per AGFSync category, each with hand-written TIFA-style questions) and
//! importers for prompt lists (text, JSONL, CSV) and TIFA question files.
//!
//! LLM authoring (AGFSync stages 1 and 2) writes the same records; until it
//! lands, these are the sources.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use agfsync_store::{prompt_id, PromptRecord, QuestionRecord};

use crate::error::{PipelineError, Result};

/// The twelve AGFSync prompt categories (one list for the whole project).
pub use agfsync_author::CATEGORIES;

/// A built-in prompt: category, text, and (question, element type, element).
type Builtin = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str, &'static str)],
);

/// Three prompts per category (the first twelve: one per category, in
/// category order), each with questions whose answer is "yes".
const BUILTIN: &[Builtin] = &[
    (
        "natural landscapes",
        "a snowy mountain lake at sunrise, pine trees along the shore",
        &[
            ("Is there a lake?", "object", "lake"),
            ("Are there mountains?", "object", "mountain"),
            ("Is there snow?", "object", "snow"),
            ("Are there pine trees?", "object", "pine trees"),
            ("Is it sunrise?", "other", "sunrise"),
            (
                "Are the trees along the shore?",
                "spatial",
                "along the shore",
            ),
        ],
    ),
    (
        "cities and architecture",
        "a narrow cobblestone street with yellow houses and flower boxes",
        &[
            ("Is there a street?", "object", "street"),
            (
                "Is the street made of cobblestone?",
                "material",
                "cobblestone",
            ),
            ("Are there houses?", "object", "houses"),
            ("Are the houses yellow?", "color", "yellow"),
            ("Are there flower boxes?", "object", "flower boxes"),
            ("Is the street narrow?", "attribute", "narrow"),
        ],
    ),
    (
        "people",
        "an old fisherman mending a blue net on a wooden pier",
        &[
            ("Is there a person?", "human", "fisherman"),
            ("Is the person old?", "attribute", "old"),
            ("Is there a net?", "object", "net"),
            ("Is the net blue?", "color", "blue"),
            ("Is the person mending the net?", "activity", "mending"),
            ("Is there a pier?", "object", "pier"),
            ("Is the pier wooden?", "material", "wooden"),
        ],
    ),
    (
        "animals",
        "two red foxes playing in fresh snow",
        &[
            ("Are there foxes?", "animal", "fox"),
            ("Are there two foxes?", "counting", "two"),
            ("Are the foxes red?", "color", "red"),
            ("Are the foxes playing?", "activity", "playing"),
            ("Is there snow?", "object", "snow"),
        ],
    ),
    (
        "plants",
        "a potted cactus with pink flowers on a sunny windowsill",
        &[
            ("Is there a cactus?", "object", "cactus"),
            ("Is the cactus in a pot?", "object", "pot"),
            ("Are there flowers?", "object", "flowers"),
            ("Are the flowers pink?", "color", "pink"),
            ("Is there a windowsill?", "object", "windowsill"),
            ("Is the cactus on the windowsill?", "spatial", "on"),
        ],
    ),
    (
        "food and beverages",
        "a bowl of ramen with a soft-boiled egg and green onions",
        &[
            ("Is there a bowl?", "object", "bowl"),
            ("Is there ramen?", "food", "ramen"),
            ("Is there an egg?", "food", "egg"),
            ("Is the egg soft-boiled?", "attribute", "soft-boiled"),
            ("Are there green onions?", "food", "green onions"),
        ],
    ),
    (
        "sports and fitness",
        "a cyclist racing down a mountain road in a yellow jersey",
        &[
            ("Is there a cyclist?", "human", "cyclist"),
            ("Is there a bicycle?", "object", "bicycle"),
            ("Is the cyclist racing?", "activity", "racing"),
            ("Is there a road?", "object", "road"),
            ("Is the jersey yellow?", "color", "yellow"),
            ("Is the road on a mountain?", "location", "mountain"),
        ],
    ),
    (
        "art and culture",
        "a violinist performing on a candlelit stage",
        &[
            ("Is there a violinist?", "human", "violinist"),
            ("Is there a violin?", "object", "violin"),
            ("Is the violinist performing?", "activity", "performing"),
            ("Is there a stage?", "object", "stage"),
            ("Are there candles?", "object", "candles"),
        ],
    ),
    (
        "technology and industry",
        "a robotic arm assembling a circuit board in a clean factory",
        &[
            ("Is there a robotic arm?", "object", "robotic arm"),
            ("Is there a circuit board?", "object", "circuit board"),
            ("Is the arm assembling the board?", "activity", "assembling"),
            ("Is this in a factory?", "location", "factory"),
            ("Is the factory clean?", "attribute", "clean"),
        ],
    ),
    (
        "everyday objects",
        "a red vintage bicycle leaning against a brick wall",
        &[
            ("Is there a bicycle?", "object", "bicycle"),
            ("Is the bicycle red?", "color", "red"),
            ("Is the bicycle vintage?", "attribute", "vintage"),
            ("Is there a wall?", "object", "wall"),
            ("Is the wall made of brick?", "material", "brick"),
            (
                "Is the bicycle leaning against the wall?",
                "spatial",
                "leaning against",
            ),
        ],
    ),
    (
        "transportation",
        "a steam locomotive crossing a stone bridge over a river",
        &[
            ("Is there a locomotive?", "object", "locomotive"),
            ("Is it a steam locomotive?", "attribute", "steam"),
            ("Is there a bridge?", "object", "bridge"),
            ("Is the bridge made of stone?", "material", "stone"),
            ("Is there a river?", "object", "river"),
            ("Is the bridge over the river?", "spatial", "over"),
        ],
    ),
    (
        "abstract and conceptual",
        "a glowing hourglass filled with stars instead of sand",
        &[
            ("Is there an hourglass?", "object", "hourglass"),
            ("Is the hourglass glowing?", "attribute", "glowing"),
            ("Are there stars?", "object", "stars"),
            ("Are the stars inside the hourglass?", "spatial", "inside"),
            ("Is there no sand?", "other", "instead of sand"),
        ],
    ),
    (
        "natural landscapes",
        "a desert canyon with red rock walls under a clear blue sky",
        &[
            ("Is there a canyon?", "object", "canyon"),
            ("Are the rock walls red?", "color", "red"),
            ("Is the sky blue?", "color", "blue"),
            ("Is the sky clear?", "attribute", "clear"),
            ("Is this a desert?", "location", "desert"),
        ],
    ),
    (
        "natural landscapes",
        "a waterfall pouring into a green pool surrounded by ferns",
        &[
            ("Is there a waterfall?", "object", "waterfall"),
            ("Is there a pool?", "object", "pool"),
            ("Is the pool green?", "color", "green"),
            ("Are there ferns?", "object", "ferns"),
            (
                "Do the ferns surround the pool?",
                "spatial",
                "surrounded by",
            ),
        ],
    ),
    (
        "cities and architecture",
        "a glass skyscraper reflecting orange clouds at sunset",
        &[
            ("Is there a skyscraper?", "object", "skyscraper"),
            ("Is the skyscraper made of glass?", "material", "glass"),
            ("Are there clouds?", "object", "clouds"),
            ("Are the clouds orange?", "color", "orange"),
            ("Is it sunset?", "other", "sunset"),
        ],
    ),
    (
        "cities and architecture",
        "a white lighthouse on a rocky cliff above the sea",
        &[
            ("Is there a lighthouse?", "object", "lighthouse"),
            ("Is the lighthouse white?", "color", "white"),
            ("Is there a cliff?", "object", "cliff"),
            ("Is the cliff rocky?", "attribute", "rocky"),
            ("Is the lighthouse above the sea?", "spatial", "above"),
            ("Is there a sea?", "object", "sea"),
        ],
    ),
    (
        "people",
        "a child flying a yellow kite on a windy beach",
        &[
            ("Is there a child?", "human", "child"),
            ("Is there a kite?", "object", "kite"),
            ("Is the kite yellow?", "color", "yellow"),
            ("Is the child flying the kite?", "activity", "flying"),
            ("Is this on a beach?", "location", "beach"),
        ],
    ),
    (
        "people",
        "two chefs in white hats cooking in a busy kitchen",
        &[
            ("Are there chefs?", "human", "chefs"),
            ("Are there two chefs?", "counting", "two"),
            ("Are the chefs wearing hats?", "object", "hats"),
            ("Are the hats white?", "color", "white"),
            ("Are the chefs cooking?", "activity", "cooking"),
            ("Is this in a kitchen?", "location", "kitchen"),
        ],
    ),
    (
        "animals",
        "an owl perched on a mossy branch at night",
        &[
            ("Is there an owl?", "animal", "owl"),
            ("Is there a branch?", "object", "branch"),
            ("Is the branch mossy?", "attribute", "mossy"),
            ("Is the owl perched on the branch?", "spatial", "perched on"),
            ("Is it night?", "other", "night"),
        ],
    ),
    (
        "animals",
        "three ducklings swimming behind their mother on a pond",
        &[
            ("Are there ducklings?", "animal", "ducklings"),
            ("Are there three ducklings?", "counting", "three"),
            ("Is there a mother duck?", "animal", "mother"),
            ("Are the ducklings swimming?", "activity", "swimming"),
            ("Is there a pond?", "object", "pond"),
            (
                "Are the ducklings behind their mother?",
                "spatial",
                "behind",
            ),
        ],
    ),
    (
        "plants",
        "a field of sunflowers under a stormy sky",
        &[
            ("Is there a field?", "object", "field"),
            ("Are there sunflowers?", "object", "sunflowers"),
            ("Is there a sky?", "object", "sky"),
            ("Is the sky stormy?", "attribute", "stormy"),
            ("Are the sunflowers under the sky?", "spatial", "under"),
        ],
    ),
    (
        "plants",
        "a bonsai tree in a blue ceramic pot on a wooden table",
        &[
            ("Is there a bonsai tree?", "object", "bonsai tree"),
            ("Is there a pot?", "object", "pot"),
            ("Is the pot blue?", "color", "blue"),
            ("Is the pot ceramic?", "material", "ceramic"),
            ("Is there a table?", "object", "table"),
            ("Is the table wooden?", "material", "wooden"),
        ],
    ),
    (
        "food and beverages",
        "a stack of pancakes with blueberries and maple syrup",
        &[
            ("Are there pancakes?", "food", "pancakes"),
            ("Are the pancakes stacked?", "spatial", "stack"),
            ("Are there blueberries?", "food", "blueberries"),
            ("Is there syrup?", "food", "maple syrup"),
            ("Is the syrup on the pancakes?", "spatial", "with"),
        ],
    ),
    (
        "food and beverages",
        "a cup of coffee with latte art next to a croissant",
        &[
            ("Is there a cup?", "object", "cup"),
            ("Is there coffee?", "food", "coffee"),
            ("Is there latte art?", "attribute", "latte art"),
            ("Is there a croissant?", "food", "croissant"),
            ("Is the cup next to the croissant?", "spatial", "next to"),
        ],
    ),
    (
        "sports and fitness",
        "a surfer riding a large wave at sunrise",
        &[
            ("Is there a surfer?", "human", "surfer"),
            ("Is there a surfboard?", "object", "surfboard"),
            ("Is there a wave?", "object", "wave"),
            ("Is the wave large?", "attribute", "large"),
            ("Is the surfer riding the wave?", "activity", "riding"),
            ("Is it sunrise?", "other", "sunrise"),
        ],
    ),
    (
        "sports and fitness",
        "a basketball player dunking in an empty gym",
        &[
            ("Is there a basketball player?", "human", "player"),
            ("Is there a basketball?", "object", "basketball"),
            ("Is the player dunking?", "activity", "dunking"),
            ("Is this in a gym?", "location", "gym"),
            ("Is the gym empty?", "attribute", "empty"),
        ],
    ),
    (
        "art and culture",
        "a marble statue of a horse in a museum hall",
        &[
            ("Is there a statue?", "object", "statue"),
            ("Is the statue made of marble?", "material", "marble"),
            ("Is the statue of a horse?", "animal", "horse"),
            ("Is this in a museum?", "location", "museum"),
            ("Is there a hall?", "object", "hall"),
        ],
    ),
    (
        "art and culture",
        "paper lanterns glowing over a crowded night market",
        &[
            ("Are there lanterns?", "object", "lanterns"),
            ("Are the lanterns made of paper?", "material", "paper"),
            ("Are the lanterns glowing?", "attribute", "glowing"),
            ("Is there a market?", "location", "market"),
            ("Is the market crowded?", "attribute", "crowded"),
            ("Is it night?", "other", "night"),
        ],
    ),
    (
        "technology and industry",
        "a wind turbine farm on green hills",
        &[
            ("Are there wind turbines?", "object", "wind turbines"),
            ("Are there several turbines?", "counting", "farm"),
            ("Are there hills?", "object", "hills"),
            ("Are the hills green?", "color", "green"),
            ("Are the turbines on the hills?", "spatial", "on"),
        ],
    ),
    (
        "technology and industry",
        "a vintage computer with a glowing green screen on a desk",
        &[
            ("Is there a computer?", "object", "computer"),
            ("Is the computer vintage?", "attribute", "vintage"),
            ("Is there a screen?", "object", "screen"),
            ("Is the screen green?", "color", "green"),
            ("Is the screen glowing?", "attribute", "glowing"),
            ("Is the computer on a desk?", "spatial", "on"),
        ],
    ),
    (
        "everyday objects",
        "a pair of worn leather boots by a front door",
        &[
            ("Are there boots?", "object", "boots"),
            ("Is there a pair of boots?", "counting", "pair"),
            ("Are the boots made of leather?", "material", "leather"),
            ("Are the boots worn?", "attribute", "worn"),
            ("Is there a door?", "object", "door"),
            ("Are the boots by the door?", "spatial", "by"),
        ],
    ),
    (
        "everyday objects",
        "an open book and round glasses on a quilted blanket",
        &[
            ("Is there a book?", "object", "book"),
            ("Is the book open?", "attribute", "open"),
            ("Are there glasses?", "object", "glasses"),
            ("Are the glasses round?", "shape", "round"),
            ("Is there a blanket?", "object", "blanket"),
            ("Is the blanket quilted?", "attribute", "quilted"),
        ],
    ),
    (
        "transportation",
        "a red double-decker bus on a rainy street",
        &[
            ("Is there a bus?", "object", "bus"),
            ("Is the bus red?", "color", "red"),
            ("Is it a double-decker bus?", "attribute", "double-decker"),
            ("Is there a street?", "object", "street"),
            ("Is it rainy?", "attribute", "rainy"),
        ],
    ),
    (
        "transportation",
        "a sailboat with white sails on a calm lake",
        &[
            ("Is there a sailboat?", "object", "sailboat"),
            ("Are there sails?", "object", "sails"),
            ("Are the sails white?", "color", "white"),
            ("Is there a lake?", "object", "lake"),
            ("Is the lake calm?", "attribute", "calm"),
            ("Is the sailboat on the lake?", "spatial", "on"),
        ],
    ),
    (
        "abstract and conceptual",
        "a staircase spiraling into the clouds",
        &[
            ("Is there a staircase?", "object", "staircase"),
            ("Is the staircase spiraling?", "shape", "spiraling"),
            ("Are there clouds?", "object", "clouds"),
            ("Does the staircase go into the clouds?", "spatial", "into"),
            ("Is the staircase tall?", "attribute", "into the clouds"),
        ],
    ),
    (
        "abstract and conceptual",
        "a clock melting over the edge of a table",
        &[
            ("Is there a clock?", "object", "clock"),
            ("Is the clock melting?", "attribute", "melting"),
            ("Is there a table?", "object", "table"),
            (
                "Is the clock over the edge of the table?",
                "spatial",
                "over the edge",
            ),
            ("Is the clock drooping?", "shape", "melting"),
        ],
    ),
];

/// The built-in prompt set, in order.
pub fn builtin_prompts() -> Vec<PromptRecord> {
    BUILTIN
        .iter()
        .enumerate()
        .map(|(i, (cat, text, _))| PromptRecord {
            pid: prompt_id(cat, text),
            ord: i as i64,
            category: (*cat).to_string(),
            text: (*text).to_string(),
            source: "builtin".into(),
        })
        .collect()
}

/// The built-in questions of a built-in prompt (`None` for other prompts).
pub fn builtin_questions(prompt: &PromptRecord) -> Option<Vec<QuestionRecord>> {
    let (_, _, qs) = BUILTIN
        .iter()
        .find(|(c, t, _)| *c == prompt.category && *t == prompt.text)?;
    Some(
        qs.iter()
            .enumerate()
            .map(|(i, (q, et, el))| yes_no(&prompt.pid, i, q, et, el))
            .collect(),
    )
}

fn yes_no(pid: &str, idx: usize, q: &str, et: &str, el: &str) -> QuestionRecord {
    QuestionRecord {
        pid: pid.to_string(),
        idx: idx as i64,
        question: q.to_string(),
        choices: vec!["yes".into(), "no".into()],
        answer: Some("yes".into()),
        element_type: Some(et.to_string()),
        element: Some(el.to_string()),
    }
}

fn input_err(path: &Path, reason: String) -> PipelineError {
    PipelineError::Input {
        path: path.to_path_buf(),
        reason,
    }
}

/// The default of `[limits] max_prompt_chars`.
pub const DEFAULT_MAX_PROMPT_CHARS: usize = 4000;

/// The default of `[limits] max_input_file_bytes` (256 MiB).
pub const DEFAULT_MAX_INPUT_FILE_BYTES: u64 = 256 << 20;

/// Bounds on prompt and question files (`[limits]` of agfsync.toml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputLimits {
    /// The longest prompt, caption or question accepted, in characters.
    pub max_prompt_chars: usize,
    /// The largest file read, in bytes.
    pub max_file_bytes: u64,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_prompt_chars: DEFAULT_MAX_PROMPT_CHARS,
            max_file_bytes: DEFAULT_MAX_INPUT_FILE_BYTES,
        }
    }
}

impl InputLimits {
    /// Refuses `text` (what `what` names) when it is longer than the limit.
    pub(crate) fn check_chars(&self, path: &Path, what: &str, text: &str) -> Result<()> {
        // Counting stops at the limit: a huge line costs no more than that.
        if text.chars().nth(self.max_prompt_chars).is_some() {
            return Err(input_err(
                path,
                format!(
                    "{what} is longer than {} characters (starts {:?}); raise                      `[limits] max_prompt_chars` in agfsync.toml if it is meant",
                    self.max_prompt_chars,
                    text.chars().take(60).collect::<String>()
                ),
            ));
        }
        Ok(())
    }
}

/// Reads `path` as UTF-8 text, refusing a file larger than `max_bytes`
/// before reading it (the error names the limit and how to raise it).
pub fn read_text_limited(path: &Path, max_bytes: u64) -> Result<String> {
    let len = std::fs::metadata(path)
        .map_err(|e| PipelineError::io(path, e))?
        .len();
    if len > max_bytes {
        return Err(input_err(
            path,
            format!(
                "the file is {len} bytes, more than the {max_bytes} allowed; raise                  `[limits] max_input_file_bytes` in agfsync.toml if it is meant"
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))
}

/// Reads a prompt list: `.txt` (one prompt a line; `#` comments and blank
/// lines skipped), `.jsonl` (`{"prompt": "...", "category": "..."}`, `text`
/// or `caption` accepted for `prompt`) or `.csv` (header with a `prompt` or
/// `caption` column and an optional `category` column; double-quoted fields).
/// Duplicates (same category and text) are kept once; `ord` is the line order.
/// The default [`InputLimits`] apply.
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptRecord>> {
    read_prompt_file_with(path, &InputLimits::default())
}

/// [`read_prompt_file`] with other limits.
pub fn read_prompt_file_with(path: &Path, limits: &InputLimits) -> Result<Vec<PromptRecord>> {
    let text = read_text_limited(path, limits.max_file_bytes)?;
    parse_prompt_text(&text, path, limits)
}

/// Parses the text of a prompt file; `path` gives the format (its
/// extension), the records' `source` (its file name) and names it in errors.
pub fn parse_prompt_text(
    text: &str,
    path: &Path,
    limits: &InputLimits,
) -> Result<Vec<PromptRecord>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let source = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut raw: Vec<(String, String)> = Vec::new();
    match ext.as_str() {
        "txt" | "" => {
            for line in text.lines() {
                let t = line.trim();
                if !t.is_empty() && !t.starts_with('#') {
                    raw.push((String::new(), t.to_string()));
                }
            }
        }
        "jsonl" => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| input_err(path, format!("line {}: not JSON: {e}", i + 1)))?;
                let prompt = ["prompt", "text", "caption"]
                    .iter()
                    .find_map(|k| v.get(k).and_then(|x| x.as_str()))
                    .ok_or_else(|| {
                        input_err(
                            path,
                            format!("line {}: no `prompt` (or `text`, `caption`) string", i + 1),
                        )
                    })?;
                let cat = v
                    .get("category")
                    .and_then(|x| x.as_str())
                    .unwrap_or_default();
                raw.push((cat.to_string(), prompt.trim().to_string()));
            }
        }
        "csv" => {
            let mut lines = text.lines().enumerate();
            let header = lines
                .next()
                .map(|(_, h)| split_csv(h))
                .ok_or_else(|| input_err(path, "empty CSV file".into()))?;
            let col = |names: &[&str]| {
                header
                    .iter()
                    .position(|h| names.contains(&h.trim().to_ascii_lowercase().as_str()))
            };
            let p = col(&["prompt", "caption", "text"]).ok_or_else(|| {
                input_err(
                    path,
                    format!("line 1: no `prompt` column in the header {header:?}"),
                )
            })?;
            let c = col(&["category"]);
            for (i, line) in lines {
                if line.trim().is_empty() {
                    continue;
                }
                let f = split_csv(line);
                let prompt = f.get(p).ok_or_else(|| {
                    input_err(
                        path,
                        format!("line {}: fewer columns than the header", i + 1),
                    )
                })?;
                let cat = c.and_then(|c| f.get(c)).cloned().unwrap_or_default();
                raw.push((cat, prompt.trim().to_string()));
            }
        }
        other => {
            return Err(input_err(
                path,
                format!("unknown prompt file type `.{other}`: use .txt, .jsonl or .csv"),
            ))
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, (cat, text)) in raw.into_iter().enumerate() {
        if text.is_empty() {
            continue;
        }
        limits.check_chars(path, &format!("prompt {}", i + 1), &text)?;
        limits.check_chars(path, &format!("the category of prompt {}", i + 1), &cat)?;
        let pid = prompt_id(&cat, &text);
        if seen.insert(pid.clone()) {
            out.push(PromptRecord {
                pid,
                ord: out.len() as i64,
                category: cat,
                text,
                source: source.clone(),
            });
        }
    }
    if out.is_empty() {
        return Err(input_err(path, "no prompts in the file".into()));
    }
    Ok(out)
}

/// Splits one CSV line (RFC 4180 quoting; no newlines inside fields).
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// One entry of a TIFA question file.
#[derive(Debug, Deserialize)]
struct TifaEntry {
    caption: String,
    question: String,
    #[serde(default)]
    choices: Vec<String>,
    #[serde(default)]
    answer: Option<String>,
    #[serde(default)]
    element_type: Option<String>,
    #[serde(default)]
    element: Option<String>,
}

/// Reads TIFA's question JSON (a list of entries with `caption`,
/// `question`, `choices`, `answer`, `element_type`, `element`; extra TIFA
/// fields such as `id` are ignored) grouped by caption text. An entry that
/// does not fit is reported with its position.
/// The default [`InputLimits`] apply.
pub fn read_tifa_questions(path: &Path) -> Result<BTreeMap<String, Vec<QuestionRecord>>> {
    read_tifa_questions_with(path, &InputLimits::default())
}

/// [`read_tifa_questions`] with other limits.
pub fn read_tifa_questions_with(
    path: &Path,
    limits: &InputLimits,
) -> Result<BTreeMap<String, Vec<QuestionRecord>>> {
    let text = read_text_limited(path, limits.max_file_bytes)?;
    parse_tifa_questions(&text, path, limits)
}

/// Parses the text of a TIFA question file (`path` names it in errors).
pub fn parse_tifa_questions(
    text: &str,
    path: &Path,
    limits: &InputLimits,
) -> Result<BTreeMap<String, Vec<QuestionRecord>>> {
    let v: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
        input_err(
            path,
            format!("not a TIFA question file (a JSON list of questions): {e}"),
        )
    })?;
    let mut out: BTreeMap<String, Vec<QuestionRecord>> = BTreeMap::new();
    for (i, entry) in v.into_iter().enumerate() {
        let e: TifaEntry = serde_json::from_value(entry)
            .map_err(|err| input_err(path, format!("entry {i}: {err}")))?;
        limits.check_chars(path, &format!("entry {i}: the caption"), &e.caption)?;
        limits.check_chars(path, &format!("entry {i}: the question"), &e.question)?;
        let list = out.entry(e.caption).or_default();
        list.push(QuestionRecord {
            pid: String::new(),
            idx: list.len() as i64,
            question: e.question,
            choices: if e.choices.is_empty() {
                vec!["yes".into(), "no".into()]
            } else {
                e.choices
            },
            answer: e.answer,
            element_type: e.element_type,
            element: e.element,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn builtin_set_covers_every_category_with_enough_questions() {
        let p = builtin_prompts();
        assert_eq!(p.len(), 3 * CATEGORIES.len());
        for (rec, cat) in p.iter().zip(CATEGORIES) {
            assert_eq!(
                rec.category, cat,
                "the first twelve follow the category order"
            );
        }
        for cat in CATEGORIES {
            assert_eq!(p.iter().filter(|r| r.category == cat).count(), 3, "{cat}");
        }
        let mut texts: Vec<&str> = p.iter().map(|r| r.text.as_str()).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), p.len(), "no duplicate prompts");
        for rec in &p {
            let qs = builtin_questions(rec).unwrap();
            assert!(qs.len() >= 5, "{}: {} questions", rec.text, qs.len());
        }
    }

    #[test]
    fn csv_quotes_and_missing_column() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.csv");
        std::fs::write(&f, "category,prompt\nanimals,\"a cat, \"\"grumpy\"\"\"\n").unwrap();
        let p = read_prompt_file(&f).unwrap();
        assert_eq!(p[0].text, "a cat, \"grumpy\"");
        assert_eq!(p[0].category, "animals");
        std::fs::write(&f, "category,text2\nanimals,x\n").unwrap();
        let err = read_prompt_file(&f).unwrap_err().to_string();
        assert!(err.contains("no `prompt` column"), "{err}");
    }

    #[test]
    fn jsonl_error_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.jsonl");
        std::fs::write(&f, "{\"prompt\": \"a\"}\n{\"prompt\": 3}\n").unwrap();
        let err = read_prompt_file(&f).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn tifa_file_groups_by_caption() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tifa.json");
        std::fs::write(
            &f,
            r#"[{"id":"1","caption":"a cat","question":"is there a cat?","choices":["yes","no"],"answer":"yes","element_type":"animal","element":"cat"},
                {"id":"1","caption":"a cat","question":"what animal is this?","choices":["cat","dog"],"answer":"cat","element_type":"animal","element":"cat"}]"#,
        )
        .unwrap();
        let q = read_tifa_questions(&f).unwrap();
        assert_eq!(q["a cat"].len(), 2);
        assert_eq!(q["a cat"][1].idx, 1);
        std::fs::write(&f, r#"[{"caption":"x"}]"#).unwrap();
        let err = read_tifa_questions(&f).unwrap_err().to_string();
        assert!(err.contains("entry 0") && err.contains("question"), "{err}");
    }
}
