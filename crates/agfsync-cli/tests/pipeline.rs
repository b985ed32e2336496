//! End-to-end tests of the run commands on the tiny preset: the whole loop,
//! crash safety (processes aborted at the worst points and SIGKILLed, then
//! rerun), shards merged back, exports, and bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use agfsync_store::{pickapic::read_pickapic, Store};
use anyhow::{ensure, Context, Result};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agfsync"));
    c.env("HF_HUB_OFFLINE", "1")
        .env_remove("AGFSYNC_FAULT")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("RANK")
        .env_remove("JOB_COMPLETION_INDEX");
    c
}

fn agfsync(args: &[&str]) -> Result<Output> {
    Ok(bin().args(args).output()?)
}

fn ok(out: &Output) -> Result<()> {
    ensure!(
        out.status.success(),
        "agfsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// `agfsync init --preset tiny` with a smaller loop: 3 prompts, 3
/// candidates each, batches of 2 (so batches straddle prompts), 2 steps,
/// 4 training steps with a checkpoint every 2.
fn init_small(dir: &Path) -> Result<()> {
    ok(&agfsync(&["init", s(dir), "--preset", "tiny"])?)?;
    let cfg = dir.join("agfsync.toml");
    let text = std::fs::read_to_string(&cfg)?
        .replace("limit = 4", "limit = 3")
        .replace("candidates = 4", "candidates = 3")
        .replace("steps = 4\nguidance_scale", "steps = 2\nguidance_scale")
        .replace("batch_size = 4", "batch_size = 2");
    std::fs::write(&cfg, text)?;
    Ok(())
}

/// Everything a run decides, as comparable text: candidate rows and the
/// bytes of their files, score values, pairs, and the trained weights.
fn fingerprint(dir: &Path, with_training: bool) -> Result<BTreeMap<String, String>> {
    let store = Store::open(dir)?;
    store.check_integrity()?;
    let mut out = BTreeMap::new();
    for c in store.candidates(None)? {
        let img = std::fs::read(dir.join(&c.image))?;
        let lat = std::fs::read(dir.join(&c.latents))?;
        out.insert(
            format!("cand {} {}", c.pid, c.idx),
            format!(
                "{} {:?} {} {}",
                c.seed,
                c.noise_seed,
                agfsync_store::prompt_id("", &format!("{img:?}")),
                agfsync_store::prompt_id("", &format!("{lat:?}"))
            ),
        );
    }
    for sc in store.scores()? {
        out.insert(
            format!("score {} {} {}", sc.pid, sc.idx, sc.metric),
            format!("{:?} {:?}", sc.value, sc.error),
        );
    }
    for p in store.pairs()? {
        out.insert(
            format!("pair {}", p.pid),
            format!("{} {:?} {:?}", p.status, p.winner, p.loser),
        );
    }
    if with_training {
        let w = std::fs::read(dir.join("train/dpo/pytorch_lora_weights.safetensors"))?;
        out.insert(
            "lora".into(),
            agfsync_store::prompt_id("", &format!("{w:?}")),
        );
    }
    Ok(out)
}

/// The `metrics` of a run's built-in benchmark results.
fn eval_metrics(dir: &Path) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("eval/builtin/results.json"),
    )?)?;
    Ok(v["metrics"].clone())
}

/// One uninterrupted reference run, shared by the tests that compare with it.
fn reference() -> Result<PathBuf> {
    static REF: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let lock = REF.get_or_init(|| Mutex::new(None));
    let mut guard = lock.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    if let Some(p) = guard.as_ref() {
        return Ok(p.clone());
    }
    let dir = tempfile::tempdir()?.keep().join("reference");
    init_small(&dir)?;
    ok(&agfsync(&["run", s(&dir)])?)?;
    *guard = Some(dir.clone());
    Ok(dir)
}

