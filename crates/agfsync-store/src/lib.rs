//! The agfsync run store: everything one run of the AGFSync loop produces,
//! in one directory.
//!
//! * `agfsync.db`: a SQLite database (WAL mode) with the records of every
//!   stage: prompts, questions, candidates, scores, pairs, training runs,
//!   evaluations, and `meta` (schema version, the resolved config, model
//!   identities). Its schema is versioned ([`SCHEMA_VERSION`]) and migrated
//!   forward on open; a store from a newer agfsync is refused, not damaged.
//! * files beside it, named by the record that owns them
//!   (`images/<prompt id>/<index>.png`, `latents/<prompt id>/<index>.safetensors`).
//!
//! Crash safety rests on two rules. Files are written atomically (a temporary
//! file in the same directory, flushed, then renamed: [`write_file_atomic`]),
//! and a unit of work is done exactly when its rows are committed, in one
//! transaction, after its files are in place. A crash therefore loses at most
//! the unit in flight; its files, if any were written, are rewritten
//! identically by the rerun (generation is deterministic in the seeds).
//!
//! Prompt ids are content hashes ([`prompt_id`]), so shards of one run that
//! each hold a subset of the prompts merge ([`Store::merge_from`]) without
//! renumbering.

pub mod error;
pub mod pickapic;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::{Result, StoreError};

/// The schema version this build writes (and the newest it reads).
pub const SCHEMA_VERSION: i64 = 2;

/// The database's file name inside a run directory.
pub const DB_FILE: &str = "agfsync.db";

/// The migrations, in order: entry `i` takes a store from version `i` to
/// `i + 1`. Each runs in one transaction with the version bump.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE prompts (
        pid TEXT PRIMARY KEY,
        ord INTEGER NOT NULL,
        category TEXT NOT NULL,
        text TEXT NOT NULL,
        source TEXT NOT NULL
    );
    CREATE TABLE questions (
        pid TEXT NOT NULL REFERENCES prompts(pid),
        idx INTEGER NOT NULL,
        question TEXT NOT NULL,
        choices TEXT NOT NULL,
        answer TEXT,
        element_type TEXT,
        element TEXT,
        source TEXT NOT NULL,
        PRIMARY KEY (pid, idx)
    );
    CREATE TABLE question_sets (pid TEXT PRIMARY KEY REFERENCES prompts(pid), source TEXT NOT NULL);
    CREATE TABLE candidates (
        pid TEXT NOT NULL REFERENCES prompts(pid),
        idx INTEGER NOT NULL,
        model TEXT NOT NULL,
        scheduler TEXT NOT NULL,
        steps INTEGER NOT NULL,
        guidance REAL NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        seed INTEGER NOT NULL,
        noise_seed INTEGER,
        noise_ratio REAL NOT NULL,
        image TEXT NOT NULL,
        latents TEXT NOT NULL,
        PRIMARY KEY (pid, idx)
    );
    CREATE TABLE scores (
        pid TEXT NOT NULL,
        idx INTEGER NOT NULL,
        metric TEXT NOT NULL,
        value REAL,
        version TEXT NOT NULL,
        details TEXT NOT NULL,
        error TEXT,
        PRIMARY KEY (pid, idx, metric),
        FOREIGN KEY (pid, idx) REFERENCES candidates(pid, idx)
    );
    CREATE TABLE pairs (
        pid TEXT PRIMARY KEY REFERENCES prompts(pid),
        status TEXT NOT NULL,
        winner INTEGER,
        loser INTEGER,
        winner_score REAL,
        loser_score REAL,
        reason TEXT NOT NULL
    );
    CREATE TABLE trainings (
        name TEXT PRIMARY KEY,
        out TEXT NOT NULL,
        config TEXT NOT NULL,
        status TEXT NOT NULL,
        steps_done INTEGER NOT NULL,
        result TEXT
    );
    CREATE TABLE evaluations (
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        metric TEXT NOT NULL,
        value REAL NOT NULL,
        version TEXT NOT NULL,
        details TEXT NOT NULL,
        PRIMARY KEY (name, model, metric)
    );
    "#,
    // 1 -> 2: per-image evaluation records (the paired statistics need
    // per-prompt values, not only the aggregates in `evaluations`).
    r#"
    CREATE TABLE eval_items (
        bench TEXT NOT NULL,
        model TEXT NOT NULL,
        item INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        grp TEXT NOT NULL,
        seed INTEGER NOT NULL,
        image TEXT NOT NULL,
        PRIMARY KEY (bench, model, item)
    );
    CREATE TABLE eval_scores (
        bench TEXT NOT NULL,
        model TEXT NOT NULL,
        item INTEGER NOT NULL,
        metric TEXT NOT NULL,
        value REAL,
        version TEXT NOT NULL,
        details TEXT NOT NULL,
        error TEXT,
        PRIMARY KEY (bench, model, item, metric)
    );
    "#,
];

