//! Scoring (logits, next-token log-probs, entropies) and KV-cache generation.

use crate::backend::{Backend, NO_TARGET};
use crate::model::{Activations, KvCache, Qwen2};
use crate::sampling::{DrawKey, SamplingParams};
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

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// New tokens, including the stop token when one ended the completion.
    pub ids: Vec<u32>,
    pub stopped: bool,
}

/// Samples `opt.n` completions of one prompt, decoded together.
pub fn generate<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    prompt: &[u32],
    opt: &GenerateOptions,
) -> Result<Vec<Completion>> {
    let req = Request {
        prompt,
        n: opt.n.max(1),
        seed: opt.seed,
    };
    let mut out = generate_batch(be, model, &[req], opt, opt.n.max(1))?;
    Ok(out.pop().unwrap_or_default())
}

/// One prompt to sample `n` completions of, from its own random stream: completion j's token t
/// is drawn with the key (seed, j, t), so what a request gets does not depend on the requests
/// decoded beside it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub prompt: &'a [u32],
    pub n: usize,
    pub seed: u64,
}

/// The last prompt prefilled: its request, its cache and the activations holding its logits.
struct Prefilled<T> {
    req: usize,
    cache: KvCache<T>,
    acts: Activations<T>,
}

/// A sequence being decoded in a slot of the batch: request, sample index, tokens so far.
struct Active {
    req: usize,
    sample: usize,
    ids: Vec<u32>,
}

/// Samples every request's completions with continuous batching: up to `rows` sequences decode
/// together, one token each per step, and a slot whose sequence ended takes the next one at
/// once, so a long completion does not hold finished ones' slots idle. Each prompt is
/// prefilled once and its cache copied into the slots of its samples. `opt.n` and `opt.seed`
/// are ignored here (each request has its own). Completions come back per request, in order.
pub fn generate_batch<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    requests: &[Request],
    opt: &GenerateOptions,
    rows: usize,
) -> Result<Vec<Vec<Completion>>> {
    let mut out: Vec<Vec<Completion>> = requests
        .iter()
        .map(|r| vec![Completion::default(); r.n])
        .collect();
    if let Some(i) = requests.iter().position(|r| r.prompt.is_empty()) {
        bail!("prompt {i} is empty: generation needs at least one token");
    }
    let mut queue = requests
        .iter()
        .enumerate()
        .flat_map(|(i, r)| (0..r.n).map(move |j| (i, j)))
        .peekable();
    if opt.max_new_tokens == 0 || queue.peek().is_none() {
        return Ok(out);
    }
    let total: usize = requests.iter().map(|r| r.n).sum();
    let rows = rows.clamp(1, total);
    let v = model.cfg.vocab_size;
    let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let mut cache = model.alloc_cache(be, rows, longest + opt.max_new_tokens)?;
    let mut step_acts = model.alloc_activations(be, rows, 1, false)?;
    let mut slots: Vec<Option<Active>> = (0..rows).map(|_| None).collect();
    let mut prefilled: Option<Prefilled<B::Buf>> = None;
    let mut next = vec![0u32; rows];
    loop {
        for (s, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let Some((req, sample)) = queue.next() else {
                break;
            };
            let prompt = requests[req].prompt;
            if prefilled.as_ref().is_none_or(|p| p.req != req) {
                // Dropped first: the previous prompt's cache is not needed any more.
                drop(prefilled.take());
                let mut cache = model.alloc_cache(be, 1, prompt.len())?;
                let mut acts = model.alloc_activations(be, 1, prompt.len(), false)?;
                model.forward_cached(be, prompt, &mut acts, &mut cache)?;
                prefilled = Some(Prefilled { req, cache, acts });
            }
            let p = prefilled.as_ref().expect("prefilled above");
            cache.copy_prefix(be, s, &p.cache, 0, prompt.len())?;
            // The prompt's next-token logits stand in for this slot's decode-step logits.
            be.copy_range(&mut step_acts.logits, s * v, &p.acts.logits, 0, v);
            *slot = Some(Active {
                req,
                sample,
                ids: Vec::new(),
            });
        }
        if slots.iter().all(Option::is_none) {
            break;
        }
        let keys: Vec<DrawKey> = slots
            .iter()
            .map(|a| match a {
                Some(a) => DrawKey {
                    seed: requests[a.req].seed,
                    sequence: a.sample as u64,
                    step: a.ids.len() as u64,
                },
                None => DrawKey {
                    seed: 0,
                    sequence: 0,
                    step: 0,
                },
            })
            .collect();
        let drawn = be.sample(&step_acts.logits, rows, v, &opt.sampling, &keys)?;
        for (s, slot) in slots.iter_mut().enumerate() {
            next[s] = 0;
            let Some(a) = slot else {
                cache.clear(s);
                continue;
            };
            let tok = drawn[s];
            a.ids.push(tok);
            next[s] = tok;
            let stopped = !opt.ignore_eos && opt.stop_ids.contains(&tok);
            if stopped || a.ids.len() == opt.max_new_tokens {
                let a = slot.take().expect("active");
                out[a.req][a.sample] = Completion {
                    ids: a.ids,
                    stopped,
                };
                // The slot decodes a placeholder at position 0 until it is refilled.
                cache.clear(s);
                next[s] = 0;
            }
        }
        if slots.iter().all(Option::is_none) {
            // Nothing to decode: refill every slot, or stop.
            if queue.peek().is_none() {
                break;
            }
            continue;
        }
        model.forward_cached(be, &next, &mut step_acts, &mut cache)?;
    }
    Ok(out)
}
