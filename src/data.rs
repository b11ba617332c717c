//! Prompt files (interim: JSONL with plain or verl layouts; replaced by the full loader).

use crate::grader::GoldAnswer;
use crate::tokenizer::ChatMessage;
use anyhow::{bail, Context, Result};
use std::path::Path;

#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone)]
pub struct Example {
    pub index: usize,
    pub prompt: Prompt,
    pub gold: Option<GoldAnswer>,
    pub source: Option<String>,
}

pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let Some(p) = v
            .get("problem")
            .or(v.get("question"))
            .or(v.get("prompt"))
            .and_then(|p| p.as_str())
        else {
            bail!("{}:{}: no prompt field", path.display(), i + 1);
        };
        out.push(Example {
            index: out.len(),
            prompt: Prompt::Text(p.to_string()),
            gold: None,
            source: None,
        });
    }
    Ok(out)
}
