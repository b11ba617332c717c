//! The lm_head and the softmax statistics of its logits, chunk by chunk: the [N, V] logits of
//! a whole batch never exist, only [LM_HEAD_CHUNK, V] at a time (the Liger-Kernel
//! fused-linear idea, applied to entropy and log-prob instead of cross-entropy).
//!
//! Per chunk of rows, the forward is a GEMM (logits = x · lm_headᵀ) and `softmax_stats_into`;
//! the loss then gives each row's a = d loss/d entropy and b = d loss/d logprob. The backward
//! recomputes the chunk's logits rather than keeping them, and takes the forward's statistics
//! back (`softmax_stats_bwd_saved`), so the gradient is one read of the logits and one write,
//! followed by the two GEMMs dx = dlogits · lm_head and dlm_head += dlogitsᵀ · x.

use crate::backend::{Backend, RowStats, StatsLoss};
use anyhow::{bail, Result};

/// Rows per chunk. 2048 rows × 152064 × bf16 is 623 MB and the chunk holds two such buffers
/// (logits, dlogits): 1.25 GB at Qwen2.5's vocabulary, under the 2 GB budget. Bigger chunks are
/// fewer passes of the dlm_head GEMM over its f32 [V, H] output (beta = 1 reads and writes all
/// 2.2 GB of it once per chunk, as long as the GEMM's own math at K = 1024 rows) and fewer
/// host round trips for the statistics.
pub const LM_HEAD_CHUNK: usize = 2048;

/// The chunk buffers, allocated once per (rows, hidden, vocab).
pub struct Chunks<T> {
    rows: usize,
    x: T,
    logits: T,
    dlogits: T,
    dx: T,
    /// The chunk's (logsumexp, entropy, logprob) rows, f32.
    stats: T,
}

impl<T> Chunks<T> {
    pub fn new<B: Backend<Buf = T>>(be: &B, n: usize, h: usize, v: usize) -> Result<Self> {
        let rows = LM_HEAD_CHUNK.min(n).max(1);
        Ok(Chunks {
            rows,
            x: be.alloc(rows * h)?,
            logits: be.alloc(rows * v)?,
            dlogits: be.alloc(rows * v)?,
            dx: be.alloc(rows * h)?,
            stats: be.alloc_f32(3 * rows)?,
        })
    }
}

fn check(n: usize, lens: &[(&str, usize)]) -> Result<()> {
    for (what, len) in lens {
        if *len != n {
            bail!("lm_head statistics over {n} rows got {len} {what}");
        }
    }
    Ok(())
}

/// Statistics at `temperature` of softmax(x · lm_headᵀ) for every row of x: [n, h].
#[allow(clippy::too_many_arguments)]
pub fn stats<B: Backend>(
    be: &B,
    c: &mut Chunks<B::Buf>,
    x: &B::Buf,
    lm_head: &B::Buf,
    (n, h, v): (usize, usize, usize),
    targets: &[u32],
    temperature: f32,
) -> Result<Vec<RowStats>> {
    check(n, &[("targets", targets.len())])?;
    // Every chunk's statistics stay on the backend until one download at the end.
    let mut all = be.alloc_f32(3 * n)?;
    for r0 in (0..n).step_by(c.rows) {
        let rows = c.rows.min(n - r0);
        be.copy_range(&mut c.x, 0, x, r0 * h, rows * h);
        be.matmul(&mut c.logits, &c.x, lm_head, None, rows, h, v);
        be.softmax_stats_into(
            &mut c.stats,
            &c.logits,
            rows,
            v,
            &targets[r0..r0 + rows],
            temperature,
        )?;
        be.copy_range(&mut all, 3 * r0, &c.stats, 0, 3 * rows);
    }
    Ok(RowStats::from_flat(&be.download(&all)?[..3 * n]))
}

/// Gradients of Σ_r a[r]·entropy[r] + b[r]·logprob[r]: dx (=, [n, h]) and dlm_head (+=), given
/// the rows' statistics from `stats` at the same temperature, so that each chunk's gradient is
/// one pass over its recomputed logits.
#[allow(clippy::too_many_arguments)]
pub fn stats_bwd<B: Backend>(
    be: &B,
    c: &mut Chunks<B::Buf>,
    dx: &mut B::Buf,
    dlm_head: &mut B::Buf,
    x: &B::Buf,
    lm_head: &B::Buf,
    (n, h, v): (usize, usize, usize),
    stats: &[RowStats],
    targets: &[u32],
    temperature: f32,
    a: &[f32],
    b: &[f32],
) -> Result<()> {
    check(
        n,
        &[
            ("statistics", stats.len()),
            ("targets", targets.len()),
            ("a", a.len()),
            ("b", b.len()),
        ],
    )?;
    let all = be.upload_f32(&RowStats::flatten(stats))?;
    for r0 in (0..n).step_by(c.rows) {
        let rows = c.rows.min(n - r0);
        let span = r0..r0 + rows;
        be.copy_range(&mut c.x, 0, x, r0 * h, rows * h);
        be.matmul(&mut c.logits, &c.x, lm_head, None, rows, h, v);
        be.copy_range(&mut c.stats, 0, &all, 3 * r0, 3 * rows);
        be.softmax_stats_bwd_saved(
            &mut c.dlogits,
            &c.logits,
            &c.stats,
            rows,
            v,
            &StatsLoss {
                targets: &targets[span.clone()],
                temperature,
                a: &a[span.clone()],
                b: &b[span],
            },
        );
        be.zero(&mut c.dx);
        be.matmul_bwd(
            Some(&mut c.dx),
            Some(&mut *dlm_head),
            None,
            &c.dlogits,
            &c.x,
            lm_head,
            rows,
            h,
            v,
        );
        be.copy_range(dx, r0 * h, &c.dx, 0, rows * h);
    }
    Ok(())
}
