//! Unfused causal attention on cuBLAS strided-batched GEMMs and the two row kernels of
//! cuda/attention_unfused.cu: what eager PyTorch does, one sequence's [heads, tq, tk] scores in
//! memory at a time. It is the baseline the flash kernels are timed against in the same run
//! (`attention fwd (causal, unfused)`), and `EMPO_ATTENTION=unfused` trains with it.
//!
//! The GEMMs are written down as data ([`BatchedGemm`]: which tensors, at which offsets,
//! leading dimensions and batch strides), so that the tests below can run the very same list on
//! the host and hold it to the CPU attention, strides and all, where no GPU is.
//!
//! Grouped-query attention without copying K and V per head: for the j-th query head of every
//! group, the heads j, j + group, j + 2·group, ... sit `group · head_dim` apart in a token's row
//! and their kv heads `head_dim` apart, so one batched call covers them, `group` calls a product.

use super::cuda::slot::{DELTA, DKV_ACCUM, DPROBS, DSCORES, PROBS, SCORES};
use super::cuda::{Arg, CudaBackend, CudaBuf, Dtype};
use super::AttnShape;

/// The tensors a GEMM of this path reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tensor {
    Q,
    K,
    V,
    Out,
    DOut,
    Dq,
    /// f32 [2, batch, cap, kv_heads, head_dim]: dk, then dv, summed over each group's heads.
    DkvAccum,
    /// One sequence's f32 [heads, tq, tk]: raw scores Q·Kᵀ.
    Scores,
    /// The same shape in bf16: softmax(scale · scores), zero past the causal limit.
    Probs,
    /// f32: dO·Vᵀ.
    DProbs,
    /// bf16: the gradient of the raw scores.
    DScores,
}

/// A matrix operand in cuBLAS's column-major terms: element (r, c) of batch entry i lies at
/// `offset + i·stride + r + c·ld` of its tensor.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub t: Tensor,
    pub offset: usize,
    pub ld: usize,
    pub stride: usize,
}

/// C_i = op(A_i)·op(B_i) + beta·C_i for i in 0..count, op transposing where `trans` says.
#[derive(Clone, Copy, Debug)]
pub struct BatchedGemm {
    pub trans: (bool, bool),
    pub mnk: (usize, usize, usize),
    pub a: Operand,
    pub b: Operand,
    pub beta: f32,
    pub c: Operand,
    pub count: usize,
}

/// Query head j of every group in sequence `seq` of a [batch, tq, heads, d] tensor: a row-major
/// [tq, d] matrix, which column-major is its transpose [d, tq].
fn q_heads(s: &AttnShape, t: Tensor, seq: usize, j: usize) -> Operand {
    let (row, group) = (s.heads * s.head_dim, s.heads / s.kv_heads);
    Operand {
        t,
        offset: seq * s.tq * row + j * s.head_dim,
        ld: row,
        stride: group * s.head_dim,
    }
}

/// Every kv head of sequence `seq` of a [batch, cap, kv_heads, d] tensor that starts `base`
/// elements into `t`: column-major [d, tk].
fn kv_heads(s: &AttnShape, t: Tensor, seq: usize, base: usize) -> Operand {
    let row = s.kv_heads * s.head_dim;
    Operand {
        t,
        offset: base + seq * s.cap * row,
        ld: row,
        stride: s.head_dim,
    }
}

/// Query head j of every group in a [heads, tq, tk] score tensor: column-major [tk, tq].
fn score_rows(s: &AttnShape, t: Tensor, j: usize) -> Operand {
    let plane = s.tq * s.tk;
    Operand {
        t,
        offset: j * plane,
        ld: s.tk,
        stride: (s.heads / s.kv_heads) * plane,
    }
}

fn gemm(
    trans: (bool, bool),
    mnk: (usize, usize, usize),
    [a, b, c]: [Operand; 3],
    beta: f32,
    s: &AttnShape,
) -> BatchedGemm {
    BatchedGemm {
        trans,
        mnk,
        a,
        b,
        beta,
        c,
        count: s.kv_heads,
    }
}

/// Sᵀ = K·Qᵀ for query head j of each group: a row-major S [tq, tk] per head.
fn scores(s: &AttnShape, seq: usize, j: usize) -> BatchedGemm {
    let (q, k) = (
        q_heads(s, Tensor::Q, seq, j),
        kv_heads(s, Tensor::K, seq, 0),
    );
    let c = score_rows(s, Tensor::Scores, j);
    gemm((true, false), (s.tk, s.tq, s.head_dim), [k, q, c], 0.0, s)
}

