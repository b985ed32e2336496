//! Fault injection for the crash tests: `AGFSYNC_FAULT=<point>[:<n>]` makes
//! the process abort (no unwinding, no destructors, no flushes: what SIGKILL
//! or a power cut does to a process) the `n`-th time (default 1st) it
//! reaches the named point. Points sit where a crash hurts most: after a
//! unit's files are written and before its rows are committed.
//!
//! Reading one environment variable per unit costs nothing next to a UNet
//! batch; without the variable the hook does nothing.
//!
//! The points, by stage: `prompts.before_commit`, `questions.after_commit`,
//! `generate.before_commit`, `generate.after_commit`, `score.before_commit`,
//! `pairs.before_commit`, `train.step` (after each optimizer step),
//! `checkpoint.before_rename` (a checkpoint's files written under its
//! temporary name), `checkpoint.between_renames` (the same step saved again:
//! the old copy moved aside, the new one not yet in place),
//! `checkpoint.before_latest` (the new checkpoint in place, `latest` not yet
//! updated), `export.before_rename` (an exported LoRA or UNet written under
//! its temporary name), `eval.before_commit`, `eval_score.before_commit`; and
//! `enospc@generate.image` for [`disk_full`].
//!
//! It is its own crate so that the trainer (`agfsync-dpo`) and the pipeline
//! share one counter and one syntax.

use std::sync::atomic::{AtomicUsize, Ordering};

static HITS: AtomicUsize = AtomicUsize::new(0);

/// Aborts the process if `AGFSYNC_FAULT` names `point` and this is the
/// requested hit.
pub fn point(name: &str) {
    let Ok(spec) = std::env::var("AGFSYNC_FAULT") else {
        return;
    };
    let (target, nth) = match spec.split_once(':') {
        Some((t, n)) => (t, n.parse::<usize>().unwrap_or(1)),
        None => (spec.as_str(), 1),
    };
    if target != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("AGFSYNC_FAULT: aborting at {name} (hit {nth})");
        std::process::abort();
    }
}

/// A write that fails as a full disk does (`ENOSPC`) when `AGFSYNC_FAULT`
/// is `enospc@<point>`; `Ok` otherwise.
pub fn disk_full(name: &str) -> std::io::Result<()> {
    match std::env::var("AGFSYNC_FAULT") {
        Ok(spec) if spec.strip_prefix("enospc@") == Some(name) => {
            Err(std::io::Error::from_raw_os_error(28))
        }
        _ => Ok(()),
    }
}
