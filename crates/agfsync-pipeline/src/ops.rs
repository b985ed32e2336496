//! Whole-run operations: status, merging shards, exports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use agfsync_store::pickapic::{write_pickapic, PickapicRow};
use agfsync_store::{resolve_inside, write_file_atomic, Store, StoreCounts};

use crate::config::{RunConfig, CONFIG_FILE};
use crate::error::{PipelineError, Result};
use crate::run::Run;
use crate::shard::Shard;

/// One stage's progress.
#[derive(Clone, Debug, Serialize)]
pub struct StageStatus {
    /// Stage name.
    pub stage: String,
    /// Units done.
    pub done: usize,
    /// Units expected (as far as known now).
    pub total: usize,
    /// A short remark.
    pub note: String,
}

/// What `agfsync status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct RunStatus {
    /// The run directory.
    pub dir: PathBuf,
    /// The shard shown.
    pub shard: String,
    /// Per-stage progress, in loop order.
    pub stages: Vec<StageStatus>,
    /// Raw row counts.
    pub counts: StoreCounts,
}

/// Reads a run's progress (from the store only: truthful after a crash).
pub fn status(run: &Run) -> Result<RunStatus> {
    let c = run.store.counts()?;
    let expected_prompts = crate::stages::configured_prompts(run)
        .map(|p| p.iter().filter(|p| run.shard.owns(p.ord)).count())
        .unwrap_or(c.prompts);
    let n = run.config.generate.candidates;
    let metrics = run.config.score.metrics.len();
    let trainings = run.store.trainings()?;
    let train = trainings.iter().find(|t| t.name == "dpo");
    let s = |stage: &str, done, total, note: String| StageStatus {
        stage: stage.into(),
        done,
        total,
        note,
    };
    let stages = vec![
        s("prompts", c.prompts, expected_prompts, String::new()),
        s(
            "questions",
            c.prompts_with_questions,
            c.prompts,
            format!("{} questions", c.questions),
        ),
        s(
            "generate",
            c.candidates,
            c.prompts * n,
            format!("{n} per prompt"),
        ),
        s(
            "score",
            c.scores + c.score_errors,
            c.candidates * metrics,
            if c.score_errors > 0 {
                format!("{} failed", c.score_errors)
            } else {
                String::new()
            },
        ),
        s(
            "pairs",
            c.pairs + c.pairs_skipped,
            c.prompts_with_candidates,
            format!(
                "{} pairs, {} prompts without a pair",
                c.pairs, c.pairs_skipped
            ),
        ),
        s(
            "train",
            train.map_or(0, |t| t.steps_done as usize),
            run.config.train.steps,
            train.map_or_else(|| "not started".into(), |t| t.status.clone()),
        ),
        s(
            "eval",
            c.eval_items,
            crate::eval::benchmark(run).map_or(0, |(_, items)| items.len())
                * run
                    .config
                    .eval
                    .models
                    .iter()
                    .filter(|m| *m != "tuned" || train.is_some_and(|t| t.status == "done"))
                    .count(),
            format!("images of {}", run.config.eval.models.join(", ")),
        ),
    ];
    Ok(RunStatus {
        dir: run.store_dir.clone(),
        shard: run.shard.to_string(),
        stages,
        counts: c,
    })
}

/// What [`merge`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MergeReport {
    /// Shards merged.
    pub shards: usize,
    /// Prompts added.
    pub prompts: usize,
    /// Candidates added.
    pub candidates: usize,
    /// Score rows added.
    pub scores: usize,
    /// Evaluation images added.
    pub eval_items: usize,
    /// Evaluation score rows added.
    pub eval_scores: usize,
}

/// Merges shard stores (directories holding an `agfsync.db`) into the run at
/// `out` (which must have been initialised with the same config). Refuses a
/// shard whose data fingerprint (models, prompts, generation, metrics)
/// differs from the run's. Pairs are recomputed afterwards by the pairs stage.
pub fn merge(out: &Path, shards: &[PathBuf]) -> Result<MergeReport> {
    let run = Run::open(out, Shard::ALL)?;
    let fp = run.config.data_fingerprint();
    let mut store = run.store;
    let mut report = MergeReport::default();
    for dir in shards {
        let shard = Store::open(dir)?;
        let theirs = shard.meta("data_fingerprint")?;
        if theirs.as_deref() != Some(fp.as_str()) {
            return Err(PipelineError::Invalid(format!(
                "{}: made with a different config than {} (data fingerprint {} vs {fp}): \
                 different models, prompts, generation settings or metrics cannot be merged",
                dir.display(),
                out.join(CONFIG_FILE).display(),
                theirs.unwrap_or_else(|| "none".into())
            )));
        }
        let n = store.merge_from(&shard)?;
        report.shards += 1;
        report.prompts += n.prompts;
        report.candidates += n.candidates;
        report.scores += n.scores;
        report.eval_items += n.eval_items;
        report.eval_scores += n.eval_scores;
    }
    Ok(report)
}

