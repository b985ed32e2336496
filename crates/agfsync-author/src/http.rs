//! The OpenAI-compatible chat-completions backend (OpenAI, vLLM, llama.cpp
//! server, ollama, TGI): `POST {base_url}/chat/completions`.
//!
//! * The API key is read once, from an environment variable whose *name* is
//!   configured or from a file that (on unix) only its owner may read. It is
//!   held in a type whose `Debug` prints `<redacted>`, sent only in the
//!   `Authorization` header, and scrubbed from anything a server sends back
//!   before that text reaches an error or a log (ureq's own debug log
//!   masks the `Authorization` header). Configs hold only the variable's
//!   name or the file's path, so they can be stored with a run. Redirects
//!   are not followed: an API endpoint does not move, and following one
//!   would turn the POST into a GET.
//! * A key must be printable ASCII without blanks (what a header can
//!   carry); anything else is refused when it is read, without quoting it.
//! * Connect and read timeouts; 429, 5xx and connection failures (timeouts
//!   included) are retried with exponential backoff and jitter, and a
//!   `Retry-After` in seconds is honoured (up to a cap). Other statuses
//!   (400, 401, 404, ...) fail at once: retrying cannot fix them.
//! * With a JSON schema in the request and `structured_output` on, the
//!   request carries `response_format: {"type": "json_schema", ...}`;
//!   otherwise the schema is appended to the last user message as an
//!   instruction, which works with every server.

use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{excerpt, AuthorError, Result};
use crate::llm::{ChatRequest, ChatResponse, Llm, Role};

/// How much of a server's body an error quotes.
const BODY_EXCERPT: usize = 300;

/// Settings of the HTTP backend. Holds no secret: the key is named, not
/// stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// The API root, e.g. `https://api.openai.com/v1` or
    /// `http://localhost:8000/v1` (vLLM), `http://localhost:11434/v1`
    /// (ollama).
    pub base_url: String,
    /// The model name the server knows.
    pub model: String,
    /// The name of the environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// A file holding the API key (on unix it must not be readable by group
    /// or others).
    pub api_key_file: Option<PathBuf>,
    /// Seconds to wait for a connection.
    pub connect_timeout_s: f64,
    /// Seconds to wait for the answer (generation of thousands of tokens
    /// takes a while).
    pub read_timeout_s: f64,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff, in seconds; doubled per retry.
    pub backoff_initial_s: f64,
    /// Longest backoff, in seconds.
    pub backoff_max_s: f64,
    /// Longest `Retry-After` honoured, in seconds.
    pub max_retry_after_s: f64,
    /// Requests in flight at once in a batch.
    pub max_concurrency: usize,
    /// Send the schema as `response_format` (OpenAI, vLLM, llama.cpp and
    /// recent ollama support it) instead of asking for it in the prompt.
    pub structured_output: bool,
    /// Answers with a larger body than this many bytes are refused (a
    /// misbehaving server cannot exhaust memory); default 8 MiB.
    pub max_response_bytes: u64,
}

/// The default of [`HttpConfig::max_response_bytes`]: 8 MiB, far above any
/// chat answer of a few thousand tokens.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 8 << 20;