#[test]
fn run_completes_every_stage_and_status_says_so() -> Result<()> {
    let dir = reference()?;
    let out = agfsync(&["status", s(&dir), "--json"])?;
    ok(&out)?;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let stages = st["stages"].as_array().context("stages")?;
    assert_eq!(stages.len(), 7);
    for stage in stages {
        assert_eq!(stage["done"], stage["total"], "{stage}");
        assert!(stage["total"].as_u64().unwrap_or(0) > 0, "{stage}");
    }
    assert_eq!(st["counts"]["candidates"], 9);
    // clip, aesthetic and vqa (the tiny LLaVA answering the built-in questions).
    assert_eq!(st["counts"]["scores"], 27);
    assert!(dir
        .join("train/dpo/pytorch_lora_weights.safetensors")
        .is_file());
    assert!(dir.join("logs/agfsync.log").is_file());
    // The eval stage compared base and tuned on 3 prompts (init_small
    // limits both prompt sets), and the report holds both models' images
    // and no external URL.
    assert_eq!(st["counts"]["eval_items"], 6);
    let html = std::fs::read_to_string(dir.join("report.html"))?;
    assert_eq!(html.matches("data:image/png;base64,").count(), 6);
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(html.contains("tuned") && html.contains("<svg"));
    // A second run redoes nothing.
    let again = agfsync(&["run", s(&dir), "--json"])?;
    ok(&again)?;
    let rep: serde_json::Value = serde_json::from_slice(&again.stdout)?;
    assert_eq!(rep["generate"]["done"], 0, "{rep}");
    assert_eq!(rep["score"]["done"], 0, "{rep}");
    assert_eq!(rep["train"]["skipped"], 1, "{rep}");
    assert_eq!(rep["eval"]["done"], 0, "{rep}");
    Ok(())
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result() -> Result<()> {
    let reference = reference()?;
    let dir = tempfile::tempdir()?;
    let dir = dir.path().join("crashy");
    init_small(&dir)?;
    // Abort (no cleanup, like SIGKILL) at the worst points: files written
    // but rows not committed, and mid-training after a checkpoint.
    for point in [
        "prompts.before_commit",
        "questions.after_commit:2",
        "generate.before_commit:2",
        "generate.after_commit:1",
        "score.before_commit:2",
        "pairs.before_commit",
        "train.step:3",
        // The checkpoint at step 4 and the LoRA export, each killed
        // between writing and renaming into place.
        "checkpoint.before_rename",
        "checkpoint.before_latest",
        "checkpoint.between_renames",
        "export.before_rename",
        "eval.before_commit:2",
        "eval_score.before_commit:2",
    ] {
        let out = bin()
            .args(["run", s(&dir)])
            .env("AGFSYNC_FAULT", point)
            .output()?;
        assert!(!out.status.success(), "{point}: the fault did not fire");
        // After each crash the store opens and status answers.
        ok(&agfsync(&["status", s(&dir)])?)?;
    }
    // A real SIGKILL from outside, while the run is working.
    let mut child = bin().args(["run", s(&dir)]).spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = child.kill();
    let _ = child.wait();
    ok(&agfsync(&["run", s(&dir)])?)?;
    assert_eq!(fingerprint(&dir, true)?, fingerprint(&reference, true)?);
    // The evaluation, interrupted twice, ends with the same numbers.
    assert_eq!(eval_metrics(&dir)?, eval_metrics(&reference)?);
    Ok(())
}

#[test]
fn two_shards_merged_equal_one_unsharded_run() -> Result<()> {
    let reference = reference()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("sharded");
    init_small(&dir)?;
    for shard in ["0/2", "1/2"] {
        ok(&agfsync(&["run", s(&dir), "--shard", shard])?)?;
    }
    // The second shard through the Slurm array environment instead of the flag.
    let out = bin()
        .args(["status", s(&dir), "--json"])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()?;
    ok(&out)?;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(st["shard"], "1/2");
    assert_eq!(st["counts"]["prompts"], 1);
    ok(&agfsync(&[
        "merge",
        s(&dir),
        s(&dir.join("shards/0-of-2")),
        s(&dir.join("shards/1-of-2")),
    ])?)?;
    ok(&agfsync(&["pairs", s(&dir)])?)?;
    assert_eq!(fingerprint(&dir, false)?, fingerprint(&reference, false)?);

    // Evaluation in shards too: the shards above already evaluated `base`
    // (no training yet, so `tuned` was left out); after training on the
    // merged run, each shard evaluates `tuned` on its items, and the merged
    // summary equals the unsharded run's, number for number.
    ok(&agfsync(&["train", s(&dir)])?)?;
    for shard in ["0/2", "1/2"] {
        ok(&agfsync(&["eval", s(&dir), "--shard", shard])?)?;
    }
    let out = agfsync(&[
        "merge",
        s(&dir),
        s(&dir.join("shards/0-of-2")),
        s(&dir.join("shards/1-of-2")),
    ])?;
    ok(&out)?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("evaluation images"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&agfsync(&["eval", s(&dir)])?)?;
    let (mine, theirs) = (eval_metrics(&dir)?, eval_metrics(&reference)?);
    assert!(mine.as_array().is_some_and(|m| !m.is_empty()));
    assert_eq!(mine, theirs);
    Ok(())
}

#[test]
fn merge_refuses_a_shard_of_another_config() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    init_small(&a)?;
    init_small(&b)?;
    let cfg = b.join("agfsync.toml");
    let text = std::fs::read_to_string(&cfg)?.replace("seed = 0", "seed = 1");
    std::fs::write(&cfg, text)?;
    ok(&agfsync(&["prompts", s(&b), "--shard", "0/2"])?)?;
    let out = agfsync(&["merge", s(&a), s(&b.join("shards/0-of-2"))])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different config"), "{err}");
    Ok(())
}