/// The forward of sequence `seq`, query head j of each group: scores, then (after the softmax
/// kernel) Oᵀ = Vᵀ·Pᵀ.
pub fn forward_gemms(s: &AttnShape, seq: usize, j: usize) -> [BatchedGemm; 2] {
    let (v, p, o) = (
        kv_heads(s, Tensor::V, seq, 0),
        score_rows(s, Tensor::Probs, j),
        q_heads(s, Tensor::Out, seq, j),
    );
    let out = gemm((false, false), (s.head_dim, s.tq, s.tk), [v, p, o], 0.0, s);
    [scores(s, seq, j), out]
}

/// The backward's products before its row kernel: the scores again, and dPᵀ = V·dOᵀ.
pub fn backward_gemms_before(s: &AttnShape, seq: usize, j: usize) -> [BatchedGemm; 2] {
    let (v, dout, dp) = (
        kv_heads(s, Tensor::V, seq, 0),
        q_heads(s, Tensor::DOut, seq, j),
        score_rows(s, Tensor::DProbs, j),
    );
    let dp = gemm(
        (true, false),
        (s.tk, s.tq, s.head_dim),
        [v, dout, dp],
        0.0,
        s,
    );
    [scores(s, seq, j), dp]
}

/// The backward's products after its row kernel: dVᵀ += dOᵀ·P, dQᵀ = Kᵀ·dSᵀ, dKᵀ += Qᵀ·dS. The
/// group's heads add into the same dk, dv rows, so those go to the f32 accumulator.
pub fn backward_gemms_after(s: &AttnShape, seq: usize, j: usize) -> [BatchedGemm; 3] {
    let nkv = s.batch * s.cap * s.kv_heads * s.head_dim;
    let (d, tq, tk) = (s.head_dim, s.tq, s.tk);
    let dv = gemm(
        (false, true),
        (d, tk, tq),
        [
            q_heads(s, Tensor::DOut, seq, j),
            score_rows(s, Tensor::Probs, j),
            kv_heads(s, Tensor::DkvAccum, seq, nkv),
        ],
        1.0,
        s,
    );
    let dq = gemm(
        (false, false),
        (d, tq, tk),
        [
            kv_heads(s, Tensor::K, seq, 0),
            score_rows(s, Tensor::DScores, j),
            q_heads(s, Tensor::Dq, seq, j),
        ],
        0.0,
        s,
    );
    let dk = gemm(
        (false, true),
        (d, tk, tq),
        [
            q_heads(s, Tensor::Q, seq, j),
            score_rows(s, Tensor::DScores, j),
            kv_heads(s, Tensor::DkvAccum, seq, 0),
        ],
        1.0,
        s,
    );
    [dv, dq, dk]
}

/// Runs one planned GEMM with the tensors' device addresses.
fn run(be: &CudaBackend, g: &BatchedGemm, at: &dyn Fn(Tensor) -> (u64, Dtype)) {
    let op = |o: Operand| {
        let (ptr, dt) = at(o.t);
        let size = if dt == Dtype::Bf16 { 2 } else { 4 };
        (ptr + (o.offset * size) as u64, dt, o.ld, o.stride)
    };
    be.gemm_batched(g.trans, g.mnk, op(g.a), op(g.b), g.beta, op(g.c), g.count);
}

/// The float scratch the backward takes at shape `s`, as (slot, floats), in the order of
/// `backward`'s pointers: delta, the dk/dv accumulator, then one sequence's scores, their
/// gradient (f32), probabilities and score gradients (bf16, two to a float). The forward takes
/// the scores and probabilities. The memory plan counts the same.
pub fn backward_scratch(s: &AttnShape) -> [(usize, usize); 6] {
    let plane = s.heads * s.tq * s.tk;
    [
        (DELTA, s.batch * s.heads * s.tq.div_ceil(64) * 64),
        (DKV_ACCUM, 2 * s.batch * s.cap * s.kv_heads * s.head_dim),
        (SCORES, plane),
        (DPROBS, plane),
        (PROBS, plane.div_ceil(2)),
        (DSCORES, plane.div_ceil(2)),
    ]
}

