//! The HTTP backend against a scripted chat-completions server written
//! here on std's TcpListener: retries on 429 and 5xx, Retry-After, give-up,
//! timeouts, malformed bodies, bounded concurrency, and an API key that
//! never leaks into errors or Debug output.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agfsync_author::http::{HttpConfig, HttpLlm};
use agfsync_author::llm::{chat_many, ChatRequest, JsonSchema, Llm, Message};
use agfsync_author::AuthorError;
use serde_json::{json, Value};

/// One scripted answer.
#[derive(Clone)]
enum Reply {
    /// Status, extra headers, body.
    Http(u16, Vec<(&'static str, String)>, String),
    /// Answer 200 with this content after a delay.
    Slow(Duration, String),
    /// Read the request, then say nothing for this long.
    Hang(Duration),
    /// 401 whose body echoes the request's Authorization header (as some
    /// servers and proxies do).
    EchoAuth,
}

/// A received request.
#[derive(Clone, Debug)]
struct Seen {
    headers: Vec<String>,
    body: Value,
}

struct Server {
    base_url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    max_in_flight: Arc<AtomicUsize>,
}

fn completion(content: &str) -> String {
    json!({
        "id": "x", "object": "chat.completion", "model": "test-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7}
    })
    .to_string()
}

fn ok(content: &str) -> Reply {
    Reply::Http(200, vec![], completion(content))
}

/// Serves `script` in order (then 500s) on a free local port.
fn serve(script: Vec<Reply>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    {
        let seen = seen.clone();
        let max_in_flight = max_in_flight.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (script, seen) = (script.clone(), seen.clone());
                let (in_flight, max_in_flight) = (in_flight.clone(), max_in_flight.clone());
                std::thread::spawn(move || {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_in_flight.fetch_max(now, Ordering::SeqCst);
                    let response = handle(stream, &script, &seen);
                    // Out of flight before the answer is written: the
                    // client may send its next request the moment the
                    // answer arrives, before this thread would decrement.
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    if let Some((mut out, bytes)) = response {
                        let _ = out.write_all(&bytes);
                        let _ = out.flush();
                    }
                });
            }
        });
    }
    Server {
        base_url: format!("http://{addr}/v1"),
        seen,
        max_in_flight,
    }
}

/// Reads one request and returns the stream with the scripted answer's
/// bytes (none when the script hangs up or the request is unreadable).
fn handle(
    stream: TcpStream,
    script: &Mutex<VecDeque<Reply>>,
    seen: &Mutex<Vec<Seen>>,
) -> Option<(TcpStream, Vec<u8>)> {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        headers.push(line);
    }
    let len = headers
        .iter()
        .find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let auth = headers
        .iter()
        .find(|h| h.to_lowercase().starts_with("authorization:"))
        .cloned()
        .unwrap_or_default();
    seen.lock().unwrap().push(Seen { headers, body });
    let reply = script.lock().unwrap().pop_front().unwrap_or(Reply::Http(
        500,
        vec![],
        "script exhausted".into(),
    ));
    let (status, extra, text) = match reply {
        Reply::Http(s, h, b) => (s, h, b),
        Reply::Slow(d, content) => {
            std::thread::sleep(d);
            (200, vec![], completion(&content))
        }
        Reply::Hang(d) => {
            std::thread::sleep(d);
            return None;
        }
        Reply::EchoAuth => (
            401,
            vec![],
            json!({"error": {"message": format!("Incorrect API key provided: {auth}")}})
                .to_string(),
        ),
    };
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        text.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(&text);
    Some((stream, head.into_bytes()))
}

fn config(server: &Server) -> HttpConfig {
    HttpConfig {
        base_url: server.base_url.clone(),
        model: "test-model".into(),
        connect_timeout_s: 2.0,
        read_timeout_s: 5.0,
        max_retries: 3,
        backoff_initial_s: 0.01,
        backoff_max_s: 0.05,
        max_retry_after_s: 5.0,
        ..HttpConfig::default()
    }
}

fn request() -> ChatRequest {
    let mut r = ChatRequest::new(vec![Message::system("be brief"), Message::user("hello")]);
    r.seed = Some(42);
    r.max_tokens = 100;
    r
}

