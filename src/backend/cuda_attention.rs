//! Launchers for cuda/attention.cu and cuda/attention_decode.cu: flash-style training attention (forward and backward) on
//! tensor cores for head_dim 64 and 128, a scalar fallback for other head sizes, split-K decode
//! attention over the KV cache, and the cache write. The dispatch rule and every kernel's
//! geometry are documented at the top of the .cu file.

use super::cuda::{Arg, CudaBackend, CudaBuf, Dtype};
use super::AttnShape;

/// Keys per decode split: long caches are cut into this many keys per block, then merged.
const DECODE_CHUNK: usize = 256;

/// Float scratch slots of the CUDA backend used here.
const DELTA: usize = 0;
const DQ_ACCUM: usize = 1;
const PART_O: usize = 2;
const PART_ML: usize = 3;

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
        return decode(be, out, lse, q, k, v, s);
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
        Some(dn) => be.launch(
            &format!("attention_fwd_d{dn}"),
            (s.tq.div_ceil(64) as u32, s.heads as u32, s.batch as u32),
            (128, 1, 1),
            (256 * s.head_dim) as u32,
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

/// One query per sequence over `tk` cached keys (every sequence of the batch at the same
/// length here; the kernel itself takes a length per sequence).
fn decode(
    be: &CudaBackend,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    s: AttnShape,
) {
    let kv_len = vec![s.tk as u32; s.batch];
    let Some(len_p) = be.stage_kv_len(&kv_len) else {
        return;
    };
    let splits = s.tk.div_ceil(DECODE_CHUNK).max(1);
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
    let group = s.heads / s.kv_heads;
    be.launch(
        "attention_decode",
        (
            splits as u32,
            (s.kv_heads * group.div_ceil(8)) as u32,
            s.batch as u32,
        ),
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
            Arg::I(DECODE_CHUNK as i32),
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
    let Some(delta) = be.scratch_f32(DELTA, rows) else {
        return;
    };
    let dq_accum = match fast(s.head_dim) {
        Some(_) => match be.scratch_f32(DQ_ACCUM, nq) {
            Some(p) => p,
            None => return,
        },
        None => 0, // the fallback writes dq directly
    };
    be.launch(
        "attention_bwd_preprocess",
        (rows.div_ceil(4) as u32, 1, 1),
        (128, 1, 1),
        0,
        &[
            Arg::P(delta),
            Arg::P(dq_accum),
            Arg::P(dout.ptr()),
            Arg::P(out.ptr()),
            Arg::L(rows as i64),
            Arg::I(s.head_dim as i32),
        ],
    );
    let shape_args = [
        Arg::I(s.tq as i32),
        Arg::I(s.tk as i32),
        Arg::I(s.cap as i32),
        Arg::I(s.heads as i32),
        Arg::I(s.kv_heads as i32),
    ];
    let inputs = [
        Arg::P(dout.ptr()),
        Arg::P(lse.ptr()),
        Arg::P(delta),
        Arg::P(q.ptr()),
        Arg::P(k.ptr()),
        Arg::P(v.ptr()),
    ];
    match fast(s.head_dim) {
        Some(dn) => {
            let mut args = vec![Arg::P(dq_accum), Arg::P(dk.ptr()), Arg::P(dv.ptr())];
            args.extend(inputs);
            args.extend(shape_args);
            be.launch(
                &format!("attention_bwd_d{dn}"),
                (s.cap.div_ceil(64) as u32, s.kv_heads as u32, s.batch as u32),
                (128, 1, 1),
                if s.head_dim == 128 { 49152 } else { 32768 },
                &args,
            );
            be.launch(
                "attention_bwd_dq_convert",
                (nq.div_ceil(256) as u32, 1, 1),
                (256, 1, 1),
                0,
                &[Arg::P(dq.ptr()), Arg::P(dq_accum), Arg::L(nq as i64)],
            );
        }
        None => {
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
    pos0: usize,
    tq: usize,
    row: usize,
) {
    if pos0 + tq > cap {
        be.fail_op(format!(
            "kv_write: positions {pos0}..{} past the cache capacity {cap}",
            pos0 + tq
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
            Arg::I(pos0 as i32),
            Arg::I(tq as i32),
            Arg::I(row as i32),
        ],
    );
}