const INSERT_PROMPT: &str = "INSERT OR IGNORE INTO prompts (pid, ord, category, text, source)
     VALUES (?1, ?2, ?3, ?4, ?5)";

const SET_META: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2)
     ON CONFLICT(key) DO UPDATE SET value = excluded.value";

/// A prompt of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// Content id ([`prompt_id`] of category and text).
    pub pid: String,
    /// Position in the full prompt set (stable across shards).
    pub ord: i64,
    /// AGFSync category (empty when unknown).
    pub category: String,
    /// The prompt.
    pub text: String,
    /// Where it came from (`builtin`, a file name, an LLM run).
    pub source: String,
}

/// A question about a prompt (TIFA fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuestionRecord {
    /// The prompt.
    pub pid: String,
    /// Position among the prompt's questions.
    pub idx: i64,
    /// The question.
    pub question: String,
    /// Answer choices (`["yes", "no"]` for yes/no questions).
    pub choices: Vec<String>,
    /// The answer the prompt implies.
    pub answer: Option<String>,
    /// TIFA element type.
    pub element_type: Option<String>,
    /// The element asked about.
    pub element: Option<String>,
}

/// One generated image and what reproduces it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateRecord {
    /// The prompt.
    pub pid: String,
    /// Candidate index within the prompt (0 = clean prompt embedding).
    pub idx: i64,
    /// Model identity.
    pub model: String,
    /// Scheduler name.
    pub scheduler: String,
    /// Denoising steps.
    pub steps: i64,
    /// Guidance scale.
    pub guidance: f64,
    /// Image width in pixels.
    pub width: i64,
    /// Image height in pixels.
    pub height: i64,
    /// Seed of the initial latents.
    pub seed: u64,
    /// Seed of the prompt-embedding noise (`None` for the clean candidate).
    pub noise_seed: Option<u64>,
    /// Embedding-noise ratio.
    pub noise_ratio: f64,
    /// The PNG, relative to the run directory.
    pub image: String,
    /// The final latents (safetensors), relative to the run directory.
    pub latents: String,
}

/// One metric's score of one candidate (or why there is none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreRecord {
    /// The prompt.
    pub pid: String,
    /// The candidate.
    pub idx: i64,
    /// Metric name.
    pub metric: String,
    /// The value; `None` when scoring failed.
    pub value: Option<f64>,
    /// The scorer's version string.
    pub version: String,
    /// Secondary values.
    pub details: BTreeMap<String, f64>,
    /// Why scoring failed.
    pub error: Option<String>,
}

/// The pair chosen for a prompt, or why none was.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// The prompt.
    pub pid: String,
    /// `pair`, or why no pair: `tie`, `below_min_gap`, `too_few_candidates`,
    /// `missing_scores`.
    pub status: String,
    /// Winning candidate.
    pub winner: Option<i64>,
    /// Losing candidate.
    pub loser: Option<i64>,
    /// Combined score of the winner.
    pub winner_score: Option<f64>,
    /// Combined score of the loser.
    pub loser_score: Option<f64>,
    /// Why: the weights, the normalisation, every candidate's raw and
    /// normalised metrics and combined score (JSON).
    pub reason: serde_json::Value,
}

/// A training run recorded in the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// Name (the output folder's name).
    pub name: String,
    /// Output folder, relative to the run directory.
    pub out: String,
    /// The training config (JSON).
    pub config: serde_json::Value,
    /// `running`, `done` or `failed`.
    pub status: String,
    /// Optimizer steps completed.
    pub steps_done: i64,
    /// The exported weights, relative to the run directory.
    pub result: Option<String>,
}

