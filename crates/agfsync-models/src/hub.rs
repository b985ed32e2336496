//! Where model files come from: a local folder, or a Hugging Face Hub repo
//! resolved through the huggingface_hub cache (downloading on demand when
//! online).
//!
//! A model is named by a *spec*: either an existing local directory (a
//! diffusers pipeline folder or a transformers model folder) or a hub repo id
//! such as `org/name` or `org/name@revision`.  [`resolve_model`] turns a spec
//! into a [`ModelSource`], from which callers fetch individual files with
//! [`ModelSource::file`] and locate safetensors weights with [`find_weights`].
//!
//! The cache layout is the one huggingface_hub uses, so models downloaded by
//! Python tools are found here and vice versa:
//!
//! ```text
//! {cache}/models--{org}--{name}/refs/{revision}        -> commit hash
//! {cache}/models--{org}--{name}/snapshots/{hash}/...   -> files (symlinks into blobs/)
//! {cache}/models--{org}--{name}/blobs/{etag}
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};

/// Default branch used when a repo id has no `@revision`.
pub const DEFAULT_REVISION: &str = "main";

/// Errors raised while locating model files.  Every message names the file or
/// folder involved and says how to fix the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The spec is neither an existing folder nor a valid hub repo id.
    #[error(
        "`{spec}` is neither an existing local folder nor a valid Hugging Face repo id ({reason}); \
         pass the path of a diffusers/transformers model folder, or a repo id like `org/name` \
         or `org/name@revision`"
    )]
    InvalidSpec {
        /// The spec as given.
        spec: String,
        /// Why it is not a valid repo id.
        reason: String,
    },

    /// A relative file path requested from a model is malformed.
    #[error("invalid file path `{path}` inside a model: {reason}")]
    InvalidPath {
        /// The relative path requested.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Offline and the requested repo revision has no cached snapshot.
    #[error(
        "model `{repo_id}` (revision `{revision}`) is not an existing local folder and is not in the \
         Hugging Face cache, and downloads are disabled (offline mode). Looked at:\n{}\n\
         Fix: run once while online (unset HF_HUB_OFFLINE) so it gets downloaded, pass a local model \
         folder instead, or set HF_HUB_CACHE to the cache directory that holds it",
        fmt_paths(.looked_at)
    )]
    NotCached {
        /// Hub repo id.
        repo_id: String,
        /// Requested revision (branch, tag or commit).
        revision: String,
        /// Every path that was checked.
        looked_at: Vec<PathBuf>,
    },

    /// Offline and one file of a cached snapshot is missing.
    #[error(
        "`{file}` of model `{repo_id}` (revision `{revision}`) is not in the Hugging Face cache \
         (looked at {}) and downloads are disabled (offline mode). Fix: run once while online \
         (unset HF_HUB_OFFLINE) so it gets downloaded, or pass a local model folder instead",
        .looked_at.display()
    )]
    FileNotCached {
        /// Hub repo id.
        repo_id: String,
        /// Requested revision.
        revision: String,
        /// Relative path of the file in the repo.
        file: String,
        /// Where the file was expected.
        looked_at: PathBuf,
    },

    /// A file is missing from a local model folder.
    #[error("missing file {}: {hint}", .path.display())]
    MissingFile {
        /// The missing path.
        path: PathBuf,
        /// How to fix it.
        hint: String,
    },

    /// The hub repo exists but has no such file at this revision.
    #[error(
        "`{file}` is not a file of hub repo `{repo_id}` at revision `{revision}`{}",
        fmt_nearby(.nearby)
    )]
    NotInRepo {
        /// Hub repo id.
        repo_id: String,
        /// Requested revision.
        revision: String,
        /// Relative path requested.
        file: String,
        /// Files of the same folder, to help spot a typo.
        nearby: Vec<String>,
    },

    /// The hub could not be queried and nothing usable is cached.
    #[error(
        "`{repo_id}` is not an existing local folder, and the Hugging Face Hub could not be \
         queried for it (revision `{revision}`): {source}. Nothing usable is cached either (looked at:\n{}\n). {}",
        fmt_paths(.looked_at),
        api_hint(.source)
    )]
    Api {
        /// Hub repo id.
        repo_id: String,
        /// Requested revision.
        revision: String,
        /// Cache paths that were checked for a fallback.
        looked_at: Vec<PathBuf>,
        /// Underlying hf-hub error (shown in the message, so not chained).
        source: Box<ApiError>,
    },

    /// Downloading one file failed.
    #[error(
        "downloading `{file}` of `{repo_id}` (revision `{revision}`) into {} failed: {source}. {}",
        .cache_dir.display(),
        api_hint(.source)
    )]
    Download {
        /// Hub repo id.
        repo_id: String,
        /// Requested revision.
        revision: String,
        /// Relative file path.
        file: String,
        /// Cache directory used.
        cache_dir: PathBuf,
        /// Underlying hf-hub error (shown in the message, so not chained).
        source: Box<ApiError>,
    },

    /// No safetensors weights with the expected names exist.
    #[error(
        "no safetensors weights in {location}: looked for {}; files present: {}",
        .looked_for.join(", "),
        fmt_present(.present)
    )]
    WeightsNotFound {
        /// Human-readable folder description.
        location: String,
        /// File names tried, in order of preference.
        looked_for: Vec<String>,
        /// Files that are there.
        present: Vec<String>,
    },

    /// Only pickle (`.bin`/`.ckpt`) weights exist.
    #[error(
        "{location} only holds pickle weights ({}); agfsync requires safetensors (pickle files can \
         run arbitrary code and are not supported). Convert once with:\n  {convert}\n\
         then pass the converted folder",
        .files.join(", ")
    )]
    PickleOnly {
        /// Human-readable folder description.
        location: String,
        /// The pickle files found.
        files: Vec<String>,
        /// A Python command that converts the model to safetensors.
        convert: String,
    },

    /// A sharded weights index file is malformed.
    #[error(
        "invalid sharded-weights index {}: {reason}; re-download the model or re-save it with \
         `save_pretrained(..., safe_serialization=True)`",
        .path.display()
    )]
    InvalidIndex {
        /// Path of the `*.safetensors.index.json` file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A filesystem operation failed.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn fmt_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| format!("  - {}", p.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn fmt_nearby(nearby: &[String]) -> String {
    if nearby.is_empty() {
        String::new()
    } else {
        format!(" (files in the same folder: {})", nearby.join(", "))
    }
}

