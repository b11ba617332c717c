//! The backend interface the one model code path runs on.
//!
//! Buffers are flat arrays of logical f32 values; how they are stored (f32 on the CPU, bf16 on
//! the GPU) is the backend's business. Shapes are passed explicitly, as in llm.c, so every op
//! reads like its kernel. Ops are infallible: a GPU backend keeps the first launch error and
//! reports it from `download`/`sync`, the way CUDA's own sticky errors work.
//!
//! Gradient outputs of `*_bwd` ops marked "(+=)" accumulate, so that micro-batches and the
//! several consumers of one activation (q, k and v all read the normed input) add up without
//! extra buffers; outputs marked "(=)" are overwritten.

pub mod cpu;
pub mod cuda;
pub mod cuda_attention;
pub mod cuda_attention_unfused;
pub mod cuda_rl;

use anyhow::{bail, Result};

/// Shapes of one attention call.
///
/// q: [batch, tq, heads, head_dim]; k, v: [batch, cap, kv_heads, head_dim] of which the first
/// `tk` rows are valid; out: like q; lse: [batch, tq, heads]. Query i sits at absolute position
/// `tk - tq + i` and attends to keys 0..=that position (causal, with a KV-cache offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub cap: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Where each sequence of a batch sits in a KV cache: the position of its first new row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Starts<'a> {
    /// Every sequence at the same position: training (0) and a prefill.
    Same(usize),
    /// Sequence b at `starts[b]`: a ragged cache, whose sequences grew at their own pace.
    Each(&'a [u32]),
}

impl Starts<'_> {
    /// Where sequence b starts.
    pub fn of(&self, b: usize) -> usize {
        match self {
            Starts::Same(p) => *p,
            Starts::Each(s) => s[b] as usize,
        }
    }
}

/// Per-row results of the softmax at a temperature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStats {
    pub logsumexp: f32,
    pub entropy: f32,
    /// Log-prob of the row's target token; 0 where the row has no target.
    pub logprob: f32,
}

/// What the softmax-statistics backward differentiates: Σ_r a[r]·entropy[r] + b[r]·logprob[r]
/// of softmax(logits / temperature) per row, the log-prob being of `targets[r]` (NO_TARGET: none,
/// and b[r] is ignored).
#[derive(Debug, Clone, Copy)]
pub struct StatsLoss<'a> {
    pub targets: &'a [u32],
    pub temperature: f32,
    pub a: &'a [f32],
    pub b: &'a [f32],
}

impl RowStats {
    /// Rows from the f32 layout `Backend::softmax_stats_into` writes: (logsumexp, entropy,
    /// logprob) per row.
    pub fn from_flat(flat: &[f32]) -> Vec<RowStats> {
        flat.chunks_exact(3)
            .map(|c| RowStats {
                logsumexp: c[0],
                entropy: c[1],
                logprob: c[2],
            })
            .collect()
    }

    /// The layout `from_flat` reads.
    pub fn flatten(rows: &[RowStats]) -> Vec<f32> {
        rows.iter()
            .flat_map(|r| [r.logsumexp, r.entropy, r.logprob])
            .collect()
    }
}

/// One AdamW update's scalars (PyTorch's AdamW: decoupled decay, bias correction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Multiplies the gradient first: global-norm clipping folded into the update pass.
    pub grad_scale: f32,
}

/// Marks a row that has no target token in `softmax_stats`.
pub const NO_TARGET: u32 = u32::MAX;

/// What a backend has allocated and copied between host and device, counted where it does so.
/// The model's rule is that a warm layer does neither: `check-kernels` runs the same step at
/// two depths and asks that these counts not grow with the layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Device buffers, scratch, staging and page-locked host memory allocated.
    pub allocs: u64,
    /// Copies from the host to the device (uploads, staged ids and lengths).
    pub to_device: u64,
    /// Copies from the device to the host (downloads, reductions read back).
    pub to_host: u64,
}

impl Traffic {
    /// The counts added since `before`.
    pub fn since(self, before: Traffic) -> Traffic {
        Traffic {
            allocs: self.allocs - before.allocs,
            to_device: self.to_device - before.to_device,
            to_host: self.to_host - before.to_host,
        }
    }
}

