//! The in-process backend: a Llama-family chat model (`LlamaForCausalLM`,
//! `Qwen2ForCausalLM`: Qwen2.5-Instruct, Llama 3 Instruct, ...) run with
//! candle, sampling as the HTTP backends do (temperature, top-p, seed,
//! token budget) and, when a request carries a JSON schema, decoding under
//! [`JsonConstraint`] so that the answer parses and follows the schema
//! whatever the weights (even random ones).
//!
//! A model is a transformers folder or hub id (resolved through
//! `agfsync_models::hub`): `config.json`, safetensors weights (sharded or
//! not), `tokenizer.json`, and a chat template from
//! `tokenizer_config.json`'s `chat_template`, `chat_template.jinja` or
//! `chat_template.json`. The template is rendered with minijinja the way
//! transformers' `apply_chat_template` renders it with jinja2:
//! `trim_blocks` and `lstrip_blocks` on, `raise_exception`, a Python-style
//! `tojson`, Python string methods, the tokenizer's special tokens as
//! globals.
//!
//! Requests run concurrently from [`crate::chat_many`]'s threads: the model
//! is read-only and each request has its own cache, so no lock is held
//! while decoding.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use agfsync_models::hub::{find_weights, resolve_model, HubOptions, ModelSource};
use agfsync_models::llama::{CausalLm, KvCache, LlamaConfig, LmInput, LogitsAt};
use agfsync_models::weights::{open_safetensors, save_safetensors, RandomWeights};
use candle_core::{DType, Device, Tensor};
use minijinja::value::{Kwargs, Value as JValue};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::constrained::{ConstraintState, JsonConstraint, Vocabulary};
use crate::error::{AuthorError, Result};
use crate::llm::{ChatRequest, ChatResponse, Llm, Message};

/// How to load a [`LocalLlm`].
#[derive(Clone, Debug)]
pub struct LocalLlmOptions {
    /// Compute dtype (F32 on CPUs; BF16 or F16 on GPUs).
    pub dtype: DType,
    /// Where the model runs.
    pub device: Device,
    /// How many requests [`crate::chat_many`] decodes together, as one
    /// left-padded batch with one key/value cache (default 1).
    pub max_concurrency: usize,
}

impl Default for LocalLlmOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            max_concurrency: 1,
        }
    }
}

/// A chat template (`tokenizer_config.json`'s `chat_template`) compiled
/// with minijinja, with the globals transformers provides.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// Name of the one template in a [`ChatTemplate`]'s environment.
const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `special_tokens` become globals (`bos_token`,
    /// `eos_token`, ...), as `apply_chat_template` passes them.
    pub fn new(source: &str, special_tokens: &[(&str, String)]) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // jinja2 as transformers configures it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        // Templates call str methods (`.startswith`, `.strip`, `.split`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_filter("tojson", tojson);
        for (name, value) in special_tokens {
            env.add_global(name.to_string(), value.clone());
        }
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| template_error(&e))?;
        Ok(Self { env })
    }

    /// Renders `messages` as `apply_chat_template(messages,
    /// add_generation_prompt=..., tokenize=False, enable_thinking=False)`
    /// does. `enable_thinking` is for Qwen3's templates, which otherwise
    /// open a reasoning block before the answer; authoring wants the JSON
    /// answer alone, and other templates ignore the variable.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error(&e))?;
        template
            .render(minijinja::context! {
                messages => JValue::from_serialize(messages),
                add_generation_prompt => add_generation_prompt,
                enable_thinking => false,
            })
            .map_err(|e| template_error(&e))
    }
}