#[test]
fn exported_pairs_read_back_as_pickapic() -> Result<()> {
    let dir = reference()?;
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("pairs.parquet");
    let jsonl = tmp.path().join("candidates.jsonl");
    let view = tmp.path().join("view");
    ok(&agfsync(&[
        "export",
        s(&dir),
        "--pairs",
        s(&file),
        "--candidates",
        s(&jsonl),
        "--images",
        s(&view),
    ])?)?;
    let rows = read_pickapic(&file)?;
    let store = Store::open(&dir)?;
    let pairs: Vec<_> = store
        .pairs()?
        .into_iter()
        .filter(|p| p.status == "pair")
        .collect();
    assert_eq!(rows.len(), pairs.len());
    let prompts = store.prompts()?;
    for (row, pair) in rows.iter().zip(&pairs) {
        assert_eq!(row.label_0, 1.0);
        assert_eq!(row.prompt_id, pair.pid);
        let text = &prompts
            .iter()
            .find(|p| p.pid == pair.pid)
            .context("prompt")?
            .text;
        assert_eq!(&row.caption, text);
        let winner = store
            .candidates(Some(&pair.pid))?
            .into_iter()
            .find(|c| Some(c.idx) == pair.winner)
            .context("winner")?;
        assert_eq!(row.jpg_0, std::fs::read(dir.join(&winner.image))?);
    }
    assert_eq!(std::fs::read_to_string(&jsonl)?.lines().count(), 9);
    assert!(std::fs::read_dir(&view)?.count() == 3);
    Ok(())
}

#[test]
fn a_misspelt_config_key_is_named_with_its_line_and_nothing_is_written() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("r");
    init_small(&dir)?;
    let cfg = dir.join("agfsync.toml");
    let text = std::fs::read_to_string(&cfg)?.replace("min_gap = 0.0", "min_gapp = 0.0");
    std::fs::write(&cfg, text)?;
    let out = agfsync(&["run", s(&dir)])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min_gapp") && err.contains("line"), "{err}");
    assert!(!dir.join("images").exists());
    Ok(())
}

#[test]
fn bad_shard_specs_and_missing_runs_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("r");
    init_small(&dir)?;
    let out = agfsync(&["run", s(&dir), "--shard", "3/2"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("3/2"));
    let out = agfsync(&["status", s(&tmp.path().join("nope"))])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("agfsync init"));
    // init refuses to overwrite a run.
    let out = agfsync(&["init", s(&dir)])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    Ok(())
}

