//! Where a model's files come from: a local directory, or a Hugging Face
//! model id (`org/name`) found in the local hub cache or fetched from the hub.
//!
//! mistral.rs 0.8.1 ignores `HF_HUB_OFFLINE` and, for a cached model, still
//! asks the hub for its file list. So a model id found in the cache
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
//! revision `main`) is loaded from its snapshot directory like a local one;
//! only an uncached id goes to the hub, and with `HF_HUB_OFFLINE` set that
//! is a clear error instead of a network timeout.

use std::path::{Path, PathBuf};

/// A model's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory (or file) on this machine.
    Local(PathBuf),
    /// A hub id to download.
    Hub(String),
}

/// The hub cache directory, as the Hugging Face tools choose it.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` forbids going to the hub.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Whether `s` looks like a hub id (`org/name`).
pub fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The cached snapshot of `id` at revision `main`, if complete enough to load.
pub fn cached_snapshot(cache: &Path, id: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let hash = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
    let snap = repo.join("snapshots").join(hash.trim());
    snap.join("config.json").exists().then_some(snap)
}

/// Resolves a configured model path.
pub fn resolve(path: &Path) -> Result<ModelSource, String> {
    if path.exists() {
        return Ok(ModelSource::Local(path.to_path_buf()));
    }
    let s = path.to_string_lossy();
    if !is_hub_id(&s) {
        return Err(format!(
            "model path {} does not exist (make a demo model with `retro-fleet model tiny --out DIR`, \
             or give a Hugging Face id such as `org/name`)",
            path.display()
        ));
    }
    let cache = cache_dir();
    if let Some(snap) = cached_snapshot(&cache, &s) {
        return Ok(ModelSource::Local(snap));
    }
    if offline() {
        return Err(format!(
            "model `{s}` is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set: download it first \
             (`huggingface-cli download {s}`), point HF_HUB_CACHE/HF_HOME at a cache that has it, or unset HF_HUB_OFFLINE",
            cache.display()
        ));
    }
    Ok(ModelSource::Hub(s.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_org_slash_name() {
        assert!(is_hub_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0"));
        assert!(!is_hub_id("models/tiny/extra"));
        assert!(!is_hub_id("./tiny"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("tiny"));
    }

    #[test]
    fn a_cached_snapshot_is_found_by_its_main_ref() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny");
        assert_eq!(cached_snapshot(cache.path(), "org/tiny"), None);
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(cached_snapshot(cache.path(), "org/tiny"), None, "no config.json yet");
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(cached_snapshot(cache.path(), "org/tiny"), Some(snap));
    }
}
