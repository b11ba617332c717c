//! The Qwen2 decoder, written once over the `Backend` interface: training forward (keeping
//! activations), full backward (gradients for every parameter), and KV-cache inference.

use crate::backend::{AttnShape, Backend, RowStats, Starts};
use crate::config::ModelConfig;
use crate::weights::WeightFiles;
use anyhow::{bail, Result};
use std::path::Path;

pub struct LayerParams<T> {
    pub input_norm: T,
    pub wq: T,
    pub bq: T,
    pub wk: T,
    pub bk: T,
    pub wv: T,
    pub bv: T,
    pub wo: T,
    pub post_norm: T,
    pub w_gate: T,
    pub w_up: T,
    pub w_down: T,
}

/// Parameters (or gradients, or optimizer moments: anything shaped like the model).
pub struct Params<T> {
    pub embed: T,
    pub layers: Vec<LayerParams<T>>,
    pub final_norm: T,
    /// None when the lm_head is tied to the embedding.
    pub lm_head: Option<T>,
}

/// Every tensor of the model with its Hugging Face name and shape, in a fixed order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        specs.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![qd, h]),
            (format!("{p}.self_attn.q_proj.bias"), vec![qd]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kvd, h]),
            (format!("{p}.self_attn.k_proj.bias"), vec![kvd]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kvd, h]),
            (format!("{p}.self_attn.v_proj.bias"), vec![kvd]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, qd]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    specs.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    specs
}

/// Random tensors in `tensor_specs` order: normal-ish weights of the given scale, norm weights
/// one. Deterministic in `seed` (tests and benchmarks; real runs load checkpoints).
pub fn random_tensors(cfg: &ModelConfig, seed: u64, scale: f32) -> Vec<Vec<f32>> {
    tensor_specs(cfg)
        .iter()
        .enumerate()
        .map(|(ti, (name, shape))| {
            let n: usize = shape.iter().product();
            if name.ends_with("norm.weight") {
                return vec![1.0; n];
            }
            // Counter-based draws, so they are made in parallel with the same values: two 7B
            // layers (the bench's model) are half a billion of them.
            use rayon::prelude::*;
            (0..n as u64)
                .into_par_iter()
                .map(|i| (crate::sampling::uniform(seed, ti as u64, i) * 2.0 - 1.0) * scale * 1.732)
                .collect()
        })
        .collect()
}

impl<T> Params<T> {
    /// Builds from tensors in `tensor_specs` order.
    pub fn from_list(cfg: &ModelConfig, list: Vec<T>) -> Params<T> {
        let mut it = list.into_iter();
        let mut next = || it.next().expect("tensor list shorter than tensor_specs");
        let embed = next();
        let layers = (0..cfg.num_layers)
            .map(|_| LayerParams {
                input_norm: next(),
                wq: next(),
                bq: next(),
                wk: next(),
                bk: next(),
                wv: next(),
                bv: next(),
                wo: next(),
                post_norm: next(),
                w_gate: next(),
                w_up: next(),
                w_down: next(),
            })
            .collect();
        let final_norm = next();
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(next())
        };
        Params {
            embed,
            layers,
            final_norm,
            lm_head,
        }
    }

    /// References in `tensor_specs` order.
    pub fn list(&self) -> Vec<&T> {
        let mut v = vec![&self.embed];
        for l in &self.layers {
            v.extend([
                &l.input_norm,
                &l.wq,
                &l.bq,
                &l.wk,
                &l.bk,
                &l.wv,
                &l.bv,
                &l.wo,
                &l.post_norm,
                &l.w_gate,
                &l.w_up,
                &l.w_down,
            ]);
        }
        v.push(&self.final_norm);
        v.extend(self.lm_head.as_ref());
        v
    }

    pub fn list_mut(&mut self) -> Vec<&mut T> {
        let mut v = vec![&mut self.embed];
        for l in &mut self.layers {
            v.extend([
                &mut l.input_norm,
                &mut l.wq,
                &mut l.bq,
                &mut l.wk,
                &mut l.bk,
                &mut l.wv,
                &mut l.bv,
                &mut l.wo,
                &mut l.post_norm,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]);
        }
        v.push(&mut self.final_norm);
        v.extend(self.lm_head.as_mut());
        v
    }
}