/// One optimizer update's settings for `Backend::optimizer_step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerStep {
    /// AdamW's scalars (its `grad_scale` is ignored: the step computes it); None means SGD
    /// with `lr`.
    pub adamw: Option<AdamWStep>,
    pub lr: f32,
    /// Global L2 norm the gradient is clipped to; 0 disables clipping.
    pub max_norm: f32,
    /// Σg² over the whole gradient, when the caller has it: offloaded moments are updated a
    /// group of tensors at a time, and each group is clipped by the norm of all of them.
    pub sumsq: Option<f64>,
    /// The place of the first tensor handed in among all the model's tensors (0 when all of
    /// them are). The GPU's stochastic rounding keys on each tensor's place, so an update done
    /// a group at a time writes the same bits as one over every tensor.
    pub first_tensor: usize,
}

/// AdamW's first and second moments of every tensor, in `Params::list` order.
pub type MomentLists<'a, 'b, T> = (&'a mut [&'b mut T], &'a mut [&'b mut T]);

pub trait Backend {
    type Buf;
    /// f32 values in host memory that the device copies to and from: the optimizer moments
    /// when they are offloaded. Page-locked on the GPU, so that the copies run at the bus's
    /// speed and are queued like kernels.
    type Host;

    fn name(&self) -> String;

    /// A zero-filled buffer of `n` values, in the backend's storage type (bf16 on the GPU):
    /// weights, activations and their gradients.
    fn alloc(&self, n: usize) -> Result<Self::Buf>;
    /// A zero-filled buffer kept in f32 on every backend: normalization and attention
    /// statistics, parameter gradients (they accumulate) and optimizer moments.
    fn alloc_f32(&self, n: usize) -> Result<Self::Buf> {
        self.alloc(n)
    }
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// Uploads into f32 storage (statistics, gradients: what `alloc_f32` holds).
    fn upload_f32(&self, host: &[f32]) -> Result<Self::Buf> {
        self.upload(host)
    }
    /// Uploads bf16 values (a bf16 checkpoint's weights) without a detour through f32 where
    /// the backend stores bf16.
    fn upload_bf16(&self, host: &[half::bf16]) -> Result<Self::Buf> {
        let wide: Vec<f32> = host.iter().map(|x| x.to_f32()).collect();
        self.upload(&wide)
    }
    /// Allocations and host-device copies so far (see [`Traffic`]).
    fn traffic(&self) -> Traffic;
    /// Bytes held by this backend's buffers and scratch (live, peak since the last reset), where
    /// tracked.
    fn memory(&self) -> Option<(usize, usize)> {
        None
    }
    fn reset_peak_memory(&self) {}
    /// Frees the scratch the ops keep between calls, so that the next op's is measured afresh.
    fn release_scratch(&self) {}
    /// The device's (free, total) bytes, where the backend has a device of its own; the CPU
    /// reference has none (a run there is not planned against memory).
    fn device_memory(&self) -> Option<(usize, usize)> {
        None
    }
    /// Bytes of one stored activation or weight value.
    fn storage_bytes(&self) -> usize {
        4
    }
    /// Waits for queued work and reports the first error since the last check.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// `n` zero values in host memory.
    fn alloc_host(&self, n: usize) -> Result<Self::Host>;
    /// dst = src for a buffer in f32 storage, queued in order with the kernels.
    fn copy_to_device(&self, dst: &mut Self::Buf, src: &Self::Host);
    /// dst = src from a buffer in f32 storage, queued; the values are there after `sync`.
    fn copy_to_host(&self, dst: &mut Self::Host, src: &Self::Buf);
    /// Host memory's values, once the copies into it have run (checkpoints).
    fn host_values(&self, h: &Self::Host) -> Result<Vec<f32>>;
    /// Sets host memory's values (resuming from a checkpoint).
    fn set_host_values(&self, h: &mut Self::Host, values: &[f32]) -> Result<()>;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn zero(&self, buf: &mut Self::Buf);
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// dst[dst_off..dst_off + n] = src[src_off..src_off + n]: how contiguous row ranges (a
    /// chunk of tokens) move between buffers without views.
    fn copy_range(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        n: usize,
    );
    /// y += x
    fn add(&self, y: &mut Self::Buf, x: &Self::Buf);
    /// y += alpha * x (used by SGD and the finite-difference checks)
    fn axpy(&self, y: &mut Self::Buf, alpha: f32, x: &Self::Buf);
    /// Σ x², accumulated in f64 (gradient norms).
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64>;
    /// AdamW on one tensor: p, m, v updated in place from gradient g.
    fn adamw(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        h: &AdamWStep,
    );

