//! The one interface every language model backend implements ([`Llm`]), the
//! request and response types, batches with bounded concurrency
//! ([`chat_many`]) and a scripted test double ([`FakeLlm`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{AuthorError, Result};

/// Who wrote a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The user's turn.
    User,
    /// The model's turn (few-shot answers).
    Assistant,
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Its author.
    pub role: Role,
    /// Its text.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// A JSON schema the answer must follow, with the name OpenAI's
/// `response_format` wants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonSchema {
    /// A short identifier (`[A-Za-z0-9_-]`, what OpenAI accepts).
    pub name: String,
    /// The schema itself.
    pub schema: serde_json::Value,
}

/// One chat-completion request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus sampling mass.
    pub top_p: f32,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Sampling seed, where the backend honours one.
    pub seed: Option<u64>,
    /// The schema of the answer, when it must be JSON of a known shape.
    pub json_schema: Option<JsonSchema>,
}

impl ChatRequest {
    /// A request with AGFSync's official sampling (temperature 0.9, top-p
    /// 0.7) and room for 4096 tokens.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            temperature: 0.9,
            top_p: 0.7,
            max_tokens: 4096,
            seed: None,
            json_schema: None,
        }
    }
}

/// A model's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The generated text.
    pub text: String,
    /// Why generation stopped (`stop`, `length`, ...), when reported.
    pub finish_reason: Option<String>,
    /// The model that answered, when reported.
    pub model: Option<String>,
    /// Prompt tokens, when reported.
    pub prompt_tokens: Option<u64>,
    /// Generated tokens, when reported.
    pub completion_tokens: Option<u64>,
}

/// A language model that answers chat requests.
///
/// Implementations must be usable from several threads at once
/// ([`chat_many`] shares one backend between its workers).
pub trait Llm: Send + Sync {
    /// Answers one request.
    fn chat(&self, request: &ChatRequest) -> Result<ChatResponse>;

    /// A stable description of the model for provenance records (backend,
    /// endpoint, model name, revision); never a secret.
    fn identity(&self) -> String;

    /// How many requests [`chat_many`] may have in flight at once.
    fn max_concurrency(&self) -> usize {
        1
    }

    /// Answers every request, in request order, one failure not stopping
    /// the others. By default at most [`Llm::max_concurrency`] requests run
    /// at once on std threads ([`chat_many_with`]); a backend that can
    /// answer several requests in one computation (the in-process model's
    /// padded batches) overrides it.
    fn chat_batch(&self, requests: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
        chat_many_with(self, requests, self.max_concurrency())
    }
}

/// Answers every request through [`Llm::chat_batch`]; results come back
/// in request order. One failed request does not stop the others.
pub fn chat_many<L: Llm + ?Sized>(llm: &L, requests: &[ChatRequest]) -> Vec<Result<ChatResponse>> {
    llm.chat_batch(requests)
}

/// [`chat_many`] with an explicit bound on requests in flight (at least 1).
pub fn chat_many_with<L: Llm + ?Sized>(
    llm: &L,
    requests: &[ChatRequest],
    max_in_flight: usize,
) -> Vec<Result<ChatResponse>> {
    let workers = max_in_flight.max(1).min(requests.len());
    if workers <= 1 {
        return requests.iter().map(|r| llm.chat(r)).collect();
    }
    // Workers pull the next request index from a shared counter, so a slow
    // request never holds back the others and at most `workers` are in
    // flight.
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<ChatResponse>>>> =
        requests.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else {
                    break;
                };
                let answer = llm.chat(request);
                if let Ok(mut slot) = slots[i].lock() {
                    *slot = Some(answer);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner().ok().flatten().unwrap_or_else(|| {
                // Only reachable if a worker panicked inside `chat`.
                Err(AuthorError::Llm {
                    model: llm.identity(),
                    message: "request was not answered (worker thread panicked)".into(),
                })
            })
        })
        .collect()
}

/// What a [`FakeLlm`] answers with.
type Responder = Box<dyn Fn(&ChatRequest) -> std::result::Result<String, String> + Send + Sync>;

/// A deterministic stand-in for a language model in tests: answers come
/// from a script (in call order) or from a function of the request, and
/// every request is recorded.
pub struct FakeLlm {
    name: String,
    script: Mutex<VecDeque<std::result::Result<String, String>>>,
    responder: Option<Responder>,
    seen: Mutex<Vec<ChatRequest>>,
    concurrency: usize,
}

