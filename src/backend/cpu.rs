//! The CPU reference backend: plain f32 loops (rayon across rows, the gemm crate for matmuls).
//! It is the oracle every CUDA kernel is checked against, so clarity beats cleverness here.
//! Each op is a free function over slices, so checks can call it without a backend object.

use super::{
    check_stats_args, AdamWStep, AttnShape, Backend, RowStats, Starts, StatsLoss, Traffic,
    NO_TARGET,
};
use anyhow::{bail, Result};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// dst = alpha·dst + beta·lhs·rhs, with explicit strides (row stride, column stride) for each
/// operand, so transposes cost nothing.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds that make the raw-pointer call below safe.
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs);
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    // SAFETY: the asserts above keep every strided access inside the slices, and dst does not
    // alias lhs or rhs (it is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// out[m, n] = a[m, k] · w[n, k]ᵀ + bias
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    gemm_strided(m, n, k, out, (n, 1), false, a, (k, 1), w, (1, k));
    if let Some(b) = bias {
        out.par_chunks_mut(n).for_each(|row| {
            for (o, bb) in row.iter_mut().zip(b) {
                *o += bb;
            }
        });
    }
}

#[allow(clippy::too_many_arguments)]
pub fn matmul_bwd(
    da: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    a: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    if let Some(da) = da {
        // da[m, k] += dout[m, n] · w[n, k]
        gemm_strided(m, k, n, da, (k, 1), true, dout, (n, 1), w, (k, 1));
    }
    if let Some(dw) = dw {
        // dw[n, k] += dout[m, n]ᵀ · a[m, k]
        gemm_strided(n, k, m, dw, (k, 1), true, dout, (1, n), a, (k, 1));
    }
    if let Some(db) = dbias {
        for row in dout.chunks_exact(n).take(m) {
            for (d, g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    }
}

pub fn embedding(out: &mut [f32], table: &[f32], ids: &[u32], dim: usize) {
    out.par_chunks_mut(dim).zip(ids).for_each(|(row, &id)| {
        let id = id as usize;
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    });
}

pub fn embedding_bwd(dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) {
    // Serial: the same id may appear twice, and this is cheap next to the matmuls.
    for (row, &id) in dout.chunks_exact(dim).zip(ids) {
        let id = id as usize;
        for (d, g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(
    out: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    dim: usize,
    eps: f32,
) {
    out[..rows * dim]
        .par_chunks_mut(dim)
        .zip(rstd[..rows].par_iter_mut())
        .zip(x.par_chunks(dim))
        .for_each(|((o, r), xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * *r * wv;
            }
        });
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    rows: usize,
    dim: usize,
) {
    // With x̂ = x·r and y = w·x̂: dx = r·(g − x̂·mean(g·x̂)) where g = dout·w.
    dx[..rows * dim]
        .par_chunks_mut(dim)
        .zip(dout.par_chunks(dim))
        .zip(x.par_chunks(dim))
        .zip(rstd.par_iter())
        .for_each(|(((dxr, dor), xr), &r)| {
            let mut dot = 0.0f32;
            for i in 0..dim {
                dot += dor[i] * w[i] * xr[i] * r;
            }
            let mean = dot / dim as f32;
            for i in 0..dim {
                let xhat = xr[i] * r;
                dxr[i] += r * (dor[i] * w[i] - xhat * mean);
            }
        });
    for ((dor, xr), &r) in dout
        .chunks_exact(dim)
        .zip(x.chunks_exact(dim))
        .zip(rstd)
        .take(rows)
    {
        for i in 0..dim {
            dw[i] += dor[i] * xr[i] * r;
        }
    }
}

/// The inverse frequencies RoPE rotates pair i by, computed in f32 as transformers does.
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &mut [f32],
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    starts: Starts,
    theta: f32,
    inverse: bool,
) {
    let half = head_dim / 2;
    let inv = rope_inv_freq(head_dim, theta);
    let sign = if inverse { -1.0 } else { 1.0 };
    x[..batch * seq * heads * head_dim]
        .par_chunks_mut(heads * head_dim)
        .enumerate()
        .for_each(|(row, xr)| {
            let pos = (starts.of(row / seq) + row % seq) as f32;
            for i in 0..half {
                let angle = pos * inv[i];
                let (s, c) = angle.sin_cos();
                let s = s * sign;
                for h in 0..heads {
                    let base = h * head_dim;
                    let x1 = xr[base + i];
                    let x2 = xr[base + i + half];
                    xr[base + i] = x1 * c - x2 * s;
                    xr[base + i + half] = x2 * c + x1 * s;
                }
            }
        });
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn attention(out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    attention_ragged(out, lse, q, k, v, s, None)
}

/// `attention` where sequence b holds kv_len[b] keys instead of s.tk: its queries are its last
/// tq positions.
#[allow(clippy::too_many_arguments)]
pub fn attention_ragged(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    kv_len: Option<&[u32]>,
) {
    let AttnShape {
        tq,
        tk,
        cap,
        heads,
        kv_heads,
        head_dim: d,
        ..
    } = s;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let qrow = heads * d;
    let kvrow = kv_heads * d;
    out[..s.batch * tq * qrow]
        .par_chunks_mut(qrow)
        .zip(lse.par_chunks_mut(heads))
        .enumerate()
        .for_each(|(row, (orow, lrow))| {
            let (b, i) = (row / tq, row % tq);
            let tk = kv_len.map_or(tk, |l| l[b] as usize);
            let last = tk - tq + i; // causal limit, inclusive
            let mut p = vec![0.0f32; last + 1];
            for h in 0..heads {
                let kvh = h / group;
                let qv = &q[row * qrow + h * d..row * qrow + (h + 1) * d];
                let mut m = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    let kb = (b * cap + j) * kvrow + kvh * d;
                    *pj = dot(qv, &k[kb..kb + d]) * scale;
                    m = m.max(*pj);
                }
                let mut l = 0.0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - m).exp();
                    l += *pj;
                }
                let o = &mut orow[h * d..(h + 1) * d];
                o.fill(0.0);
                for (j, pj) in p.iter().enumerate() {
                    let vb = (b * cap + j) * kvrow + kvh * d;
                    for (ov, vv) in o.iter_mut().zip(&v[vb..vb + d]) {
                        *ov += pj * vv;
                    }
                }
                for ov in o.iter_mut() {
                    *ov /= l;
                }
                lrow[h] = m + l.ln();
            }
        });
}

#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) {
    let AttnShape {
        batch,
        tq,
        tk,
        cap,
        heads,
        kv_heads,
        head_dim: d,
    } = s;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let qrow = heads * d;
    let kvrow = kv_heads * d;
    // One task per (sequence, kv head): it alone owns that head's dk/dv and its group's dq, so
    // the tasks never write the same place. Results are scattered back afterwards.
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..batch * kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, kvh) = (task / kv_heads, task % kv_heads);
            let mut dq_l = vec![0.0f32; tq * group * d];
            let mut dk_l = vec![0.0f32; tk * d];
            let mut dv_l = vec![0.0f32; tk * d];
            for g in 0..group {
                let h = kvh * group + g;
                for i in 0..tq {
                    let qb = (b * tq + i) * qrow + h * d;
                    let (qv, dov, ov) = (&q[qb..qb + d], &dout[qb..qb + d], &out[qb..qb + d]);
                    let l = lse[(b * tq + i) * heads + h];
                    let big_d = dot(dov, ov);
                    let last = tk - tq + i;
                    let dqi = &mut dq_l[(i * group + g) * d..(i * group + g + 1) * d];
                    for j in 0..=last {
                        let kb = (b * cap + j) * kvrow + kvh * d;
                        let (kv, vv) = (&k[kb..kb + d], &v[kb..kb + d]);
                        let p = (dot(qv, kv) * scale - l).exp();
                        let dp = dot(dov, vv);
                        let ds = p * (dp - big_d) * scale;
                        for t in 0..d {
                            dv_l[j * d + t] += p * dov[t];
                            dqi[t] += ds * kv[t];
                            dk_l[j * d + t] += ds * qv[t];
                        }
                    }
                }
            }
            (dq_l, dk_l, dv_l)
        })
        .collect();
    dk[..batch * cap * kvrow].fill(0.0);
    dv[..batch * cap * kvrow].fill(0.0);
    for (task, (dq_l, dk_l, dv_l)) in parts.into_iter().enumerate() {
        let (b, kvh) = (task / kv_heads, task % kv_heads);
        for i in 0..tq {
            for g in 0..group {
                let h = kvh * group + g;
                let dst = (b * tq + i) * qrow + h * d;
                dq[dst..dst + d]
                    .copy_from_slice(&dq_l[(i * group + g) * d..(i * group + g + 1) * d]);
            }
        }
        for j in 0..tk {
            let dst = (b * cap + j) * kvrow + kvh * d;
            dk[dst..dst + d].copy_from_slice(&dk_l[j * d..(j + 1) * d]);
            dv[dst..dst + d].copy_from_slice(&dv_l[j * d..(j + 1) * d]);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn kv_write(
    cache: &mut [f32],
    new: &[f32],
    batch: usize,
    cap: usize,
    starts: Starts,
    tq: usize,
    row: usize,
) {
    for b in 0..batch {
        let src = &new[b * tq * row..(b + 1) * tq * row];
        let dst = (b * cap + starts.of(b)) * row;
        cache[dst..dst + tq * row].copy_from_slice(src);
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| *o = g * sigmoid(g) * u);
}

pub fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(dout.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .for_each(|((dg, du), (&d, (&g, &u)))| {
            let sg = sigmoid(g);
            *du = d * g * sg;
            *dg = d * u * sg * (1.0 + g * (1.0 - sg));
        });
}

/// Softmax statistics of one row at a temperature, as f64 sums so long vocabularies do not
/// lose the small tail.
pub fn row_stats(row: &[f32], target: u32, temperature: f32) -> (RowStats, f32) {
    let inv_t = 1.0 / temperature;
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * inv_t;
    let (mut sum, mut zsum) = (0.0f64, 0.0f64);
    for &x in row {
        let z = x * inv_t;
        let e = ((z - m) as f64).exp();
        sum += e;
        // A masked logit (−inf) has e = 0 and must add nothing: 0·(−inf) would be NaN.
        zsum += e * z.max(f32::MIN) as f64;
    }
    let lse = m + sum.ln() as f32;
    let mean_z = (zsum / sum) as f32;
    let logprob = if target == NO_TARGET {
        0.0
    } else {
        row[target as usize] * inv_t - lse
    };
    (
        RowStats {
            logsumexp: lse,
            entropy: lse - mean_z,
            logprob,
        },
        mean_z,
    )
}

pub fn softmax_stats(
    logits: &[f32],
    rows: usize,
    vocab: usize,
    targets: &[u32],
    temperature: f32,
) -> Vec<RowStats> {
    logits[..rows * vocab]
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| row_stats(row, t, temperature).0)
        .collect()
}

pub fn softmax_stats_bwd(
    dlogits: &mut [f32],
    logits: &[f32],
    rows: usize,
    vocab: usize,
    loss: &StatsLoss,
) {
    stats_bwd_rows(dlogits, logits, rows, vocab, loss, |r, row| {
        let (st, mean_z) = row_stats(row, loss.targets[r], loss.temperature);
        (st.logsumexp, mean_z)
    });
}

/// softmax_stats_bwd with each row's statistics taken from `stats` (the layout of
/// `RowStats::flatten`) instead of recomputed; E[z] = logsumexp − entropy.
pub fn softmax_stats_bwd_saved(
    dlogits: &mut [f32],
    logits: &[f32],
    stats: &[f32],
    rows: usize,
    vocab: usize,
    loss: &StatsLoss,
) {
    stats_bwd_rows(dlogits, logits, rows, vocab, loss, |r, _| {
        let (lse, entropy) = (stats[3 * r], stats[3 * r + 1]);
        (lse, lse - entropy)
    });
}

/// The gradient pass over every row, given each row's (logsumexp, E[z]) from `moments`.
fn stats_bwd_rows(
    dlogits: &mut [f32],
    logits: &[f32],
    rows: usize,
    vocab: usize,
    loss: &StatsLoss,
    moments: impl Fn(usize, &[f32]) -> (f32, f32) + Sync,
) {
    let StatsLoss {
        targets,
        temperature,
        a,
        b,
    } = *loss;
    dlogits[..rows * vocab]
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .for_each(|(r, (drow, row))| {
            let m = moments(r, row);
            stats_grad(drow, row, m, targets[r], temperature, a[r], b[r]);
        });
}

/// softmax_stats_bwd_saved with each row's gradient written over its logits.
pub fn softmax_stats_bwd_saved_in_place(
    logits: &mut [f32],
    stats: &[f32],
    rows: usize,
    vocab: usize,
    loss: &StatsLoss,
) {
    let StatsLoss {
        targets,
        temperature,
        a,
        b,
    } = *loss;
    logits[..rows * vocab]
        .par_chunks_mut(vocab)
        .enumerate()
        .for_each(|(r, row)| {
            let (lse, entropy) = (stats[3 * r], stats[3 * r + 1]);
            stats_grad_in_place(
                row,
                (lse, lse - entropy),
                targets[r],
                temperature,
                a[r],
                b[r],
            );
        });
}

/// One row's gradient of a·entropy + b·logprob given its (logsumexp, E[z]).
fn stats_grad(
    drow: &mut [f32],
    row: &[f32],
    moments: (f32, f32),
    target: u32,
    temperature: f32,
    a: f32,
    b: f32,
) {
    drow.copy_from_slice(row);
    stats_grad_in_place(drow, moments, target, temperature, a, b);
}

/// `stats_grad` over the row it reads: each logit is replaced by its own gradient.
fn stats_grad_in_place(
    row: &mut [f32],
    (lse, mean_z): (f32, f32),
    target: u32,
    temperature: f32,
    a: f32,
    b: f32,
) {
    // With z = logits/T, p = softmax(z): dH/dz_j = −p_j (z_j − E_p[z]) and
    // dlogp_y/dz_j = [j = y] − p_j; the chain rule through z adds the 1/T.
    let inv_t = 1.0 / temperature;
    let cb = if target == NO_TARGET { 0.0 } else { b };
    for x in row.iter_mut() {
        let z = *x * inv_t;
        let p = (z - lse).exp();
        // The clamp keeps a masked logit's (p = 0, z = −inf) gradient 0 rather than NaN; the
        // kernel clamps the same way.
        *x = (a * (-p * (z - mean_z).max(-1e30)) - cb * p) * inv_t;
    }
    if target != NO_TARGET {
        row[target as usize] += cb * inv_t;
    }
}

pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWStep) {
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let step_size = (h.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = 1.0 - h.lr * h.weight_decay;
    p.par_iter_mut()
        .zip(g.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            let g = g * h.grad_scale;
            *p *= decay;
            *m = h.beta1 * *m + (1.0 - h.beta1) * g;
            *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + h.eps);
        });
}