fn fmt_present(present: &[String]) -> String {
    if present.is_empty() {
        "none (the folder is missing or empty)".to_string()
    } else {
        present.join(", ")
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// How hub repos are resolved: cache location, offline mode, credentials.
///
/// Build it explicitly (tests, embedding) or with [`HubOptions::from_env`],
/// which follows huggingface_hub's environment variables.
#[derive(Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache directory (the folder holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// Never touch the network; use cached snapshots only.
    pub offline: bool,
    /// Access token for gated/private repos.
    pub token: Option<String>,
    /// Hub endpoint; `None` means <https://huggingface.co>.
    pub endpoint: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubOptions {
    /// Offline options over an explicit cache directory, no token.
    pub fn offline(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            offline: true,
            token: None,
            endpoint: None,
            progress: false,
        }
    }

    /// Options from the process environment, following huggingface_hub:
    ///
    /// * cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`,
    ///   where `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else
    ///   `~/.cache/huggingface`;
    /// * offline: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to
    ///   `1`/`true`/`yes`/`on`;
    /// * token: `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`), else the file at
    ///   `HF_TOKEN_PATH`, else `$HF_HOME/token`;
    /// * endpoint: `HF_ENDPOINT`;
    /// * progress bars unless `HF_HUB_DISABLE_PROGRESS_BARS` is true.
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Same as [`HubOptions::from_env`] with environment lookups done through
    /// `env` (so it can be tested without touching the process environment).
    /// Empty values count as unset. The token file is read from disk.
    pub fn from_lookup(env: impl Fn(&str) -> Option<String>) -> Self {
        let var = |key: &str| env(key).filter(|v| !v.trim().is_empty());
        let home = var("HOME")
            .or_else(|| var("USERPROFILE"))
            .map(PathBuf::from);
        let expand = |value: String| -> PathBuf {
            match (value.strip_prefix("~/"), &home) {
                (Some(rest), Some(home)) => home.join(rest),
                _ if value == "~" => home.clone().unwrap_or_else(|| PathBuf::from(value)),
                _ => PathBuf::from(value),
            }
        };
        let hf_home = match var("HF_HOME") {
            Some(v) => expand(v),
            None => {
                let base = match var("XDG_CACHE_HOME") {
                    Some(xdg) => expand(xdg),
                    None => match &home {
                        Some(home) => home.join(".cache"),
                        None => PathBuf::from(".cache"),
                    },
                };
                base.join("huggingface")
            }
        };
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(&expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE")
            .or_else(|| var("TRANSFORMERS_OFFLINE"))
            .is_some_and(|v| is_truthy(&v));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(&expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        let endpoint = var("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string());
        let progress = !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_truthy(&v));
        Self {
            cache_dir,
            offline,
            token,
            endpoint,
            progress,
        }
    }
}

fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

// ---------------------------------------------------------------------------
// Repo ids
// ---------------------------------------------------------------------------

/// A parsed hub repo id with its revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoSpec {
    /// `org/name` (or a legacy org-less `name`).
    pub repo_id: String,
    /// Branch, tag or 40-hex commit hash; [`DEFAULT_REVISION`] when omitted.
    pub revision: String,
}

impl RepoSpec {
    /// Parses `org/name` or `org/name@revision`.
    pub fn parse(spec: &str) -> Result<Self, HubError> {
        let invalid = |reason: &str| HubError::InvalidSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if spec.trim().is_empty() {
            return Err(invalid("it is empty"));
        }
        if spec.chars().any(char::is_whitespace) {
            return Err(invalid("repo ids cannot contain spaces"));
        }
        let (repo_id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (spec, None),
        };
        let parts: Vec<&str> = repo_id.split('/').collect();
        if parts.len() > 2 {
            return Err(invalid(
                "a repo id has at most one '/' (and no such folder exists)",
            ));
        }
        for part in &parts {
            if part.is_empty() {
                return Err(invalid("the organisation or name is empty"));
            }
            if part.contains("..") || part.contains("--") {
                return Err(invalid("repo ids cannot contain '..' or '--'"));
            }
            if part.len() > 96 {
                return Err(invalid("names are at most 96 characters"));
            }
            if !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(invalid(
                    "names may only contain letters, digits, '-', '_' and '.'",
                ));
            }
            if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
                return Err(invalid("names cannot start or end with '-' or '.'"));
            }
        }
        let revision = match revision {
            None => DEFAULT_REVISION.to_string(),
            Some(rev) => {
                if rev.is_empty() {
                    return Err(invalid("the revision after '@' is empty"));
                }
                if rev.contains("..")
                    || rev.starts_with('/')
                    || rev.ends_with('/')
                    || rev.contains('\\')
                    || rev.contains('@')
                {
                    return Err(invalid("the revision is not a valid branch, tag or commit"));
                }
                rev.to_string()
            }
        };
        Ok(Self {
            repo_id: repo_id.to_string(),
            revision,
        })
    }

    /// The repo's folder name in the cache: `models--{org}--{name}`.
    pub fn cache_folder_name(&self) -> String {
        format!("models--{}", self.repo_id.replace('/', "--"))
    }

    /// Whether the revision is a full 40-hex commit hash.
    pub fn revision_is_commit(&self) -> bool {
        is_commit_hash(&self.revision)
    }
}

