//! The lm_head and the softmax statistics of its logits, chunk by chunk: the [N, V] logits of
//! a whole batch never exist, only [rows, V] for one chunk at a time (the Liger-Kernel
//! fused-linear idea, applied to entropy and log-prob instead of cross-entropy).
//!
//! Per chunk of rows, the forward is a GEMM (logits = x · lm_headᵀ) and `softmax_stats_into`;
//! the loss then gives each row's a = d loss/d entropy and b = d loss/d logprob. The gradient
//! overwrites the chunk's logits (`softmax_stats_bwd_saved_in_place`: one read and one write),
//! and two GEMMs follow: dx = dlogits · lm_head and dlm_head += dlogitsᵀ · x.
//!
//! `stats_and_grad` does a chunk's forward and gradient in one pass, the loss's coefficients
//! taken from the chunk's statistics in between, so its logits are computed once: for any loss
//! whose per-row coefficients follow from each row's own statistics, and for a sequence-level
//! loss whose rows fit in one chunk (a training sequence). Otherwise the statistics of all
//! chunks come first (`stats`), and the backward (`stats_bwd`) recomputes each chunk's logits:
//! four GEMMs where one pass has three.

use crate::backend::{Backend, RowStats, StatsLoss};
use anyhow::{bail, Result};

/// Rows per chunk. One [rows, V] buffer holds a chunk's logits and then their gradient: 4096 ×
/// 152064 × bf16 is 1.25 GB at Qwen2.5's vocabulary, under the 2 GB budget. Taller chunks are
/// fewer passes of the dlm_head GEMM over its f32 [V, H] output (beta = 1 reads and writes all
/// 2.2 GB of it once per chunk: as long as the GEMM's own math at K = 1024 rows, a quarter of it
/// at 4096) and let a whole 4k-token sequence take the one-pass path.
pub const LM_HEAD_CHUNK: usize = 4096;

/// The most one chunk's bf16 logits may take, which shortens chunks for vocabularies larger
/// than Qwen2.5's.
const CHUNK_LOGITS_BYTES: usize = 1280 << 20;

/// Rows per chunk for n rows over a vocabulary of v: LM_HEAD_CHUNK, fewer (a multiple of 64)
/// where v is so large that the logits would pass CHUNK_LOGITS_BYTES, never more than n.
pub fn chunk_rows(n: usize, v: usize) -> usize {
    let fit = CHUNK_LOGITS_BYTES / (2 * v.max(1));
    let fit = if fit >= 64 { fit / 64 * 64 } else { fit };
    LM_HEAD_CHUNK.min(fit).min(n).max(1)
}

/// The chunk buffers, allocated once per (rows, hidden, vocab).
pub struct Chunks<T> {
    rows: usize,
    x: T,
    /// The chunk's logits, then their gradient in place.
    logits: T,
    dx: T,
    /// The chunk's (logsumexp, entropy, logprob) rows, f32.
    stats: T,
}

impl<T> Chunks<T> {
    /// Values held, for the memory plan's tests.
    pub fn held<B: Backend<Buf = T>>(&self, be: &B) -> usize {
        [&self.x, &self.logits, &self.dx, &self.stats]
            .iter()
            .map(|b| be.len(b))
            .sum()
    }

