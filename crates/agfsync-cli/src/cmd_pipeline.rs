//! The run commands: `init`, `run`, `status`, one command per stage
//! (`prompts`, `questions`, `generate`, `score`, `pairs`), `merge` and
//! `export`. They are thin: the work is in `agfsync-pipeline`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use agfsync_pipeline::config::Preset;
use agfsync_pipeline::ops;
use agfsync_pipeline::{run_stage, Progress, Run, Shard, Stage, StageContext};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::ProgressBar;

use crate::common::progress;

/// Options shared by the commands that work on a run.
#[derive(Args, Debug, Clone)]
pub struct RunTarget {
    /// The run directory (made by `agfsync init`).
    pub dir: PathBuf,
    /// Work on shard I of N of the prompts (`I/N`, 0-based); each shard
    /// writes its own store under DIR/shards/I-of-N. Without it, the shard
    /// comes from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT,
    /// JOB_COMPLETION_INDEX/AGFSYNC_SHARD_COUNT or RANK/WORLD_SIZE when set.
    #[arg(long)]
    pub shard: Option<String>,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

impl RunTarget {
    fn shard(&self) -> Result<Shard> {
        if let Some(s) = &self.shard {
            return Ok(Shard::parse(s)?);
        }
        Ok(Shard::from_env(|k| std::env::var(k).ok())?.unwrap_or(Shard::ALL))
    }
}

/// Arguments of `agfsync init`.
#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    /// The run directory to create.
    pub dir: PathBuf,
    /// Starting point: tiny (random-weight models written into the run; CPU,
    /// minutes), sd15 or sdxl (hub models).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
}

/// Arguments of `agfsync run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Run directory. Omit it to run the embedded tiny default in a fresh
    /// directory under ./runs.
    pub dir: Option<PathBuf>,
    /// Work on shard I of N (see `agfsync status --help`).
    #[arg(long)]
    pub shard: Option<String>,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// Set when no directory was given: the embedded tiny default.
    #[arg(skip)]
    pub embedded_default: bool,
}

/// For `agfsync run` without a directory: picks (and creates) a fresh
/// directory under ./runs for the embedded tiny default, before logging
/// starts so the run's log file can live in it.
pub fn choose_default_dir(a: &mut RunArgs) {
    if a.dir.is_some() {
        return;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let d = PathBuf::from("runs").join(format!("tiny-{stamp}"));
    let _ = std::fs::create_dir_all(&d);
    a.dir = Some(d);
    a.embedded_default = true;
}

/// Arguments of `agfsync merge`.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The run to merge into (initialised with the same agfsync.toml).
    pub out: PathBuf,
    /// Shard stores (e.g. RUN/shards/0-of-2) or runs to merge.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}

/// Arguments of `agfsync export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The run directory.
    pub dir: PathBuf,
    /// Write the pairs as Pick-a-Pic Parquet (caption, jpg_0 = winner,
    /// jpg_1 = loser, label_0 = 1).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Write candidates with their scores as JSON lines.
    #[arg(long)]
    pub candidates: Option<PathBuf>,
    /// Write an image-folder view (one folder per prompt, best first).
    #[arg(long)]
    pub images: Option<PathBuf>,
}

/// Arguments of `agfsync report`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The run directory (after `agfsync eval`).
    pub dir: PathBuf,
    /// Output file (default: DIR/report.html).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Prompts shown in the image grid.
    #[arg(long, default_value_t = 16)]
    pub grid: usize,
}

/// `agfsync report`.
pub fn report(a: &ReportArgs) -> Result<()> {
    let r = Run::open(&a.dir, Shard::ALL)?;
    let rep = agfsync_pipeline::eval::build_report(&r, a.grid)?;
    if rep.metrics.is_empty() {
        bail!(
            "no evaluation results in {}: run `agfsync eval {}` first",
            a.dir.display(),
            a.dir.display()
        );
    }
    let html = agfsync_eval::report::render_html(&rep);
    let out = a.out.clone().unwrap_or_else(|| a.dir.join("report.html"));
    agfsync_store::write_file_atomic(&out, html.as_bytes())?;
    println!("{}", out.display());
    Ok(())
}

/// A progress bar per stage.
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    quiet: bool,
}

impl Progress for Bars {
    fn begin(&self, stage: &str, total: u64) {
        if self.quiet {
            return;
        }
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(progress(total, stage));
        }
    }
    fn advance(&self, n: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(b) = b.as_ref() {
                b.inc(n);
            }
        }
    }
    fn end(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        }
    }
}

/// The Ctrl-C flag: the first Ctrl-C asks the stage to stop after the unit
/// in flight; a second one exits at once (the store stays consistent: units
/// are transactions).
fn cancel_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let _ = ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting now; rerun the command to continue");
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: stopping after the unit in flight (press again to exit now)");
        });
        flag
    })
    .clone()
}

