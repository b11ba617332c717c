//! Launchers for cuda/attention.cu and cuda/attention_decode.cu: flash-style training attention (forward and backward) on
//! tensor cores for head_dim 64 and 128, a scalar fallback for other head sizes, split-K decode
//! attention over the KV cache, and the cache write. The dispatch rule and every kernel's
//! geometry are documented at the top of the .cu file.

use super::cuda::slot::{DELTA, DKV_ACCUM, DQ_ACCUM, LSE2, PART_ML, PART_O};
use super::cuda::{Arg, AttnKernels, CudaBackend, CudaBuf, Dtype};
use super::{AttnShape, Starts};

/// Decode split granularity in keys: one 16-key step for each of a decode block's 4 warps. A
/// split is a multiple of this and at least twice it.
const DECODE_CHUNK: usize = 64;

fn check(
    be: &CudaBackend,
    op: &str,
    s: &AttnShape,
    bufs: &[(&str, &CudaBuf, Dtype, usize)],
) -> bool {
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) || s.tq > s.tk || s.tk > s.cap {
        be.fail_op(format!("{op}: inconsistent shape {s:?}"));
        return false;
    }
    if !s.head_dim.is_multiple_of(8) || s.head_dim > 256 {
        be.fail_op(format!(
            "{op}: head_dim {} is not a multiple of 8 up to 256, which the kernels need",
            s.head_dim
        ));
        return false;
    }
    bufs.iter()
        .all(|(name, b, d, n)| be.want(op, name, b, *d, *n))
}

fn fast(head_dim: usize) -> Option<&'static str> {
    match head_dim {
        64 => Some("64"),
        128 => Some("128"),
        _ => None,
    }
}

pub fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    s: AttnShape,
) {
    let nq = s.batch * s.tq * s.heads * s.head_dim;
    let nkv = s.batch * s.cap * s.kv_heads * s.head_dim;
    if !check(
        be,
        "attention",
        &s,
        &[
            ("out", out, Dtype::Bf16, nq),
            ("lse", lse, Dtype::F32, s.batch * s.tq * s.heads),
            ("q", q, Dtype::Bf16, nq),
            ("k", k, Dtype::Bf16, nkv),
            ("v", v, Dtype::Bf16, nkv),
        ],
    ) {
        return;
    }
    let (tq, tk, cap, heads, kvh, d) = (
        s.tq as i32,
        s.tk as i32,
        s.cap as i32,
        s.heads as i32,
        s.kv_heads as i32,
        s.head_dim as i32,
    );
    if s.tq == 1 {
        return decode(be, out, lse, q, k, v, s, &vec![s.tk as u32; s.batch]);
    }
    if be.attention_kernels() == AttnKernels::Unfused {
        return super::cuda_attention_unfused::forward(be, out, lse, q, k, v, s);
    }
    let common = [
        Arg::P(out.ptr()),
        Arg::P(lse.ptr()),
        Arg::P(q.ptr()),
        Arg::P(k.ptr()),
        Arg::P(v.ptr()),
        Arg::I(tq),
        Arg::I(tk),
        Arg::I(cap),
        Arg::I(heads),
        Arg::I(kvh),
    ];
    match fast(s.head_dim) {
        // The same grid: 128-query tiles, y = 0 first. 5 tiles of 32 KB (Q, K and V twice) and
        // 1 KB to align them to the swizzle's 1 KB period.
        Some("128") if be.attention_kernels() == AttnKernels::Wgmma => be.launch(
            "attention_fwd_d128_wgmma",
            ((s.batch * s.heads) as u32, s.tq.div_ceil(128) as u32, 1),
            (256, 1, 1),
            5 * 32768 + 1024,
            &common,
        ),
        // 128-query tiles; y = 0 is the tile with the longest causal rows, dispatched first.
        Some(dn) => be.launch(
            &format!("attention_fwd_d{dn}"),
            ((s.batch * s.heads) as u32, s.tq.div_ceil(128) as u32, 1),
            (128, 1, 1),
            (512 * s.head_dim) as u32,
            &common,
        ),
        None => {
            let mut args = common.to_vec();
            args.push(Arg::I(d));
            be.launch(
                "attention_fwd_generic",
                ((s.tq * s.heads).div_ceil(4) as u32, s.batch as u32, 1),
                (128, 1, 1),
                0,
                &args,
            )
        }
    }
}

