//! Resolves `--weights`: a model directory, or a model name already in the local Hugging Face
//! cache. Nothing is ever downloaded.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Cache roots in the order Hugging Face itself consults them.
pub fn cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        roots.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        roots.push(PathBuf::from(p).join("hub"));
    }
    if let Ok(home) = std::env::var("HOME") {
        roots.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    roots
}

pub fn resolve_weights(spec: &str) -> Result<PathBuf> {
    resolve_in(spec, &cache_roots())
}

pub fn resolve_in(spec: &str, roots: &[PathBuf]) -> Result<PathBuf> {
    let direct = Path::new(spec);
    if direct.is_dir() {
        return Ok(direct.to_path_buf());
    }
    let mut looked = vec![format!("directory {}", direct.display())];
    // `Org/Name` maps to `models--Org--Name`; a bare name matches any org, case-insensitively.
    let wanted = spec.trim_matches('/').to_lowercase();
    for root in roots {
        looked.push(format!("cache {}", root.display()));
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("models--"))
            .collect();
        names.sort();
        for name in names {
            let repo = name["models--".len()..].replace("--", "/").to_lowercase();
            let bare = repo.rsplit('/').next().unwrap_or("");
            if repo == wanted || bare == wanted {
                if let Some(snap) = newest_snapshot(&root.join(&name)) {
                    return Ok(snap);
                }
                looked.push(format!(
                    "{} (no usable snapshot)",
                    root.join(&name).display()
                ));
            }
        }
    }
    bail!(
        "model {spec:?} not found; looked in:\n  {}\n(the engine never downloads: fetch the model first, or pass its directory)",
        looked.join("\n  ")
    )
}

/// The snapshot `refs/main` points to, else the most recently modified one with a config.json.
fn newest_snapshot(model_dir: &Path) -> Option<PathBuf> {
    if let Ok(rev) = std::fs::read_to_string(model_dir.join("refs/main")) {
        let p = model_dir.join("snapshots").join(rev.trim());
        if p.join("config.json").exists() {
            return Some(p);
        }
    }
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(model_dir.join("snapshots"))
        .ok()?
        .flatten()
    {
        let p = e.path();
        if !p.join("config.json").exists() {
            continue;
        }
        let t = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, p));
        }
    }
    best.map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cached_model_by_bare_name_and_lists_places_otherwise() {
        let tmp = std::env::temp_dir().join(format!("empo-hub-{}", std::process::id()));
        let snap = tmp.join("models--Qwen--Qwen2.5-Math-7B/snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let roots = vec![tmp.join("missing"), tmp.clone()];
        assert_eq!(resolve_in("qwen2.5-math-7b", &roots).unwrap(), snap);
        assert_eq!(resolve_in("Qwen/Qwen2.5-Math-7B", &roots).unwrap(), snap);
        let err = format!("{:#}", resolve_in("nope-1b", &roots).unwrap_err());
        assert!(
            err.contains(&tmp.display().to_string()) && err.contains("missing"),
            "{err}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