/// Buffers of one layer's forward pass, kept for its backward.
pub struct LayerActs<T> {
    x_in: T,
    xn: T,
    rstd1: T,
    q: T,
    k: T,
    v: T,
    att: T,
    lse: T,
    x_mid: T,
    xn2: T,
    rstd2: T,
    gate: T,
    up: T,
    h: T,
}

/// Gradient scratch, allocated on the first backward of a given size.
struct Scratch<T> {
    dx: T,
    dxn: T,
    datt: T,
    dq: T,
    dk: T,
    dv: T,
    dh: T,
    dgate: T,
    dup: T,
}

pub use crate::lm_head::LM_HEAD_CHUNK;

/// Activations of one forward call over `batch × seq` tokens.
pub struct Activations<T> {
    pub batch: usize,
    pub seq: usize,
    ids: Vec<u32>,
    x: T,
    /// Every layer's activations after a training forward; one set, reused by each layer in
    /// turn, for inference and under recompute.
    layers: Vec<LayerActs<T>>,
    /// Under recompute, each layer's input [batch·seq, hidden]; otherwise empty.
    inputs: Vec<T>,
    /// The layer whose activations the one set in `layers` holds, under recompute.
    holds: Option<usize>,
    x_final: T,
    xf: T,
    rstdf: T,
    /// [batch·seq, vocab] after `forward_train`; [batch, vocab] after `forward_cached`;
    /// empty when only the chunked statistics path ran.
    pub logits: T,
    scratch: Option<Scratch<T>>,
    chunk: Option<crate::lm_head::Chunks<T>>,
}

impl<T> Activations<T> {
    /// Whether these hold what a backward over a `layers`-layer model needs.
    fn for_training(&self, layers: usize) -> bool {
        self.layers.len() == layers || self.inputs.len() == layers
    }

    /// Values held in every buffer: (saved activations, gradient scratch, lm_head chunk).
    /// The memory plan's tests hold its counts to these.
    pub fn held<B: Backend<Buf = T>>(&self, be: &B) -> (usize, usize, usize) {
        let saved = self
            .layers
            .iter()
            .flat_map(|la| {
                [
                    &la.x_in, &la.xn, &la.rstd1, &la.q, &la.k, &la.v, &la.att, &la.lse, &la.x_mid,
                    &la.xn2, &la.rstd2, &la.gate, &la.up, &la.h,
                ]
            })
            .chain(&self.inputs)
            .chain([&self.x, &self.x_final, &self.xf, &self.rstdf, &self.logits])
            .map(|b| be.len(b))
            .sum();
        let scratch = self.scratch.as_ref().map_or(0, |s| {
            [
                &s.dx, &s.dxn, &s.datt, &s.dq, &s.dk, &s.dv, &s.dh, &s.dgate, &s.dup,
            ]
            .iter()
            .map(|b| be.len(b))
            .sum()
        });
        let chunk = self.chunk.as_ref().map_or(0, |c| c.held(be));
        (saved, scratch, chunk)
    }
}

impl<T> KvCache<T> {
    /// Values held, for the memory plan's tests.
    pub fn held<B: Backend<Buf = T>>(&self, be: &B) -> usize {
        self.k.iter().chain(&self.v).map(|b| be.len(b)).sum()
    }

    /// Positions sequence b has filled.
    pub fn len(&self, b: usize) -> usize {
        self.lens[b] as usize
    }

    /// Every sequence's filled positions.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }

    /// Where the next forward writes: one start for all when the sequences are level.
    fn starts(&self) -> Starts<'_> {
        match self.lens.split_first() {
            Some((&first, rest)) if rest.iter().all(|&l| l == first) => {
                Starts::Same(first as usize)
            }
            _ => Starts::Each(&self.lens),
        }
    }

    /// Forgets sequence b's positions from `len` on, if it holds more: the next forward
    /// overwrites them (the decode benchmark replays one step at fixed lengths this way).
    pub fn truncate(&mut self, b: usize, len: usize) {
        self.lens[b] = self.lens[b].min(len as u32);
    }

    /// Empties sequence b's slot for reuse: a finished sequence's row takes a new one.
    pub fn clear(&mut self, b: usize) {
        self.lens[b] = 0;
    }

    /// Copies the first `len` positions of `src`'s sequence `from` into sequence `to`, which then
    /// holds exactly them: a prompt prefilled once seeds every sample of its group.
    pub fn copy_prefix<B: Backend<Buf = T>>(
        &mut self,
        be: &B,
        to: usize,
        src: &KvCache<T>,
        from: usize,
        len: usize,
    ) -> Result<()> {
        if to >= self.batch || from >= src.batch || len > src.len(from) || len > self.cap {
            bail!(
                "KV cache copy: {len} positions of sequence {from} (of {}, holding {}) into \
                 sequence {to} (of {}, capacity {})",
                src.batch,
                src.lens.get(from).copied().unwrap_or(0),
                self.batch,
                self.cap
            );
        }
        let row = be.len(&self.k[0]) / (self.batch * self.cap);
        for (dst, s) in self
            .k
            .iter_mut()
            .zip(&src.k)
            .chain(self.v.iter_mut().zip(&src.v))
        {
            be.copy_range(dst, to * self.cap * row, s, from * src.cap * row, len * row);
        }
        self.lens[to] = len as u32;
        Ok(())
    }
}

pub struct KvCache<T> {
    pub batch: usize,
    pub cap: usize,
    /// Positions filled, per sequence: sequences sampled together end at different lengths, and
    /// a finished one's slot is refilled with a new sequence.
    lens: Vec<u32>,
    k: Vec<T>,
    v: Vec<T>,
}

/// Where a layer forward runs: the batch, this call's positions, and whether the layer's output
/// is wanted.
#[derive(Clone, Copy)]
struct Span<'a> {
    batch: usize,
    seq: usize,
    starts: Starts<'a>,
    output: bool,
}

pub struct Qwen2<B: Backend> {
    pub cfg: ModelConfig,
    pub params: Params<B::Buf>,
    /// Activation checkpointing: a training forward keeps only each layer's input, and the
    /// backward recomputes one layer at a time from it into one shared set of buffers (one more
    /// forward, less the down projections; at Qwen2.5-7B's 28 layers, 8% of the saved
    /// activations).
    pub recompute: bool,
}

impl<B: Backend> Qwen2<B> {
    /// Loads every tensor from the checkpoint, checking names and shapes.
    pub fn load(be: &B, cfg: ModelConfig, weights: &WeightFiles) -> Result<Self> {
        let mut list = Vec::new();
        for (name, shape) in tensor_specs(&cfg) {
            let buf = match weights.load_bf16(&name, &shape)? {
                Some(raw) => be.upload_bf16(&raw)?,
                None => be.upload(&weights.load_f32(&name, &shape)?)?,
            };
            list.push(buf);
        }
        Ok(Qwen2 {
            params: Params::from_list(&cfg, list),
            cfg,
            recompute: false,
        })
    }