/// Device addresses of the scratch slots `want` names, allocated or grown as needed.
fn scratch<const N: usize>(be: &CudaBackend, want: [(usize, usize); N]) -> Option<[u64; N]> {
    let mut out = [0; N];
    for (o, (slot, floats)) in out.iter_mut().zip(want) {
        *o = be.scratch_f32(slot, floats)?;
    }
    Some(out)
}

fn group(s: &AttnShape) -> usize {
    s.heads / s.kv_heads
}

/// `Backend::attention` (tq > 1; the caller has checked every buffer against `s`).
pub fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    s: AttnShape,
) {
    let [_, _, scores_slot, _, probs_slot, _] = backward_scratch(&s);
    let Some([scores, probs]) = scratch(be, [scores_slot, probs_slot]) else {
        return;
    };
    let at = |t: Tensor| match t {
        Tensor::Q => (q.ptr(), Dtype::Bf16),
        Tensor::K => (k.ptr(), Dtype::Bf16),
        Tensor::V => (v.ptr(), Dtype::Bf16),
        Tensor::Out => (out.ptr(), Dtype::Bf16),
        Tensor::Scores => (scores, Dtype::F32),
        Tensor::Probs => (probs, Dtype::Bf16),
        other => unreachable!("the forward plan names only its own tensors, not {other:?}"),
    };
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    for seq in 0..s.batch {
        for j in 0..group(&s) {
            run(be, &forward_gemms(&s, seq, j)[0], &at);
        }
        be.launch(
            "attention_unfused_softmax",
            (s.tq as u32, s.heads as u32, 1),
            (256, 1, 1),
            0,
            &[
                Arg::P(probs),
                Arg::P(lse.ptr()),
                Arg::P(scores),
                Arg::I(seq as i32),
                Arg::I(s.tq as i32),
                Arg::I(s.tk as i32),
                Arg::I(s.heads as i32),
                Arg::F(scale),
            ],
        );
        for j in 0..group(&s) {
            run(be, &forward_gemms(&s, seq, j)[1], &at);
        }
    }
}

/// `Backend::attention_bwd` (the caller has checked every buffer against `s`), in the scratch
/// of `backward_scratch`.
pub fn backward(
    be: &CudaBackend,
    [dq, dk, dv]: [&mut CudaBuf; 3],
    [dout, out, lse]: [&CudaBuf; 3],
    [q, k, v]: [&CudaBuf; 3],
    s: AttnShape,
) {
    let nkv = s.batch * s.cap * s.kv_heads * s.head_dim;
    let padded = s.batch * s.heads * s.tq.div_ceil(64) * 64;
    let Some([delta, accum, scores, dprobs, probs, dscores]) = scratch(be, backward_scratch(&s))
    else {
        return;
    };
    // delta = rowsum(dO·O), and the accumulator zeroed (rows tk..cap of dk, dv stay 0).
    be.launch(
        "attention_bwd_preprocess",
        (padded.div_ceil(4) as u32, 1, 1),
        (128, 1, 1),
        0,
        &[
            Arg::P(delta),
            Arg::P(0),
            Arg::P(0),
            Arg::P(accum),
            Arg::P(dout.ptr()),
            Arg::P(out.ptr()),
            Arg::P(lse.ptr()),
            Arg::I(s.batch as i32),
            Arg::I(s.tq as i32),
            Arg::I(s.heads as i32),
            Arg::I(s.head_dim as i32),
            Arg::L(2 * nkv as i64),
        ],
    );
    let at = |t: Tensor| match t {
        Tensor::Q => (q.ptr(), Dtype::Bf16),
        Tensor::K => (k.ptr(), Dtype::Bf16),
        Tensor::V => (v.ptr(), Dtype::Bf16),
        Tensor::DOut => (dout.ptr(), Dtype::Bf16),
        Tensor::Dq => (dq.ptr(), Dtype::Bf16),
        Tensor::DkvAccum => (accum, Dtype::F32),
        Tensor::Scores => (scores, Dtype::F32),
        Tensor::Probs => (probs, Dtype::Bf16),
        Tensor::DProbs => (dprobs, Dtype::F32),
        Tensor::DScores => (dscores, Dtype::Bf16),
        Tensor::Out => unreachable!("the backward plan reads O only through delta"),
    };
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    for seq in 0..s.batch {
        for j in 0..group(&s) {
            for g in &backward_gemms_before(&s, seq, j) {
                run(be, g, &at);
            }
        }
        be.launch(
            "attention_unfused_softmax_bwd",
            (s.tq as u32, s.heads as u32, 1),
            (256, 1, 1),
            0,
            &[
                Arg::P(probs),
                Arg::P(dscores),
                Arg::P(scores),
                Arg::P(dprobs),
                Arg::P(lse.ptr()),
                Arg::P(delta),
                Arg::I(seq as i32),
                Arg::I(s.tq as i32),
                Arg::I(s.tk as i32),
                Arg::I(s.heads as i32),
                Arg::F(scale),
            ],
        );
        for j in 0..group(&s) {
            for g in &backward_gemms_after(&s, seq, j) {
                run(be, g, &at);
            }
        }
    }
    // dk, dv from the accumulator (nq = 0: dq is written directly).
    be.launch(
        "attention_bwd_convert",
        ((2 * nkv).div_ceil(1024) as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(0),
            Arg::P(dk.ptr()),
            Arg::P(dv.ptr()),
            Arg::P(0),
            Arg::P(accum),
            Arg::L(0),
            Arg::L(nkv as i64),
        ],
    );
}

