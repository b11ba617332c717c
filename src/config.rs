//! `config.json` of a Hugging Face Qwen2 checkpoint.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// Storage dtype the checkpoint declares (`torch_dtype` or the newer `dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "float32" | "F32" | "f32" => Some(DType::F32),
            "bfloat16" | "BF16" | "bf16" => Some(DType::BF16),
            "float16" | "F16" | "f16" => Some(DType::F16),
            _ => None,
        }
    }
    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub dtype: DType,
}

fn req_usize(v: &Value, key: &str, file: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .with_context(|| {
            format!(
                "{}: missing or non-integer field `{key}` (expected a positive integer)",
                file.display()
            )
        })
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text, path)
    }

    /// `file` is only used to name the source in errors.
    pub fn from_json_str(text: &str, file: &Path) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text)
            .with_context(|| format!("{}: not valid JSON", file.display()))?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "qwen2" {
            bail!(
                "{}: unsupported model_type {:?}; this engine runs `qwen2` checkpoints",
                file.display(),
                model_type
            );
        }
        let hidden_size = req_usize(&v, "hidden_size", file)?;
        let num_heads = req_usize(&v, "num_attention_heads", file)?;
        let num_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => {
                if num_heads == 0 || hidden_size % num_heads != 0 {
                    bail!(
                        "{}: hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}",
                        file.display()
                    );
                }
                hidden_size / num_heads
            }
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!(
                "{}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}",
                file.display()
            );
        }
        if head_dim % 2 != 0 {
            bail!(
                "{}: head_dim {head_dim} must be even for RoPE",
                file.display()
            );
        }
        // Released Qwen2.5 checkpoints put rope_theta at the top level; newer transformers
        // write a rope_parameters object instead.
        let rope_theta = if let Some(rp) = v.get("rope_parameters").filter(|x| x.is_object()) {
            let ty = rp
                .get("rope_type")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if ty != "default" {
                bail!(
                    "{}: rope_parameters.rope_type {ty:?} is not supported (only \"default\")",
                    file.display()
                );
            }
            rp.get("rope_theta").and_then(Value::as_f64)
        } else {
            None
        }
        .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
        .unwrap_or(10000.0);
        if let Some(rs) = v.get("rope_scaling").filter(|x| !x.is_null()) {
            let ty = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if ty != "default" {
                bail!(
                    "{}: rope_scaling type {ty:?} is not supported",
                    file.display()
                );
            }
        }
        let dtype_str = v
            .get("torch_dtype")
            .or_else(|| v.get("dtype"))
            .and_then(Value::as_str)
            .unwrap_or("float32");
        let dtype = DType::parse(dtype_str).with_context(|| {
            format!(
                "{}: unsupported dtype {dtype_str:?} (expected float32, bfloat16 or float16)",
                file.display()
            )
        })?;
        Ok(ModelConfig {
            hidden_size,
            intermediate_size: req_usize(&v, "intermediate_size", file)?,
            num_layers: req_usize(&v, "num_hidden_layers", file)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req_usize(&v, "vocab_size", file)?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            rope_theta: rope_theta as f32,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(32768) as usize,
            dtype,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// A config.json that transformers reads back as the same model.
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": false,
            "torch_dtype": self.dtype.hf_name(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100})
    }

    #[test]
    fn both_rope_layouts() {
        let mut a = base();
        a["rope_theta"] = 5000.0.into();
        let ca = ModelConfig::from_json_str(&a.to_string(), Path::new("a")).unwrap();
        assert_eq!(ca.rope_theta, 5000.0);
        let mut b = base();
        b["rope_parameters"] = serde_json::json!({"rope_theta": 1e6, "rope_type": "default"});
        b["dtype"] = "bfloat16".into();
        let cb = ModelConfig::from_json_str(&b.to_string(), Path::new("b")).unwrap();
        assert_eq!(cb.rope_theta, 1e6);
        assert_eq!(cb.dtype, DType::BF16);
        assert_eq!(cb.head_dim, 16);
    }

    #[test]
    fn rejects_other_model_types_by_name() {
        let mut a = base();
        a["model_type"] = "llama".into();
        let e = ModelConfig::from_json_str(&a.to_string(), Path::new("x/config.json")).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("x/config.json") && msg.contains("llama"),
            "{msg}"
        );
    }
}