    pub fn new<B: Backend<Buf = T>>(be: &B, n: usize, h: usize, v: usize) -> Result<Self> {
        let rows = chunk_rows(n, v);
        Ok(Chunks {
            rows,
            x: be.alloc(rows * h)?,
            logits: be.alloc(rows * v)?,
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
        let loss = StatsLoss {
            targets: &targets[span.clone()],
            temperature,
            a: &a[span.clone()],
            b: &b[span],
        };
        chunk_grad(be, c, dx, dlm_head, lm_head, (r0, rows), (h, v), &loss);
    }
    Ok(())
}

/// All rows' (a, b) from all rows' statistics.
pub type WholeCoef<'a> = Box<dyn FnOnce(&[RowStats]) -> (Vec<f32>, Vec<f32>) + 'a>;

/// How the loss's per-row coefficients (a = d loss/d entropy, b = d loss/d logprob) follow
/// from the statistics.
pub enum Coef<'a> {
    /// Each row's (a, b) from its index and its own statistics (a token-level loss: entropy
    /// minimization, cross-entropy, a token-mean policy loss): every chunk takes one pass.
    PerRow(&'a dyn Fn(usize, &RowStats) -> (f32, f32)),
    /// Every row's (a, b) from all rows' statistics together (a sequence-level loss): one pass
    /// when the rows fit in one chunk; else the statistics of every chunk come first, and the
    /// backward recomputes each chunk's logits.
    Whole(WholeCoef<'a>),
}

/// Statistics and their gradients together: dx (=) and dlm_head (+=) of
/// Σ_r a[r]·entropy[r] + b[r]·logprob[r], with (a, b) from `coef`. Returns the statistics.
#[allow(clippy::too_many_arguments)]
pub fn stats_and_grad<B: Backend>(
    be: &B,
    c: &mut Chunks<B::Buf>,
    dx: &mut B::Buf,
    dlm_head: &mut B::Buf,
    x: &B::Buf,
    lm_head: &B::Buf,
    (n, h, v): (usize, usize, usize),
    targets: &[u32],
    temperature: f32,
    coef: Coef,
) -> Result<Vec<RowStats>> {
    check(n, &[("targets", targets.len())])?;
    let (mut whole, per_row) = match coef {
        Coef::Whole(f) if n > c.rows => {
            let stats = stats(be, c, x, lm_head, (n, h, v), targets, temperature)?;
            let (a, b) = f(&stats);
            let dims = (n, h, v);
            stats_bwd(
                be,
                c,
                dx,
                dlm_head,
                x,
                lm_head,
                dims,
                &stats,
                targets,
                temperature,
                &a,
                &b,
            )?;
            return Ok(stats);
        }
        Coef::Whole(f) => (Some(f), None),
        Coef::PerRow(f) => (None, Some(f)),
    };
    let mut all = Vec::with_capacity(n);
    for r0 in (0..n).step_by(c.rows) {
        let rows = c.rows.min(n - r0);
        let span = r0..r0 + rows;
        be.copy_range(&mut c.x, 0, x, r0 * h, rows * h);
        be.matmul(&mut c.logits, &c.x, lm_head, None, rows, h, v);
        let t = &targets[span.clone()];
        be.softmax_stats_into(&mut c.stats, &c.logits, rows, v, t, temperature)?;
        // The coefficients need the statistics on the host: one small download per chunk.
        let st = RowStats::from_flat(&be.download(&c.stats)?[..3 * rows]);
        let (a, b): (Vec<f32>, Vec<f32>) = match (per_row, whole.take()) {
            (Some(f), _) => st.iter().enumerate().map(|(i, s)| f(r0 + i, s)).unzip(),
            (None, Some(f)) => f(&st),
            (None, None) => bail!("lm_head: a sequence-level loss over {n} rows in chunks"),
        };
        check(rows, &[("a", a.len()), ("b", b.len())])?;
        let loss = StatsLoss {
            targets: t,
            temperature,
            a: &a,
            b: &b,
        };
        chunk_grad(be, c, dx, dlm_head, lm_head, (r0, rows), (h, v), &loss);
        all.extend(st);
    }
    Ok(all)
}

/// The gradient of one chunk whose logits and statistics are in `c`: dlogits over the logits,
/// then dx[r0..r0 + rows] (=) and dlm_head (+=).
#[allow(clippy::too_many_arguments)]
fn chunk_grad<B: Backend>(
    be: &B,
    c: &mut Chunks<B::Buf>,
    dx: &mut B::Buf,
    dlm_head: &mut B::Buf,
    lm_head: &B::Buf,
    (r0, rows): (usize, usize),
    (h, v): (usize, usize),
    loss: &StatsLoss,
) {
    be.softmax_stats_bwd_saved_in_place(&mut c.logits, &c.stats, rows, v, loss);
    be.zero(&mut c.dx);
    be.matmul_bwd(
        Some(&mut c.dx),
        Some(dlm_head),
        None,
        &c.logits,
        &c.x,
        lm_head,
        rows,
        h,
        v,
    );
    be.copy_range(dx, r0 * h, &c.dx, 0, rows * h);
}