/// Waits (up to two minutes) until the run at `dir` has written an image.
fn wait_for_first_image(dir: &Path) {
    let images = dir.join("images");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline
        && !std::fs::read_dir(&images).is_ok_and(|mut d| d.next().is_some())
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Moves `file` aside and back, like a model file deleted and restored.
struct Hidden(PathBuf);

impl Hidden {
    fn new(file: PathBuf) -> Result<Self> {
        std::fs::rename(&file, file.with_extension("hidden"))?;
        Ok(Self(file))
    }
}

impl Drop for Hidden {
    fn drop(&mut self) {
        let _ = std::fs::rename(self.0.with_extension("hidden"), &self.0);
    }
}

/// A clean failure: non-zero exit (not a signal), no panic, and the message
/// names `needle`.
fn clean_failure(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "{needle} not named: {err}");
}

#[test]
fn model_files_that_disappear_mid_run_are_named_and_the_rerun_completes() -> Result<()> {
    let reference = reference()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("vanishing");
    init_small(&dir)?;
    let clip = dir.join("models/tiny-clip/model.safetensors");
    let unet = dir.join("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors");
    let unet_copy = tmp.path().join("unet.safetensors");
    std::fs::copy(&unet, &unet_copy)?;

    // The scorer's weights are gone, and the UNet's file is deleted while
    // the run is generating with it: generation finishes (the loaded model
    // does not need the file again), then the score stage stops with an
    // error naming the folder and the file it looked for.
    let hidden = Hidden::new(clip)?;
    let child = bin()
        .args(["run", s(&dir)])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    wait_for_first_image(&dir);
    std::fs::remove_file(&unet)?;
    let out = child.wait_with_output()?;
    clean_failure(&out, "tiny-clip");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.safetensors"), "{err}");
    ok(&agfsync(&["status", s(&dir)])?)?;
    let store = Store::open(&dir)?;
    store.check_integrity()?;
    assert_eq!(store.candidates(None)?.len(), 9, "generation completed");
    assert!(store.scores()?.is_empty(), "nothing scored without CLIP");
    drop(store);

    // CLIP back, the UNet still gone: scoring and pairs finish, training
    // stops naming the file, and status says so.
    drop(hidden);
    let out = agfsync(&["run", s(&dir)])?;
    clean_failure(&out, "diffusion_pytorch_model.safetensors");
    let status = agfsync(&["status", s(&dir), "--json"])?;
    ok(&status)?;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let stage = |name: &str| {
        status["stages"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["stage"] == name))
            .cloned()
            .unwrap_or_default()
    };
    for name in ["score", "pairs"] {
        let st = stage(name);
        assert!(st["total"].as_u64() > Some(0), "{status}");
        assert_eq!(st["done"], st["total"], "{status}");
    }
    assert_eq!(stage("train")["done"], 0, "{status}");

    // Restored, the run completes to exactly the uninterrupted result.
    std::fs::copy(&unet_copy, &unet)?;
    ok(&agfsync(&["run", s(&dir)])?)?;
    assert_eq!(fingerprint(&dir, true)?, fingerprint(&reference, true)?);
    assert_eq!(eval_metrics(&dir)?, eval_metrics(&reference)?);
    Ok(())
}

#[test]
fn ctrl_c_stops_cleanly_and_a_full_disk_is_reported_then_both_resume() -> Result<()> {
    let reference = reference()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("interrupted");
    init_small(&dir)?;
    // A full disk while writing an image: a clear error naming the file.
    let out = bin()
        .args(["run", s(&dir)])
        .env("AGFSYNC_FAULT", "enospc@generate.image")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No space left on device") && err.contains(".png"),
        "{err}"
    );
    ok(&agfsync(&["status", s(&dir)])?)?;
    // Ctrl-C (SIGINT) once some candidates exist: the stage stops after the
    // unit in flight and says how to continue.
    let child = bin()
        .args(["run", s(&dir)])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    wait_for_first_image(&dir);
    ok(&Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .output()?)?;
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert!(
            err.contains("interrupted") && err.contains("rerun"),
            "{err}"
        );
    }
    ok(&agfsync(&["run", s(&dir)])?)?;
    assert_eq!(fingerprint(&dir, true)?, fingerprint(&reference, true)?);
    Ok(())
}