#[test]
fn retries_429_honouring_retry_after_then_succeeds() {
    let server = serve(vec![
        Reply::Http(429, vec![("Retry-After", "1".into())], "slow down".into()),
        ok("hi there"),
    ]);
    let llm = HttpLlm::new(config(&server)).unwrap();
    let t = Instant::now();
    let r = llm.chat(&request()).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.text, "hi there");
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    assert_eq!(r.model.as_deref(), Some("test-model"));
    assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(11), Some(7)));
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let body = &seen[1].body;
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["seed"], 42);
    assert_eq!(body["max_tokens"], 100);
    assert!((body["temperature"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    assert!((body["top_p"].as_f64().unwrap() - 0.7).abs() < 1e-6);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["content"], "hello");
    assert!(body.get("response_format").is_none());
    assert!(!seen[1]
        .headers
        .iter()
        .any(|h| h.to_lowercase().starts_with("authorization")));
}

#[test]
fn server_errors_until_give_up() {
    let server = serve(vec![
        Reply::Http(500, vec![], "boom".into()),
        Reply::Http(503, vec![], "busy".into()),
        Reply::Http(502, vec![], "bad gateway".into()),
        Reply::Http(500, vec![], "still down".into()),
        ok("too late"),
    ]);
    let llm = HttpLlm::new(config(&server)).unwrap();
    match llm.chat(&request()).unwrap_err() {
        AuthorError::Status {
            status,
            attempts,
            body,
            ..
        } => {
            assert_eq!((status, attempts), (500, 4));
            assert!(body.contains("still down"), "{body}");
        }
        e => panic!("{e}"),
    }
    assert_eq!(server.seen.lock().unwrap().len(), 4);
}

#[test]
fn redirects_are_not_followed() {
    let server = serve(vec![
        Reply::Http(
            307,
            vec![("Location", "http://127.0.0.1:9/v1".into())],
            String::new(),
        ),
        ok("x"),
    ]);
    let llm = HttpLlm::new(config(&server)).unwrap();
    let e = llm.chat(&request()).unwrap_err().to_string();
    assert!(e.contains("HTTP 307"), "{e}");
    assert_eq!(server.seen.lock().unwrap().len(), 1);
}

#[test]
fn client_errors_are_not_retried() {
    let server = serve(vec![
        Reply::Http(400, vec![], "bad request".into()),
        ok("x"),
    ]);
    let llm = HttpLlm::new(config(&server)).unwrap();
    let e = llm.chat(&request()).unwrap_err().to_string();
    assert!(e.contains("HTTP 400") && e.contains("bad request"), "{e}");
    assert_eq!(server.seen.lock().unwrap().len(), 1);
}

#[test]
fn a_hang_trips_the_read_timeout() {
    let server = serve(vec![
        Reply::Hang(Duration::from_secs(3)),
        Reply::Hang(Duration::from_secs(3)),
    ]);
    let llm = HttpLlm::new(HttpConfig {
        read_timeout_s: 0.3,
        max_retries: 1,
        ..config(&server)
    })
    .unwrap();
    let t = Instant::now();
    match llm.chat(&request()).unwrap_err() {
        AuthorError::Transport {
            attempts,
            timed_out,
            ..
        } => {
            assert_eq!(attempts, 2);
            assert!(timed_out);
        }
        e => panic!("{e}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn connection_refused_is_retried_then_reported() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let llm = HttpLlm::new(HttpConfig {
        base_url: format!("http://127.0.0.1:{port}/v1"),
        model: "m".into(),
        max_retries: 2,
        backoff_initial_s: 0.01,
        ..HttpConfig::default()
    })
    .unwrap();
    match llm.chat(&request()).unwrap_err() {
        AuthorError::Transport { attempts, .. } => assert_eq!(attempts, 3),
        e => panic!("{e}"),
    }
}

#[test]
fn malformed_bodies_are_reported_with_an_excerpt() {
    let server = serve(vec![
        Reply::Http(200, vec![], "<html>proxy error</html>".into()),
        Reply::Http(200, vec![], json!({"choices": []}).to_string()),
        Reply::Http(
            200,
            vec![],
            json!({"choices": [{"message": {"content": null}}]}).to_string(),
        ),
    ]);
    let llm = HttpLlm::new(config(&server)).unwrap();
    let e = llm.chat(&request()).unwrap_err().to_string();
    assert!(e.contains("not JSON") && e.contains("proxy error"), "{e}");
    let e = llm.chat(&request()).unwrap_err().to_string();
    assert!(e.contains("no choices"), "{e}");
    let e = llm.chat(&request()).unwrap_err().to_string();
    assert!(e.contains("no message content"), "{e}");
}

#[test]
fn schema_goes_to_response_format_or_to_the_prompt() {
    let schema = JsonSchema {
        name: "prompts".into(),
        schema: json!({"type": "object", "properties": {"prompts": {"type": "array", "items": {"type": "string"}}}, "required": ["prompts"]}),
    };
    let mut r = request();
    r.json_schema = Some(schema.clone());
    let server = serve(vec![ok("{}"), ok("{}")]);
    let structured = HttpLlm::new(HttpConfig {
        structured_output: true,
        ..config(&server)
    })
    .unwrap();
    structured.chat(&r).unwrap();
    let plain = HttpLlm::new(config(&server)).unwrap();
    plain.chat(&r).unwrap();
    let seen = server.seen.lock().unwrap().clone();
    let rf = &seen[0].body["response_format"];
    assert_eq!(rf["type"], "json_schema");
    assert_eq!(rf["json_schema"]["name"], "prompts");
    assert_eq!(rf["json_schema"]["schema"], schema.schema);
    assert!(seen[1].body.get("response_format").is_none());
    let last = seen[1].body["messages"][1]["content"].as_str().unwrap();
    assert!(
        last.starts_with("hello") && last.contains("JSON schema"),
        "{last}"
    );
    assert!(last.contains("\"prompts\""), "{last}");
}

#[test]
fn chat_many_bounds_requests_in_flight() {
    let replies = (0..8)
        .map(|i| Reply::Slow(Duration::from_millis(150), format!("answer {i}")))
        .collect();
    let server = serve(replies);
    let llm = HttpLlm::new(HttpConfig {
        max_concurrency: 3,
        ..config(&server)
    })
    .unwrap();
    let requests = vec![request(); 8];
    let out = chat_many(&llm, &requests);
    assert!(out.iter().all(|r| r.is_ok()));
    let max = server.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=3).contains(&max), "{max}");
}