/// Writes the run's pairs as Pick-a-Pic Parquet (winner in `jpg_0`).
pub fn export_pairs(run: &Run, path: &Path) -> Result<usize> {
    let prompts: BTreeMap<String, String> = run
        .store
        .prompts()?
        .into_iter()
        .map(|p| (p.pid, p.text))
        .collect();
    let cands: BTreeMap<(String, i64), String> = run
        .store
        .candidates(None)?
        .into_iter()
        .map(|c| ((c.pid, c.idx), c.image))
        .collect();
    let mut rows = Vec::new();
    for p in run
        .store
        .pairs()?
        .into_iter()
        .filter(|p| p.status == "pair")
    {
        let read = |idx: Option<i64>| -> Result<Vec<u8>> {
            let rel = idx
                .and_then(|i| cands.get(&(p.pid.clone(), i)))
                .ok_or_else(|| {
                    PipelineError::Invalid(format!("pair {} names a missing candidate", p.pid))
                })?;
            let path = resolve_inside(&run.store_dir, rel)?;
            std::fs::read(&path).map_err(|e| PipelineError::io(&path, e))
        };
        rows.push(PickapicRow {
            caption: prompts.get(&p.pid).cloned().unwrap_or_default(),
            jpg_0: read(p.winner)?,
            jpg_1: read(p.loser)?,
            label_0: 1.0,
            prompt_id: p.pid.clone(),
            reason: p.reason.to_string(),
        });
    }
    write_pickapic(path, &rows)?;
    Ok(rows.len())
}

/// Writes candidates with their scores as JSON lines (one per candidate).
pub fn export_candidates_jsonl(run: &Run, path: &Path) -> Result<usize> {
    let prompts: BTreeMap<String, String> = run
        .store
        .prompts()?
        .into_iter()
        .map(|p| (p.pid, p.text))
        .collect();
    let mut scores: BTreeMap<(String, i64), serde_json::Map<String, serde_json::Value>> =
        BTreeMap::new();
    for s in run.store.scores()? {
        scores.entry((s.pid.clone(), s.idx)).or_default().insert(
            s.metric.clone(),
            serde_json::json!({"value": s.value, "version": s.version, "error": s.error}),
        );
    }
    let mut out = String::new();
    let cands = run.store.candidates(None)?;
    for c in &cands {
        let line = serde_json::json!({
            "prompt": prompts.get(&c.pid),
            "candidate": c,
            "scores": scores.get(&(c.pid.clone(), c.idx)),
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    write_file_atomic(path, out.as_bytes())?;
    Ok(cands.len())
}

/// Writes an image-folder view for people: `DIR/<prompt order>/` holding
/// each candidate as `<rank>-c<index>.png` (best first, winner and loser
/// marked) and a `prompt.txt`. Only this folder is written.
pub fn export_image_folder(run: &Run, dir: &Path) -> Result<usize> {
    let pairs: BTreeMap<String, agfsync_store::PairRecord> = run
        .store
        .pairs()?
        .into_iter()
        .map(|p| (p.pid.clone(), p))
        .collect();
    let mut n = 0;
    for p in run.store.prompts()? {
        let cands = run.store.candidates(Some(&p.pid))?;
        if cands.is_empty() {
            continue;
        }
        let sub = dir.join(format!("{:05}", p.ord));
        let pair = pairs.get(&p.pid);
        let combined = |idx: i64| -> Option<f64> {
            pair?.reason["candidates"]
                .as_array()?
                .iter()
                .find(|c| c["candidate"] == idx)?["combined"]
                .as_f64()
        };
        let mut order: Vec<_> = cands.iter().collect();
        order.sort_by(|a, b| {
            combined(b.idx)
                .unwrap_or(f64::NEG_INFINITY)
                .total_cmp(&combined(a.idx).unwrap_or(f64::NEG_INFINITY))
        });
        for (rank, c) in order.iter().enumerate() {
            let tag = match pair {
                Some(q) if q.winner == Some(c.idx) => "-winner",
                Some(q) if q.loser == Some(c.idx) => "-loser",
                _ => "",
            };
            let from = resolve_inside(&run.store_dir, &c.image)?;
            let bytes = std::fs::read(&from).map_err(|e| PipelineError::io(&from, e))?;
            write_file_atomic(&sub.join(format!("{rank}-c{}{tag}.png", c.idx)), &bytes)?;
            n += 1;
        }
        write_file_atomic(
            &sub.join("prompt.txt"),
            format!(
                "{}\n{}\n",
                p.text,
                pair.map(|q| q.status.as_str()).unwrap_or("")
            )
            .as_bytes(),
        )?;
    }
    Ok(n)
}

/// Loads a run's config without opening its store (for `--help`-like
/// checks and `agfsync merge`'s validation).
pub fn load_config(dir: &Path) -> Result<RunConfig> {
    RunConfig::load(&dir.join(CONFIG_FILE))
}