/// Reads at most `limit` bytes of `reader` as UTF-8 text: `Ok(None)` when
/// there is more than that (the caller refuses it).
fn read_limited(reader: impl std::io::Read, limit: u64) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut buf = Vec::new();
    reader.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Ok(None);
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The start of an error body (for the excerpt only, so bounded).
fn error_body(response: ureq::Response) -> String {
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(
        &mut std::io::Read::take(response.into_reader(), 64 * 1024),
        &mut buf,
    );
    String::from_utf8_lossy(&buf).into_owned()
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            base_url: "http://localhost:8000/v1".into(),
            model: String::new(),
            api_key_env: None,
            api_key_file: None,
            connect_timeout_s: 10.0,
            read_timeout_s: 600.0,
            max_retries: 5,
            backoff_initial_s: 1.0,
            backoff_max_s: 60.0,
            max_retry_after_s: 300.0,
            max_concurrency: 4,
            structured_output: false,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// An API key; its `Debug` never shows it.
#[derive(Clone)]
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A chat-completions client.
#[derive(Clone)]
pub struct HttpLlm {
    config: HttpConfig,
    /// Where requests go (may hold `user:password@`).
    endpoint: String,
    /// The endpoint as errors and logs show it, without credentials.
    url: String,
    /// `user:password@` of the base URL, scrubbed like the key.
    userinfo: Option<String>,
    key: Option<ApiKey>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for HttpLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials in the base URL stay out of Debug output too.
        let config = HttpConfig {
            base_url: without_userinfo(&self.config.base_url),
            ..self.config.clone()
        };
        f.debug_struct("HttpLlm")
            .field("config", &config)
            .field("url", &self.url)
            .field("key", &self.key)
            .finish()
    }
}

impl HttpLlm {
    /// A client for `config`; reads the API key now, so a missing or badly
    /// protected key is reported before any work starts.
    pub fn new(config: HttpConfig) -> Result<Self> {
        if config.model.trim().is_empty() {
            return Err(AuthorError::Config("the LLM model name is empty".into()));
        }
        if !(config.connect_timeout_s > 0.0 && config.read_timeout_s > 0.0) {
            return Err(AuthorError::Config("timeouts must be positive".into()));
        }
        let key = read_key(&config)?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs_f64(config.connect_timeout_s))
            .timeout_read(Duration::from_secs_f64(config.read_timeout_s))
            .timeout_write(Duration::from_secs_f64(config.read_timeout_s))
            .redirects(0)
            .build();
        let endpoint = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        let url = without_userinfo(&endpoint);
        let userinfo = userinfo(&endpoint);
        Ok(Self {
            config,
            endpoint,
            url,
            userinfo,
            key,
            agent,
        })
    }

    /// The settings.
    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    /// The JSON body of `request`.
    pub fn request_body(&self, request: &ChatRequest) -> Value {
        let mut messages = request.messages.clone();
        let mut body = json!({
            "model": self.config.model,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
        });
        if let Some(schema) = &request.json_schema {
            if self.config.structured_output {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {"name": schema.name, "schema": schema.schema, "strict": true}
                });
            } else {
                let ask = format!(
                    "\n\nAnswer with one JSON value only, no other text, following this JSON schema:\n{}",
                    schema.schema
                );
                match messages.last_mut() {
                    Some(m) if m.role == Role::User => m.content.push_str(&ask),
                    _ => messages.push(crate::llm::Message::user(ask.trim_start())),
                }
            }
        }
        body["messages"] = json!(messages);
        if let Some(seed) = request.seed {
            body["seed"] = json!(seed);
        }
        body
    }

    /// `text` with the key replaced, for anything that came from outside.
    fn scrub(&self, text: &str) -> String {
        let mut text = match &self.key {
            Some(ApiKey(k)) if !k.is_empty() => text.replace(k.as_str(), "<redacted>"),
            _ => text.to_string(),
        };
        if let Some(u) = &self.userinfo {
            text = text.replace(u.as_str(), "");
        }
        text
    }

    /// The delay before retry number `retry` (1-based): exponential with
    /// jitter (a uniform factor in [0.5, 1]), or the server's Retry-After.
    fn delay(&self, retry: u32, retry_after: Option<f64>) -> Duration {
        if let Some(s) = retry_after {
            return Duration::from_secs_f64(s.clamp(0.0, self.config.max_retry_after_s));
        }
        let exp = self.config.backoff_initial_s * 2f64.powi(retry.saturating_sub(1).min(30) as i32);
        let capped = exp.min(self.config.backoff_max_s).max(0.0);
        Duration::from_secs_f64(capped * rand::thread_rng().gen_range(0.5..=1.0))
    }

    fn parse_response(&self, body: &str) -> Result<ChatResponse> {
        let bad = |reason: &str| AuthorError::BadResponse {
            url: self.url.clone(),
            reason: reason.into(),
            received: excerpt(&self.scrub(body), BODY_EXCERPT),
        };
        let v: Value = serde_json::from_str(body).map_err(|_| bad("not JSON"))?;
        let choice = v
            .get("choices")
            .and_then(|c| c.get(0))
            .ok_or_else(|| bad("no choices"))?;
        let text = choice
            .get("message")
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no message content in the first choice"))?;
        let usage = v.get("usage");
        let count = |k: &str| usage.and_then(|u| u.get(k)).and_then(Value::as_u64);
        Ok(ChatResponse {
            text: text.to_string(),
            finish_reason: choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(str::to_string),
            model: v.get("model").and_then(Value::as_str).map(str::to_string),
            prompt_tokens: count("prompt_tokens"),
            completion_tokens: count("completion_tokens"),
        })
    }
}