#[test]
fn a_planted_key_never_leaks() {
    const KEY: &str = "sk-planted-SECRET-7f3a9c";
    let var = "AGFSYNC_AUTHOR_TEST_KEY_LEAK";
    std::env::set_var(var, KEY);
    let server = serve(vec![
        Reply::EchoAuth,
        Reply::Http(200, vec![], format!("not json, but the key: Bearer {KEY}")),
        Reply::Http(503, vec![], format!("overloaded {KEY}")),
        Reply::Http(503, vec![], format!("overloaded {KEY}")),
        Reply::Hang(Duration::from_secs(2)),
    ]);
    let cfg = HttpConfig {
        api_key_env: Some(var.into()),
        max_retries: 1,
        read_timeout_s: 0.3,
        ..config(&server)
    };
    let llm = HttpLlm::new(cfg.clone()).unwrap();
    let mut texts = vec![
        format!("{llm:?}"),
        format!("{cfg:?}"),
        serde_json::to_string(&cfg).unwrap(),
        llm.identity(),
    ];
    for _ in 0..3 {
        let e = llm.chat(&request()).unwrap_err();
        texts.push(e.to_string());
        texts.push(format!("{e:?}"));
    }
    // The key was sent, as a bearer token.
    let seen = server.seen.lock().unwrap().clone();
    assert!(seen[0]
        .headers
        .iter()
        .any(|h| h == &format!("authorization: Bearer {KEY}")
            || h == &format!("Authorization: Bearer {KEY}")));
    for t in &texts {
        assert!(!t.contains(KEY), "key leaked in: {t}");
        assert!(!t.contains("SECRET"), "key leaked in: {t}");
    }
    assert!(texts[4].contains("<redacted>"), "{}", texts[4]);
}

#[test]
fn key_sources_are_checked() {
    let e = HttpLlm::new(HttpConfig {
        model: "m".into(),
        api_key_env: Some("AGFSYNC_AUTHOR_TEST_KEY_UNSET".into()),
        ..HttpConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("AGFSYNC_AUTHOR_TEST_KEY_UNSET is not set"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, "sk-file-SECRET-1\n").unwrap();
    let with_file = || {
        HttpLlm::new(HttpConfig {
            model: "m".into(),
            api_key_file: Some(path.clone()),
            ..HttpConfig::default()
        })
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = with_file().unwrap_err().to_string();
        assert!(
            e.contains("readable by group or others") && e.contains("644"),
            "{e}"
        );
        assert!(!e.contains("SECRET"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let llm = with_file().unwrap();
    assert!(!format!("{llm:?}").contains("SECRET"));
    std::fs::write(&path, "sk-file SECRET\n").unwrap();
    let e = with_file().unwrap_err().to_string();
    assert!(e.contains("blanks") && !e.contains("SECRET"), "{e}");
    let both = HttpLlm::new(HttpConfig {
        model: "m".into(),
        api_key_env: Some("X".into()),
        api_key_file: Some(path.clone()),
        ..HttpConfig::default()
    });
    assert!(both.is_err());
}

#[test]
fn answer_larger_than_max_response_bytes_is_refused() {
    let server = serve(vec![ok(&"x".repeat(5000))]);
    let llm = HttpLlm::new(HttpConfig {
        max_response_bytes: 1000,
        ..config(&server)
    })
    .unwrap();
    let err = llm.chat(&request()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AuthorError::BadResponse { .. }), "{msg}");
    assert!(msg.contains("larger than 1000 bytes"), "{msg}");
    assert!(msg.contains("max_response_bytes"), "{msg}");
    // Refused once, not retried: a server that sends too much keeps doing so.
    assert_eq!(server.seen.lock().unwrap().len(), 1);
    // Within the limit the same answer is read.
    let server = serve(vec![ok(&"x".repeat(5000))]);
    let r = HttpLlm::new(config(&server))
        .unwrap()
        .chat(&request())
        .unwrap();
    assert_eq!(r.text.len(), 5000);
}
