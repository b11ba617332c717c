//! Scoring (logits, next-token log-probs, entropies) and KV-cache generation.

use crate::backend::{Backend, NO_TARGET};
use crate::model::Qwen2;
use crate::sampling::SamplingParams;
use anyhow::{bail, Result};

/// Row r of a [batch, seq] token grid predicts ids[r + 1] within its sequence; the last
/// position of each sequence has no target.
pub fn next_token_targets(ids: &[u32], batch: usize, seq: usize) -> Vec<u32> {
    (0..batch * seq)
        .map(|r| {
            if r % seq + 1 < seq {
                ids[r + 1]
            } else {
                NO_TARGET
            }
        })
        .collect()
}

pub struct Scores {
    /// [seq, vocab]
    pub logits: Vec<f32>,
    /// [seq - 1]: log-prob of each next token at the temperature
    pub logprobs: Vec<f32>,
    /// [seq]: entropy of softmax(logits / temperature)
    pub entropy: Vec<f32>,
}

pub fn score<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    ids: &[u32],
    temperature: f32,
) -> Result<Scores> {
    if ids.is_empty() {
        bail!("nothing to score: the token sequence is empty");
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("--temperature must be a positive number for scoring, got {temperature}");
    }
    let seq = ids.len();
    let mut acts = model.alloc_activations(be, 1, seq, true)?;
    model.forward_train(be, ids, &mut acts)?;
    let targets = next_token_targets(ids, 1, seq);
    let stats = be.softmax_stats(
        &acts.logits,
        seq,
        model.cfg.vocab_size,
        &targets,
        temperature,
    )?;
    Ok(Scores {
        logits: be.download(&acts.logits)?,
        logprobs: stats[..seq - 1].iter().map(|s| s.logprob).collect(),
        entropy: stats.iter().map(|s| s.entropy).collect(),
    })
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub n: usize,
    pub seed: u64,
    pub stop_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// New tokens, including the stop token when one ended the completion.
    pub ids: Vec<u32>,
    pub stopped: bool,
}

/// Samples `n` completions of one prompt as a batch sharing one KV cache allocation.
pub fn generate<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    prompt: &[u32],
    opt: &GenerateOptions,
) -> Result<Vec<Completion>> {
    if prompt.is_empty() {
        bail!("the prompt is empty: generation needs at least one token");
    }
    let n = opt.n.max(1);
    let v = model.cfg.vocab_size;
    let cap = prompt.len() + opt.max_new_tokens;
    let mut cache = model.alloc_cache(be, n, cap)?;
    let mut out: Vec<Completion> = (0..n)
        .map(|_| Completion {
            ids: vec![],
            stopped: false,
        })
        .collect();
    if opt.max_new_tokens == 0 {
        return Ok(out);
    }
    let batch_prompt: Vec<u32> = (0..n).flat_map(|_| prompt.iter().copied()).collect();
    let mut acts = model.alloc_activations(be, n, prompt.len(), false)?;
    model.forward_cached(be, &batch_prompt, &mut acts, &mut cache)?;
    let mut step_acts = model.alloc_activations(be, n, 1, false)?;
    let seq_ids: Vec<u64> = (0..n as u64).collect();
    for step in 0..opt.max_new_tokens {
        let logits = if step == 0 {
            &acts.logits
        } else {
            &step_acts.logits
        };
        let drawn = be.sample(logits, n, v, &opt.sampling, opt.seed, &seq_ids, step as u64)?;
        let mut next = vec![0u32; n];
        for (i, c) in out.iter_mut().enumerate() {
            if c.stopped {
                continue;
            }
            let tok = drawn[i];
            c.ids.push(tok);
            next[i] = tok;
            if !opt.ignore_eos && opt.stop_ids.contains(&tok) {
                c.stopped = true;
            }
        }
        if out.iter().all(|c| c.stopped) || step + 1 == opt.max_new_tokens {
            break;
        }
        // Finished sequences keep decoding a dummy token so the batch stays rectangular.
        model.forward_cached(be, &next, &mut step_acts, &mut cache)?;
    }
    Ok(out)
}