/// `Backend::attention_decode`: one query per sequence over its own number of cached keys.
#[allow(clippy::too_many_arguments)]
pub fn forward_ragged(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    s: AttnShape,
    kv_len: &[u32],
) {
    if s.tq != 1 || kv_len.len() != s.batch || kv_len.iter().any(|&l| l == 0 || l as usize > s.tk) {
        be.fail_op(format!(
            "attention_decode: {} key counts for {s:?} (one query per sequence, 1..=tk keys each)",
            kv_len.len()
        ));
        return;
    }
    let nq = s.batch * s.heads * s.head_dim;
    let nkv = s.batch * s.cap * s.kv_heads * s.head_dim;
    if check(
        be,
        "attention_decode",
        &s,
        &[
            ("out", out, Dtype::Bf16, nq),
            ("lse", lse, Dtype::F32, s.batch * s.heads),
            ("q", q, Dtype::Bf16, nq),
            ("k", k, Dtype::Bf16, nkv),
            ("v", v, Dtype::Bf16, nkv),
        ],
    ) {
        decode(be, out, lse, q, k, v, s, kv_len);
    }
}

/// One query per sequence, sequence b over its first kv_len[b] cached keys.
///
/// A block reads the K/V rows of one kv head (for up to 8 of its q heads) over one split of
/// the keys. The split count fills one wave of resident blocks: every block then streams at the
/// same rate and they finish together, and a single split (the usual case for a full batch)
/// needs no combine pass.
#[allow(clippy::too_many_arguments)]
fn decode(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    s: AttnShape,
    kv_len: &[u32],
) {
    let Some(len_p) = be.stage_kv_len(kv_len) else {
        return;
    };
    // Kernel by row width, with its blocks per SM (its __launch_bounds__).
    let (kernel, per_sm) = match s.head_dim {
        0..=64 => ("attention_decode_d64", 4),
        65..=128 => ("attention_decode_d128", 2),
        _ => ("attention_decode_d256", 2),
    };
    let row_blocks = s.kv_heads * (s.heads / s.kv_heads).div_ceil(8);
    let blocks = s.batch * row_blocks;
    let slots = be.sm_count() as usize * per_sm;
    let most = s.tk.div_ceil(2 * DECODE_CHUNK).max(1);
    let want = (slots / blocks.max(1)).clamp(1, most);
    let chunk =
        s.tk.div_ceil(want)
            .next_multiple_of(DECODE_CHUNK)
            .max(DECODE_CHUNK);
    let splits = s.tk.div_ceil(chunk).max(1);
    let (po, pml) = if splits > 1 {
        let rows = splits * s.batch * s.heads;
        match (
            be.scratch_f32(PART_O, rows * s.head_dim),
            be.scratch_f32(PART_ML, rows * 2),
        ) {
            (Some(a), Some(b)) => (a, b),
            _ => return,
        }
    } else {
        (0, 0)
    };
    be.launch(
        kernel,
        (splits as u32, row_blocks as u32, s.batch as u32),
        (128, 1, 1),
        0,
        &[
            Arg::P(out.ptr()),
            Arg::P(lse.ptr()),
            Arg::P(po),
            Arg::P(pml),
            Arg::P(q.ptr()),
            Arg::P(k.ptr()),
            Arg::P(v.ptr()),
            Arg::P(len_p),
            Arg::I(s.cap as i32),
            Arg::I(s.heads as i32),
            Arg::I(s.kv_heads as i32),
            Arg::I(s.head_dim as i32),
            Arg::I(chunk as i32),
        ],
    );
    if splits > 1 {
        be.launch(
            "attention_decode_combine",
            (s.heads as u32, s.batch as u32, 1),
            (128, 1, 1),
            0,
            &[
                Arg::P(out.ptr()),
                Arg::P(lse.ptr()),
                Arg::P(po),
                Arg::P(pml),
                Arg::I(splits as i32),
                Arg::I(s.heads as i32),
                Arg::I(s.head_dim as i32),
            ],
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    be: &CudaBackend,
    dq: &mut CudaBuf,
    dk: &mut CudaBuf,
    dv: &mut CudaBuf,
    dout: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    s: AttnShape,
) {
    let nq = s.batch * s.tq * s.heads * s.head_dim;
    let nkv = s.batch * s.cap * s.kv_heads * s.head_dim;
    let rows = s.batch * s.tq * s.heads;
    if !check(
        be,
        "attention_bwd",
        &s,
        &[
            ("dq", dq, Dtype::Bf16, nq),
            ("dk", dk, Dtype::Bf16, nkv),
            ("dv", dv, Dtype::Bf16, nkv),
            ("dout", dout, Dtype::Bf16, nq),
            ("out", out, Dtype::Bf16, nq),
            ("lse", lse, Dtype::F32, rows),
            ("q", q, Dtype::Bf16, nq),
            ("k", k, Dtype::Bf16, nkv),
            ("v", v, Dtype::Bf16, nkv),
        ],
    ) {
        return;
    }
    if be.attention_kernels() == AttnKernels::Unfused {
        return super::cuda_attention_unfused::backward(
            be,
            [dq, dk, dv],
            [dout, out, lse],
            [q, k, v],
            s,
        );
    }
    // delta (and lse2 on the fast path) are [batch, heads, tq rounded up to 64].
    let padded = s.batch * s.heads * s.tq.div_ceil(64) * 64;
    let Some(delta) = be.scratch_f32(DELTA, padded) else {
        return;
    };
    let shape_args = [
        Arg::I(s.tq as i32),
        Arg::I(s.tk as i32),
        Arg::I(s.cap as i32),
        Arg::I(s.heads as i32),
        Arg::I(s.kv_heads as i32),
    ];
    let preprocess = |lse2: u64, dq_accum: u64, dkv_accum: u64| {
        be.launch(
            "attention_bwd_preprocess",
            (padded.div_ceil(4) as u32, 1, 1),
            (128, 1, 1),
            0,
            &[
                Arg::P(delta),
                Arg::P(lse2),
                Arg::P(dq_accum),
                Arg::P(dkv_accum),
                Arg::P(dout.ptr()),
                Arg::P(out.ptr()),
                Arg::P(lse.ptr()),
                Arg::I(s.batch as i32),
                Arg::I(s.tq as i32),
                Arg::I(s.heads as i32),
                Arg::I(s.head_dim as i32),
                Arg::L(if dkv_accum != 0 { 2 * nkv as i64 } else { 0 }),
            ],
        )
    };
    let wgmma = s.head_dim == 128 && be.attention_kernels() == AttnKernels::Wgmma;
    let smem = match s.head_dim {
        128 if wgmma => 149504,
        128 => 164864,
        _ => 99328,
    };
    // A GPU without that much shared memory per block (sm_86/89: 99 KB) takes the fallback.
    let fast_bwd = fast(s.head_dim).filter(|_| smem <= be.max_smem_optin());
    match fast_bwd {
        Some(dn) => {
            // GQA: the q heads of a group add dk, dv into fp32 scratch; without it the kernel
            // writes them directly.
            let gqa = s.heads > s.kv_heads;
            let (Some(lse2), Some(dq_accum)) =
                (be.scratch_f32(LSE2, padded), be.scratch_f32(DQ_ACCUM, nq))
            else {
                return;
            };
            let dkv_accum = if gqa {
                match be.scratch_f32(DKV_ACCUM, 2 * nkv) {
                    Some(p) => p,
                    None => return,
                }
            } else {
                0
            };
            preprocess(lse2, dq_accum, dkv_accum);
            let mut args = vec![
                Arg::P(dq_accum),
                Arg::P(dkv_accum),
                Arg::P(dk.ptr()),
                Arg::P(dv.ptr()),
                Arg::P(dout.ptr()),
                Arg::P(lse2),
                Arg::P(delta),
                Arg::P(q.ptr()),
                Arg::P(k.ptr()),
                Arg::P(v.ptr()),
            ];
            args.extend(shape_args);
            let keys = if gqa { s.tk } else { s.cap };
            // The wgmma kernel has the same contract and grid (cuda/attention_wgmma.cu).
            let name = if wgmma {
                "attention_bwd_d128_wgmma".to_string()
            } else {
                format!("attention_bwd_d{dn}")
            };
            be.launch(
                &name,
                ((s.batch * s.heads) as u32, keys.div_ceil(128) as u32, 1),
                (256, 1, 1),
                smem,
                &args,
            );
            let n = nq + if gqa { 2 * nkv } else { 0 };
            be.launch(
                "attention_bwd_convert",
                (n.div_ceil(1024) as u32, 1, 1),
                (256, 1, 1),
                0,
                &[
                    Arg::P(dq.ptr()),
                    Arg::P(dk.ptr()),
                    Arg::P(dv.ptr()),
                    Arg::P(dq_accum),
                    Arg::P(dkv_accum),
                    Arg::L(nq as i64),
                    Arg::L(nkv as i64),
                ],
            );
        }
        None => {
            preprocess(0, 0, 0);
            let inputs = [
                Arg::P(dout.ptr()),
                Arg::P(lse.ptr()),
                Arg::P(delta),
                Arg::P(q.ptr()),
                Arg::P(k.ptr()),
                Arg::P(v.ptr()),
            ];
            let mut args = vec![Arg::P(dq.ptr())];
            args.extend(inputs);
            args.extend(shape_args);
            args.push(Arg::I(s.head_dim as i32));
            be.launch(
                "attention_bwd_dq_generic",
                ((s.tq * s.heads).div_ceil(4) as u32, s.batch as u32, 1),
                (128, 1, 1),
                0,
                &args,
            );
            let mut args = vec![Arg::P(dk.ptr()), Arg::P(dv.ptr())];
            args.extend(inputs);
            args.extend(shape_args);
            args.push(Arg::I(s.head_dim as i32));
            be.launch(
                "attention_bwd_dkdv_generic",
                ((s.cap * s.kv_heads).div_ceil(4) as u32, s.batch as u32, 1),
                (128, 1, 1),
                0,
                &args,
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn kv_write(
    be: &CudaBackend,
    cache: &mut CudaBuf,
    new: &CudaBuf,
    batch: usize,
    cap: usize,
    starts: Starts,
    tq: usize,
    row: usize,
) {
    let Some((pos0, starts_p)) = be.stage_starts("kv_write", starts, batch) else {
        return;
    };
    if let Some(b) = (0..batch).find(|&b| starts.of(b) + tq > cap) {
        let at = starts.of(b);
        be.fail_op(format!(
            "kv_write: sequence {b} at positions {at}..{} past the cache capacity {cap}",
            at + tq
        ));
        return;
    }
    if !(be.want("kv_write", "cache", cache, Dtype::Bf16, batch * cap * row)
        && be.want("kv_write", "new", new, Dtype::Bf16, batch * tq * row))
    {
        return;
    }
    let n = batch * tq * row;
    be.launch(
        "kv_write",
        (n.div_ceil(256) as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(cache.ptr()),
            Arg::P(new.ptr()),
            Arg::I(batch as i32),
            Arg::I(cap as i32),
            Arg::I(pos0),
            Arg::P(starts_p),
            Arg::I(tq as i32),
            Arg::I(row as i32),
        ],
    );
}

/// The wgmma forms of the attention kernels, one at a time (`wgmma_probe`, the layout probe in
/// cuda/attention_wgmma.cu): (name, [m, k, n], A stored transposed, B stored transposed), the
/// product being D (m × n) = A B with A given as [k][m] where transposed and B as [n][k].
#[rustfmt::skip]
pub const WGMMA_FORMS: [(&str, [usize; 3], bool, bool); 5] = [
    ("S = Q Kᵀ (fwd: A, B K-major in smem)", [128, 128, 128], false, true),
    ("O += P V (fwd: A regs, B N-major)", [128, 128, 128], false, false),
    ("Sᵀ = K Qᵀ (bwd: m64n64, K-major)", [128, 128, 64], false, true),
    ("dV += Pᵀ dO (bwd: A regs, B N-major)", [128, 64, 128], false, false),
    ("dQ = dS K (bwd: A M-major, B N-major)", [64, 128, 128], true, false),
];

/// Runs form `form` of `WGMMA_FORMS` on A and B (rounded to bf16) and returns D. Needs
/// `has_wgmma`.
pub fn wgmma_probe(
    be: &CudaBackend,
    form: usize,
    a: &[f32],
    b: &[f32],
) -> anyhow::Result<Vec<f32>> {
    use crate::backend::Backend;
    let [m, k, n] = WGMMA_FORMS[form].1;
    anyhow::ensure!(
        a.len() == m * k && b.len() == k * n,
        "wgmma probe form {form}: operands of {} and {} values, expected {} and {}",
        a.len(),
        b.len(),
        m * k,
        k * n
    );
    let (ba, bb) = (be.upload(a)?, be.upload(b)?);
    let d = be.upload_f32(&vec![f32::NAN; m * n])?;
    be.launch(
        "wgmma_probe",
        (1, 1, 1),
        (256, 1, 1),
        2 * 32768 + 128 * 128 + 1024,
        &[
            Arg::P(d.ptr()),
            Arg::P(ba.ptr()),
            Arg::P(bb.ptr()),
            Arg::I(form as i32),
        ],
    );
    be.download(&d)
}