#[test]
fn eval_on_a_tifa_file_scores_every_caption_and_reports_element_types() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("tifa");
    init_small(&dir)?;
    std::fs::write(
        dir.join("tifa.json"),
        r#"[
  {"id": "c1", "caption": "two red apples on a table", "question": "are there apples?",
   "choices": ["yes", "no"], "answer": "yes", "element_type": "object", "element": "apples"},
  {"id": "c1", "caption": "two red apples on a table", "question": "how many apples are there?",
   "choices": ["1", "2", "3"], "answer": "2", "element_type": "counting", "element": "two"},
  {"id": "c2", "caption": "a dog on a sofa", "question": "what animal is this?",
   "choices": ["dog", "cat"], "answer": "dog", "element_type": "animal", "element": "dog"}
]"#,
    )?;
    let cfg = dir.join("agfsync.toml");
    let text = std::fs::read_to_string(&cfg)?
        .replace("benchmark = \"builtin\"", "benchmark = \"tifa:tifa.json\"")
        .replace(
            "metrics = [\"clip\", \"aesthetic\", \"vqa\", \"hps\"]\nresamples",
            "metrics = [\"vqa\"]\nresamples",
        );
    std::fs::write(&cfg, text)?;
    // No training yet: only the base model, with a note saying why.
    let out = agfsync(&["eval", s(&dir), "--json"])?;
    ok(&out)?;
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(rep["eval"]["done"], 4, "2 images and their 2 scores: {rep}");
    assert!(rep["eval"]["notes"].to_string().contains("tuned"), "{rep}");
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("eval/tifa/results.json"),
    )?)?;
    let vqa = &results["metrics"][0];
    assert_eq!(vqa["metric"], "vqa");
    let mean = vqa["means"]["base"].as_f64().context("mean")?;
    assert!((0.0..=100.0).contains(&mean), "{results}");
    ok(&agfsync(&["report", s(&dir)])?)?;
    let html = std::fs::read_to_string(dir.join("report.html"))?;
    assert!(html.contains("TIFA by element type"));
    for et in ["object", "counting", "animal"] {
        assert!(
            html.contains(et),
            "element type {et} missing from the report"
        );
    }
    // A broken benchmark file is named with its entry and field.
    std::fs::write(dir.join("tifa.json"), r#"[{"id": "c1", "caption": "x"}]"#)?;
    let bad = tempfile::tempdir()?;
    let dir2 = bad.path().join("r");
    init_small(&dir2)?;
    std::fs::copy(dir.join("tifa.json"), dir2.join("tifa.json"))?;
    std::fs::copy(&cfg, dir2.join("agfsync.toml"))?;
    let out = agfsync(&["eval", s(&dir2)])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tifa.json") && err.contains("entry 0"),
        "{err}"
    );
    Ok(())
}

/// A minimal OpenAI-compatible chat-completions server: answers prompt
/// requests with a fixed list (one near duplicate) and question requests
/// with six questions and one malformed entry. Returns its base URL.
fn fake_llm_server() -> Result<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let body = String::from_utf8_lossy(&body);
            let content = if body.contains("\"name\":\"questions\"") {
                serde_json::json!({"questions": [
                    {"question": "Is there a fox?", "element_type": "animal", "element": "fox", "answer": "yes"},
                    {"question": "Is the fox red?", "element_type": "color", "element": "red", "answer": "yes"},
                    {"question": "Is there snow on the ground?", "element_type": "object", "element": "snow", "answer": "yes"},
                    {"question": "Does a lighthouse stand there?", "element_type": "object", "element": "lighthouse", "answer": "yes"},
                    {"question": "Are rocks visible at the coast?", "element_type": "location", "element": "coast", "answer": "yes"},
                    {"question": "Is it dusk?", "element_type": "other", "element": "dusk", "answer": "yes"},
                    {"question": "Broken entry without an element", "answer": "yes"}
                ]})
            } else {
                serde_json::json!({"prompts": [
                    "a red fox sleeping in fresh snow",
                    "a red fox sleeping in fresh snow!",
                    "a lighthouse on a rocky coast at dusk"
                ]})
            };
            let reply = serde_json::json!({
                "id": "x", "object": "chat.completion", "model": "fake-llm",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content.to_string()}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}
            })
            .to_string();
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    Ok(format!("http://{addr}/v1"))
}