#[cfg(test)]
mod tests {
    //! The plan above, run on the host: each GEMM read exactly as cuBLAS reads its arguments,
    //! the row kernels' arithmetic in f32, against cpu::attention and cpu::attention_bwd.

    use super::*;
    use crate::backend::cpu;
    use std::collections::HashMap;

    type Tensors = HashMap<Tensor, Vec<f32>>;

    fn host_gemm(g: &BatchedGemm, t: &mut Tensors) {
        let (a, b) = (t[&g.a.t].clone(), t[&g.b.t].clone());
        let c = t.get_mut(&g.c.t).unwrap();
        let (m, n, k) = g.mnk;
        let at =
            |o: &Operand, i: usize, r: usize, col: usize| o.offset + i * o.stride + r + col * o.ld;
        for i in 0..g.count {
            for r in 0..m {
                for col in 0..n {
                    let mut acc = 0.0f32;
                    for l in 0..k {
                        let x = if g.trans.0 {
                            a[at(&g.a, i, l, r)]
                        } else {
                            a[at(&g.a, i, r, l)]
                        };
                        let y = if g.trans.1 {
                            b[at(&g.b, i, col, l)]
                        } else {
                            b[at(&g.b, i, l, col)]
                        };
                        acc += x * y;
                    }
                    let dst = &mut c[at(&g.c, i, r, col)];
                    *dst = acc + if g.beta == 0.0 { 0.0 } else { g.beta * *dst };
                }
            }
        }
    }

    fn last_key(s: &AttnShape, i: usize) -> usize {
        s.tk - s.tq + i
    }

    /// attention_unfused_softmax in f32.
    fn host_softmax(s: &AttnShape, seq: usize, t: &mut Tensors, lse: &mut [f32]) {
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let scores = t[&Tensor::Scores].clone();
        let p = t.get_mut(&Tensor::Probs).unwrap();
        for h in 0..s.heads {
            for i in 0..s.tq {
                let row = &scores[(h * s.tq + i) * s.tk..][..s.tk];
                let n = last_key(s, i) + 1;
                let m = row[..n]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                let l: f32 = row[..n].iter().map(|&x| (x * scale - m).exp()).sum();
                let lse_row = m + l.ln();
                for (j, &x) in row.iter().enumerate() {
                    p[(h * s.tq + i) * s.tk + j] = if j < n {
                        (x * scale - lse_row).exp()
                    } else {
                        0.0
                    };
                }
                lse[(seq * s.tq + i) * s.heads + h] = lse_row;
            }
        }
    }