/// A minijinja error with its chain of causes, as a template error.
fn template_error(e: &minijinja::Error) -> AuthorError {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    AuthorError::Template {
        name: "chat_template".into(),
        reason,
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=...,
/// separators=..., sort_keys=...)`, whose default separators are `", "` and
/// `": "` (minijinja's own `tojson` writes compact JSON and escapes HTML
/// characters, which would change what the model reads).
fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let bad = |e: serde_json::Error| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    };
    let mut out = Vec::new();
    if sort_keys == Some(true) {
        // serde_json's map is sorted (no `preserve_order`).
        let v = serde_json::to_value(&value).map_err(bad)?;
        write_py_json(&v, indent, &mut out).map_err(bad)?;
    } else {
        write_py_json(&value, indent, &mut out).map_err(bad)?;
    }
    Ok(JValue::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

/// Serialises `v` with Python's `json.dumps` layout.
fn write_py_json<T: serde::Serialize + ?Sized>(
    v: &T,
    indent: Option<usize>,
    out: &mut Vec<u8>,
) -> std::result::Result<(), serde_json::Error> {
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let f = serde_json::ser::PrettyFormatter::with_indent(&pad);
            v.serialize(&mut serde_json::Serializer::with_formatter(out, f))
        }
        None => v.serialize(&mut serde_json::Serializer::with_formatter(
            out,
            PyFormatter,
        )),
    }
}

/// Python's default `json.dumps` separators: `", "` and `": "`.
struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// End-of-turn tokens of well-known chat templates: when the template
/// writes one and the tokenizer has it, generation stops there too.
const TEMPLATE_END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
];

/// A Llama-family chat model run in process; see the module documentation.
pub struct LocalLlm {
    model: CausalLm,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    eos: Vec<u32>,
    identity: String,
    max_concurrency: usize,
    /// Built on the first schema request (decoding every token once).
    vocab: OnceLock<Arc<Vocabulary>>,
    /// Compiled constraints (with their vocabulary tries) by schema text.
    constraints: Mutex<HashMap<String, Arc<JsonConstraint>>>,
}

impl std::fmt::Debug for LocalLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLlm")
            .field("identity", &self.identity)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// Reads a JSON file, naming it on failure.
fn read_json(path: &Path, location: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| AuthorError::Load {
        location: location.to_string(),
        reason: format!("{} is not valid JSON: {e}", path.display()),
    })
}

/// A token given in `tokenizer_config.json` as a string or as an
/// `AddedToken` object (`{"content": ...}`).
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Token ids given as one number or a list.
fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The chat template of `src`: `chat_template.jinja`, else
/// `chat_template.json`, else `tokenizer_config.json`'s `chat_template`
/// (a string, or a list of named templates of which `default` is used).
fn find_template(
    src: &ModelSource,
    tokenizer_config: Option<&Value>,
    location: &str,
) -> Result<String> {
    let load = |e: agfsync_models::hub::HubError| AuthorError::Load {
        location: location.to_string(),
        reason: e.to_string(),
    };
    if let Some(path) = src.optional_file("chat_template.jinja").map_err(load)? {
        return std::fs::read_to_string(&path).map_err(|source| AuthorError::Io { path, source });
    }
    let from_value = |v: &Value| -> Option<String> {
        match v.get("chat_template")? {
            Value::String(s) => Some(s.clone()),
            Value::Array(named) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| named.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        }
    };
    if let Some(path) = src.optional_file("chat_template.json").map_err(load)? {
        if let Some(t) = from_value(&read_json(&path, location)?) {
            return Ok(t);
        }
    }
    if let Some(t) = tokenizer_config.and_then(from_value) {
        return Ok(t);
    }
    Err(AuthorError::Load {
        location: location.to_string(),
        reason: "no chat template: neither tokenizer_config.json has a `chat_template` nor is \
                 there a chat_template.jinja or chat_template.json; use an instruction-tuned \
                 (\"-Instruct\" / \"-Chat\") model, or save its tokenizer with transformers \
                 (AutoTokenizer.from_pretrained(...).save_pretrained(DIR)), which writes the \
                 template"
            .into(),
    })
}

impl LocalLlm {
    /// Resolves `spec` (a folder or hub id, `org/name@revision`) with
    /// `hub` and loads it.
    pub fn open(spec: &str, hub: &HubOptions, options: &LocalLlmOptions) -> Result<Self> {
        let src = resolve_model(spec, hub).map_err(|e| AuthorError::Load {
            location: spec.to_string(),
            reason: e.to_string(),
        })?;
        Self::load(&src, options)
    }