impl fmt::Display for RepoSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.repo_id, self.revision)
    }
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Looks up the cached snapshot of `repo` in `cache_dir`.
///
/// Returns `(commit, snapshot_dir)` on success, or every path inspected on
/// failure (for error messages).
pub fn cached_snapshot(
    cache_dir: &Path,
    repo: &RepoSpec,
) -> Result<(String, PathBuf), Vec<PathBuf>> {
    let repo_dir = cache_dir.join(repo.cache_folder_name());
    let snapshots = repo_dir.join("snapshots");
    let mut looked_at = Vec::new();
    if repo.revision_is_commit() {
        let snap = snapshots.join(&repo.revision);
        if snap.is_dir() {
            return Ok((repo.revision.clone(), snap));
        }
        looked_at.push(snap);
    }
    let ref_path = repo_dir.join("refs").join(&repo.revision);
    match std::fs::read_to_string(&ref_path) {
        Ok(hash) => {
            let hash = hash.trim().to_string();
            looked_at.push(ref_path);
            let snap = snapshots.join(&hash);
            if !hash.is_empty() && !hash.contains(['/', '\\']) && snap.is_dir() {
                return Ok((hash, snap));
            }
            looked_at.push(snap);
        }
        Err(_) => looked_at.push(ref_path),
    }
    Err(looked_at)
}