    /// Σ over the tensors of Σ x²: the whole gradient's squared norm, as `optimizer_step`
    /// reduces it when not handed one. The GPU sums in the same fixed order in both places, so
    /// an update split in groups (offloaded moments) clips by exactly the same scale.
    fn grad_sumsq(&self, grads: &[&Self::Buf]) -> Result<f64> {
        let mut sum = 0.0;
        for g in grads {
            sum += self.sum_squares(g)?;
        }
        Ok(sum)
    }

    /// One update of every parameter tensor: the global gradient norm, the clipping scale
    /// min(1, max_norm / (norm + 1e-6)) folded into the update, and AdamW or SGD. Returns the
    /// norm before clipping; when it is not finite nothing is updated and the caller gets the
    /// norm to report. The default runs tensor by tensor; the GPU reduces the norm and applies
    /// the scale on the device, in one launch each.
    fn optimizer_step(
        &self,
        params: &mut [&mut Self::Buf],
        grads: &[&Self::Buf],
        moments: Option<MomentLists<'_, '_, Self::Buf>>,
        h: &OptimizerStep,
    ) -> Result<f64> {
        let sum = match h.sumsq {
            Some(s) => s,
            None => self.grad_sumsq(grads)?,
        };
        let norm = sum.sqrt();
        if !norm.is_finite() {
            return Ok(norm);
        }
        let scale = if h.max_norm > 0.0 && norm > h.max_norm as f64 {
            (h.max_norm as f64 / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        match (moments, h.adamw) {
            (Some((m, v)), Some(a)) => {
                let a = AdamWStep {
                    grad_scale: scale,
                    ..a
                };
                for (((p, g), m), v) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(m.iter_mut())
                    .zip(v.iter_mut())
                {
                    self.adamw(p, g, m, v, &a);
                }
            }
            _ => {
                for (p, g) in params.iter_mut().zip(grads) {
                    self.axpy(p, -h.lr * scale, g);
                }
            }
        }
        Ok(norm)
    }

    /// out[t] = table[ids[t]] for rows of `dim` values. Also gathers rows of any matrix.
    fn embedding(&self, out: &mut Self::Buf, table: &Self::Buf, ids: &[u32], dim: usize);
    /// dtable[ids[t]] += dout[t] (+=)
    fn embedding_bwd(&self, dtable: &mut Self::Buf, dout: &Self::Buf, ids: &[u32], dim: usize);

    /// out[m, n] = a[m, k] · w[n, k]ᵀ (+ bias[n]): the layout of a PyTorch Linear.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        w: &Self::Buf,
        bias: Option<&Self::Buf>,
        m: usize,
        k: usize,
        n: usize,
    );
    /// da += dout · w, dw += doutᵀ · a, dbias += Σ_rows dout (all +=).
    #[allow(clippy::too_many_arguments)]
    fn matmul_bwd(
        &self,
        da: Option<&mut Self::Buf>,
        dw: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        a: &Self::Buf,
        w: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
    );

    /// out = x / rms(x) * w per row; rstd[row] = 1 / sqrt(mean(x²) + eps) is kept for backward.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    );
    /// dx (+=), dw (+=).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        dim: usize,
    );