    /// Loads a transformers chat model folder or resolved hub repo.
    pub fn load(src: &ModelSource, options: &LocalLlmOptions) -> Result<Self> {
        let location = src.describe("");
        let load_err = |reason: String| AuthorError::Load {
            location: location.clone(),
            reason,
        };
        let hub = |e: agfsync_models::hub::HubError| load_err(e.to_string());
        let config_path = src.file("config.json").map_err(hub)?;
        let raw_config = read_json(&config_path, &location)?;
        if let Some(archs) = raw_config.get("architectures").and_then(Value::as_array) {
            let names: Vec<&str> = archs.iter().filter_map(Value::as_str).collect();
            if !names.iter().any(|a| {
                matches!(
                    *a,
                    "LlamaForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM"
                )
            }) {
                return Err(load_err(format!(
                    "config.json declares {names:?}; the in-process backend runs \
                     LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM models (Qwen2.5, \
                     Qwen3, Llama 3, ...); serve other models with vLLM or llama.cpp and use \
                     the HTTP backend"
                )));
            }
        }
        let config = LlamaConfig::from_value(&raw_config)
            .map_err(|e| load_err(format!("config.json: {e}")))?;
        let tokenizer_path = src
            .optional_file("tokenizer.json")
            .map_err(hub)?
            .ok_or_else(|| {
                load_err(
                    "no tokenizer.json: save the fast tokenizer next to the weights with \
                     transformers (AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
                        .into(),
                )
            })?;
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            load_err(format!(
                "{} cannot be read as a tokenizer: {e}",
                tokenizer_path.display()
            ))
        })?;
        let tokenizer_config = match src.optional_file("tokenizer_config.json").map_err(hub)? {
            Some(p) => Some(read_json(&p, &location)?),
            None => None,
        };
        let source = find_template(src, tokenizer_config.as_ref(), &location)?;
        let mut specials = Vec::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(t) = token_text(tokenizer_config.as_ref().and_then(|c| c.get(key))) {
                specials.push((key, t));
            }
        }
        let template = ChatTemplate::new(&source, &specials).map_err(|e| {
            load_err(format!(
                "the chat template does not compile ({e}); fix or replace it in \
                 tokenizer_config.json / chat_template.jinja"
            ))
        })?;
        // Where generation stops: generation_config.json, config.json, the
        // tokenizer's eos_token, and the template's end-of-turn token.
        let mut eos: Vec<u32> = Vec::new();
        if let Some(p) = src.optional_file("generation_config.json").map_err(hub)? {
            eos.extend(id_list(read_json(&p, &location)?.get("eos_token_id")));
        }
        eos.extend(config.eos_token_ids.iter().copied());
        if let Some((_, t)) = specials.iter().find(|(k, _)| *k == "eos_token") {
            eos.extend(tokenizer.token_to_id(t));
        }
        for t in TEMPLATE_END_TOKENS {
            if source.contains(t) {
                eos.extend(tokenizer.token_to_id(t));
            }
        }
        let mut seen = std::collections::HashSet::new();
        eos.retain(|id| seen.insert(*id));
        if eos.is_empty() {
            return Err(load_err(
                "no end-of-sequence token: set `eos_token_id` in generation_config.json or \
                 config.json, or `eos_token` in tokenizer_config.json"
                    .into(),
            ));
        }
        let files = find_weights(src, "", "model", None).map_err(hub)?;
        let vb = open_safetensors(&files, options.dtype, &options.device)
            .map_err(|e| load_err(e.to_string()))?;
        let model = CausalLm::new_causal_lm(&config, vb).map_err(|e| {
            load_err(format!(
                "the weights do not fit config.json ({e}); check that the folder is one \
                 complete checkpoint"
            ))
        })?;
        Ok(Self {
            model,
            tokenizer,
            template,
            eos,
            identity: format!("local:{src}"),
            max_concurrency: options.max_concurrency.max(1),
            vocab: OnceLock::new(),
            constraints: Mutex::new(HashMap::new()),
        })
    }

    /// The compiled chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The tokens that end generation (the first is the one constrained
    /// decoding emits).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The vocabulary constrained decoding works on: each token's text
    /// (see [`vocabulary_of`]).
    pub fn vocabulary(&self) -> Arc<Vocabulary> {
        self.vocab
            .get_or_init(|| Arc::new(vocabulary_of(&self.tokenizer, self.eos.first().copied())))
            .clone()
    }

    /// The compiled constraint of `schema`, from the cache when it was
    /// seen before.
    fn constraint(&self, schema: &Value) -> Result<Arc<JsonConstraint>> {
        let key = schema.to_string();
        if let Some(c) = self
            .constraints
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            return Ok(c);
        }
        let c = Arc::new(JsonConstraint::new(schema, self.vocabulary())?);
        if let Ok(mut m) = self.constraints.lock() {
            m.insert(key, c.clone());
        }
        Ok(c)
    }

    fn llm_error(&self, message: impl std::fmt::Display) -> AuthorError {
        AuthorError::Llm {
            model: self.identity.clone(),
            message: message.to_string(),
        }
    }

    /// Everything about one request before decoding: its prompt ids, its
    /// JSON constraint and state, and its seeded generator.
    fn prepare<'r>(&self, request: &'r ChatRequest) -> Result<Row<'r>> {
        if request.temperature.is_nan() || request.temperature < 0.0 {
            return Err(AuthorError::Config("temperature must be >= 0".into()));
        }
        let prompt = self.template.render(&request.messages, true)?;
        // apply_chat_template(tokenize=True) adds no special tokens: the
        // template writes them.
        let ids = self
            .tokenizer
            .encode(prompt.as_str(), false)
            .map_err(|e| self.llm_error(format!("tokenising the prompt: {e}")))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(self.llm_error("the chat template rendered an empty prompt"));
        }
        let constraint = match &request.json_schema {
            Some(s) => Some(self.constraint(&s.schema)?),
            None => None,
        };
        let state = constraint.as_ref().map(|c| c.start());
        let max_tokens = request.max_tokens as usize;
        if let (Some(c), Some(s)) = (&constraint, &state) {
            let need = c.shortest_completion(s).chars().count();
            if need > max_tokens {
                return Err(AuthorError::Config(format!(
                    "max_tokens {max_tokens} is too small for the smallest document of the \
                     schema ({need} characters)"
                )));
            }
        }
        Ok(Row {
            request,
            ids,
            constraint,
            state,
            rng: ChaCha8Rng::seed_from_u64(request.seed.unwrap_or_else(rand::random)),
            out: Vec::new(),
            finish: "length",
            done: max_tokens == 0,
            error: None,
        })
    }

    /// Chooses `row`'s next token from its `scores` at decoding step
    /// `step`, or finishes the row (end of sequence, a complete JSON
    /// document, or the token budget).
    fn next_token(&self, row: &mut Row<'_>, scores: &mut [f32], step: usize) -> Result<()> {
        let max_tokens = row.request.max_tokens as usize;
        let token = match (&row.constraint, &mut row.state) {
            (Some(c), Some(s)) => {
                if c.is_complete(s) {
                    row.finish = "stop";
                    row.done = true;
                    return Ok(());
                }
                let token = self.constrained_step(
                    c,
                    s,
                    scores,
                    max_tokens - step,
                    row.request,
                    &mut row.rng,
                )?;
                c.advance(s, token)?;
                token
            }
            _ => {
                let token = sample(
                    scores,
                    row.request.temperature,
                    row.request.top_p,
                    &mut row.rng,
                )
                .ok_or_else(|| self.llm_error("the model's logits are all NaN"))?;
                if self.eos.contains(&token) {
                    row.finish = "stop";
                    row.done = true;
                    return Ok(());
                }
                token
            }
        };
        row.out.push(token);
        if row
            .state
            .as_ref()
            .zip(row.constraint.as_ref())
            .is_some_and(|(s, c)| c.is_complete(s))
        {
            row.finish = "stop";
            row.done = true;
        } else if row.out.len() >= max_tokens {
            row.done = true;
        }
        Ok(())
    }

    /// Decodes `rows` together: their prompts left-padded into one batch
    /// with one key/value cache, then one token per unfinished row per
    /// forward pass (finished rows feed a padding token that nothing
    /// attends to). A row's own error finishes that row only.
    fn decode(&self, rows: &mut [Row<'_>]) -> std::result::Result<(), candle_core::Error> {
        let device = self.model.device();
        let b = rows.len();
        let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(b * width);
        let mut mask = Vec::with_capacity(b * width);
        for r in rows.iter() {
            let pad = width - r.ids.len();
            flat.extend(std::iter::repeat_n(0u32, pad));
            flat.extend_from_slice(&r.ids);
            mask.extend(std::iter::repeat_n(0f32, pad));
            mask.extend(std::iter::repeat_n(1f32, r.ids.len()));
        }
        let input = Tensor::from_vec(flat, (b, width), device)?;
        // Without padding the mask changes nothing; leaving it out keeps a
        // single request on exactly the unbatched path.
        let mask = (b > 1)
            .then(|| Tensor::from_vec(mask, (b, width), device))
            .transpose()?;
        let mut cache = KvCache::new();
        let mut logits = self.model.forward(
            LmInput::Ids(&input),
            mask.as_ref(),
            &mut cache,
            LogitsAt::Last,
        )?;
        let mut step = 0;
        while rows.iter().any(|r| !r.done) {
            let all: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            for (row, mut scores) in rows.iter_mut().zip(all) {
                if row.done {
                    continue;
                }
                if let Err(e) = self.next_token(row, &mut scores, step) {
                    row.error = Some(e);
                    row.done = true;
                }
            }
            step += 1;
            if rows.iter().all(|r| r.done) {
                break;
            }
            let next: Vec<u32> = rows
                .iter()
                .map(|r| {
                    if r.done {
                        0
                    } else {
                        r.out.last().copied().unwrap_or(0)
                    }
                })
                .collect();
            let live: Vec<f32> = rows.iter().map(|r| if r.done { 0. } else { 1. }).collect();
            let next = Tensor::from_vec(next, (b, 1), device)?;
            let live = (b > 1)
                .then(|| Tensor::from_vec(live, (b, 1), device))
                .transpose()?;
            logits = self.model.forward(
                LmInput::Ids(&next),
                live.as_ref(),
                &mut cache,
                LogitsAt::Last,
            )?;
        }
        Ok(())
    }

    /// The answer of a decoded row.
    fn answer(&self, row: Row<'_>) -> Result<ChatResponse> {
        if let Some(e) = row.error {
            return Err(e);
        }
        let text = match &row.state {
            Some(s) => s.text().to_string(),
            None => self
                .tokenizer
                .decode(&row.out, true)
                .map_err(|e| self.llm_error(format!("decoding the answer: {e}")))?,
        };
        Ok(ChatResponse {
            text,
            finish_reason: Some(row.finish.into()),
            model: Some(self.identity.clone()),
            prompt_tokens: Some(row.ids.len() as u64),
            completion_tokens: Some(row.out.len() as u64),
        })
    }

    /// Answers `requests` decoded together in one padded batch; results
    /// in request order, a failed request failing alone.
    fn generate_batch(&self, requests: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        let mut results: Vec<Option<Result<ChatResponse>>> =
            requests.iter().map(|_| None).collect();
        let mut rows = Vec::new();
        let mut at = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match self.prepare(r) {
                Ok(row) => {
                    rows.push(row);
                    at.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !rows.is_empty() {
            match self.decode(&mut rows) {
                Ok(()) => {
                    for (row, i) in rows.into_iter().zip(at) {
                        results[i] = Some(self.answer(row));
                    }
                }
                Err(e) => {
                    for i in at {
                        results[i] = Some(Err(self.llm_error(&e)));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(self.llm_error("request was not answered"))))
            .collect()
    }

    /// Chooses the next token under `c`: sampled among the allowed tokens
    /// as long as the shortest completion of the document still fits in
    /// the `budget` of tokens left after it; otherwise (or when the model
    /// only likes tokens that would break the budget) the longest token
    /// that starts the shortest completion. Every step thus keeps "the
    /// completion fits in the budget" true, and the answer always closes.
    fn constrained_step(
        &self,
        c: &JsonConstraint,
        s: &ConstraintState,
        scores: &mut [f32],
        budget: usize,
        request: &ChatRequest,
        rng: &mut ChaCha8Rng,
    ) -> Result<u32> {
        let allowed = c.allowed_tokens(s);
        for (i, score) in scores.iter_mut().enumerate() {
            if !allowed.get(i).copied().unwrap_or(false) {
                *score = f32::NEG_INFINITY;
            }
        }
        // A few draws; a refused token is masked before the next.
        for _ in 0..8 {
            let Some(token) = sample(scores, request.temperature, request.top_p, rng) else {
                break;
            };
            if !scores[token as usize].is_finite() {
                break;
            }
            let mut next = s.clone();
            let fits = c.advance(&mut next, token).is_ok()
                && c.shortest_completion(&next).chars().count() < budget;
            if fits {
                return Ok(token);
            }
            scores[token as usize] = f32::NEG_INFINITY;
        }
        let completion = c.shortest_completion(s);
        let vocab = c.vocab();
        (0..vocab.len() as u32)
            .filter(|&t| allowed[t as usize] && (t as usize) < scores.len())
            .filter_map(|t| vocab.piece(t).map(|p| (t, p)))
            .filter(|(_, p)| !p.is_empty() && completion.starts_with(p))
            .max_by_key(|(t, p)| (p.len(), std::cmp::Reverse(*t)))
            .map(|(t, _)| t)
            .ok_or_else(|| {
                self.llm_error(format!(
                    "no token of the vocabulary starts {completion:?}, which the JSON \
                     document needs to close"
                ))
            })
    }
}

/// One request being decoded in a batch.
struct Row<'r> {
    request: &'r ChatRequest,
    /// The rendered, tokenised prompt.
    ids: Vec<u32>,
    constraint: Option<Arc<JsonConstraint>>,
    state: Option<ConstraintState>,
    rng: ChaCha8Rng,
    /// Tokens generated so far.
    out: Vec<u32>,
    finish: &'static str,
    done: bool,
    error: Option<AuthorError>,
}

impl Llm for LocalLlm {
    fn chat(&self, request: &ChatRequest) -> Result<ChatResponse> {
        self.generate_batch(std::slice::from_ref(request))
            .pop()
            .unwrap_or_else(|| Err(self.llm_error("request was not answered")))
    }

    /// Up to `max_concurrency` requests at a time, decoded together in one
    /// padded batch (one forward pass per token for all of them).
    fn chat_batch(&self, requests: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        requests
            .chunks(self.max_concurrency.max(1))
            .flat_map(|chunk| self.generate_batch(chunk))
            .collect()
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }
}

/// Samples a token from `logits` (non-finite entries are never chosen):
/// arg-max when `temperature` is 0, else from the softmax at
/// `temperature` restricted to the smallest set of most likely tokens
/// whose mass reaches `top_p`. `None` when no entry is finite.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut impl Rng) -> Option<u32> {
    let finite = logits.iter().enumerate().filter(|(_, l)| l.is_finite());
    let (best, &max) = finite
        .clone()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
    if temperature <= 0.0 {
        return Some(best as u32);
    }
    let t = f64::from(temperature);
    let mut probs: Vec<(usize, f64)> = finite
        .map(|(i, &l)| (i, (f64::from(l - max) / t).exp()))
        .collect();
    // Most likely first; ties by id so the order never depends on the sort.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mass = f64::from(top_p.clamp(0.0, 1.0)) * total;
    let mut kept = 0;
    let mut acc = 0.0;
    for p in &probs {
        kept += 1;
        acc += p.1;
        if acc >= mass {
            break;
        }
    }
    probs.truncate(kept.max(1));
    let kept_total: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.gen::<f64>() * kept_total;
    for &(i, p) in &probs {
        if r < p {
            return Some(i as u32);
        }
        r -= p;
    }
    probs.last().map(|p| p.0 as u32)
}

/// GPT-2's byte-level alphabet: the character standing for each byte in a
/// byte-level BPE vocabulary (printable bytes stand for themselves, the
/// others are shifted above U+0100).
fn byte_level_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    table
}

/// The text of every token of `tokenizer`, for constrained decoding.
///
/// Special added tokens get empty pieces (never allowed). For byte-level
/// BPE tokenizers (GPT-2, Qwen, Llama 3) a token is mapped back to its
/// bytes; a token that is not whole UTF-8 on its own (a piece of a
/// multi-byte character) gets an empty piece, since the character
/// automaton cannot follow half a character: those characters are written
/// with the tokens that hold them whole. Other tokenizers are asked to
/// decode each token alone, and tokens that decode to U+FFFD are refused
/// the same way.
pub fn vocabulary_of(tokenizer: &Tokenizer, eos: Option<u32>) -> Vocabulary {
    let added = tokenizer.get_added_tokens_decoder();
    let n = added
        .keys()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(tokenizer.get_vocab_size(true));
    let byte_level = tokenizer
        .get_decoder()
        .and_then(|d| serde_json::to_string(d).ok())
        .is_some_and(|d| d.contains("\"ByteLevel\""));
    let inverse: HashMap<char, u8> = byte_level_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    let pieces = (0..n as u32)
        .map(|id| {
            if let Some(a) = added.get(&id) {
                return if a.special {
                    String::new()
                } else {
                    a.content.clone()
                };
            }
            if byte_level {
                let Some(token) = tokenizer.id_to_token(id) else {
                    return String::new();
                };
                token
                    .chars()
                    .map(|c| inverse.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .unwrap_or_default()
            } else {
                match tokenizer.decode(&[id], false) {
                    Ok(p) if !p.contains('\u{FFFD}') => p,
                    _ => String::new(),
                }
            }
        })
        .collect();
    Vocabulary::new(pieces, eos)
}

/// Words and JSON fragments [`write_tiny_qwen2`]'s tokenizer merges into
/// single tokens, on top of its 256 byte tokens.
const TINY_MERGED: &[&str] = &[
    "{\"",
    "\":",
    "\":[\"",
    "\",\"",
    "\"]}",
    "\"},{\"",
    "\"}]}",
    "\":\"",
    "prompts",
    "questions",
    "question",
    "element",
    "element_type",
    "answer",
    "yes",
    "object",
    "color",
    "counting",
    "attribute",
    " a",
    " the",
    " of",
    " on",
    " in",
    " with",
    " red",
    " blue",
    " green",
    " cat",
    " dog",
    " house",
    " tree",
    " car",
    " photo",
    " small",
    " big",
    " two",
    " is",
    " there",
    " Is",
    " Are",
    " Does",
    "system",
    "user",
    "assistant",
    "é",
];

/// The byte-level BPE `tokenizer.json` of [`write_tiny_qwen2`]: the 256
/// byte tokens, merges spelling [`TINY_MERGED`], and Qwen's three special
/// tokens after them.
pub fn tiny_qwen2_tokenizer_json() -> Value {
    let table = byte_level_chars();
    let mut vocab = serde_json::Map::new();
    for c in table {
        vocab.insert(c.to_string(), json!(vocab.len()));
    }
    let mut merges: Vec<Value> = Vec::new();
    for word in TINY_MERGED {
        let symbols: Vec<String> = word
            .bytes()
            .map(|b| table[b as usize].to_string())
            .collect();
        let mut acc = symbols[0].clone();
        for s in &symbols[1..] {
            let merged = format!("{acc}{s}");
            if !vocab.contains_key(&merged) {
                merges.push(json!([acc, s]));
                vocab.insert(merged.clone(), json!(vocab.len()));
            }
            acc = merged;
        }
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let base = vocab.len();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": false, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            special(base, "<|endoftext|>"),
            special(base + 1, "<|im_start|>"),
            special(base + 2, "<|im_end|>"),
        ],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

/// The Qwen-style chat template of [`write_tiny_qwen2`]: a default system
/// message unless the conversation starts with one, then
/// `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
pub const TINY_CHAT_TEMPLATE: &str = "{%- if messages[0]['role'] != 'system' %}\n\
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n\
{%- endif %}\n\
{%- for message in messages %}\n\
    {%- if message.role not in ['system', 'user', 'assistant'] %}\n\
        {{- raise_exception('unknown role ' + message.role) }}\n\
    {%- endif %}\n\
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n\
{%- endfor %}\n\
{%- if add_generation_prompt %}\n\
    {{- '<|im_start|>assistant\\n' }}\n\
{%- endif %}\n";

/// Writes a tiny random `Qwen2ForCausalLM` chat model folder
/// (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
/// with a Qwen-style chat template, generation_config.json): 2 layers,
/// width 32, grouped-query attention, a byte-level BPE tokenizer that
/// spells anything and has whole tokens for JSON punctuation and some
/// English words. The same `seed` writes the same files.
pub fn write_tiny_qwen2(dir: &Path, seed: u64) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuthorError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tok = tiny_qwen2_tokenizer_json();
    let base = tok["model"]["vocab"]
        .as_object()
        .map_or(0, serde_json::Map::len);
    let (endoftext, im_end) = (base, base + 2);
    let vocab_size = base + 3;
    let config = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "use_sliding_window": false,
        "bos_token_id": endoftext,
        "eos_token_id": im_end,
        "torch_dtype": "float32"
    });
    let tokenizer_config = json!({
        "add_bos_token": false,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "model_max_length": 4096,
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": TINY_CHAT_TEMPLATE,
    });
    let generation_config = json!({
        "bos_token_id": endoftext,
        "eos_token_id": [im_end, endoftext],
        "do_sample": true,
        "temperature": 0.7,
        "top_p": 0.8
    });
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(v)
            .map_err(|e| AuthorError::Config(format!("serialising {name}: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(io(&path))
    };
    write_json("config.json", &config)?;
    write_json("tokenizer.json", &tok)?;
    write_json("tokenizer_config.json", &tokenizer_config)?;
    write_json("generation_config.json", &generation_config)?;
    let cfg = LlamaConfig::from_value(&config)
        .map_err(|e| AuthorError::Config(format!("tiny Qwen2 config: {e}")))?;
    let weights = RandomWeights::new(seed);
    let build = |e: candle_core::Error| AuthorError::Llm {
        model: "tiny-qwen2".into(),
        message: e.to_string(),
    };
    CausalLm::new_causal_lm(&cfg, weights.var_builder(DType::F32, &Device::Cpu)).map_err(build)?;
    save_safetensors(&weights.tensors(), &dir.join("model.safetensors")).map_err(|e| {
        AuthorError::Llm {
            model: "tiny-qwen2".into(),
            message: e.to_string(),
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn qwen3_templates_render_without_thinking() -> Result<()> {
        // The tail of Qwen3's template: with enable_thinking false it closes
        // an empty reasoning block so the model answers at once.
        let t = ChatTemplate::new(
            "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + \
             '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}\
             {{- '<|im_start|>assistant\\n' }}\
             {%- if enable_thinking is defined and enable_thinking is false %}\
             {{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}",
            &[],
        )?;
        let out = t.render(&[crate::llm::Message::user("hi")], true)?;
        assert!(
            out.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            "{out:?}"
        );
        Ok(())
    }

    #[test]
    fn byte_level_alphabet_is_gpt2s() {
        let t = byte_level_chars();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn sampling_is_greedy_at_zero_and_respects_the_mask() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let l = [1.0, 3.0, f32::NEG_INFINITY, 2.0];
        assert_eq!(sample(&l, 0.0, 1.0, &mut rng), Some(1));
        for _ in 0..200 {
            assert_ne!(sample(&l, 5.0, 1.0, &mut rng), Some(2));
        }
        // A tiny top-p keeps only the most likely token.
        for _ in 0..50 {
            assert_eq!(sample(&l, 1.0, 0.01, &mut rng), Some(1));
        }
        assert_eq!(sample(&[f32::NAN], 1.0, 1.0, &mut rng), None);
    }

    #[test]
    fn python_style_tojson() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", &[]).unwrap();
        let mut env_out = String::new();
        env_out.push_str(
            &t.env
                .get_template(TEMPLATE_NAME)
                .unwrap()
                .render(minijinja::context! { x => json!({"b": [1, "é<"], "a": null}) })
                .unwrap(),
        );
        assert_eq!(
            env_out,
            "{\"a\": null, \"b\": [1, \"é<\"]}|{\n  \"a\": null,\n  \"b\": [\n    1,\n    \"é<\"\n  ]\n}"
        );
    }
}