// ---------------------------------------------------------------------------
// Model sources
// ---------------------------------------------------------------------------

/// A resolved model: a local folder, or a hub repo pinned to one commit.
#[derive(Debug, Clone)]
pub struct ModelSource {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Local { dir: PathBuf },
    Hub(Box<HubState>),
}

#[derive(Debug, Clone)]
struct HubState {
    repo: RepoSpec,
    cache_dir: PathBuf,
    commit: String,
    snapshot: PathBuf,
    online: Option<Online>,
}

#[derive(Clone)]
struct Online {
    api: Api,
    /// Every file of the repo at `commit`.
    siblings: BTreeSet<String>,
}

impl fmt::Debug for Online {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Online")
            .field("siblings", &self.siblings.len())
            .finish_non_exhaustive()
    }
}

/// Resolves a model spec (local folder, `org/name` or `org/name@revision`).
///
/// An existing directory is used as is. Otherwise the spec is parsed as a hub
/// repo id; offline, the cached snapshot is used; online, the repo is queried
/// once (commit and file list) and files are downloaded on demand by
/// [`ModelSource::file`]. If the hub cannot be reached but a snapshot is
/// cached, the cached snapshot is used with a warning.
pub fn resolve_model(spec: &str, options: &HubOptions) -> Result<ModelSource, HubError> {
    let as_path = Path::new(spec);
    if !spec.is_empty() && as_path.is_dir() {
        return Ok(ModelSource::local(as_path));
    }
    let repo = RepoSpec::parse(spec)?;
    if options.offline {
        return match cached_snapshot(&options.cache_dir, &repo) {
            Ok((commit, snapshot)) => Ok(ModelSource::cached(
                repo,
                options.cache_dir.clone(),
                commit,
                snapshot,
            )),
            Err(mut looked_at) => {
                looked_at.insert(0, as_path.to_path_buf());
                Err(HubError::NotCached {
                    repo_id: repo.repo_id,
                    revision: repo.revision,
                    looked_at,
                })
            }
        };
    }
    resolve_online(repo, options)
}

