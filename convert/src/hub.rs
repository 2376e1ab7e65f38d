//! Resolving a Hugging Face repo id (`microsoft/bitnet-b1.58-2B-4T`) to a snapshot folder
//! in the local hub cache, the way `huggingface_hub` lays it out:
//! `CACHE/models--ORG--NAME/refs/REVISION` holds a commit hash, and
//! `CACHE/models--ORG--NAME/snapshots/HASH/` holds the files.

use std::path::{Path, PathBuf};

use crate::error::{ConvertError, Result};

/// The cache folders searched, in `huggingface_hub`'s order of precedence.
pub fn cache_dirs() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut dirs = Vec::new();
    if let Some(d) = env("HF_HUB_CACHE") {
        dirs.push(d);
    }
    if let Some(d) = env("HF_HOME") {
        dirs.push(d.join("hub"));
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        dirs.push(d.join("huggingface").join("hub"));
    }
    if let Some(d) = env("HOME") {
        dirs.push(d.join(".cache").join("huggingface").join("hub"));
    }
    dirs.dedup();
    dirs
}

/// Whether `spec` looks like a repo id rather than a path.
pub fn is_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// A local folder as is, or a repo id looked up in the hub cache.
pub fn resolve(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_repo_id(spec) {
        return Err(ConvertError::NotFound(format!(
            "{spec}: no such folder (and not a repo id like ORG/NAME)"
        )));
    }
    resolve_in(spec, revision.unwrap_or("main"), &cache_dirs())
}

/// Looks `repo` up in the given cache folders.
pub fn resolve_in(repo: &str, revision: &str, caches: &[PathBuf]) -> Result<PathBuf> {
    let folder = format!("models--{}", repo.replace('/', "--"));
    let mut looked = Vec::new();
    for cache in caches {
        let model = cache.join(&folder);
        let refs = model.join("refs").join(revision);
        let commit = match std::fs::read_to_string(&refs) {
            Ok(hash) => hash.trim().to_string(),
            // A commit hash may be given directly as the revision.
            Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => {
                revision.to_string()
            }
            Err(_) => {
                looked.push(refs.display().to_string());
                continue;
            }
        };
        let snapshot = model.join("snapshots").join(&commit);
        if snapshot.join("config.json").exists() {
            return Ok(snapshot);
        }
        looked.push(format!("{} (no config.json)", snapshot.display()));
    }
    Err(ConvertError::NotFound(format!(
        "{repo} (revision {revision}) is not in the local Hugging Face cache. Looked in:\n  {}\n\
         Download it on a machine with network access, e.g. `huggingface-cli download {repo}` \
         (or `hf download {repo}`), then copy the cache folder, or pass the model folder's path.",
        if looked.is_empty() {
            "(no cache folder: set HF_HUB_CACHE or HF_HOME)".to_string()
        } else {
            looked.join("\n  ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("microsoft/bitnet-b1.58-2B-4T"));
        assert!(!is_repo_id("./model"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
    }

    #[test]
    fn resolves_refs_and_commit_hashes_in_a_built_cache() {
        let cache = tempfile::tempdir().unwrap();
        let model = cache.path().join("models--org--tiny");
        let hash = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(model.join("refs")).unwrap();
        std::fs::create_dir_all(model.join("snapshots").join(hash)).unwrap();
        std::fs::write(model.join("refs/main"), format!("{hash}\n")).unwrap();
        std::fs::write(model.join("snapshots").join(hash).join("config.json"), "{}").unwrap();
        let caches = vec![PathBuf::from("/nonexistent"), cache.path().to_path_buf()];
        let got = resolve_in("org/tiny", "main", &caches).unwrap();
        assert_eq!(got, model.join("snapshots").join(hash));
        assert_eq!(resolve_in("org/tiny", hash, &caches).unwrap(), got);
        let err = resolve_in("org/tiny", "v2", &caches)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refs/v2") && err.contains("huggingface-cli download org/tiny"),
            "{err}"
        );
        let err = resolve_in("org/other", "main", &caches)
            .unwrap_err()
            .to_string();
        assert!(err.contains("models--org--other"), "{err}");
    }
}
