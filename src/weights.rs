//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Tensors are decoded to f32 one at a time on request, so the
//! files are never read whole up front.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start: usize,
    end: usize,
}

pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorEntry>,
}

impl WeightFiles {
    /// Opens the weights of a Hugging Face model directory.
    pub fn open_dir(dir: &Path) -> Result<WeightFiles> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_paths(&index)?
        } else {
            bail!(
                "{}: no weights found (expected model.safetensors, or model.safetensors.index.json with its shards)",
                dir.display()
            );
        };
        Self::open_files(&paths)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<WeightFiles> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let f = File::open(path)
                .with_context(|| format!("cannot open weights file {}", path.display()))?;
            // SAFETY: the checkpoint is treated as read-only; a concurrent writer truncating it
            // is outside what a mapped-file reader can defend against.
            let mmap = unsafe { Mmap::map(&f) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            // deserialize() validates the header and that every tensor lies inside the file,
            // which catches truncated downloads.
            SafeTensors::deserialize(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a valid safetensors file ({e}); the file may be truncated or corrupt",
                    path.display()
                )
            })?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: bad safetensors header ({e})", path.display()))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name.clone(),
                    TensorEntry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push((path.clone(), mmap));
        }
        Ok(WeightFiles { files, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Decodes a tensor to f32, checking its shape against what the model expects.
    /// The stored bytes of tensor `name`, checked against the expected shape.
    fn raw(&self, name: &str, expected: &[usize]) -> Result<(&[u8], Dtype, &Path)> {
        let t = self.tensors.get(name).with_context(|| {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            format!("tensor `{name}` is missing from {}", files.join(", "))
        })?;
        let path = &self.files[t.file].0;
        if t.shape != expected {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?}",
                path.display(),
                t.shape,
                expected
            );
        }
        Ok((&self.files[t.file].1[t.start..t.end], t.dtype, path))
    }

    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (bytes, dtype, path) = self.raw(name, expected)?;
        decode_f32(bytes, dtype).with_context(|| format!("{}: tensor `{name}`", path.display()))
    }

    /// The tensor's values as bf16 when it is stored as bf16 (no rounding involved); None for
    /// other storage types, which go through `load_f32`.
    pub fn load_bf16(&self, name: &str, expected: &[usize]) -> Result<Option<Vec<half::bf16>>> {
        let (bytes, dtype, _) = self.raw(name, expected)?;
        if dtype != Dtype::BF16 {
            return Ok(None);
        }
        Ok(Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ))
    }
}

/// Widens stored f32/bf16/f16 bytes (little-endian, possibly unaligned) to f32.
pub fn decode_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        other => bail!("unsupported stored dtype {other:?} (expected F32, BF16 or F16)"),
    })
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing `weight_map` object", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut uniq = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: weight_map entry for `{tensor}` is not a file name",
                index.display()
            )
        })?;
        uniq.insert(file.to_string(), ());
    }
    if uniq.is_empty() {
        bail!("{}: weight_map is empty", index.display());
    }
    Ok(uniq.into_keys().map(|f| dir.join(f)).collect())
}