thread_local! {
    // Per thread: the reference is called from many test threads at once, and a count must
    // see only its own caller's work.
    static TRAFFIC: std::cell::Cell<Traffic> = const {
        std::cell::Cell::new(Traffic { allocs: 0, to_device: 0, to_host: 0 })
    };
}

/// Counts what the model asks of the reference: its buffers are host memory, so an "upload"
/// is a copy all the same, and the model's discipline is the same on both backends.
fn count(f: impl FnOnce(&mut Traffic)) {
    TRAFFIC.with(|t| {
        let mut v = t.get();
        f(&mut v);
        t.set(v);
    });
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Host = Vec<f32>;

    fn traffic(&self) -> Traffic {
        TRAFFIC.with(|t| t.get())
    }

    fn name(&self) -> String {
        format!(
            "cpu (f32 reference, {} threads)",
            rayon::current_num_threads()
        )
    }
    fn alloc(&self, n: usize) -> Result<Vec<f32>> {
        count(|t| t.allocs += 1);
        Ok(vec![0.0; n])
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        count(|t| {
            t.allocs += 1;
            t.to_device += 1;
        });
        Ok(host.to_vec())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        count(|t| t.to_host += 1);
        Ok(buf.clone())
    }
    fn alloc_host(&self, n: usize) -> Result<Vec<f32>> {
        count(|t| t.allocs += 1);
        Ok(vec![0.0; n])
    }
    fn copy_to_device(&self, dst: &mut Vec<f32>, src: &Vec<f32>) {
        count(|t| t.to_device += 1);
        dst.copy_from_slice(src);
    }
    fn copy_to_host(&self, dst: &mut Vec<f32>, src: &Vec<f32>) {
        count(|t| t.to_host += 1);
        dst.copy_from_slice(src);
    }
    fn host_values(&self, h: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(h.clone())
    }
    fn set_host_values(&self, h: &mut Vec<f32>, values: &[f32]) -> Result<()> {
        if h.len() != values.len() {
            bail!("{} values for host memory of {}", values.len(), h.len());
        }
        h.copy_from_slice(values);
        Ok(())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn zero(&self, buf: &mut Vec<f32>) {
        buf.fill(0.0);
    }
    fn copy_range(
        &self,
        dst: &mut Vec<f32>,
        dst_off: usize,
        src: &Vec<f32>,
        src_off: usize,
        n: usize,
    ) {
        dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>) {
        dst.copy_from_slice(src);
    }
    fn add(&self, y: &mut Vec<f32>, x: &Vec<f32>) {
        y.par_iter_mut()
            .zip(x.par_iter())
            .for_each(|(a, b)| *a += b);
    }
    fn axpy(&self, y: &mut Vec<f32>, alpha: f32, x: &Vec<f32>) {
        y.par_iter_mut()
            .zip(x.par_iter())
            .for_each(|(a, b)| *a += alpha * b);
    }
    fn sum_squares(&self, x: &Vec<f32>) -> Result<f64> {
        // Fixed chunks summed in order: the result must not depend on rayon's work stealing,
        // or the same seed would not give the same run.
        let parts: Vec<f64> = x
            .par_chunks(1 << 14)
            .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum())
            .collect();
        Ok(parts.iter().sum())
    }
    fn adamw(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        h: &AdamWStep,
    ) {
        adamw(p, g, m, v, h)
    }
    fn embedding(&self, out: &mut Vec<f32>, table: &Vec<f32>, ids: &[u32], dim: usize) {
        embedding(out, table, ids, dim)
    }
    fn embedding_bwd(&self, dtable: &mut Vec<f32>, dout: &Vec<f32>, ids: &[u32], dim: usize) {
        embedding_bwd(dtable, dout, ids, dim)
    }
    fn matmul(
        &self,
        out: &mut Vec<f32>,
        a: &Vec<f32>,
        w: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        matmul(out, a, w, bias.map(|b| b.as_slice()), m, k, n)
    }
    fn matmul_bwd(
        &self,
        da: Option<&mut Vec<f32>>,
        dw: Option<&mut Vec<f32>>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        a: &Vec<f32>,
        w: &Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        matmul_bwd(
            da.map(|x| x.as_mut_slice()),
            dw.map(|x| x.as_mut_slice()),
            dbias.map(|x| x.as_mut_slice()),
            dout,
            a,
            w,
            m,
            k,
            n,
        )
    }
    fn rmsnorm(
        &self,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        rmsnorm(out, rstd, x, w, rows, dim, eps)
    }
    fn rmsnorm_bwd(
        &self,
        dx: &mut Vec<f32>,
        dw: &mut Vec<f32>,
        dout: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        rows: usize,
        dim: usize,
    ) {
        rmsnorm_bwd(dx, dw, dout, x, w, rstd, rows, dim)
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        batch: usize,
        seq: usize,
        heads: usize,
        head_dim: usize,
        starts: Starts,
        theta: f32,
        inverse: bool,
    ) {
        rope(x, batch, seq, heads, head_dim, starts, theta, inverse)
    }
    fn attention(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: AttnShape,
    ) {
        attention(out, lse, q, k, v, s)
    }
    fn attention_decode(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: AttnShape,
        kv_len: &[u32],
    ) {
        attention_ragged(out, lse, q, k, v, s, Some(kv_len))
    }
    fn attention_bwd(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: AttnShape,
    ) {
        attention_bwd(dq, dk, dv, dout, out, lse, q, k, v, s)
    }
    fn kv_write(
        &self,
        cache: &mut Vec<f32>,
        new: &Vec<f32>,
        batch: usize,
        cap: usize,
        starts: Starts,
        tq: usize,
        row: usize,
    ) {
        kv_write(cache, new, batch, cap, starts, tq, row)
    }
    fn swiglu(&self, out: &mut Vec<f32>, gate: &Vec<f32>, up: &Vec<f32>) {
        swiglu(out, gate, up)
    }
    fn swiglu_bwd(
        &self,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
    ) {
        swiglu_bwd(dgate, dup, dout, gate, up)
    }
    fn softmax_stats(
        &self,
        logits: &Vec<f32>,
        rows: usize,
        vocab: usize,
        targets: &[u32],
        temperature: f32,
    ) -> Result<Vec<RowStats>> {
        check_stats_args(logits.len(), rows, vocab, targets)?;
        Ok(softmax_stats(logits, rows, vocab, targets, temperature))
    }
    fn softmax_stats_into(
        &self,
        stats: &mut Vec<f32>,
        logits: &Vec<f32>,
        rows: usize,
        vocab: usize,
        targets: &[u32],
        temperature: f32,
    ) -> Result<()> {
        check_stats_args(logits.len(), rows, vocab, targets)?;
        if stats.len() < 3 * rows {
            bail!(
                "softmax_stats: stats holds {} values, {rows} rows need {}",
                stats.len(),
                3 * rows
            );
        }
        let flat = RowStats::flatten(&softmax_stats(logits, rows, vocab, targets, temperature));
        stats[..3 * rows].copy_from_slice(&flat);
        Ok(())
    }
    fn softmax_stats_bwd(
        &self,
        dlogits: &mut Vec<f32>,
        logits: &Vec<f32>,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    ) {
        softmax_stats_bwd(dlogits, logits, rows, vocab, loss)
    }
    fn softmax_stats_bwd_saved(
        &self,
        dlogits: &mut Vec<f32>,
        logits: &Vec<f32>,
        stats: &Vec<f32>,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    ) {
        softmax_stats_bwd_saved(dlogits, logits, stats, rows, vocab, loss)
    }
    fn softmax_stats_bwd_saved_in_place(
        &self,
        logits: &mut Vec<f32>,
        stats: &Vec<f32>,
        rows: usize,
        vocab: usize,
        loss: &StatsLoss,
    ) {
        softmax_stats_bwd_saved_in_place(logits, stats, rows, vocab, loss)
    }
}