impl Llm for HttpLlm {
    fn chat(&self, request: &ChatRequest) -> Result<ChatResponse> {
        let body = self.request_body(request).to_string();
        let attempts_allowed = self.config.max_retries.saturating_add(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut call = self
                .agent
                .post(&self.endpoint)
                .set("Content-Type", "application/json");
            if let Some(ApiKey(k)) = &self.key {
                call = call.set("Authorization", &format!("Bearer {k}"));
            }
            let last = attempt >= attempts_allowed;
            let (retry_after, failure) = match call.send_string(&body) {
                // Redirects are not followed, and ureq hands them back as
                // successes: an answer that is not 2xx is an error here.
                Ok(response) if !(200..300).contains(&response.status()) => {
                    let status = response.status();
                    let text = error_body(response);
                    return Err(AuthorError::Status {
                        url: self.url.clone(),
                        status,
                        attempts: attempt,
                        body: excerpt(&self.scrub(&text), BODY_EXCERPT),
                    });
                }
                Ok(response) => {
                    match read_limited(response.into_reader(), self.config.max_response_bytes) {
                        Ok(Some(text)) => return self.parse_response(&text),
                        Ok(None) => {
                            return Err(AuthorError::BadResponse {
                                url: self.url.clone(),
                                reason: format!(
                                    "the answer is larger than {} bytes; raise `[llm] \
                                 max_response_bytes` in agfsync.toml if the server is meant \
                                 to send that much",
                                    self.config.max_response_bytes
                                ),
                                received: String::new(),
                            })
                        }
                        Err(e) => (
                            None,
                            AuthorError::Transport {
                                url: self.url.clone(),
                                message: self.scrub(&format!("reading the response: {e}")),
                                attempts: attempt,
                                timed_out: is_timeout_io(&e),
                            },
                        ),
                    }
                }
                Err(ureq::Error::Status(status, response)) => {
                    let retry_after = response
                        .header("Retry-After")
                        .and_then(|h| h.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite());
                    let text = error_body(response);
                    let failure = AuthorError::Status {
                        url: self.url.clone(),
                        status,
                        attempts: attempt,
                        body: excerpt(&self.scrub(&text), BODY_EXCERPT),
                    };
                    if !(status == 429 || (500..600).contains(&status)) {
                        return Err(failure);
                    }
                    (retry_after, failure)
                }
                Err(ureq::Error::Transport(t)) => {
                    let timed_out = is_timeout(&t);
                    (
                        None,
                        AuthorError::Transport {
                            url: self.url.clone(),
                            message: self.scrub(&t.to_string()),
                            attempts: attempt,
                            timed_out,
                        },
                    )
                }
            };
            if last {
                return Err(failure);
            }
            let wait = self.delay(attempt, retry_after);
            tracing::warn!(url = %self.url, attempt, wait_s = wait.as_secs_f64(), error = %failure, "LLM request failed; retrying");
            std::thread::sleep(wait);
        }
    }

    fn identity(&self) -> String {
        format!(
            "openai-compatible:{}@{}",
            self.config.model,
            without_userinfo(&self.config.base_url)
        )
    }

    fn max_concurrency(&self) -> usize {
        self.config.max_concurrency.max(1)
    }
}

