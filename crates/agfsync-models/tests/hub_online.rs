//! Online hub mode against a local fake hub server on 127.0.0.1 (no
//! internet needed).
//!
//! ureq sends even loopback requests through a proxy named in the
//! environment (it ignores NO_PROXY), so this test binary clears the proxy
//! variables for its own process before any client exists. It lives in its
//! own binary so no other test reads the environment meanwhile.

use std::path::Path;
use std::sync::Once;

use agfsync_models::hub::{find_weights, resolve_model, HubError, HubOptions};
use anyhow::Result;

mod support;
use support::*;

static CLEAR_PROXY: Once = Once::new();

fn without_proxy() {
    CLEAR_PROXY.call_once(|| {
        for k in [
            "ALL_PROXY",
            "all_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
        ] {
            std::env::remove_var(k);
        }
    });
}

// ---------------------------------------------------------------------------
// Online mode against a local fake hub (no internet needed)
// ---------------------------------------------------------------------------

mod fake_hub {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};

    /// Serves `files` of repo `repo_id` at commit `sha` with the endpoints
    /// hf-hub uses: `GET /api/models/{id}/revision/{rev}` and ranged
    /// `GET /{id}/resolve/{rev}/{file}`. Returns the endpoint URL.
    pub fn serve(repo_id: &str, sha: &str, files: Vec<(String, Vec<u8>)>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let repo_id = repo_id.to_string();
        let sha = sha.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = handle(stream, &repo_id, &sha, &files);
            }
        });
        format!("http://{addr}")
    }

    fn handle(
        mut stream: TcpStream,
        repo_id: &str,
        sha: &str,
        files: &[(String, Vec<u8>)],
    ) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        let mut range = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        let info_prefix = format!("/api/models/{repo_id}/revision/");
        let resolve_prefix = format!("/{repo_id}/resolve/");
        let (status, headers, body): (&str, Vec<String>, Vec<u8>) =
            if path.starts_with(&info_prefix) {
                let siblings: Vec<String> = files
                    .iter()
                    .map(|(f, _)| format!("{{\"rfilename\": \"{f}\"}}"))
                    .collect();
                let json = format!(
                    "{{\"id\": \"{repo_id}\", \"sha\": \"{sha}\", \"siblings\": [{}]}}",
                    siblings.join(", ")
                );
                (
                    "200 OK",
                    vec!["Content-Type: application/json".into()],
                    json.into_bytes(),
                )
            } else if let Some(rest) = path.strip_prefix(&resolve_prefix) {
                let file = rest.split_once('/').map(|(_, f)| f).unwrap_or("");
                match files.iter().position(|(f, _)| f == file) {
                    Some(i) => {
                        let data = &files[i].1;
                        let start: usize = range
                            .as_deref()
                            .and_then(|r| r.strip_prefix("bytes="))
                            .and_then(|r| r.split('-').next())
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        let end = match range.as_deref() {
                            Some("bytes=0-0") => 0,
                            _ => data.len().saturating_sub(1),
                        };
                        let end = end.min(data.len().saturating_sub(1));
                        let body = data.get(start..=end).unwrap_or(&[]).to_vec();
                        (
                            "206 Partial Content",
                            vec![
                                format!("X-Repo-Commit: {sha}"),
                                format!("ETag: \"etag-{i}\""),
                                format!("Content-Range: bytes {start}-{end}/{}", data.len()),
                            ],
                            body,
                        )
                    }
                    None => ("404 Not Found", vec![], b"not found".to_vec()),
                }
            } else {
                ("404 Not Found", vec![], b"not found".to_vec())
            };
        let mut response = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for h in headers {
            response.push_str(&h);
            response.push_str("\r\n");
        }
        response.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(response.as_bytes())?;
        stream.write_all(&body)?;
        stream.flush()
    }
}

fn online_options(cache: &Path, endpoint: &str) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        offline: false,
        token: None,
        endpoint: Some(endpoint.to_string()),
        progress: false,
    }
}

