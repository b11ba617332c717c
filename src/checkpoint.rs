//! Checkpoints in Hugging Face layout (safetensors with the original tensor names and dtype,
//! config and tokenizer files copied), so transformers and vLLM load them as they are.
//! A checkpoint directory is built under a temporary name, synced, then renamed into place.

use crate::backend::Backend;
use crate::config::DType;
use crate::model::{tensor_specs, Params, Qwen2};
use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Files copied verbatim from the source model directory when they exist.
const MODEL_SIDE_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// Encodes f32 values in a stored dtype (round to nearest even for bf16/f16).
pub fn encode(values: &[f32], dtype: DType) -> (Dtype, Vec<u8>) {
    match dtype {
        DType::F32 => (Dtype::F32, bytemuck::cast_slice(values).to_vec()),
        DType::BF16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        ),
    }
}

/// Serializes named tensors of one model-shaped set (params or optimizer moments).
pub fn params_to_safetensors<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    params: &Params<B::Buf>,
    dtype: DType,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let specs = tensor_specs(&model.cfg);
    let mut encoded = Vec::with_capacity(specs.len());
    for ((name, shape), buf) in specs.iter().zip(params.list()) {
        let host = be.download(buf)?;
        let (dt, bytes) = encode(&host, dtype);
        encoded.push((name.clone(), shape.clone(), dt, bytes));
    }
    let views = encoded
        .iter()
        .map(|(n, s, dt, b)| {
            Ok((
                n.clone(),
                TensorView::new(*dt, s.clone(), b).with_context(|| format!("tensor `{n}`"))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, metadata).context("cannot serialize checkpoint")
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        }
        std::fs::File::open(&p)?.sync_all()?;
    }
    Ok(())
}

/// Writes a directory atomically: `fill` writes into a temporary sibling, whose files are
/// synced before the rename makes it visible as `dir`.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    fill(&tmp)?;
    sync_tree(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Saves model weights in the checkpoint's original dtype, plus the source's config and
/// tokenizer files, and any `extra` (name, bytes) files (trainer and optimizer state).
pub fn save_model_dir<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    source_dir: &Path,
    dir: &Path,
    extra: Vec<(String, Vec<u8>)>,
) -> Result<PathBuf> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let weights = params_to_safetensors(be, model, &model.params, model.cfg.dtype, Some(meta))?;
    write_dir_atomic(dir, |tmp| {
        std::fs::write(tmp.join("model.safetensors"), &weights)?;
        for f in MODEL_SIDE_FILES {
            let src = source_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, tmp.join(f))
                    .with_context(|| format!("cannot copy {}", src.display()))?;
            }
        }
        if !tmp.join("config.json").exists() {
            std::fs::write(
                tmp.join("config.json"),
                serde_json::to_vec_pretty(&model.cfg.to_hf_json())?,
            )?;
        }
        for (name, bytes) in &extra {
            let path = tmp.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, bytes)?;
        }
        Ok(())
    })?;
    Ok(dir.to_path_buf())
}