/// One evaluation image: benchmark, model, item, its prompt and seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalItemRecord {
    /// Benchmark name.
    pub bench: String,
    /// Model name (`base`, `tuned`, ...).
    pub model: String,
    /// Item index within the benchmark.
    pub item: i64,
    /// The prompt.
    pub prompt: String,
    /// Group (HPSv2 style, TIFA caption id, or empty).
    pub grp: String,
    /// Seed of the initial latents (the same for every model).
    pub seed: u64,
    /// The image, relative to the run directory.
    pub image: String,
}

/// One metric of one evaluation image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalScoreRecord {
    /// Benchmark name.
    pub bench: String,
    /// Model name.
    pub model: String,
    /// Item index.
    pub item: i64,
    /// Metric.
    pub metric: String,
    /// The value (`None` when scoring failed).
    pub value: Option<f64>,
    /// Scorer version.
    pub version: String,
    /// Secondary values.
    pub details: BTreeMap<String, f64>,
    /// Why scoring failed.
    pub error: Option<String>,
}

/// Row counts per table: what `agfsync status` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCounts {
    /// Prompts.
    pub prompts: usize,
    /// Prompts with a question set.
    pub prompts_with_questions: usize,
    /// Questions.
    pub questions: usize,
    /// Candidates.
    pub candidates: usize,
    /// Prompts with at least one candidate.
    pub prompts_with_candidates: usize,
    /// Score rows with a value.
    pub scores: usize,
    /// Score rows recording a failure.
    pub score_errors: usize,
    /// Prompts with a chosen pair.
    pub pairs: usize,
    /// Prompts the pairs stage considered but gave no pair.
    pub pairs_skipped: usize,
    /// Training runs finished.
    pub trainings_done: usize,
    /// Evaluation rows.
    pub evaluations: usize,
    /// Evaluation images.
    pub eval_items: usize,
}

/// What [`Store::merge_from`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeCounts {
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

/// An open run store.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Connection,
}

/// The content id of a prompt: 16 hex digits of SHA-256 over category and
/// text, so the same prompt has the same id in every shard and every run.
pub fn prompt_id(category: &str, text: &str) -> String {
    let mut h = Sha256::new();
    h.update(category.as_bytes());
    h.update([0u8]);
    h.update(text.as_bytes());
    let d = h.finalize();
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| StoreError::io(path, e))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory is written and flushed to disk, then renamed over `path`. A
/// crash leaves either the old file or the new one, never a torn one.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        StoreError::io(path, e)
    })
}

/// Resolves a path stored in (or imported into) a run: it must be relative,
/// without `..`, and must not leave `root` through a symbolic link. Returns
/// the absolute path under `root`.
pub fn resolve_inside(root: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() {
        return Err(StoreError::Invalid(format!(
            "path `{rel}` must be relative to the run directory {}",
            root.display()
        )));
    }
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => {
                return Err(StoreError::Invalid(format!(
                    "path `{rel}` leaves the run directory {} (`..` or a prefix)",
                    root.display()
                )))
            }
        }
    }
    let full = root.join(p);
    // A symlink anywhere on the way could point outside: check what exists.
    if let (Ok(real_root), Ok(real)) = (root.canonicalize(), full.canonicalize()) {
        if !real.starts_with(&real_root) {
            return Err(StoreError::Invalid(format!(
                "path `{rel}` resolves to {} outside the run directory {} (a symbolic link)",
                real.display(),
                root.display()
            )));
        }
    }
    Ok(full)
}

fn json_text<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse_json<T: for<'de> Deserialize<'de> + Default>(text: &str) -> T {
    serde_json::from_str(text).unwrap_or_default()
}