#[test]
fn online_downloads_on_demand_into_the_cache_layout() -> Result<()> {
    without_proxy();
    let files = vec![
        (
            "model_index.json".to_string(),
            b"{\"_class_name\": \"x\"}".to_vec(),
        ),
        (
            "unet/config.json".to_string(),
            b"{\"sample_size\": 8}".to_vec(),
        ),
        (
            "unet/diffusion_pytorch_model.fp16.safetensors".to_string(),
            b"half weights".to_vec(),
        ),
        (
            "vae/diffusion_pytorch_model.bin".to_string(),
            b"pickle".to_vec(),
        ),
    ];
    let endpoint = fake_hub::serve("org/tiny-sd", HASH, files);
    let cache = tempfile::tempdir()?;
    let src = resolve_model("org/tiny-sd", &online_options(cache.path(), &endpoint))?;
    assert!(!src.is_offline());
    assert_eq!(src.commit(), Some(HASH));
    let snapshot = cache
        .path()
        .join("models--org--tiny-sd/snapshots")
        .join(HASH);
    assert_eq!(src.root(), snapshot);
    // The branch -> commit ref is recorded for later offline runs.
    assert_eq!(
        std::fs::read_to_string(cache.path().join("models--org--tiny-sd/refs/main"))?,
        HASH
    );
    // Existence and listings come from the repo's file list.
    assert!(src.exists("unet/config.json"));
    assert!(!src.exists("unet/missing.json"));
    assert_eq!(
        src.list("unet")?,
        vec![
            "config.json".to_string(),
            "diffusion_pytorch_model.fp16.safetensors".to_string()
        ]
    );

    let config = src.file("unet/config.json")?;
    assert_eq!(config, snapshot.join("unet/config.json"));
    assert_eq!(std::fs::read_to_string(&config)?, "{\"sample_size\": 8}");
    let weights = find_weights(&src, "unet", "diffusion_pytorch_model", None)?;
    assert_eq!(std::fs::read(&weights[0])?, b"half weights");

    let err = src.file("unet/missing.json").expect_err("not in repo");
    assert!(matches!(err, HubError::NotInRepo { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
    let err = find_weights(&src, "vae", "diffusion_pytorch_model", None).expect_err("pickle");
    assert!(matches!(err, HubError::PickleOnly { .. }), "{err:?}");

    // What was downloaded is now usable offline.
    let offline = resolve_model("org/tiny-sd", &HubOptions::offline(cache.path()))?;
    assert_eq!(offline.commit(), Some(HASH));
    assert_eq!(
        std::fs::read_to_string(offline.file("unet/config.json")?)?,
        "{\"sample_size\": 8}"
    );
    assert!(offline.file("model_index.json").is_err());
    Ok(())
}

#[test]
fn online_errors_and_cache_fallback() -> Result<()> {
    without_proxy();
    let endpoint = fake_hub::serve("org/tiny-sd", HASH, vec![]);
    let cache = tempfile::tempdir()?;
    // Unknown repo: 404 with a hint about spelling; nothing cached.
    let err = resolve_model("org/other", &online_options(cache.path(), &endpoint))
        .expect_err("unknown repo");
    assert!(matches!(err, HubError::Api { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("org/other") && msg.contains("spelling"),
        "{msg}"
    );

    // Unreachable hub: falls back to the cached snapshot.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", l.local_addr()?)
    };
    fake_repo(
        cache.path(),
        "org/cached",
        Some("main"),
        HASH,
        &[("model_index.json", "{}")],
    )?;
    let src = resolve_model("org/cached", &online_options(cache.path(), &closed))?;
    assert!(src.is_offline());
    assert!(src.file("model_index.json").is_ok());
    // ... and errors when nothing is cached, suggesting offline mode.
    let err = resolve_model("org/nothing", &online_options(cache.path(), &closed))
        .expect_err("unreachable");
    let msg = err.to_string();
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    Ok(())
}