#[test]
fn prompts_and_questions_authored_by_an_llm_server_reach_the_run_and_the_key_stays_secret(
) -> Result<()> {
    let url = fake_llm_server()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("llm");
    init_small(&dir)?;
    let cfg = dir.join("agfsync.toml");
    let key = "sk-agfsync-planted-secret-1234567890";
    let text = std::fs::read_to_string(&cfg)?
        .replace(
            "[run]\n",
            &format!(
                "[llm]\nbase_url = \"{url}\"\nmodel = \"fake-llm\"\napi_key_env = \"AGFSYNC_TEST_KEY\"\n\
                 structured_output = true\nmax_retries = 0\n\n[run]\n"
            ),
        )
        .replace(
            "source = \"builtin\"\nlimit = 3",
            "source = \"llm\"\nlimit = 0",
        )
        .replace(
            "[questions]\n",
            "[questions]\nllm = { grounding = \"off\", calls_per_prompt = 1 }\n",
        )
        .replace("[questions]\nllm", "[prompts.llm]\ncategories = [\"animals\", \"landscapes\"]\n\n[questions]\nllm")
        .replace("source = \"builtin\"\n\n[generate]", "source = \"llm\"\n\n[generate]");
    std::fs::write(&cfg, text)?;
    let mut outputs = String::new();
    for stage in ["prompts", "questions", "status"] {
        let out = bin()
            .args([stage, s(&dir), "--json"])
            .env("AGFSYNC_TEST_KEY", key)
            .output()?;
        outputs.push_str(&String::from_utf8_lossy(&out.stdout));
        outputs.push_str(&String::from_utf8_lossy(&out.stderr));
        ensure!(
            out.status.success(),
            "{stage}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let store = Store::open(&dir)?;
    let prompts = store.prompts()?;
    // Two categories, each answered with three prompts of which one is a
    // near duplicate.
    assert_eq!(prompts.len(), 4, "{prompts:?}");
    assert!(
        prompts.iter().all(|p| p.source.starts_with("llm:")),
        "{prompts:?}"
    );
    for p in &prompts {
        let qs = store.questions(&p.pid)?;
        assert_eq!(qs.len(), 6, "the malformed entry is dropped: {qs:?}");
        assert!(qs.iter().all(|q| q.answer.as_deref() == Some("yes")));
    }
    // The key is in no output, config, store or log.
    assert!(!outputs.contains(key));
    for f in ["agfsync.toml", "agfsync.db", "logs/agfsync.log"] {
        let bytes = std::fs::read(dir.join(f)).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(key),
            "{f} holds the key"
        );
    }
    Ok(())
}

#[test]
fn an_in_process_random_llm_still_authors_valid_records_into_the_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("local");
    init_small(&dir)?;
    let cfg = dir.join("agfsync.toml");
    let text = std::fs::read_to_string(&cfg)?
        .replace(
            "[run]\n",
            "[local_llm]\nmodel = \"models/tiny-qwen2\"\n\n[run]\n",
        )
        // Near duplicates judged by the tiny BERT sentence embedder.
        .replace(
            "source = \"builtin\"\nlimit = 3",
            "source = \"llm\"\nlimit = 0\nembedder = \"models/tiny-bert\"",
        )
        .replace(
            "[questions]\n",
            "[prompts.llm]\ncategories = [\"animals\"]\nper_call = 3\nmax_tokens = 200\n\n\
             [questions]\nllm = { grounding = \"off\", calls_per_prompt = 1, per_call = 3, \
             max_tokens = 200, min_questions = 1 }\n",
        )
        .replace(
            "source = \"builtin\"\n\n[generate]",
            "source = \"llm\"\n\n[generate]",
        );
    std::fs::write(&cfg, text)?;
    ok(&agfsync(&["prompts", s(&dir)])?)?;
    ok(&agfsync(&["questions", s(&dir)])?)?;
    let store = Store::open(&dir)?;
    let prompts = store.prompts()?;
    // A random-weight model writes nonsense, but constrained decoding makes
    // it valid records.
    assert!(!prompts.is_empty());
    for p in &prompts {
        assert!(
            p.source.starts_with("llm:") && p.source.contains("local:"),
            "{p:?}"
        );
        assert!(!p.text.trim().is_empty());
    }
    assert_eq!(store.prompts_with_questions()?.len(), prompts.len());
    // A rerun authors nothing new.
    let out = agfsync(&["prompts", s(&dir), "--json"])?;
    ok(&out)?;
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(rep["prompts"]["done"], 0, "{rep}");
    Ok(())
}

