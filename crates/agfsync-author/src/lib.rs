//! AGFSync stages 1 and 2 written by a language model: prompts per
//! category and TIFA-style yes/no questions per prompt.
//!
//! * [`llm::Llm`] is the one interface to a model: the OpenAI-compatible
//!   HTTP backend ([`http::HttpLlm`]: OpenAI, vLLM, llama.cpp server,
//!   ollama, TGI), the in-process candle model (`local::LocalLlm`, cargo
//!   feature `local`, on by default), and [`llm::FakeLlm`]
//!   for tests. [`llm::chat_many`] runs a batch with bounded concurrency.
//! * [`json::extract_json`] recovers JSON from what models actually write
//!   (code fences, prose, trailing commas, single quotes, truncation).
//! * [`constrained`] is the core of JSON-schema-constrained decoding for an
//!   in-process model: which tokens keep the text a valid prefix of a
//!   document that follows the schema.
//! * [`prompts::author_prompts`] and [`questions::author_questions`] are
//!   the stages' logic, generic over the model and over an
//!   [`embed::Embedder`] used to drop near duplicates (the BERT-family
//!   `bert_embed::BertEmbedder`, bge in AGFSync, with the default feature
//!   `local`); their records convert
//!   to the run store's `PromptRecord` and `QuestionRecord`.
//! * [`template::Template`] is the editable message template; the defaults
//!   ship in `templates/`.
//!
//! Importing existing prompt lists and TIFA question files lives in
//! `agfsync-pipeline`'s `prompts` module, not here.

#[cfg(feature = "local")]
pub mod bert_embed;
pub mod constrained;
pub mod embed;
pub mod error;
pub mod http;
pub mod json;
pub mod llm;
#[cfg(feature = "local")]
pub mod local;
pub mod prompts;
pub mod questions;
pub mod template;

#[cfg(feature = "local")]
pub use bert_embed::{write_tiny_bert, BertEmbedder, BertEmbedderOptions, Pooling};
pub use embed::{BagOfWords, Embedder};
pub use error::{AuthorError, Result};
pub use json::extract_json;
pub use llm::{chat_many, ChatRequest, ChatResponse, FakeLlm, JsonSchema, Llm, Message, Role};
#[cfg(feature = "local")]
pub use local::{write_tiny_qwen2, ChatTemplate, LocalLlm, LocalLlmOptions};
pub use prompts::{
    author_prompts, prompt_records, AuthorStats, AuthoredPrompt, PromptAuthoring, PromptsOutcome,
    Provenance, CATEGORIES,
};
pub use questions::{
    author_questions, AuthoredQuestion, ElementType, Grounding, QuestionAuthoring, QuestionSet,
    QuestionsOutcome,
};
pub use template::Template;
