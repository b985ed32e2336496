//! Errors of authoring.
//!
//! No variant ever holds an API key: the HTTP backend scrubs the key out of
//! anything a server sends back before it becomes part of an error.

use std::path::PathBuf;

/// What can go wrong while authoring prompts and questions.
#[derive(Debug, thiserror::Error)]
pub enum AuthorError {
    /// A setting is missing or out of range.
    #[error("configuration: {0}")]
    Config(String),
    /// The API key could not be read (the message names its source, never
    /// its value).
    #[error("API key: {0}")]
    ApiKey(String),
    /// The server answered with an error status, after any retries.
    #[error("{url}: HTTP {status} after {attempts} attempt(s): {body}")]
    Status {
        /// The endpoint.
        url: String,
        /// The last status code.
        status: u16,
        /// Requests made.
        attempts: u32,
        /// The start of the response body (key scrubbed, bounded length).
        body: String,
    },
    /// The server could not be reached or stopped answering, after any
    /// retries.
    #[error("{url}: {message} after {attempts} attempt(s)")]
    Transport {
        /// The endpoint.
        url: String,
        /// What failed (connection refused, timed out, ...).
        message: String,
        /// Requests made.
        attempts: u32,
        /// True when the last failure was a timeout.
        timed_out: bool,
    },
    /// The server answered 200 with a body that is not a chat completion.
    #[error("{url}: unexpected response: {reason}; received: {received}")]
    BadResponse {
        /// The endpoint.
        url: String,
        /// What is wrong with it.
        reason: String,
        /// The start of the body (key scrubbed, bounded length).
        received: String,
    },
    /// No JSON could be recovered from a model's text.
    #[error("no JSON in the model's answer: {reason}; received: {received}")]
    Json {
        /// Why extraction failed.
        reason: String,
        /// The start of what was received (bounded length).
        received: String,
    },
    /// A JSON schema outside the supported subset, or a vocabulary that
    /// cannot express it.
    #[error("JSON schema: {0}")]
    Schema(String),
    /// A token that the constraint does not allow was fed to it.
    #[error("constrained decoding: {0}")]
    Constraint(String),
    /// An authoring template is malformed.
    #[error("template {name}: {reason}")]
    Template {
        /// The template's name or file.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The embedder failed.
    #[error("embedding: {0}")]
    Embed(String),
    /// A language model backend failed in a way of its own (in-process
    /// models, test doubles).
    #[error("LLM {model}: {message}")]
    Llm {
        /// The model identity.
        model: String,
        /// What failed.
        message: String,
    },
    /// An in-process model could not be loaded; the reason names the file
    /// and how to fix it.
    #[error("loading the model from {location}: {reason}")]
    Load {
        /// The folder or hub repo.
        location: String,
        /// What is wrong and what to do about it.
        reason: String,
    },
    /// Every LLM call of a stage failed, so there is nothing to keep.
    #[error("all {calls} LLM call(s) failed; first error: {first}")]
    AllCallsFailed {
        /// Calls made.
        calls: usize,
        /// The first failure.
        first: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Result of authoring operations.
pub type Result<T> = std::result::Result<T, AuthorError>;

/// The first `max` characters of `text` for an error message, with the
/// total length when cut, so a huge answer cannot flood a log.
pub fn excerpt(text: &str, max: usize) -> String {
    let n = text.chars().count();
    if n <= max {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(max).collect();
    format!("{head:?}... ({n} characters in all)")
}