#[test]
fn a_model_evaluated_against_its_own_copy_shows_no_difference() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("same");
    init_small(&dir)?;
    let cfg = dir.join("agfsync.toml");
    // A pipeline folder as the second model: the base itself, so every
    // paired difference must be exactly zero and every prompt a tie.
    let text = std::fs::read_to_string(&cfg)?
        .replace(
            "models = [\"base\", \"tuned\"]",
            "models = [\"base\", \"copy=models/tiny-sd15\", \"unet=models/tiny-sd15/unet\"]",
        )
        .replace(
            "metrics = [\"clip\", \"aesthetic\", \"vqa\", \"hps\"]\nresamples",
            "metrics = [\"clip\", \"hps\"]\nresamples",
        );
    std::fs::write(&cfg, text)?;
    ok(&agfsync(&["eval", s(&dir)])?)?;
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("eval/builtin/results.json"),
    )?)?;
    let metrics = results["metrics"].as_array().context("metrics")?;
    assert_eq!(metrics.len(), 2);
    for m in metrics {
        let c = &m["comparison"];
        assert_eq!(c["n"], 3, "{m}");
        assert_eq!(c["mean_diff"], 0.0, "{m}");
        assert_eq!(c["win_rate"], 0.5, "{m}");
        assert_eq!(m["means"]["base"], m["means"]["copy"], "{m}");
        // The base's own UNet folder swapped into the base pipeline.
        assert_eq!(m["means"]["base"], m["means"]["unet"], "{m}");
    }
    // A model path that does not exist is named.
    let text = std::fs::read_to_string(&cfg)?.replace("models/tiny-sd15/unet\"]", "models/nope\"]");
    std::fs::write(&cfg, text)?;
    let out = agfsync(&["eval", s(&dir)])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("models/nope"));
    Ok(())
}

#[test]
fn a_fully_fine_tuned_unet_is_evaluated_as_tuned() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("full");
    init_small(&dir)?;
    let cfg = dir.join("agfsync.toml");
    let text = std::fs::read_to_string(&cfg)?
        .replace("lora_rank = 4\n", "full = true\n")
        .replace(
            "metrics = [\"clip\", \"aesthetic\", \"vqa\", \"hps\"]\nresamples",
            "metrics = [\"clip\"]\nresamples",
        );
    assert!(text.contains("full = true"), "no [train] section to edit");
    std::fs::write(&cfg, text)?;
    ok(&agfsync(&["run", s(&dir)])?)?;
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("eval/builtin/results.json"),
    )?)?;
    let m = &results["metrics"][0];
    assert_eq!(m["metric"], "clip", "{m}");
    assert_eq!(m["counts"]["tuned"], 3, "{m}");
    assert_eq!(m["comparison"]["n"], 3, "{m}");
    // The tuned images come from the trained UNet, not the base one.
    let store = Store::open(&dir)?;
    let items = store.eval_items("builtin")?;
    let image = |model: &str| -> Result<Vec<u8>> {
        let it = items
            .iter()
            .find(|i| i.model == model && i.item == 0)
            .context("no eval item")?;
        Ok(std::fs::read(dir.join(&it.image))?)
    };
    assert_ne!(image("base")?, image("tuned")?);
    Ok(())
}