/// The URL without `user:password@`, so credentials in a URL never reach a
/// provenance record.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) if scheme.is_empty() => rest[at + 1..].to_string(),
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The `user:password@` part of a URL, if any.
fn userinfo(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    authority.rfind('@').map(|at| authority[..=at].to_string())
}

/// True for a transport error caused by a timeout.
fn is_timeout(t: &ureq::Transport) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return is_timeout_io(io);
        }
        source = e.source();
    }
    t.to_string().contains("timed out")
}

fn is_timeout_io(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// Reads the key from the configured place; `None` when none is configured
/// (local servers need none).
fn read_key(config: &HttpConfig) -> Result<Option<ApiKey>> {
    match (&config.api_key_env, &config.api_key_file) {
        (Some(_), Some(_)) => Err(AuthorError::Config(
            "set api_key_env or api_key_file, not both".into(),
        )),
        (None, None) => Ok(None),
        (Some(name), None) => match std::env::var(name) {
            Ok(k) if !k.trim().is_empty() => {
                header_safe(k.trim(), &format!("environment variable {name}"))
            }
            Ok(_) => Err(AuthorError::ApiKey(format!(
                "environment variable {name} is empty"
            ))),
            Err(_) => Err(AuthorError::ApiKey(format!(
                "environment variable {name} is not set (or not valid UTF-8)"
            ))),
        },
        (None, Some(path)) => {
            let io = |source| AuthorError::Io {
                path: path.clone(),
                source,
            };
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(AuthorError::ApiKey(format!(
                        "{} is readable by group or others (mode {:o}); run chmod 600 on it",
                        path.display(),
                        mode & 0o777
                    )));
                }
            }
            let text = std::fs::read_to_string(path).map_err(io)?;
            let k = text.trim();
            if k.is_empty() {
                return Err(AuthorError::ApiKey(format!("{} is empty", path.display())));
            }
            header_safe(k, &path.display().to_string())
        }
    }
}

/// The key, when it can travel in a header (printable ASCII, no blanks);
/// the error names where it came from, never what it is.
fn header_safe(key: &str, from: &str) -> Result<Option<ApiKey>> {
    if key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(Some(ApiKey(key.to_string())))
    } else {
        Err(AuthorError::ApiKey(format!(
            "the key in {from} contains blanks, control or non-ASCII characters"
        )))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_dropped_from_identity() {
        assert_eq!(
            without_userinfo("https://u:p@host:1/v1"),
            "https://host:1/v1"
        );
        assert_eq!(without_userinfo("http://h/v1"), "http://h/v1");
        assert_eq!(userinfo("https://u:p@host:1/v1").as_deref(), Some("u:p@"));
        assert_eq!(userinfo("http://h/v1@x"), None);
        let llm = HttpLlm::new(HttpConfig {
            base_url: "http://user:hunter2@127.0.0.1:9/v1".into(),
            model: "m".into(),
            ..HttpConfig::default()
        })
        .unwrap();
        assert!(!llm
            .scrub("at http://user:hunter2@127.0.0.1:9/v1")
            .contains("hunter2"));
        assert!(!llm.identity().contains("hunter2"));
        assert!(!format!("{llm:?}").contains("hunter2"));
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let llm = HttpLlm::new(HttpConfig {
            model: "m".into(),
            backoff_initial_s: 1.0,
            backoff_max_s: 5.0,
            max_retry_after_s: 30.0,
            ..HttpConfig::default()
        })
        .unwrap();
        for retry in 1..10 {
            let d = llm.delay(retry, None).as_secs_f64();
            let full = (2f64.powi(retry as i32 - 1)).min(5.0);
            assert!(d >= full * 0.5 - 1e-9 && d <= full + 1e-9, "{retry}: {d}");
        }
        assert_eq!(llm.delay(1, Some(7.0)).as_secs_f64(), 7.0);
        assert_eq!(llm.delay(1, Some(1e9)).as_secs_f64(), 30.0);
    }
}