fn resolve_online(repo: RepoSpec, options: &HubOptions) -> Result<ModelSource, HubError> {
    let mut builder = ApiBuilder::new()
        .with_cache_dir(options.cache_dir.clone())
        .with_token(options.token.clone())
        .with_progress(options.progress)
        .with_retries(2);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let fallback = |source: ApiError| -> Result<ModelSource, HubError> {
        match cached_snapshot(&options.cache_dir, &repo) {
            Ok((commit, snapshot)) => {
                tracing::warn!(
                    repo = %repo,
                    error = %source,
                    "could not reach the Hugging Face Hub; using the cached snapshot {}",
                    snapshot.display()
                );
                Ok(ModelSource::cached(
                    repo.clone(),
                    options.cache_dir.clone(),
                    commit,
                    snapshot,
                ))
            }
            Err(looked_at) => Err(HubError::Api {
                repo_id: repo.repo_id.clone(),
                revision: repo.revision.clone(),
                looked_at,
                source: Box::new(source),
            }),
        }
    };
    let api = match builder.build() {
        Ok(api) => api,
        Err(e) => return fallback(e),
    };
    let info = match api
        .repo(Repo::with_revision(
            repo.repo_id.clone(),
            RepoType::Model,
            repo.revision.clone(),
        ))
        .info()
    {
        Ok(info) => info,
        Err(e) => return fallback(e),
    };
    let commit = info.sha;
    let repo_dir = options.cache_dir.join(repo.cache_folder_name());
    if commit != repo.revision {
        // Record the branch -> commit mapping like huggingface_hub does, so a
        // later offline run finds this snapshot.
        let ref_path = repo_dir.join("refs").join(&repo.revision);
        if let Some(parent) = ref_path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::write(&ref_path, &commit).map_err(io_err(&ref_path))?;
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let siblings = info.siblings.into_iter().map(|s| s.rfilename).collect();
    tracing::debug!(repo = %repo, %commit, "resolved hub repo");
    Ok(ModelSource {
        inner: Inner::Hub(Box::new(HubState {
            repo,
            cache_dir: options.cache_dir.clone(),
            commit,
            snapshot,
            online: Some(Online { api, siblings }),
        })),
    })
}

fn api_hint(e: &ApiError) -> String {
    let msg = e.to_string();
    if msg.contains("status code 401") || msg.contains("status code 403") {
        "The repo may be gated or private: accept its licence on huggingface.co and set HF_TOKEN \
         (or run `huggingface-cli login`)"
            .to_string()
    } else if msg.contains("status code 404") {
        "Check the spelling of the repo id and revision (and that it is a model repo)".to_string()
    } else {
        "Check the network connection (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use only the \
         local cache"
            .to_string()
    }
}

fn check_rel(rel: &str) -> Result<(), HubError> {
    let invalid = |reason: &str| HubError::InvalidPath {
        path: rel.to_string(),
        reason: reason.to_string(),
    };
    if rel.is_empty() {
        return Err(invalid("it is empty"));
    }
    if rel.starts_with('/') || rel.contains('\\') || Path::new(rel).is_absolute() {
        return Err(invalid("it must be relative and use '/' separators"));
    }
    if rel
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid("it cannot contain empty, '.' or '..' components"));
    }
    Ok(())
}

/// Joins a subfolder (possibly empty) and a file name with '/'.
fn join_rel(subfolder: &str, name: &str) -> String {
    let sub = subfolder.trim_matches('/');
    if sub.is_empty() {
        name.to_string()
    } else {
        format!("{sub}/{name}")
    }
}

impl ModelSource {
    /// A local model folder, used as is.
    pub fn local(dir: impl Into<PathBuf>) -> Self {
        Self {
            inner: Inner::Local { dir: dir.into() },
        }
    }

    fn cached(repo: RepoSpec, cache_dir: PathBuf, commit: String, snapshot: PathBuf) -> Self {
        Self {
            inner: Inner::Hub(Box::new(HubState {
                repo,
                cache_dir,
                commit,
                snapshot,
                online: None,
            })),
        }
    }

    /// The folder files live in: the local folder, or the hub snapshot
    /// directory (`snapshots/{commit}`; online, it only exists once a file
    /// has been downloaded).
    pub fn root(&self) -> &Path {
        match &self.inner {
            Inner::Local { dir } => dir,
            Inner::Hub(h) => &h.snapshot,
        }
    }