impl std::fmt::Debug for FakeLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeLlm").field("name", &self.name).finish()
    }
}

impl FakeLlm {
    /// Answers the i-th call with `script[i]` (`Err` texts become
    /// [`AuthorError::Llm`]); calls beyond the script fail.
    pub fn scripted(script: Vec<std::result::Result<String, String>>) -> Self {
        Self {
            name: "fake:scripted".into(),
            script: Mutex::new(script.into()),
            responder: None,
            seen: Mutex::new(Vec::new()),
            concurrency: 1,
        }
    }

    /// Answers every call with `f(request)`; deterministic whatever the
    /// order in which concurrent calls arrive.
    pub fn from_fn(
        f: impl Fn(&ChatRequest) -> std::result::Result<String, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: "fake:fn".into(),
            script: Mutex::new(VecDeque::new()),
            responder: Some(Box::new(f)),
            seen: Mutex::new(Vec::new()),
            concurrency: 1,
        }
    }

    /// Sets the identity reported for provenance.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the concurrency [`chat_many`] uses.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The requests received so far, in arrival order.
    pub fn requests(&self) -> Vec<ChatRequest> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Llm for FakeLlm {
    fn chat(&self, request: &ChatRequest) -> Result<ChatResponse> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(request.clone());
        }
        let answer = match &self.responder {
            Some(f) => f(request),
            None => self
                .script
                .lock()
                .ok()
                .and_then(|mut s| s.pop_front())
                .unwrap_or_else(|| Err("script exhausted".into())),
        };
        answer
            .map(|text| ChatResponse {
                text,
                finish_reason: Some("stop".into()),
                model: Some(self.name.clone()),
                ..ChatResponse::default()
            })
            .map_err(|message| AuthorError::Llm {
                model: self.name.clone(),
                message,
            })
    }

    fn identity(&self) -> String {
        self.name.clone()
    }

    fn max_concurrency(&self) -> usize {
        self.concurrency
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn scripted_answers_in_order_then_fails() {
        let llm = FakeLlm::scripted(vec![Ok("a".into()), Err("boom".into())]);
        let r = ChatRequest::new(vec![Message::user("hi")]);
        assert_eq!(llm.chat(&r).unwrap().text, "a");
        assert!(llm.chat(&r).unwrap_err().to_string().contains("boom"));
        assert!(llm.chat(&r).is_err());
        assert_eq!(llm.requests().len(), 3);
    }

    #[test]
    fn chat_many_reports_failures_in_place() {
        let llm = FakeLlm::from_fn(|r| {
            let text = &r.messages[0].content;
            if text.contains("bad") {
                Err(format!("refused {text}"))
            } else {
                Ok(text.clone())
            }
        })
        .with_concurrency(3);
        let requests: Vec<_> = ["a", "bad1", "b", "bad2", "c"]
            .iter()
            .map(|t| ChatRequest::new(vec![Message::user(*t)]))
            .collect();
        let out = chat_many(&llm, &requests);
        assert_eq!(out[0].as_ref().unwrap().text, "a");
        assert!(out[1].as_ref().unwrap_err().to_string().contains("bad1"));
        assert_eq!(out[2].as_ref().unwrap().text, "b");
        assert!(out[3].as_ref().unwrap_err().to_string().contains("bad2"));
        assert_eq!(out[4].as_ref().unwrap().text, "c");
        assert!(chat_many(&llm, &[]).is_empty());
    }

    #[test]
    fn chat_many_keeps_request_order_under_concurrency() {
        let llm = FakeLlm::from_fn(|r| {
            let text = r.messages[0].content.clone();
            // Later requests finish first, so order must come from indices.
            let n: u64 = text.parse().unwrap_or(0);
            std::thread::sleep(std::time::Duration::from_millis(20 - n));
            Ok(text)
        })
        .with_concurrency(4);
        let requests: Vec<_> = (0..10)
            .map(|i| ChatRequest::new(vec![Message::user(i.to_string())]))
            .collect();
        let out = chat_many(&llm, &requests);
        let texts: Vec<_> = out.into_iter().map(|r| r.unwrap().text).collect();
        let want: Vec<_> = (0..10).map(|i| i.to_string()).collect();
        assert_eq!(texts, want);
    }
}
