//! Tokenizer, chat template and stop tokens of a Hugging Face model directory.

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Ids that end a completion: generation_config.json's eos_token_id plus `<|im_end|>` and
    /// `<|endoftext|>` when the vocabulary has them.
    pub eos_ids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Special tokens in tokenizer_config.json are either strings or `{"content": ...}` objects.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            anyhow::bail!(
                "{}: file not found (expected a tokenizers JSON file)",
                tok_path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tok_path.display()))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?
        } else {
            Value::Null
        };
        // A template is a string, or a list of named templates of which "default" is used.
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => {
                let jinja = dir.join("chat_template.jinja");
                std::fs::read_to_string(jinja).ok()
            }
        };

        let mut eos_ids = Vec::new();
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let text = std::fs::read_to_string(&gen_path)
                .with_context(|| format!("cannot read {}", gen_path.display()))?;
            let g: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", gen_path.display()))?;
            match g.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
                Some(Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32))
                }
                _ => {}
            }
        }
        let eos_token = token_string(cfg.get("eos_token"));
        for t in ["<|im_end|>", "<|endoftext|>"]
            .into_iter()
            .map(str::to_string)
            .chain(eos_token.clone())
        {
            if let Some(id) = inner.token_to_id(&t) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token: token_string(cfg.get("bos_token")),
            eos_token,
            eos_ids,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer failed on input: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode ids: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template the way transformers' `apply_chat_template` does: Jinja with
    /// trim_blocks and lstrip_blocks, Python string methods, and `raise_exception`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let src = self
            .chat_template
            .as_deref()
            .context("this tokenizer has no chat_template in tokenizer_config.json")?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", src)
            .map_err(|e| anyhow!("chat_template does not parse: {e}"))?;
        let tmpl = env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            tools => minijinja::Value::from(()),
        })
        .map_err(|e| anyhow!("chat_template failed to render: {e}"))
    }
}