    /// Whether this is a local folder rather than a hub repo.
    pub fn is_local(&self) -> bool {
        matches!(self.inner, Inner::Local { .. })
    }

    /// Whether files can only come from disk (local folder or offline hub).
    pub fn is_offline(&self) -> bool {
        match &self.inner {
            Inner::Local { .. } => true,
            Inner::Hub(h) => h.online.is_none(),
        }
    }

    /// The hub repo, if this source is one.
    pub fn repo(&self) -> Option<&RepoSpec> {
        match &self.inner {
            Inner::Local { .. } => None,
            Inner::Hub(h) => Some(&h.repo),
        }
    }

    /// The resolved commit hash, for hub sources.
    pub fn commit(&self) -> Option<&str> {
        match &self.inner {
            Inner::Local { .. } => None,
            Inner::Hub(h) => Some(&h.commit),
        }
    }

    /// A spec that can be passed to Python `from_pretrained` to load this
    /// model (the folder path, or the repo id).
    pub fn python_spec(&self) -> String {
        match &self.inner {
            Inner::Local { dir } => dir.display().to_string(),
            Inner::Hub(h) => h.repo.repo_id.clone(),
        }
    }

    /// A human-readable description of `subfolder` within this model.
    pub fn describe(&self, subfolder: &str) -> String {
        let sub = subfolder.trim_matches('/');
        match &self.inner {
            Inner::Local { dir } => {
                let p = if sub.is_empty() {
                    dir.clone()
                } else {
                    dir.join(sub)
                };
                format!("folder {}", p.display())
            }
            Inner::Hub(h) => {
                let what = if sub.is_empty() {
                    "the root".to_string()
                } else {
                    format!("`{sub}/`")
                };
                format!(
                    "{what} of hub repo `{}` (commit {}, cache {})",
                    h.repo,
                    h.commit,
                    h.snapshot.display()
                )
            }
        }
    }

    /// Whether the model has the file `rel` (a '/'-separated relative path).
    ///
    /// Local and offline sources check the disk; online hub sources check
    /// the repo's file list.
    pub fn exists(&self, rel: &str) -> bool {
        if check_rel(rel).is_err() {
            return false;
        }
        match &self.inner {
            Inner::Local { dir } => dir.join(rel).is_file(),
            Inner::Hub(h) => match &h.online {
                Some(online) => online.siblings.contains(rel) || h.snapshot.join(rel).is_file(),
                None => h.snapshot.join(rel).is_file(),
            },
        }
    }