    /// attention_unfused_softmax_bwd in f32, with delta [batch, tq, heads] (rowsum dO·O).
    fn host_softmax_bwd(s: &AttnShape, seq: usize, t: &mut Tensors, lse: &[f32], delta: &[f32]) {
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let (scores, dp) = (t[&Tensor::Scores].clone(), t[&Tensor::DProbs].clone());
        let mut p = vec![0.0; scores.len()];
        let mut ds = vec![0.0; scores.len()];
        for h in 0..s.heads {
            for i in 0..s.tq {
                let at = (seq * s.tq + i) * s.heads + h;
                for j in 0..=last_key(s, i) {
                    let e = (h * s.tq + i) * s.tk + j;
                    p[e] = (scores[e] * scale - lse[at]).exp();
                    ds[e] = p[e] * (dp[e] - delta[at]) * scale;
                }
            }
        }
        t.insert(Tensor::Probs, p);
        t.insert(Tensor::DScores, ds);
    }

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| crate::sampling::uniform(seed, 0, i) * 2.0 - 1.0)
            .collect()
    }

    fn max_err(got: &[f32], want: &[f32]) -> f32 {
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f32::max)
    }

    fn check(s: AttnShape) {
        let nq = s.batch * s.tq * s.heads * s.head_dim;
        let nkv = s.batch * s.cap * s.kv_heads * s.head_dim;
        let plane = s.heads * s.tq * s.tk;
        let (q, k, v, dout) = (rnd(nq, 1), rnd(nkv, 2), rnd(nkv, 3), rnd(nq, 4));
        let mut t: Tensors = HashMap::new();
        for (name, x) in [
            (Tensor::Q, &q),
            (Tensor::K, &k),
            (Tensor::V, &v),
            (Tensor::DOut, &dout),
        ] {
            t.insert(name, x.clone());
        }
        for (name, n) in [
            (Tensor::Out, nq),
            (Tensor::Dq, nq),
            (Tensor::DkvAccum, 2 * nkv),
            (Tensor::Scores, plane),
            (Tensor::Probs, plane),
            (Tensor::DProbs, plane),
            (Tensor::DScores, plane),
        ] {
            // NaN where a GEMM with beta 0 must write; the accumulator starts at 0 as
            // attention_bwd_preprocess leaves it.
            let fill = if name == Tensor::DkvAccum {
                0.0
            } else {
                f32::NAN
            };
            t.insert(name, vec![fill; n]);
        }
        let mut lse = vec![f32::NAN; s.batch * s.tq * s.heads];
        for seq in 0..s.batch {
            for j in 0..s.heads / s.kv_heads {
                host_gemm(&forward_gemms(&s, seq, j)[0], &mut t);
            }
            host_softmax(&s, seq, &mut t, &mut lse);
            for j in 0..s.heads / s.kv_heads {
                host_gemm(&forward_gemms(&s, seq, j)[1], &mut t);
            }
        }
        let (mut want_o, mut want_lse) = (vec![0.0; nq], vec![0.0; lse.len()]);
        cpu::attention(&mut want_o, &mut want_lse, &q, &k, &v, s);
        assert!(max_err(&t[&Tensor::Out], &want_o) < 1e-5, "{s:?} out");
        assert!(max_err(&lse, &want_lse) < 1e-5, "{s:?} lse");

        let out = t[&Tensor::Out].clone();
        let delta: Vec<f32> = out
            .chunks(s.head_dim)
            .zip(dout.chunks(s.head_dim))
            .map(|(o, d)| o.iter().zip(d).map(|(a, b)| a * b).sum())
            .collect();
        for seq in 0..s.batch {
            for j in 0..s.heads / s.kv_heads {
                for g in &backward_gemms_before(&s, seq, j) {
                    host_gemm(g, &mut t);
                }
            }
            host_softmax_bwd(&s, seq, &mut t, &lse, &delta);
            for j in 0..s.heads / s.kv_heads {
                for g in &backward_gemms_after(&s, seq, j) {
                    host_gemm(g, &mut t);
                }
            }
        }
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
        cpu::attention_bwd(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, s);
        let accum = &t[&Tensor::DkvAccum];
        assert!(max_err(&t[&Tensor::Dq], &dq) < 1e-5, "{s:?} dq");
        assert!(max_err(&accum[..nkv], &dk) < 1e-5, "{s:?} dk");
        assert!(max_err(&accum[nkv..], &dv) < 1e-5, "{s:?} dv");
    }

    #[test]
    fn the_planned_gemms_compute_causal_grouped_attention() {
        let s = |batch, tq, tk, cap, heads, kv_heads, head_dim| AttnShape {
            batch,
            tq,
            tk,
            cap,
            heads,
            kv_heads,
            head_dim,
        };
        check(s(2, 7, 7, 9, 6, 2, 8)); // GQA 3, cap past tk, two sequences
        check(s(1, 5, 12, 12, 4, 4, 16)); // queries after a cached prefix, no grouping
        check(s(2, 9, 9, 9, 4, 1, 8)); // one kv head for all
    }
}