    pub fn load_dir(be: &B, dir: &Path) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = WeightFiles::open_dir(dir)?;
        Self::load(be, cfg, &weights)
    }

    /// A model with the given host tensors (tests and benchmarks).
    pub fn from_host(be: &B, cfg: ModelConfig, tensors: &[Vec<f32>]) -> Result<Self> {
        let list = tensors
            .iter()
            .map(|t| be.upload(t))
            .collect::<Result<Vec<_>>>()?;
        Ok(Qwen2 {
            params: Params::from_list(&cfg, list),
            cfg,
            recompute: false,
        })
    }

    /// Zeroed f32 buffers shaped like the parameters, for gradients and optimizer moments.
    pub fn zeros_like_params(&self, be: &B) -> Result<Params<B::Buf>> {
        let list = tensor_specs(&self.cfg)
            .iter()
            .map(|(_, s)| be.alloc_f32(s.iter().product()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Params::from_list(&self.cfg, list))
    }

    fn lm_head(&self) -> &B::Buf {
        self.params.lm_head.as_ref().unwrap_or(&self.params.embed)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!(
                "token id {bad} is out of range for vocab_size {}",
                self.cfg.vocab_size
            );
        }
        Ok(())
    }

    pub fn alloc_activations(
        &self,
        be: &B,
        batch: usize,
        seq: usize,
        train: bool,
    ) -> Result<Activations<B::Buf>> {
        let c = &self.cfg;
        let n = batch * seq;
        let (h, qd, kvd, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let keep_all = train && !self.recompute;
        let n_layers = if keep_all { c.num_layers } else { 1 };
        let n_inputs = if train && self.recompute {
            c.num_layers
        } else {
            0
        };
        let inputs = (0..n_inputs)
            .map(|_| be.alloc(n * h))
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..n_layers)
            .map(|_| {
                Ok(LayerActs {
                    x_in: be.alloc(n * h)?,
                    xn: be.alloc(n * h)?,
                    rstd1: be.alloc_f32(n)?,
                    q: be.alloc(n * qd)?,
                    k: be.alloc(n * kvd)?,
                    v: be.alloc(n * kvd)?,
                    att: be.alloc(n * qd)?,
                    lse: be.alloc_f32(n * c.num_heads)?,
                    x_mid: be.alloc(n * h)?,
                    xn2: be.alloc(n * h)?,
                    rstd2: be.alloc_f32(n)?,
                    gate: be.alloc(n * i)?,
                    up: be.alloc(n * i)?,
                    h: be.alloc(n * i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Training logits are allocated by forward_train when it runs: the chunked statistics
        // path never needs them.
        let logit_rows = if train { 0 } else { batch };
        Ok(Activations {
            batch,
            seq,
            ids: Vec::new(),
            x: be.alloc(n * h)?,
            layers,
            inputs,
            holds: None,
            x_final: be.alloc(n * h)?,
            xf: be.alloc(n * h)?,
            rstdf: be.alloc_f32(n)?,
            logits: be.alloc(logit_rows * c.vocab_size)?,
            scratch: None,
            chunk: None,
        })
    }

    pub fn alloc_cache(&self, be: &B, batch: usize, cap: usize) -> Result<KvCache<B::Buf>> {
        let n = batch * cap * self.cfg.kv_dim();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..self.cfg.num_layers {
            k.push(be.alloc(n)?);
            v.push(be.alloc(n)?);
        }
        Ok(KvCache {
            batch,
            cap,
            lens: vec![0; batch],
            k,
            v,
        })
    }

    /// The layer stack over acts.x. With a cache, new k/v are appended and attention reads the
    /// cache; without one, attention reads this call's k/v (training, positions from 0).
    fn run_layers(
        &self,
        be: &B,
        acts: &mut Activations<B::Buf>,
        mut cache: Option<&mut KvCache<B::Buf>>,
    ) {
        let c = &self.cfg;
        let (batch, seq) = (acts.batch, acts.seq);
        // The layers write the cache while they read where it starts: a copy of the lengths.
        let lens: Vec<u32> = cache.as_ref().map_or(vec![], |kc| kc.lens.clone());
        let starts = match cache.as_ref().map(|kc| kc.starts()) {
            None | Some(Starts::Same(_)) => Starts::Same(lens.first().map_or(0, |&l| l as usize)),
            Some(Starts::Each(_)) => Starts::Each(&lens),
        };
        let last = acts.layers.len() - 1;
        for l in 0..c.num_layers {
            if let Some(input) = acts.inputs.get_mut(l) {
                be.copy(input, &acts.x);
            }
            let span = Span {
                batch,
                seq,
                starts,
                output: true,
            };
            let la = &mut acts.layers[l.min(last)];
            self.layer_forward(be, l, la, &mut acts.x, cache.as_deref_mut(), span);
            acts.holds = Some(l);
        }
        if let Some(kc) = cache {
            for len in &mut kc.lens {
                *len += seq as u32;
            }
        }
        let n = batch * seq;
        be.copy(&mut acts.x_final, &acts.x);
        be.rmsnorm(
            &mut acts.xf,
            &mut acts.rstdf,
            &acts.x_final,
            &self.params.final_norm,
            n,
            c.hidden_size,
            c.rms_norm_eps,
        );
    }

    /// Causal attention of `seq` new positions over themselves, per sequence of the batch.
    fn self_attention(&self, batch: usize, seq: usize) -> AttnShape {
        let c = &self.cfg;
        AttnShape {
            batch,
            tq: seq,
            tk: seq,
            cap: seq,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// Layer `l` over x (in place: x becomes the layer's output), keeping what its backward
    /// needs in `la`. Without `span.output` it stops once `la` is complete, before the down
    /// projection, which is all a recompute for the backward needs.
    fn layer_forward(
        &self,
        be: &B,
        l: usize,
        la: &mut LayerActs<B::Buf>,
        x: &mut B::Buf,
        cache: Option<&mut KvCache<B::Buf>>,
        span: Span,
    ) {
        let c = &self.cfg;
        let p = &self.params.layers[l];
        let Span {
            batch, seq, starts, ..
        } = span;
        let n = batch * seq;
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        be.copy(&mut la.x_in, x);
        be.rmsnorm(
            &mut la.xn,
            &mut la.rstd1,
            x,
            &p.input_norm,
            n,
            h,
            c.rms_norm_eps,
        );
        be.matmul(&mut la.q, &la.xn, &p.wq, Some(&p.bq), n, h, qd);
        be.matmul(&mut la.k, &la.xn, &p.wk, Some(&p.bk), n, h, kvd);
        be.matmul(&mut la.v, &la.xn, &p.wv, Some(&p.bv), n, h, kvd);
        be.rope(
            &mut la.q,
            batch,
            seq,
            c.num_heads,
            c.head_dim,
            starts,
            c.rope_theta,
            false,
        );
        be.rope(
            &mut la.k,
            batch,
            seq,
            c.num_kv_heads,
            c.head_dim,
            starts,
            c.rope_theta,
            false,
        );
        let mut shape = self.self_attention(batch, seq);
        match cache {
            Some(kc) => {
                be.kv_write(&mut kc.k[l], &la.k, batch, kc.cap, starts, seq, kvd);
                be.kv_write(&mut kc.v[l], &la.v, batch, kc.cap, starts, seq, kvd);
                shape.cap = kc.cap;
                match starts {
                    Starts::Same(pos0) => {
                        shape.tk = pos0 + seq;
                        be.attention(&mut la.att, &mut la.lse, &la.q, &kc.k[l], &kc.v[l], shape);
                    }
                    // One new position per sequence (forward_cached checks it).
                    Starts::Each(s) => {
                        let kv_len: Vec<u32> = s.iter().map(|&p| p + 1).collect();
                        shape.tk = kv_len.iter().copied().max().unwrap_or(1) as usize;
                        be.attention_decode(
                            &mut la.att,
                            &mut la.lse,
                            &la.q,
                            &kc.k[l],
                            &kc.v[l],
                            shape,
                            &kv_len,
                        );
                    }
                }
            }
            None => be.attention(&mut la.att, &mut la.lse, &la.q, &la.k, &la.v, shape),
        }
        // x_mid = x + att·Woᵀ; the o_proj output lands in xn2 as scratch before the add.
        be.matmul(&mut la.xn2, &la.att, &p.wo, None, n, qd, h);
        be.copy(&mut la.x_mid, x);
        be.add(&mut la.x_mid, &la.xn2);
        be.rmsnorm(
            &mut la.xn2,
            &mut la.rstd2,
            &la.x_mid,
            &p.post_norm,
            n,
            h,
            c.rms_norm_eps,
        );
        be.matmul(&mut la.gate, &la.xn2, &p.w_gate, None, n, h, inter);
        be.matmul(&mut la.up, &la.xn2, &p.w_up, None, n, h, inter);
        be.swiglu(&mut la.h, &la.gate, &la.up);
        if span.output {
            be.matmul(x, &la.h, &p.w_down, None, n, inter, h);
            be.add(x, &la.x_mid);
        }
    }

    /// Forward over `ids` = [batch, seq] from position 0 up to the final norm, keeping
    /// everything backward needs. The lm_head is left to `forward_train` (full logits) or to
    /// `lm_head_stats` (chunked).
    pub fn forward_hidden(
        &self,
        be: &B,
        ids: &[u32],
        acts: &mut Activations<B::Buf>,
    ) -> Result<()> {
        let n = acts.batch * acts.seq;
        if ids.len() != n {
            bail!(
                "forward: {} ids for activations of {}×{} tokens",
                ids.len(),
                acts.batch,
                acts.seq
            );
        }
        if !acts.for_training(self.cfg.num_layers) {
            bail!("forward: these activations were allocated for inference (train = false)");
        }
        self.check_ids(ids)?;
        acts.ids = ids.to_vec();
        be.embedding(&mut acts.x, &self.params.embed, ids, self.cfg.hidden_size);
        self.run_layers(be, acts, None);
        Ok(())
    }

    /// `forward_hidden`, then the logits of every position in `acts.logits`.
    pub fn forward_train(&self, be: &B, ids: &[u32], acts: &mut Activations<B::Buf>) -> Result<()> {
        self.forward_hidden(be, ids, acts)?;
        let n = acts.batch * acts.seq;
        let v = self.cfg.vocab_size;
        if be.len(&acts.logits) != n * v {
            acts.logits = be.alloc(n * v)?;
        }
        be.matmul(
            &mut acts.logits,
            &acts.xf,
            self.lm_head(),
            None,
            n,
            self.cfg.hidden_size,
            v,
        );
        Ok(())
    }

    fn chunk_bufs(&self, be: &B, acts: &mut Activations<B::Buf>) -> Result<()> {
        if acts.chunk.is_none() {
            let n = acts.batch * acts.seq;
            let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
            acts.chunk = Some(crate::lm_head::Chunks::new(be, n, h, v)?);
        }
        Ok(())
    }

    /// Softmax statistics at `temperature` of every position's next-token distribution after
    /// `forward_hidden`, computed LM_HEAD_CHUNK rows at a time.
    pub fn lm_head_stats(
        &self,
        be: &B,
        acts: &mut Activations<B::Buf>,
        targets: &[u32],
        temperature: f32,
    ) -> Result<Vec<RowStats>> {
        let n = acts.batch * acts.seq;
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        self.chunk_bufs(be, acts)?;
        let ch = acts.chunk.as_mut().expect("allocated above");
        crate::lm_head::stats(
            be,
            ch,
            &acts.xf,
            self.lm_head(),
            (n, h, v),
            targets,
            temperature,
        )
    }

    /// The statistics of `lm_head_stats` and the backward of Σ_r a[r]·entropy[r] +
    /// b[r]·logprob[r] through the chunked lm_head and the whole model, accumulating (+=) into
    /// `grads`, with (a, b) from the statistics by `coef`: the logits are computed once where
    /// `coef` allows (`lm_head::stats_and_grad`). Returns the statistics.
    pub fn lm_head_stats_grad(
        &self,
        be: &B,
        acts: &mut Activations<B::Buf>,
        targets: &[u32],
        temperature: f32,
        coef: crate::lm_head::Coef,
        grads: &mut Params<B::Buf>,
    ) -> Result<Vec<RowStats>> {
        let n = acts.batch * acts.seq;
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        self.alloc_scratch(be, acts)?;
        self.chunk_bufs(be, acts)?;
        let s = acts.scratch.as_mut().expect("allocated above");
        let ch = acts.chunk.as_mut().expect("allocated above");
        let dlm = grads.lm_head.as_mut().unwrap_or(&mut grads.embed);
        let stats = crate::lm_head::stats_and_grad(
            be,
            ch,
            &mut s.dxn,
            dlm,
            &acts.xf,
            self.lm_head(),
            (n, h, v),
            targets,
            temperature,
            coef,
        )?;
        self.backward_from_xf(be, acts, grads)?;
        Ok(stats)
    }

    /// Incremental forward: appends `ids` = [batch, seq] to the cache and leaves the logits of
    /// each sequence's last new position in `acts.logits` = [batch, vocab].
    pub fn forward_cached(
        &self,
        be: &B,
        ids: &[u32],
        acts: &mut Activations<B::Buf>,
        cache: &mut KvCache<B::Buf>,
    ) -> Result<()> {
        let (batch, seq) = (acts.batch, acts.seq);
        if ids.len() != batch * seq || cache.batch != batch {
            bail!(
                "forward_cached: {} ids for a batch of {batch}×{seq} (cache batch {})",
                ids.len(),
                cache.batch
            );
        }
        let longest = cache.lens.iter().copied().max().unwrap_or(0) as usize;
        if longest + seq > cache.cap {
            bail!(
                "KV cache full: {longest} + {seq} positions exceed its capacity {}",
                cache.cap
            );
        }
        if seq > 1 && matches!(cache.starts(), Starts::Each(_)) {
            bail!(
                "forward_cached: {seq} new positions over sequences of different lengths; a \
                 ragged cache takes one token per sequence (prefill each prompt alone)"
            );
        }
        self.check_ids(ids)?;
        be.embedding(&mut acts.x, &self.params.embed, ids, self.cfg.hidden_size);
        self.run_layers(be, acts, Some(cache));
        // Only the last position of each sequence needs logits: gather those rows first.
        let last_rows: Vec<u32> = (0..batch).map(|b| (b * seq + seq - 1) as u32).collect();
        let h = self.cfg.hidden_size;
        be.embedding(&mut acts.x_final, &acts.xf, &last_rows, h);
        be.matmul(
            &mut acts.logits,
            &acts.x_final,
            self.lm_head(),
            None,
            batch,
            h,
            self.cfg.vocab_size,
        );
        Ok(())
    }

    /// Gradient scratch, allocated on the first backward of a given size.
    fn alloc_scratch(&self, be: &B, acts: &mut Activations<B::Buf>) -> Result<()> {
        let c = &self.cfg;
        let n = acts.batch * acts.seq;
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        if acts.scratch.is_none() {
            acts.scratch = Some(Scratch {
                dx: be.alloc(n * h)?,
                dxn: be.alloc(n * h)?,
                datt: be.alloc(n * qd)?,
                dq: be.alloc(n * qd)?,
                dk: be.alloc(n * kvd)?,
                dv: be.alloc(n * kvd)?,
                dh: be.alloc(n * inter)?,
                dgate: be.alloc(n * inter)?,
                dup: be.alloc(n * inter)?,
            });
        }
        Ok(())
    }

    /// Backward from dlogits [batch·seq, vocab] through the activations of the last
    /// `forward_train`, accumulating (+=) into `grads`.
    pub fn backward(
        &self,
        be: &B,
        acts: &mut Activations<B::Buf>,
        dlogits: &B::Buf,
        grads: &mut Params<B::Buf>,
    ) -> Result<()> {
        let c = &self.cfg;
        let n = acts.batch * acts.seq;
        if !acts.for_training(c.num_layers) || acts.ids.len() != n {
            bail!("backward needs the activations of a forward_train call");
        }
        self.alloc_scratch(be, acts)?;
        let s = acts.scratch.as_mut().expect("scratch allocated above");
        // logits = xf · lm_headᵀ
        be.zero(&mut s.dxn);
        let dlm = grads.lm_head.as_mut().unwrap_or(&mut grads.embed);
        be.matmul_bwd(
            Some(&mut s.dxn),
            Some(dlm),
            None,
            dlogits,
            &acts.xf,
            self.lm_head(),
            n,
            c.hidden_size,
            c.vocab_size,
        );
        self.backward_from_xf(be, acts, grads)
    }

    /// The backward below the lm_head, from d(loss)/d(xf) in the scratch `dxn`.
    fn backward_from_xf(
        &self,
        be: &B,
        acts: &mut Activations<B::Buf>,
        grads: &mut Params<B::Buf>,
    ) -> Result<()> {
        let c = &self.cfg;
        let (batch, seq) = (acts.batch, acts.seq);
        let n = batch * seq;
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        if !acts.for_training(c.num_layers) || acts.ids.len() != n {
            bail!("backward needs the activations of a training forward");
        }
        let Activations {
            x,
            layers,
            inputs,
            holds,
            scratch,
            x_final,
            rstdf,
            ids,
            ..
        } = acts;
        let s = scratch.as_mut().expect("scratch allocated by the caller");
        be.zero(&mut s.dx);
        be.rmsnorm_bwd(
            &mut s.dx,
            &mut grads.final_norm,
            &s.dxn,
            x_final,
            &self.params.final_norm,
            rstdf,
            n,
            h,
        );

        let shape = self.self_attention(batch, seq);
        let recompute = !inputs.is_empty();
        for l in (0..c.num_layers).rev() {
            // The forward leaves the last layer's activations in place.
            if recompute && *holds != Some(l) {
                // x is free once the forward is done: the final norm reads x_final.
                be.copy(x, &inputs[l]);
                let span = Span {
                    batch,
                    seq,
                    starts: Starts::Same(0),
                    output: false,
                };
                self.layer_forward(be, l, &mut layers[0], x, None, span);
                *holds = Some(l);
            }
            let (p, g, la) = (
                &self.params.layers[l],
                &mut grads.layers[l],
                &layers[if recompute { 0 } else { l }],
            );
            // x_out = x_mid + down(swiglu(gate(xn2), up(xn2))): dx flows to x_mid unchanged.
            be.zero(&mut s.dh);
            be.matmul_bwd(
                Some(&mut s.dh),
                Some(&mut g.w_down),
                None,
                &s.dx,
                &la.h,
                &p.w_down,
                n,
                inter,
                h,
            );
            be.swiglu_bwd(&mut s.dgate, &mut s.dup, &s.dh, &la.gate, &la.up);
            be.zero(&mut s.dxn);
            be.matmul_bwd(
                Some(&mut s.dxn),
                Some(&mut g.w_gate),
                None,
                &s.dgate,
                &la.xn2,
                &p.w_gate,
                n,
                h,
                inter,
            );
            be.matmul_bwd(
                Some(&mut s.dxn),
                Some(&mut g.w_up),
                None,
                &s.dup,
                &la.xn2,
                &p.w_up,
                n,
                h,
                inter,
            );
            be.rmsnorm_bwd(
                &mut s.dx,
                &mut g.post_norm,
                &s.dxn,
                &la.x_mid,
                &p.post_norm,
                &la.rstd2,
                n,
                h,
            );

            // x_mid = x_in + att · Woᵀ
            be.zero(&mut s.datt);
            be.matmul_bwd(
                Some(&mut s.datt),
                Some(&mut g.wo),
                None,
                &s.dx,
                &la.att,
                &p.wo,
                n,
                qd,
                h,
            );
            be.attention_bwd(
                &mut s.dq, &mut s.dk, &mut s.dv, &s.datt, &la.att, &la.lse, &la.q, &la.k, &la.v,
                shape,
            );
            be.rope(
                &mut s.dq,
                batch,
                seq,
                c.num_heads,
                c.head_dim,
                Starts::Same(0),
                c.rope_theta,
                true,
            );
            be.rope(
                &mut s.dk,
                batch,
                seq,
                c.num_kv_heads,
                c.head_dim,
                Starts::Same(0),
                c.rope_theta,
                true,
            );
            be.zero(&mut s.dxn);
            be.matmul_bwd(
                Some(&mut s.dxn),
                Some(&mut g.wq),
                Some(&mut g.bq),
                &s.dq,
                &la.xn,
                &p.wq,
                n,
                h,
                qd,
            );
            be.matmul_bwd(
                Some(&mut s.dxn),
                Some(&mut g.wk),
                Some(&mut g.bk),
                &s.dk,
                &la.xn,
                &p.wk,
                n,
                h,
                kvd,
            );
            be.matmul_bwd(
                Some(&mut s.dxn),
                Some(&mut g.wv),
                Some(&mut g.bv),
                &s.dv,
                &la.xn,
                &p.wv,
                n,
                h,
                kvd,
            );
            be.rmsnorm_bwd(
                &mut s.dx,
                &mut g.input_norm,
                &s.dxn,
                &la.x_in,
                &p.input_norm,
                &la.rstd1,
                n,
                h,
            );
        }
        be.embedding_bwd(&mut grads.embed, &s.dx, ids, h);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drawn in parallel, each value is still the draw of its own index: across the edges of
    /// rayon's splits and at the end of a tensor.
    #[test]
    fn random_tensors_are_the_draws_of_their_indices() {
        let cfg = crate::kernel_checks::model_configs().remove(0);
        let t = random_tensors(&cfg, 9, 0.5);
        let specs = tensor_specs(&cfg);
        let (ti, big) = t
            .iter()
            .enumerate()
            .max_by_key(|(_, v)| v.len())
            .expect("tensors");
        assert!(big.len() > (1 << 16) + 1, "{} values", big.len());
        assert!(!specs[ti].0.ends_with("norm.weight"));
        for i in [0, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, big.len() - 1] {
            let want = (crate::sampling::uniform(9, ti as u64, i as u64) * 2.0 - 1.0) * 0.5 * 1.732;
            assert_eq!(big[i], want, "value {i} of {}", specs[ti].0);
        }
    }
}