fn run_stages(run: &mut Run, stages: &[Stage], quiet: bool, json: bool) -> Result<()> {
    let flag = cancel_flag();
    let bars = Bars {
        bar: Mutex::new(None),
        quiet,
    };
    let ctx = StageContext {
        progress: &bars,
        cancel: &flag,
    };
    let mut reports = serde_json::Map::new();
    for &stage in stages {
        let rep =
            run_stage(run, stage, &ctx).with_context(|| format!("stage `{}`", stage.name()))?;
        if !json {
            eprintln!(
                "{:>10}: {} done, {} already done{}",
                stage.name(),
                rep.done,
                rep.skipped,
                if rep.notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", rep.notes.join("; "))
                }
            );
        }
        reports.insert(stage.name().into(), serde_json::to_value(&rep)?);
    }
    if json {
        println!("{}", serde_json::Value::Object(reports));
    }
    Ok(())
}

/// `agfsync init`.
pub fn init(a: &InitArgs) -> Result<()> {
    let preset: Preset = a.preset.parse()?;
    let rep = Run::init(&a.dir, preset)?;
    eprintln!(
        "created {} ({} preset){}",
        rep.config.display(),
        a.preset,
        if rep.models.is_empty() {
            String::new()
        } else {
            format!("; tiny models in {}", a.dir.join("models").display())
        }
    );
    eprintln!("next: agfsync run {}", a.dir.display());
    Ok(())
}

/// `agfsync run`.
pub fn run(a: &RunArgs, quiet: bool) -> Result<()> {
    let Some(dir) = a.dir.clone() else {
        bail!("no run directory");
    };
    if a.embedded_default {
        eprintln!(
            "agfsync run: no run directory given, so this is the embedded tiny default: \
             random-weight models (the images are noise by design), the built-in prompts, \
             CPU, a few minutes.\nrun directory: {}",
            dir.display()
        );
        Run::init(&dir, Preset::Tiny)?;
    }
    let target = RunTarget {
        dir: dir.clone(),
        shard: a.shard.clone(),
        json: a.json,
    };
    let mut r = Run::open(&dir, target.shard()?)?;
    run_stages(&mut r, &Stage::ALL, quiet, a.json)?;
    if r.shard == Shard::ALL && r.config.eval.enabled {
        let rep = agfsync_pipeline::eval::build_report(&r, 16)?;
        if !rep.metrics.is_empty() {
            let out = r.root.join("report.html");
            agfsync_store::write_file_atomic(
                &out,
                agfsync_eval::report::render_html(&rep).as_bytes(),
            )?;
            if !a.json {
                eprintln!("report: {}", out.display());
            }
        }
    }
    if !a.json {
        print_status(&r)?;
        eprintln!("done: {}", r.store_dir.display());
    }
    Ok(())
}

/// One stage's command.
pub fn stage(t: &RunTarget, stage: Stage, quiet: bool) -> Result<()> {
    let mut r = Run::open(&t.dir, t.shard()?)?;
    run_stages(&mut r, &[stage], quiet, t.json)
}

fn print_status(r: &Run) -> Result<()> {
    let s = ops::status(r)?;
    eprintln!("run {} (shard {})", s.dir.display(), s.shard);
    for st in &s.stages {
        let pct = if st.total == 0 {
            String::from("  -  ")
        } else {
            format!("{:>4.0}%", 100.0 * st.done as f64 / st.total as f64)
        };
        eprintln!(
            "  {:<10} {pct} {:>6}/{:<6} {}",
            st.stage, st.done, st.total, st.note
        );
    }
    Ok(())
}

/// `agfsync status`.
pub fn status(t: &RunTarget) -> Result<()> {
    let r = Run::open(&t.dir, t.shard()?)?;
    if t.json {
        println!("{}", serde_json::to_string(&ops::status(&r)?)?);
    } else {
        print_status(&r)?;
    }
    Ok(())
}

/// `agfsync merge`.
pub fn merge(a: &MergeArgs) -> Result<()> {
    let rep = ops::merge(&a.out, &a.shards)?;
    eprintln!(
        "merged {} store(s): {} prompts, {} candidates, {} scores, {} evaluation images and {} \
         evaluation scores added",
        rep.shards, rep.prompts, rep.candidates, rep.scores, rep.eval_items, rep.eval_scores,
    );
    if rep.eval_items > 0 {
        eprintln!(
            "run `agfsync eval {}` for the evaluation summary",
            a.out.display()
        );
    } else {
        eprintln!("run `agfsync pairs {}` next", a.out.display());
    }
    Ok(())
}

/// `agfsync export`.
pub fn export(a: &ExportArgs) -> Result<()> {
    if a.pairs.is_none() && a.candidates.is_none() && a.images.is_none() {
        bail!("nothing to export: give --pairs FILE.parquet, --candidates FILE.jsonl and/or --images DIR");
    }
    let r = Run::open(&a.dir, Shard::ALL)?;
    let inside = |p: &Path| -> Result<()> {
        // Exports go where the user says, but never over the store itself.
        if p.canonicalize().ok() == r.store.db_path().canonicalize().ok() {
            bail!("{} is the run store; choose another output", p.display());
        }
        Ok(())
    };
    if let Some(p) = &a.pairs {
        inside(p)?;
        let n = ops::export_pairs(&r, p)?;
        eprintln!("{n} pairs -> {}", p.display());
    }
    if let Some(p) = &a.candidates {
        inside(p)?;
        let n = ops::export_candidates_jsonl(&r, p)?;
        eprintln!("{n} candidates -> {}", p.display());
    }
    if let Some(p) = &a.images {
        let n = ops::export_image_folder(&r, p)?;
        eprintln!("{n} images -> {}", p.display());
    }
    Ok(())
}
