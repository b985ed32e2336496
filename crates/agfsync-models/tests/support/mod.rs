//! Helpers shared by the hub test binaries: a fake Hugging Face cache.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;

pub const HASH: &str = "0123456789abcdef0123456789abcdef01234567";
pub const OTHER_HASH: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// Writes `files` as blobs plus snapshot symlinks, the way huggingface_hub
/// lays out its cache, and points `refs/{revision}` at `hash` when given.
pub fn fake_repo(
    cache: &Path,
    repo_id: &str,
    revision: Option<&str>,
    hash: &str,
    files: &[(&str, &str)],
) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo_dir.join("blobs"))?;
    for (i, (rel, contents)) in files.iter().enumerate() {
        let blob = repo_dir.join("blobs").join(format!("{hash}-blob{i}"));
        std::fs::write(&blob, contents)?;
        let link = snapshot.join(rel);
        std::fs::create_dir_all(link.parent().expect("file has a parent"))?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, &link)?;
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link)?;
    }
    if let Some(rev) = revision {
        let ref_path = repo_dir.join("refs").join(rev);
        std::fs::create_dir_all(ref_path.parent().expect("ref has a parent"))?;
        std::fs::write(ref_path, hash)?;
    }
    Ok(snapshot)
}

pub fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |key| map.get(key).cloned()
}

pub fn write_local(dir: &Path, files: &[&str]) -> Result<()> {
    for rel in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().expect("file has a parent"))?;
        std::fs::write(path, b"x")?;
    }
    Ok(())
}

pub fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| {
            p.file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}
