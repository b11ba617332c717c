//! Checkpoints in Hugging Face layout (safetensors with the original tensor names and dtype,
//! config and tokenizer files copied), so transformers and vLLM load them as they are.
//! A checkpoint directory is built under a temporary name, synced, then renamed into place.

use crate::backend::Backend;
use crate::config::DType;
use crate::model::{tensor_specs, Params, Qwen2};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
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
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::BF16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Writes a safetensors file tensor by tensor: `fetch(i)` gives the values of `specs[i]` only
/// when its turn comes, so the host holds one tensor at a time. A 7B model's f32 moments are a
/// 30 GB file each; serializing one in memory first would take twice that, on top of the run.
pub fn write_safetensors(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    dtype: DType,
    metadata: Option<HashMap<String, String>>,
    mut fetch: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    let width = match dtype {
        DType::F32 => 4,
        DType::BF16 | DType::F16 => 2,
    };
    let tag = match dtype {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
    };
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        header.insert("__metadata__".into(), serde_json::to_value(meta)?);
    }
    let mut offset = 0usize;
    for (name, shape) in specs {
        let bytes = shape.iter().product::<usize>() * width;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": tag, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header)?;
    // The data starts 8-byte aligned, as safetensors' own writer leaves it.
    json.resize(json.len().next_multiple_of(8), b' ');
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
    let written = (|| -> Result<()> {
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        for (i, (name, shape)) in specs.iter().enumerate() {
            let values = fetch(i)?;
            let n: usize = shape.iter().product();
            if values.len() != n {
                bail!(
                    "tensor `{name}`: {} values for shape {shape:?}",
                    values.len()
                );
            }
            out.write_all(&encode(&values, dtype))?;
        }
        out.flush()?;
        Ok(())
    })();
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes one model-shaped set of device buffers (params or optimizer moments) under the
/// model's tensor names.
pub fn save_params<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    params: &Params<B::Buf>,
    dtype: DType,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let list = params.list();
    write_safetensors(path, &tensor_specs(&model.cfg), dtype, metadata, |i| {
        be.download(list[i])
    })
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
/// tokenizer files; `extra` then writes what else belongs in the directory (trainer and
/// optimizer state) into the temporary one it is given.
pub fn save_model_dir<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    source_dir: &Path,
    dir: &Path,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_dir_atomic(dir, |tmp| {
        save_params(
            be,
            model,
            &model.params,
            model.cfg.dtype,
            Some(meta),
            &tmp.join("model.safetensors"),
        )?;
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
        extra(tmp)
    })?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed writer's files read back through the safetensors crate, in each dtype,
    /// with their metadata, and a tensor of the wrong size is an error that names it.
    #[test]
    fn streamed_safetensors_read_back() {
        let dir = std::env::temp_dir().join(format!("empo-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let specs = vec![
            ("b.weight".to_string(), vec![2, 3]),
            ("a.bias".to_string(), vec![5]),
            ("c.norm".to_string(), vec![1]),
        ];
        let values: Vec<Vec<f32>> = specs
            .iter()
            .enumerate()
            .map(|(t, (_, s))| {
                let n: usize = s.iter().product();
                (0..n).map(|i| (t * 10 + i) as f32 * 0.37 - 1.5).collect()
            })
            .collect();
        for (dtype, tag) in [
            (DType::F32, safetensors::Dtype::F32),
            (DType::BF16, safetensors::Dtype::BF16),
            (DType::F16, safetensors::Dtype::F16),
        ] {
            let path = dir.join(format!("{tag:?}.safetensors"));
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            write_safetensors(&path, &specs, dtype, Some(meta.clone()), |i| {
                Ok(values[i].clone())
            })
            .unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            assert_eq!(header % 8, 0, "the data starts 8-byte aligned");
            let (_, st_meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(st_meta.metadata().as_ref(), Some(&meta));
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.len(), 3);
            for ((name, shape), want) in specs.iter().zip(&values) {
                let t = st.tensor(name).unwrap();
                assert_eq!((t.dtype(), t.shape()), (tag, shape.as_slice()));
                let got: Vec<f32> = match dtype {
                    DType::F32 => bytemuck::pod_collect_to_vec(t.data()),
                    DType::BF16 => t
                        .data()
                        .chunks(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    DType::F16 => t
                        .data()
                        .chunks(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                };
                let tol = if dtype == DType::F32 { 0.0 } else { 4e-3 };
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (g - w).abs() <= tol * w.abs().max(1.0),
                        "{name}: {g} vs {w}"
                    );
                }
            }
        }
        let err = write_safetensors(
            &dir.join("bad.safetensors"),
            &specs,
            DType::F32,
            None,
            |i| Ok(vec![0.0; if i == 1 { 4 } else { values[i].len() }]),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("a.bias") && msg.contains("bad.safetensors"),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