    /// Rotates x: [batch, seq, heads, head_dim] in place, half-split (rotate_half) layout,
    /// sequence b at positions starts.of(b)..+seq. `inverse` rotates back, which is also the backward pass since
    /// a rotation's transpose is its inverse.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        starts: Starts,
        theta: f32,
        inverse: bool,
    );

    /// The kernel sets training attention (forward and backward) can run with here at this
    /// head_dim, the default first, for check-kernels and bench to cover each; empty where there
    /// is only one (the CPU).
    fn attention_variants(&self, _head_dim: usize) -> Vec<&'static str> {
        Vec::new()
    }
    /// The kernel set training attention runs with now; None where there is only one.
    fn attention_variant(&self) -> Option<&'static str> {
        None
    }
    /// Runs training attention with `variant` (one of `attention_variants`) from now on.
    fn set_attention_variant(&self, variant: &str) -> Result<()> {
        bail!(
            "{} has one set of attention kernels; {variant:?} is not selectable",
            self.name()
        )
    }

    /// Causal grouped-query attention, softmax scale 1/sqrt(head_dim).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: AttnShape,
    );
    /// Decode over a ragged cache: one query per sequence (s.tq = 1), sequence b's at position
    /// kv_len[b] - 1, seeing its keys 0..kv_len[b]; s.tk is at least the longest.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: AttnShape,
        kv_len: &[u32],
    );
    /// dq, dk, dv (=), shaped like q, k, v.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: AttnShape,
    );
    /// Writes new: [batch, tq, row] into cache: [batch, cap, row], sequence b at positions
    /// starts.of(b)..+tq.
    #[allow(clippy::too_many_arguments)]
    fn kv_write(
        &self,
        cache: &mut Self::Buf,
        new: &Self::Buf,
        batch: usize,
        cap: usize,
        starts: Starts,
        tq: usize,
        row: usize,
    );

    /// out = silu(gate) * up
    fn swiglu(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf);
    /// dgate, dup (=)
    fn swiglu_bwd(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    );

    /// Logsumexp, entropy and target log-prob of softmax(logits / temperature) per row of
    /// logits: [rows, vocab]. `targets[r]` may be NO_TARGET.
    fn softmax_stats(
        &self,
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
        targets: &[u32],
        temperature: f32,
    ) -> Result<Vec<RowStats>> {
        let mut stats = self.alloc_f32(3 * rows)?;
        self.softmax_stats_into(&mut stats, logits, rows, vocab, targets, temperature)?;
        let flat = self.download(&stats)?;
        Ok(RowStats::from_flat(&flat[..3 * rows]))
    }
    /// `softmax_stats` left where the backend computes them: stats (f32, at least 3·rows
    /// values) gets (logsumexp, entropy, logprob) per row, ready for `softmax_stats_bwd_saved`
    /// with no host round trip.
    fn softmax_stats_into(
        &self,
        stats: &mut Self::Buf,
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
        targets: &[u32],
        temperature: f32,
    ) -> Result<()>;
    /// One token per row of logits [rows, vocab], drawn as `sampling::sample` does with the
    /// uniform of the row's key, so a draw depends on its key alone, never on which rows share
    /// the batch. The default downloads the logits and samples on the host; the GPU samples
    /// where the logits are.
    fn sample(
        &self,
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
        p: &crate::sampling::SamplingParams,
        keys: &[crate::sampling::DrawKey],
    ) -> Result<Vec<u32>> {
        if keys.len() != rows {
            bail!("sample: {} draw keys for {rows} rows", keys.len());
        }
        let host = self.download(logits)?;
        Ok(keys
            .iter()
            .enumerate()
            .map(|(r, key)| {
                crate::sampling::sample(&host[r * vocab..(r + 1) * vocab], p, key.uniform())
            })
            .collect())
    }
    /// dlogits (=) of `loss` over rows of logits [rows, vocab].
    fn softmax_stats_bwd(
        &self,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    );
    /// `softmax_stats_bwd` from the statistics the forward kept (`stats` as
    /// `softmax_stats_into` wrote them for these logits, at this temperature): one read of the
    /// logits and one write of dlogits, with no pass to find the statistics again.
    fn softmax_stats_bwd_saved(
        &self,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        stats: &Self::Buf,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    );
    /// `softmax_stats_bwd_saved` with the gradient written over the logits it is computed
    /// from: one [rows, vocab] buffer serves both, so the chunked lm_head's chunks can be twice
    /// as tall in the same memory.
    fn softmax_stats_bwd_saved_in_place(
        &self,
        logits: &mut Self::Buf,
        stats: &Self::Buf,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    );
}

/// The argument checks every backend's softmax_stats makes.
pub(crate) fn check_stats_args(n: usize, rows: usize, vocab: usize, targets: &[u32]) -> Result<()> {
    if n < rows * vocab {
        bail!(
            "softmax_stats: logits hold {n} values, [{rows}, {vocab}] needs {}",
            rows * vocab
        );
    }
    if targets.len() != rows {
        bail!("softmax_stats: {} targets for {rows} rows", targets.len());
    }
    if let Some(t) = targets
        .iter()
        .find(|&&t| t != NO_TARGET && t as usize >= vocab)
    {
        bail!("softmax_stats: target {t} is outside the vocabulary of {vocab}");
    }
    Ok(())
}