impl Store {
    /// Opens the run store in `dir`, creating the directory and an empty
    /// store when there is none.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        Self::open_db(dir)
    }

    /// Opens an existing run store (an error naming `agfsync init` if `dir`
    /// holds none).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join(DB_FILE).is_file() {
            return Err(StoreError::NotARun(dir.to_path_buf()));
        }
        Self::open_db(dir)
    }

    fn open_db(dir: &Path) -> Result<Self> {
        let db_path = dir.join(DB_FILE);
        let e = |s| StoreError::sqlite(&db_path, s);
        let conn = Connection::open(&db_path).map_err(e)?;
        // WAL: readers (status) never block the writer, and a crash mid-
        // transaction rolls back on the next open.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(e)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(e)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(e)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(e)?;
        let mut store = Self {
            dir: dir.to_path_buf(),
            db_path,
            conn,
        };
        store.migrate()?;
        Ok(store)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |s| StoreError::sqlite(&self.db_path, s)
    }

    /// Runs a query and maps every row.
    fn query<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let mut st = self.conn.prepare(sql).map_err(self.err())?;
        let rows = st.query_map(params, map).map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())
    }

    /// Writes `rows` with one prepared statement in one transaction, with
    /// the statements `before` and `after` (when given) in the same
    /// transaction. Returns the number of rows changed.
    fn write_rows<T>(
        &mut self,
        before: Option<(&str, &[&dyn rusqlite::ToSql])>,
        sql: &str,
        rows: &[T],
        mut each: impl FnMut(&mut rusqlite::Statement<'_>, &T) -> rusqlite::Result<usize>,
        after: Option<(&str, &[&dyn rusqlite::ToSql])>,
    ) -> Result<usize> {
        let path = self.db_path.clone();
        let e = |s| StoreError::sqlite(&path, s);
        let tx = self.conn.transaction().map_err(e)?;
        if let Some((sql, params)) = before {
            tx.execute(sql, params).map_err(e)?;
        }
        let mut changed = 0;
        {
            let mut st = tx.prepare(sql).map_err(e)?;
            for r in rows {
                changed += each(&mut st, r).map_err(e)?;
            }
        }
        if let Some((sql, params)) = after {
            tx.execute(sql, params).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(changed)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err())?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(StoreError::NewerSchema {
                path: self.db_path.clone(),
                found: version,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let path = self.db_path.clone();
            let e = |s| StoreError::sqlite(&path, s);
            let tx = self.conn.transaction().map_err(e)?;
            tx.execute_batch(sql).map_err(e)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(e)?;
            tx.commit().map_err(e)?;
            tracing::debug!("run store migrated to schema {}", i + 1);
        }
        Ok(())
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// Reads a `meta` value.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.err())
    }

    /// Writes a `meta` value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(SET_META, params![key, value])
            .map(|_| ())
            .map_err(self.err())
    }

    /// Adds prompts (one transaction); prompts already present are kept as
    /// they are. Returns how many were new.
    pub fn insert_prompts(&mut self, prompts: &[PromptRecord]) -> Result<usize> {
        self.write_rows(
            None,
            INSERT_PROMPT,
            prompts,
            |st, p| st.execute(params![p.pid, p.ord, p.category, p.text, p.source]),
            None,
        )
    }

    /// Adds prompts and sets a `meta` value in one transaction: a unit of
    /// authoring (one category) is recorded as done exactly when its
    /// prompts are stored.
    pub fn insert_prompts_with_meta(
        &mut self,
        prompts: &[PromptRecord],
        key: &str,
        value: &str,
    ) -> Result<usize> {
        self.write_rows(
            None,
            INSERT_PROMPT,
            prompts,
            |st, p| st.execute(params![p.pid, p.ord, p.category, p.text, p.source]),
            Some((SET_META, &[&key, &value])),
        )
    }

    /// Every prompt, in prompt-set order.
    pub fn prompts(&self) -> Result<Vec<PromptRecord>> {
        self.query(
            "SELECT pid, ord, category, text, source FROM prompts ORDER BY ord, pid",
            [],
            |r| {
                Ok(PromptRecord {
                    pid: r.get(0)?,
                    ord: r.get(1)?,
                    category: r.get(2)?,
                    text: r.get(3)?,
                    source: r.get(4)?,
                })
            },
        )
    }

    /// Stores the question set of one prompt (replacing any earlier one) in
    /// one transaction; `source` says what wrote it.
    pub fn set_questions(
        &mut self,
        pid: &str,
        questions: &[QuestionRecord],
        source: &str,
    ) -> Result<()> {
        self.write_rows(
            Some(("DELETE FROM questions WHERE pid = ?1", &[&pid])),
            "INSERT INTO questions (pid, idx, question, choices, answer, element_type, element, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            questions,
            |st, q| {
                st.execute(params![
                    pid,
                    q.idx,
                    q.question,
                    json_text(&q.choices),
                    q.answer,
                    q.element_type,
                    q.element,
                    source
                ])
            },
            Some((
                "INSERT INTO question_sets (pid, source) VALUES (?1, ?2)
                 ON CONFLICT(pid) DO UPDATE SET source = excluded.source",
                &[&pid, &source],
            )),
        )
        .map(|_| ())
    }

    /// Prompts that have a question set (possibly empty).
    pub fn prompts_with_questions(&self) -> Result<HashSet<String>> {
        Ok(self
            .query("SELECT pid FROM question_sets", [], |r| r.get(0))?
            .into_iter()
            .collect())
    }

    /// Prompts whose question set was dropped (source `dropped:...`, too
    /// few questions survived authoring): later stages skip them.
    pub fn dropped_prompts(&self) -> Result<HashSet<String>> {
        Ok(self
            .query(
                "SELECT pid FROM question_sets WHERE source LIKE 'dropped:%'",
                [],
                |r| r.get(0),
            )?
            .into_iter()
            .collect())
    }

    /// The questions of a prompt, in order.
    pub fn questions(&self, pid: &str) -> Result<Vec<QuestionRecord>> {
        self.query(
            "SELECT pid, idx, question, choices, answer, element_type, element
             FROM questions WHERE pid = ?1 ORDER BY idx",
            [pid],
            |r| {
                Ok(QuestionRecord {
                    pid: r.get(0)?,
                    idx: r.get(1)?,
                    question: r.get(2)?,
                    choices: parse_json(&r.get::<_, String>(3)?),
                    answer: r.get(4)?,
                    element_type: r.get(5)?,
                    element: r.get(6)?,
                })
            },
        )
    }

    /// Records candidates (one transaction: a unit of generation).
    pub fn insert_candidates(&mut self, candidates: &[CandidateRecord]) -> Result<()> {
        self.write_rows(
            None,
            "INSERT OR REPLACE INTO candidates
             (pid, idx, model, scheduler, steps, guidance, width, height, seed,
              noise_seed, noise_ratio, image, latents)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            candidates,
            |st, c| {
                st.execute(params![
                    c.pid,
                    c.idx,
                    c.model,
                    c.scheduler,
                    c.steps,
                    c.guidance,
                    c.width,
                    c.height,
                    c.seed as i64,
                    c.noise_seed.map(|s| s as i64),
                    c.noise_ratio,
                    c.image,
                    c.latents
                ])
            },
            None,
        )
        .map(|_| ())
    }

    /// Candidates, of one prompt or of all, ordered by prompt order and index.
    pub fn candidates(&self, pid: Option<&str>) -> Result<Vec<CandidateRecord>> {
        self.query(
            "SELECT c.pid, c.idx, c.model, c.scheduler, c.steps, c.guidance, c.width, c.height,
                    c.seed, c.noise_seed, c.noise_ratio, c.image, c.latents
             FROM candidates c JOIN prompts p ON p.pid = c.pid
             WHERE (?1 IS NULL OR c.pid = ?1) ORDER BY p.ord, c.pid, c.idx",
            [pid],
            |r| {
                Ok(CandidateRecord {
                    pid: r.get(0)?,
                    idx: r.get(1)?,
                    model: r.get(2)?,
                    scheduler: r.get(3)?,
                    steps: r.get(4)?,
                    guidance: r.get(5)?,
                    width: r.get(6)?,
                    height: r.get(7)?,
                    seed: r.get::<_, i64>(8)? as u64,
                    noise_seed: r.get::<_, Option<i64>>(9)?.map(|s| s as u64),
                    noise_ratio: r.get(10)?,
                    image: r.get(11)?,
                    latents: r.get(12)?,
                })
            },
        )
    }

    /// Stores scores (one transaction), replacing earlier scores of the
    /// same candidate and metric.
    pub fn upsert_scores(&mut self, scores: &[ScoreRecord]) -> Result<()> {
        self.write_rows(
            None,
            "INSERT OR REPLACE INTO scores (pid, idx, metric, value, version, details, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            scores,
            |st, s| {
                st.execute(params![
                    s.pid,
                    s.idx,
                    s.metric,
                    s.value,
                    s.version,
                    json_text(&s.details),
                    s.error
                ])
            },
            None,
        )
        .map(|_| ())
    }

    /// Every score row, ordered by prompt order, candidate and metric.
    pub fn scores(&self) -> Result<Vec<ScoreRecord>> {
        self.query(
            "SELECT s.pid, s.idx, s.metric, s.value, s.version, s.details, s.error
             FROM scores s JOIN prompts p ON p.pid = s.pid
             ORDER BY p.ord, s.pid, s.idx, s.metric",
            [],
            |r| {
                Ok(ScoreRecord {
                    pid: r.get(0)?,
                    idx: r.get(1)?,
                    metric: r.get(2)?,
                    value: r.get(3)?,
                    version: r.get(4)?,
                    details: parse_json(&r.get::<_, String>(5)?),
                    error: r.get(6)?,
                })
            },
        )
    }

    /// Replaces the whole pairs table (one transaction): pair selection is
    /// cheap and always recomputed from the scores.
    pub fn replace_pairs(&mut self, pairs: &[PairRecord]) -> Result<()> {
        self.write_rows(
            Some(("DELETE FROM pairs", &[])),
            "INSERT INTO pairs (pid, status, winner, loser, winner_score, loser_score, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            pairs,
            |st, p| {
                st.execute(params![
                    p.pid,
                    p.status,
                    p.winner,
                    p.loser,
                    p.winner_score,
                    p.loser_score,
                    p.reason.to_string()
                ])
            },
            None,
        )
        .map(|_| ())
    }

    /// Every pair record (chosen or skipped), in prompt order.
    pub fn pairs(&self) -> Result<Vec<PairRecord>> {
        self.query(
            "SELECT q.pid, q.status, q.winner, q.loser, q.winner_score, q.loser_score, q.reason
             FROM pairs q JOIN prompts p ON p.pid = q.pid ORDER BY p.ord, q.pid",
            [],
            |r| {
                Ok(PairRecord {
                    pid: r.get(0)?,
                    status: r.get(1)?,
                    winner: r.get(2)?,
                    loser: r.get(3)?,
                    winner_score: r.get(4)?,
                    loser_score: r.get(5)?,
                    reason: serde_json::from_str(&r.get::<_, String>(6)?)
                        .unwrap_or(serde_json::Value::Null),
                })
            },
        )
    }

    /// Records (or updates) a training run.
    pub fn upsert_training(&self, t: &TrainingRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO trainings (name, out, config, status, steps_done, result)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    t.name,
                    t.out,
                    t.config.to_string(),
                    t.status,
                    t.steps_done,
                    t.result
                ],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Every training run.
    pub fn trainings(&self) -> Result<Vec<TrainingRecord>> {
        self.query(
            "SELECT name, out, config, status, steps_done, result FROM trainings ORDER BY name",
            [],
            |r| {
                Ok(TrainingRecord {
                    name: r.get(0)?,
                    out: r.get(1)?,
                    config: serde_json::from_str(&r.get::<_, String>(2)?)
                        .unwrap_or(serde_json::Value::Null),
                    status: r.get(3)?,
                    steps_done: r.get(4)?,
                    result: r.get(5)?,
                })
            },
        )
    }

    /// Row counts per table.
    pub fn counts(&self) -> Result<StoreCounts> {
        let n = |sql: &str| -> Result<usize> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|v| v as usize)
                .map_err(self.err())
        };
        Ok(StoreCounts {
            prompts: n("SELECT COUNT(*) FROM prompts")?,
            prompts_with_questions: n("SELECT COUNT(*) FROM question_sets")?,
            questions: n("SELECT COUNT(*) FROM questions")?,
            candidates: n("SELECT COUNT(*) FROM candidates")?,
            prompts_with_candidates: n("SELECT COUNT(DISTINCT pid) FROM candidates")?,
            scores: n("SELECT COUNT(*) FROM scores WHERE value IS NOT NULL")?,
            score_errors: n("SELECT COUNT(*) FROM scores WHERE value IS NULL")?,
            pairs: n("SELECT COUNT(*) FROM pairs WHERE status = 'pair'")?,
            pairs_skipped: n("SELECT COUNT(*) FROM pairs WHERE status != 'pair'")?,
            trainings_done: n("SELECT COUNT(*) FROM trainings WHERE status = 'done'")?,
            evaluations: n("SELECT COUNT(*) FROM evaluations")?,
            eval_items: n("SELECT COUNT(*) FROM eval_items")?,
        })
    }

    /// Copies another store's prompts, questions, candidates (with their
    /// files) and scores into this one, in one transaction after the files
    /// are copied. Rows already here are kept; a candidate present in both
    /// with different generation settings is an error (the shards were not
    /// made by the same config). Pairs are not copied: rerun the pairs
    /// stage on the merged store.
    pub fn merge_from(&mut self, other: &Store) -> Result<MergeCounts> {
        let mut counts = MergeCounts::default();
        let prompts = other.prompts()?;
        let candidates = other.candidates(None)?;
        let scores = other.scores()?;
        let with_q = other.prompts_with_questions()?;
        let mut existing: BTreeMap<(String, i64), CandidateRecord> = self
            .candidates(None)?
            .into_iter()
            .map(|c| ((c.pid.clone(), c.idx), c))
            .collect();
        // Files first: a crash here leaves copies no row points to yet.
        let mut new_candidates = Vec::new();
        for c in &candidates {
            if let Some(mine) = existing.get(&(c.pid.clone(), c.idx)) {
                if mine != c {
                    return Err(StoreError::Invalid(format!(
                        "{}: candidate {}#{} differs from the one in {} (different models or \
                         generation settings); merge only shards of one run config",
                        other.dir.display(),
                        c.pid,
                        c.idx,
                        self.dir.display()
                    )));
                }
                continue;
            }
            for rel in [&c.image, &c.latents] {
                let from = resolve_inside(&other.dir, rel)?;
                let to = resolve_inside(&self.dir, rel)?;
                let bytes = std::fs::read(&from).map_err(|e| StoreError::io(&from, e))?;
                write_file_atomic(&to, &bytes)?;
            }
            new_candidates.push(c.clone());
            existing.insert((c.pid.clone(), c.idx), c.clone());
        }
        let mine: HashSet<String> = self.prompts()?.into_iter().map(|p| p.pid).collect();
        let my_q = self.prompts_with_questions()?;
        counts.prompts = prompts.iter().filter(|p| !mine.contains(&p.pid)).count();
        self.insert_prompts(&prompts)?;
        for pid in with_q.difference(&my_q) {
            let qs = other.questions(pid)?;
            let src: String = other
                .conn
                .query_row(
                    "SELECT source FROM question_sets WHERE pid = ?1",
                    [pid],
                    |r| r.get(0),
                )
                .map_err(other.err())?;
            self.set_questions(pid, &qs, &src)?;
        }
        counts.candidates = new_candidates.len();
        self.insert_candidates(&new_candidates)?;
        let have: HashSet<(String, i64, String)> = self
            .scores()?
            .into_iter()
            .map(|s| (s.pid, s.idx, s.metric))
            .collect();
        let new_scores: Vec<ScoreRecord> = scores
            .into_iter()
            .filter(|s| !have.contains(&(s.pid.clone(), s.idx, s.metric.clone())))
            .collect();
        counts.scores = new_scores.len();
        self.upsert_scores(&new_scores)?;
        self.merge_evaluations_from(other, &mut counts)?;
        Ok(counts)
    }

    /// Names of the benchmarks with evaluation images.
    pub fn eval_benches(&self) -> Result<Vec<String>> {
        self.query(
            "SELECT DISTINCT bench FROM eval_items ORDER BY bench",
            [],
            |r| r.get(0),
        )
    }

    /// The evaluation part of [`Store::merge_from`]: a shard's evaluation
    /// images (files first, then rows) and their scores. An item both
    /// stores hold must be the same (same prompt, seed and image path).
    fn merge_evaluations_from(&mut self, other: &Store, counts: &mut MergeCounts) -> Result<()> {
        for bench in other.eval_benches()? {
            let mine: BTreeMap<(String, i64), EvalItemRecord> = self
                .eval_items(&bench)?
                .into_iter()
                .map(|i| ((i.model.clone(), i.item), i))
                .collect();
            let mut new_items = Vec::new();
            for it in other.eval_items(&bench)? {
                if let Some(m) = mine.get(&(it.model.clone(), it.item)) {
                    if *m != it {
                        return Err(StoreError::Invalid(format!(
                            "{}: evaluation item {} of model `{}` on `{bench}` differs from the \
                             one in {}; merge only shards of one run config",
                            other.dir.display(),
                            it.item,
                            it.model,
                            self.dir.display()
                        )));
                    }
                    continue;
                }
                let from = resolve_inside(&other.dir, &it.image)?;
                let to = resolve_inside(&self.dir, &it.image)?;
                let bytes = std::fs::read(&from).map_err(|e| StoreError::io(&from, e))?;
                write_file_atomic(&to, &bytes)?;
                new_items.push(it);
            }
            counts.eval_items += new_items.len();
            self.insert_eval_items(&new_items)?;
            let have: HashSet<(String, i64, String)> = self
                .eval_scores(&bench)?
                .into_iter()
                .map(|s| (s.model, s.item, s.metric))
                .collect();
            let new_scores: Vec<EvalScoreRecord> = other
                .eval_scores(&bench)?
                .into_iter()
                .filter(|s| !have.contains(&(s.model.clone(), s.item, s.metric.clone())))
                .collect();
            counts.eval_scores += new_scores.len();
            self.upsert_eval_scores(&new_scores)?;
        }
        Ok(())
    }

    /// Records evaluation images (one transaction).
    pub fn insert_eval_items(&mut self, items: &[EvalItemRecord]) -> Result<()> {
        self.write_rows(
            None,
            "INSERT OR REPLACE INTO eval_items (bench, model, item, prompt, grp, seed, image)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            items,
            |st, i| {
                st.execute(params![
                    i.bench,
                    i.model,
                    i.item,
                    i.prompt,
                    i.grp,
                    i.seed as i64,
                    i.image
                ])
            },
            None,
        )
        .map(|_| ())
    }

    /// Evaluation images of a benchmark, by model then item.
    pub fn eval_items(&self, bench: &str) -> Result<Vec<EvalItemRecord>> {
        self.query(
            "SELECT bench, model, item, prompt, grp, seed, image FROM eval_items
             WHERE bench = ?1 ORDER BY model, item",
            [bench],
            |r| {
                Ok(EvalItemRecord {
                    bench: r.get(0)?,
                    model: r.get(1)?,
                    item: r.get(2)?,
                    prompt: r.get(3)?,
                    grp: r.get(4)?,
                    seed: r.get::<_, i64>(5)? as u64,
                    image: r.get(6)?,
                })
            },
        )
    }

    /// Stores evaluation scores (one transaction).
    pub fn upsert_eval_scores(&mut self, scores: &[EvalScoreRecord]) -> Result<()> {
        self.write_rows(
            None,
            "INSERT OR REPLACE INTO eval_scores (bench, model, item, metric, value, version, details, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            scores,
            |st, s| {
                st.execute(params![
                    s.bench,
                    s.model,
                    s.item,
                    s.metric,
                    s.value,
                    s.version,
                    json_text(&s.details),
                    s.error
                ])
            },
            None,
        )
        .map(|_| ())
    }

    /// Evaluation scores of a benchmark.
    pub fn eval_scores(&self, bench: &str) -> Result<Vec<EvalScoreRecord>> {
        self.query(
            "SELECT bench, model, item, metric, value, version, details, error FROM eval_scores
             WHERE bench = ?1 ORDER BY model, item, metric",
            [bench],
            |r| {
                Ok(EvalScoreRecord {
                    bench: r.get(0)?,
                    model: r.get(1)?,
                    item: r.get(2)?,
                    metric: r.get(3)?,
                    value: r.get(4)?,
                    version: r.get(5)?,
                    details: parse_json(&r.get::<_, String>(6)?),
                    error: r.get(7)?,
                })
            },
        )
    }

    /// Records an aggregate evaluation result.
    pub fn set_evaluation(
        &self,
        name: &str,
        model: &str,
        metric: &str,
        value: f64,
        version: &str,
        details: &serde_json::Value,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO evaluations (name, model, metric, value, version, details)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![name, model, metric, value, version, details.to_string()],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Checks the database file's integrity (SQLite's `quick_check`).
    pub fn check_integrity(&self) -> Result<()> {
        let r: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(self.err())?;
        if r == "ok" {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!(
                "{}: integrity check failed: {r}",
                self.db_path.display()
            )))
        }
    }
}