    /// The local path of file `rel`, downloading it first for online hub
    /// sources. Errors clearly when the file is missing (or, offline, not
    /// cached).
    pub fn file(&self, rel: &str) -> Result<PathBuf, HubError> {
        check_rel(rel)?;
        match &self.inner {
            Inner::Local { dir } => {
                let path = dir.join(rel);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(HubError::MissingFile {
                        path,
                        hint: format!(
                            "the local model folder {} does not have `{rel}`; check that it is a \
                             complete diffusers/transformers folder",
                            dir.display()
                        ),
                    })
                }
            }
            Inner::Hub(h) => {
                let path = h.snapshot.join(rel);
                if path.is_file() {
                    return Ok(path);
                }
                let Some(online) = &h.online else {
                    return Err(HubError::FileNotCached {
                        repo_id: h.repo.repo_id.clone(),
                        revision: h.repo.revision.clone(),
                        file: rel.to_string(),
                        looked_at: path,
                    });
                };
                if !online.siblings.contains(rel) {
                    let folder = rel.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    let nearby = online
                        .siblings
                        .iter()
                        .filter(|s| parent_of(s) == folder)
                        .take(20)
                        .cloned()
                        .collect();
                    return Err(HubError::NotInRepo {
                        repo_id: h.repo.repo_id.clone(),
                        revision: h.repo.revision.clone(),
                        file: rel.to_string(),
                        nearby,
                    });
                }
                tracing::info!(repo = %h.repo, file = rel, "downloading");
                // Pin downloads to the resolved commit so all files come from
                // the same snapshot even if the branch moves meanwhile.
                let api_repo = online.api.repo(Repo::with_revision(
                    h.repo.repo_id.clone(),
                    RepoType::Model,
                    h.commit.clone(),
                ));
                api_repo.download(rel).map_err(|e| HubError::Download {
                    repo_id: h.repo.repo_id.clone(),
                    revision: h.repo.revision.clone(),
                    file: rel.to_string(),
                    cache_dir: h.cache_dir.clone(),
                    source: Box::new(e),
                })
            }
        }
    }

    /// The file `rel` if the model has it (downloading it if needed), else
    /// `None`.
    pub fn optional_file(&self, rel: &str) -> Result<Option<PathBuf>, HubError> {
        if self.exists(rel) {
            self.file(rel).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Names of the files directly inside `subfolder` (`""` for the root),
    /// sorted. Online hub sources list the repo; others list the disk (for
    /// offline hub sources: what is cached). A missing folder lists empty.
    pub fn list(&self, subfolder: &str) -> Result<Vec<String>, HubError> {
        let sub = subfolder.trim_matches('/');
        if !sub.is_empty() {
            check_rel(sub)?;
        }
        if let Inner::Hub(h) = &self.inner {
            if let Some(online) = &h.online {
                return Ok(online
                    .siblings
                    .iter()
                    .filter(|s| parent_of(s) == sub)
                    .map(|s| s.rsplit('/').next().unwrap_or(s).to_string())
                    .collect());
            }
        }
        let dir = if sub.is_empty() {
            self.root().to_path_buf()
        } else {
            self.root().join(sub)
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            // `is_file` follows symlinks (cache snapshots hold symlinks).
            if entry.path().is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

fn parent_of(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Local { dir } => write!(f, "{}", dir.display()),
            Inner::Hub(h) => write!(f, "{} (commit {})", h.repo, h.commit),
        }
    }
}

// ---------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------

/// Finds the safetensors weights of one model folder.
///
/// `subfolder` is the pipeline component (`"unet"`, `"text_encoder"`, ...,
/// or `""` for a plain transformers folder); `stem` is the weights base name
/// (`"diffusion_pytorch_model"` for diffusers, `"model"` for transformers).
///
/// Preference order: the requested `variant` (`{stem}.{variant}.safetensors`
/// or `{stem}.safetensors.index.{variant}.json`), then the plain file
/// (`{stem}.safetensors` or `{stem}.safetensors.index.json`), then any other
/// variant present (fp16 first, then bf16, then alphabetical). Sharded
/// indexes resolve to their unique shard files, in name order. Folders with
/// only pickle weights (`.bin`, `.ckpt`, ...) are refused with a conversion
/// command.
pub fn find_weights(
    src: &ModelSource,
    subfolder: &str,
    stem: &str,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>, HubError> {
    let present = src.list(subfolder)?;
    let mut candidates: Vec<(String, bool, Option<String>)> = Vec::new();
    let mut push = |name: String, sharded: bool, variant: Option<String>| {
        if !candidates.iter().any(|(n, _, _)| *n == name) {
            candidates.push((name, sharded, variant));
        }
    };
    if let Some(v) = variant {
        push(
            format!("{stem}.{v}.safetensors"),
            false,
            Some(v.to_string()),
        );
        push(
            format!("{stem}.safetensors.index.{v}.json"),
            true,
            Some(v.to_string()),
        );
    }
    push(format!("{stem}.safetensors"), false, None);
    push(format!("{stem}.safetensors.index.json"), true, None);
    let mut others: Vec<String> = present
        .iter()
        .filter_map(|name| other_variant(name, stem))
        .filter(|v| Some(v.as_str()) != variant)
        .collect();
    others.sort_by_key(|v| {
        (
            match v.as_str() {
                "fp16" => 0,
                "bf16" => 1,
                _ => 2,
            },
            v.clone(),
        )
    });
    others.dedup();
    for v in &others {
        push(format!("{stem}.{v}.safetensors"), false, Some(v.clone()));
        push(
            format!("{stem}.safetensors.index.{v}.json"),
            true,
            Some(v.clone()),
        );
    }

    for (name, sharded, found_variant) in &candidates {
        let rel = join_rel(subfolder, name);
        if !present.iter().any(|p| p == name) && !src.exists(&rel) {
            continue;
        }
        if found_variant.as_deref() != variant {
            tracing::debug!(
                location = %src.describe(subfolder),
                requested = ?variant,
                using = %name,
                "requested weights variant not found; falling back"
            );
        }
        if !sharded {
            return Ok(vec![src.file(&rel)?]);
        }
        let index_path = src.file(&rel)?;
        let shards = read_shard_index(&index_path)?;
        let dir = parent_of(&rel).to_string();
        return shards
            .iter()
            .map(|shard| src.file(&join_rel(&dir, shard)))
            .collect();
    }

    let pickles: Vec<String> = present
        .iter()
        .filter(|n| {
            [".bin", ".ckpt", ".pt", ".pth", ".bin.index.json"]
                .iter()
                .any(|ext| n.ends_with(ext))
        })
        .cloned()
        .collect();
    if !pickles.is_empty() {
        return Err(HubError::PickleOnly {
            location: src.describe(subfolder),
            files: pickles,
            convert: convert_command(src, subfolder, stem),
        });
    }
    Err(HubError::WeightsNotFound {
        location: src.describe(subfolder),
        looked_for: candidates.into_iter().map(|(n, _, _)| n).collect(),
        present,
    })
}

/// If `name` is `{stem}.{v}.safetensors` or `{stem}.safetensors.index.{v}.json`,
/// returns `v`.
fn other_variant(name: &str, stem: &str) -> Option<String> {
    let rest = name.strip_prefix(stem)?.strip_prefix('.')?;
    let v = rest
        .strip_suffix(".safetensors")
        .or_else(|| {
            rest.strip_prefix("safetensors.index.")
                .and_then(|r| r.strip_suffix(".json"))
        })
        .filter(|v| !v.is_empty() && !v.contains('.'))?;
    Some(v.to_string())
}

/// Reads a `*.safetensors.index.json` and returns its unique shard file
/// names, sorted.
pub fn read_shard_index(path: &Path) -> Result<Vec<String>, HubError> {
    let invalid = |reason: String| HubError::InvalidIndex {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not valid JSON ({e})")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid("no `weight_map` object".to_string()))?;
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| invalid(format!("the shard of `{tensor}` is not a string")))?;
        check_rel(shard).map_err(|e| invalid(format!("bad shard name: {e}")))?;
        if !shard.ends_with(".safetensors") {
            return Err(invalid(format!(
                "shard `{shard}` is not a .safetensors file"
            )));
        }
        shards.insert(shard.to_string());
    }
    if shards.is_empty() {
        return Err(invalid("`weight_map` is empty".to_string()));
    }
    Ok(shards.into_iter().collect())
}

fn convert_command(src: &ModelSource, subfolder: &str, stem: &str) -> String {
    let spec = src.python_spec().replace('\'', "\\'");
    let sub = subfolder.trim_matches('/');
    if stem == "model" && sub.is_empty() {
        format!(
            "python -c \"from transformers import AutoModel; \
             AutoModel.from_pretrained('{spec}').save_pretrained('converted-model', \
             safe_serialization=True)\""
        )
    } else {
        format!(
            "python -c \"from diffusers import DiffusionPipeline; \
             DiffusionPipeline.from_pretrained('{spec}').save_pretrained('converted-pipeline', \
             safe_serialization=True)\""
        )
    }
}
