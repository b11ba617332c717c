//! `empo-engine bench`: each op's throughput at Qwen2.5-7B shapes (hidden 3584, 28 query and 4
//! key-value heads of 128, vocab 152064, sequences of 1k to 4k), as TFLOP/s or GB/s and as a
//! fraction of the device's ceilings measured in the same run: a large device-to-device copy
//! (memory-bound ops) and a large bf16 GEMM (compute-bound ops).
//!
//! Generic over `Backend`: on the CPU (`--device cpu`, with `--small` shapes) it measures the
//! reference; on the GPU the numbers are what the targets are about. Each case runs
//! twice to warm up, then between two `sync`s at least `iters` times and for at least 10 ms
//! (`time`).

use crate::backend::{AdamWStep, AttnShape, Backend, Starts, StatsLoss};
use anyhow::Result;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Unit {
    /// Memory-bound: bytes moved (each operand read once, each output written once).
    Bytes,
    /// Compute-bound: floating-point operations.
    Flops,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub op: String,
    pub shape: String,
    pub unit: Unit,
    /// Bytes or flops per call.
    pub work: f64,
    pub seconds: f64,
    /// Device memory the op needed beyond its inputs and outputs, where the backend tracks it.
    pub extra_bytes: Option<usize>,
    /// Memory-bound rows on the GPU: seconds of a device-to-device copy that moves the same
    /// bytes (`add_copy_peers`).
    pub copy_peer: Option<f64>,
}

impl BenchRow {
    /// A row of `work` bytes or flops per call in `seconds`, with nothing else known yet.
    pub fn new(op: &str, shape: String, unit: Unit, work: f64, seconds: f64) -> BenchRow {
        BenchRow {
            op: op.into(),
            shape,
            unit,
            work,
            seconds,
            extra_bytes: None,
            copy_peer: None,
        }
    }

    /// GB/s or TFLOP/s.
    pub fn rate(&self) -> f64 {
        match self.unit {
            Unit::Bytes => self.work / self.seconds / 1e9,
            Unit::Flops => self.work / self.seconds / 1e12,
        }
    }
}

/// Shapes: the 7B model's, or a small set for the CPU.
#[derive(Debug, Clone, Copy)]
pub struct BenchShapes {
    pub hidden: usize,
    pub inter: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub tokens: usize,
    pub seqs: &'static [usize],
    pub copy_bytes: usize,
    pub gemm: usize,
    /// Sequences a `decode_rows` step decodes together, one row each.
    pub decode_rows: &'static [usize],
    /// The shortest and the longest context of a decode step's sequences.
    pub decode_context: (usize, usize),
}

/// The memory plan's sampling batch for the mission's 7B EMPO run on an H100 (80 GB, 1324
/// tokens a sequence): `tests/memory_plan.rs` checks that the plan still gives this width.
pub const PLANNED_ROLLOUT_ROWS_7B_H100: usize = 841;

impl BenchShapes {
    pub fn qwen_7b() -> BenchShapes {
        BenchShapes {
            hidden: 3584,
            inter: 18944,
            heads: 28,
            kv_heads: 4,
            head_dim: 128,
            vocab: 152064,
            tokens: 4096,
            seqs: &[1024, 2048, 4096],
            copy_bytes: 1 << 30,
            gemm: 8192,
            decode_rows: &[8, 64, 256, PLANNED_ROLLOUT_ROWS_7B_H100],
            // A 256-token prompt, and up to 1068 new tokens (the mission's run: 1324 in all).
            decode_context: (256, 1324),
        }
    }
    pub fn small() -> BenchShapes {
        BenchShapes {
            hidden: 256,
            inter: 688,
            heads: 8,
            kv_heads: 2,
            head_dim: 32,
            vocab: 4096,
            tokens: 256,
            seqs: &[256],
            copy_bytes: 1 << 26,
            gemm: 512,
            decode_rows: &[4, 16],
            decode_context: (32, 160),
        }
    }
}

/// The least wall time one measurement spans. The clock runs from the host's first launch to its
/// return from the final sync, so it also holds that launch's latency and the sync's wake-up,
/// some 10–20 µs on a GPU: 10 calls of a 30 µs kernel would be charged 3–7% for them, where
/// PyTorch's side (tools/bench_torch_gpu.py) times between CUDA events and is not.
const MIN_WINDOW_S: f64 = 0.01;

/// Times `f` (already queued work excluded): two warm-up calls, the second timed to size the
/// measurement, then at least `iters` calls, and as many more as fill MIN_WINDOW_S (at most
/// 10000).
pub fn time<B: Backend>(be: &B, iters: usize, mut f: impl FnMut()) -> Result<f64> {
    f(); // the first call may load a kernel or allocate scratch
    be.sync()?;
    let t = Instant::now();
    f();
    be.sync()?;
    let one = t.elapsed().as_secs_f64();
    let n = iters
        .max((MIN_WINDOW_S / one.max(1e-9)).ceil() as usize)
        .min(iters.max(10_000));
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    be.sync()?;
    Ok(t.elapsed().as_secs_f64() / n as f64)
}

/// Uniform random values in [-scale, scale], a fresh stream per call: never time on constants
/// or zeros (a GEMM on constant data runs about 10% faster than on random data).
pub fn rnd(n: usize, scale: f32) -> Vec<f32> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STREAM: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let base = STREAM.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    (0..n as u64)
        .map(|i| {
            // splitmix64: cheap enough for the 512M values of the copy ceiling
            let mut z = base.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

/// The ceilings: (copy GB/s, bf16 GEMM TFLOP/s).
pub fn ceilings(rows: &[BenchRow]) -> (f64, f64) {
    let find = |op: &str| {
        rows.iter()
            .find(|r| r.op == op)
            .map_or(f64::NAN, |r| r.rate())
    };
    (find("ceiling: copy"), find("ceiling: GEMM"))
}

/// Prints a row to stderr as soon as it is measured: should the bench be cut off (a hang, the
/// device call's time limit), what ran before is already out; the table on stdout comes last.
pub fn announce(r: &BenchRow) {
    let rate = match r.unit {
        Unit::Bytes => format!("{:.0} GB/s", r.rate()),
        Unit::Flops => format!("{:.1} TFLOP/s", r.rate()),
    };
    eprintln!(
        "  {} [{}]: {:.3} ms, {rate}",
        r.op,
        r.shape,
        r.seconds * 1e3
    );
}

/// bf16 storage on the GPU: 2 bytes a value (the CPU's f32 moves twice that; its table rows are
/// still comparable to each other).
const BF16_BYTES: f64 = 2.0;

/// The bench's sections in turn (see `Sections`): every backend has these.
fn common_sections<B: Backend>(sec: &mut Sections<B>, s: &BenchShapes, iters: usize) -> Result<()> {
    let be = sec.be;
    // Every rate is read against the ceilings: without them the bench has nothing to say.
    let ceil = ceiling_rows(be, s, iters)?;
    ceil.iter().for_each(announce);
    sec.rows.extend(ceil);
    sec.run("matmul", || linear_rows(be, s, iters));
    sec.run("memory-bound", || memory_bound_rows(be, s, iters));
    sec.run("attention", || attention_rows(be, s, iters));
    sec.run("attention decode", || decode_attention_rows(be, s, iters));
    sec.run("softmax-entropy", || softmax_rows(be, s, iters));
    sec.run("adamw", || adamw_rows(be, s, iters));
    sec.run("optimizer", || optimizer_rows(be, s, iters));
    sec.run("sampling", || sampling_rows(be, s, iters));
    sec.run("lm_head", || lm_head_rows(be, s, iters));
    // One model for both sections: drawing its 0.5 billion weights takes seconds.
    let mut model = None;
    for name in ["model", "decode step"] {
        sec.run(name, || {
            if model.is_none() {
                model = Some(bench_model(be, s)?);
            }
            let m = model.as_mut().expect("built above");
            match name {
                "model" => model_rows(be, m, s, iters),
                _ => decode_rows(be, m, s, iters),
            }
        });
    }
    Ok(())
}

/// Every section over any backend; those named in `skip` are left out.
pub fn run_all<B: Backend>(
    be: &B,
    s: &BenchShapes,
    iters: usize,
    skip: &[String],
) -> Result<Vec<BenchRow>> {
    let mut sec = Sections::new(be, skip);
    common_sections(&mut sec, s, iters)?;
    Ok(sec.rows)
}

/// Every section on the GPU, then each row's copy peer, then the attention kernel sets that
/// are not the default (a fault in a kernel loses the device for what follows, so the ones
/// training does not run go last).
pub fn run_cuda(
    be: &crate::backend::cuda::CudaBackend,
    s: &BenchShapes,
    iters: usize,
    skip: &[String],
) -> Result<Vec<BenchRow>> {
    let mut sec = Sections::new(be, skip);
    common_sections(&mut sec, s, iters)?;
    sec.run("policy loss", || policy_loss_rows_cuda(be, iters));
    sec.run("(pdl)", || pdl_rows_cuda(be, s, iters));
    sec.run("embedding, ids on the device", || {
        embedding_device_ids_rows_cuda(be, s, iters)
    });
    if sec.lost.is_none() {
        if let Err(e) = add_copy_peers(be, &mut sec.rows, iters) {
            eprintln!("bench: the copy peers are left out: {e:#}");
        }
    }
    sec.run("attention variants", || {
        alternate_attention_rows(be, s, iters)
    });
    Ok(sec.rows)
}

/// Runs the bench's sections in turn. A section that errors (out of memory, a kernel's error)
/// is left out with a line saying why, and the rest still run: it must not cost the table of
/// every other one. Once one has lost the device (a fault kills the CUDA context), the rest are
/// left out, saying so; `bench --skip` that section gives the others in a fresh process.
pub struct Sections<'a, B: Backend> {
    be: &'a B,
    pub rows: Vec<BenchRow>,
    skip: &'a [String],
    lost: Option<String>,
    /// Whether the device is lost, asked after a section errors (`device_lost`; tests swap it).
    probe: fn(&B) -> bool,
}

impl<'a, B: Backend> Sections<'a, B> {
    pub fn new(be: &'a B, skip: &'a [String]) -> Self {
        Sections {
            be,
            rows: Vec::new(),
            skip,
            lost: None,
            probe: crate::kernel_checks::device_lost::<B>,
        }
    }

    pub fn run(&mut self, name: &str, section: impl FnOnce() -> Result<Vec<BenchRow>>) {
        if let Some(after) = &self.lost {
            eprintln!("bench: the {name} rows are left out: the device was lost in {after}");
            return;
        }
        if self.skip.iter().any(|x| x == name) {
            eprintln!("bench: the {name} rows are left out (--skip)");
            return;
        }
        match section() {
            Ok(r) => {
                r.iter().for_each(announce);
                self.rows.extend(r)
            }
            Err(e) => {
                eprintln!("bench: the {name} rows are left out: {e:#}");
                if (self.probe)(self.be) {
                    eprintln!("bench: the device was lost in {name}");
                    self.lost = Some(name.to_string());
                }
            }
        }
    }
}

/// The ceilings every other row is a fraction of: a large copy and a large bf16 GEMM.
fn ceiling_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let e = BF16_BYTES;
    let n = s.copy_bytes / 2;
    let src = be.upload(&rnd(n, 1.0))?;
    let mut dst = be.alloc(n)?;
    let t = time(be, iters, || be.copy(&mut dst, &src))?;
    rows.push(BenchRow::new(
        "ceiling: copy",
        format!("{} MiB", s.copy_bytes >> 20),
        Unit::Bytes,
        2.0 * n as f64 * e,
        t,
    ));
    drop((src, dst));
    let g = s.gemm;
    let (a, w) = (be.upload(&rnd(g * g, 0.01))?, be.upload(&rnd(g * g, 0.01))?);
    let mut out = be.alloc(g * g)?;
    let t = time(be, iters, || be.matmul(&mut out, &a, &w, None, g, g, g))?;
    rows.push(BenchRow::new(
        "ceiling: GEMM",
        format!("{g}³"),
        Unit::Flops,
        2.0 * (g as f64).powi(3),
        t,
    ));
    drop((a, w, out));
    Ok(rows)
}

/// The decoder's linear layers at `tokens` rows.
fn linear_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let (m, h, i) = (s.tokens, s.hidden, s.inter);
    let x = be.upload(&rnd(m * i.max(h), 0.01))?;
    for (name, k, nn) in [
        ("matmul qkv", h, (s.heads + 2 * s.kv_heads) * s.head_dim),
        ("matmul gate/up", h, i),
        ("matmul down", i, h),
    ] {
        let wt = be.upload(&rnd(nn * k, 0.01))?;
        let mut o = be.alloc(m * nn)?;
        let t = time(be, iters, || be.matmul(&mut o, &x, &wt, None, m, k, nn))?;
        rows.push(BenchRow::new(
            name,
            format!("[{m}, {k}] x [{nn}, {k}]ᵀ"),
            Unit::Flops,
            2.0 * (m * k * nn) as f64,
            t,
        ));
    }
    drop(x);
    Ok(rows)
}

/// Training attention, forward and backward, at each sequence length.
fn attention_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    train_attention_rows(be, s, iters, None)
}

/// Causal training attention at each sequence length, with the backend's default kernels, or
/// with its other kernel set `alt` (restored after): rows "attention fwd (causal[, alt])" and
/// "attention bwd (...)". FLOPs: 2·2·t²·d per head for the forward (half the square is masked),
/// and 2.5 times that for the backward (dS, dP, dQ, dK, dV), as FlashAttention counts.
fn train_attention_rows<B: Backend>(
    be: &B,
    s: &BenchShapes,
    iters: usize,
    alt: Option<&str>,
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let suffix = alt.map_or(String::new(), |a| format!(", {a}"));
    for &t_len in s.seqs {
        let sh = AttnShape {
            batch: 1,
            tq: t_len,
            tk: t_len,
            cap: t_len,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
        };
        let nq = t_len * s.heads * s.head_dim;
        let nkv = t_len * s.kv_heads * s.head_dim;
        let (q, k, vv) = (
            be.upload(&rnd(nq, 1.0))?,
            be.upload(&rnd(nkv, 1.0))?,
            be.upload(&rnd(nkv, 1.0))?,
        );
        let (mut o, mut lse) = (be.alloc(nq)?, be.alloc_f32(t_len * s.heads)?);
        let (mut dq, mut dk, mut dv) = (be.alloc(nq)?, be.alloc(nkv)?, be.alloc(nkv)?);
        let flops = 2.0 * (t_len as f64).powi(2) * s.head_dim as f64 * s.heads as f64;
        let shape = format!(
            "t {t_len}, heads {}/{}, d {}",
            s.heads, s.kv_heads, s.head_dim
        );
        let setting = be.attention_variant();
        if let Some(a) = alt {
            be.set_attention_variant(a)?;
        }
        // Each direction's scratch, grown afresh: the memory it takes beyond its inputs and
        // outputs (the unfused kernels' is quadratic in t).
        let ((), mf) = peak_over(be, || {
            be.attention(&mut o, &mut lse, &q, &k, &vv, sh);
            Ok(())
        })?;
        let ((), mb) = peak_over(be, || {
            be.attention_bwd(&mut dq, &mut dk, &mut dv, &o, &o, &lse, &q, &k, &vv, sh);
            Ok(())
        })?;
        let tf = time(be, iters, || {
            be.attention(&mut o, &mut lse, &q, &k, &vv, sh)
        });
        let tb = time(be, iters, || {
            be.attention_bwd(&mut dq, &mut dk, &mut dv, &o, &o, &lse, &q, &k, &vv, sh)
        });
        if let (Some(_), Some(was)) = (alt, setting) {
            be.set_attention_variant(was)?;
        }
        for (dir, work, t, m) in [("fwd", flops, tf, mf), ("bwd", 2.5 * flops, tb, mb)] {
            let op = format!("attention {dir} (causal{suffix})");
            rows.push(BenchRow {
                extra_bytes: m,
                ..BenchRow::new(&op, shape.clone(), Unit::Flops, work, t?)
            });
        }
    }
    Ok(rows)
}

/// Runs `f` and returns its value with the most memory it held beyond what was live before it
/// (None where the backend does not track memory). The scratch the backend keeps between ops
/// is freed first, so that what `f` needs of it is counted too.
fn peak_over<B: Backend, T>(be: &B, f: impl FnOnce() -> Result<T>) -> Result<(T, Option<usize>)> {
    be.release_scratch();
    be.sync()?;
    be.reset_peak_memory();
    let base = be.memory().map(|m| m.0);
    let v = f()?;
    be.sync()?;
    Ok((v, base.and_then(|b| be.memory().map(|m| m.1 - b))))
}

/// Decode attention over a long cache.
fn decode_attention_rows<B: Backend>(
    be: &B,
    s: &BenchShapes,
    iters: usize,
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let e = BF16_BYTES;
    // Decode: 64 sequences, one new query each over 2k cached positions; bytes of K and V.
    let (batch, ctx) = (64, s.seqs[0].max(2) * 2);
    let sh = AttnShape {
        batch,
        tq: 1,
        tk: ctx,
        cap: ctx,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
    };
    let nkv = batch * ctx * s.kv_heads * s.head_dim;
    let (q, k, vv) = (
        be.upload(&rnd(batch * s.heads * s.head_dim, 1.0))?,
        be.upload(&rnd(nkv, 1.0))?,
        be.upload(&rnd(nkv, 1.0))?,
    );
    let (mut o, mut lse) = (
        be.alloc(batch * s.heads * s.head_dim)?,
        be.alloc_f32(batch * s.heads)?,
    );
    let t = time(be, iters, || {
        be.attention(&mut o, &mut lse, &q, &k, &vv, sh)
    })?;
    rows.push(BenchRow::new(
        "attention decode",
        format!("{batch} seqs × {ctx} cached"),
        Unit::Bytes,
        2.0 * nkv as f64 * e,
        t,
    ));
    drop((q, k, vv, o, lse));
    Ok(rows)
}

/// The fused softmax-entropy forward and backward.
fn softmax_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let e = BF16_BYTES;
    let v = s.vocab;
    // Softmax statistics over the vocabulary, left on the device as the chunked lm_head uses
    // them: one read of the logits forward; one read and one write backward, from the saved
    // statistics.
    let rows_v = (s.tokens / 4).max(1);
    let logits = be.upload(&rnd(rows_v * v, 4.0))?;
    let targets: Vec<u32> = (0..rows_v as u32).collect();
    let mut stats = be.alloc_f32(3 * rows_v)?;
    let t = time(be, iters, || {
        let _ = be.softmax_stats_into(&mut stats, &logits, rows_v, v, &targets, 0.7);
    })?;
    rows.push(BenchRow::new(
        "softmax-entropy fwd",
        format!("[{rows_v}, {v}]"),
        Unit::Bytes,
        (rows_v * v) as f64 * e,
        t,
    ));
    let mut dl = be.alloc(rows_v * v)?;
    let (ca, cb) = (vec![1.0; rows_v], vec![1.0; rows_v]);
    let t = time(be, iters, || {
        be.softmax_stats_bwd_saved(
            &mut dl,
            &logits,
            &stats,
            rows_v,
            v,
            &StatsLoss {
                targets: &targets,
                temperature: 0.7,
                a: &ca,
                b: &cb,
            },
        )
    })?;
    rows.push(BenchRow::new(
        "softmax-entropy bwd",
        format!("[{rows_v}, {v}]"),
        Unit::Bytes,
        2.0 * (rows_v * v) as f64 * e,
        t,
    ));
    drop((logits, dl, stats));
    Ok(rows)
}

/// AdamW over one large tensor.
fn adamw_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let e = BF16_BYTES;
    // AdamW over one large tensor: bf16 param read+write, f32 grad read, f32 m and v read+write.
    let np = s.copy_bytes / 8;
    let mut p = be.upload(&rnd(np, 0.05))?;
    let gr = be.upload_f32(&rnd(np, 1e-3))?;
    let (mut mm, mut vm) = (be.alloc_f32(np)?, be.alloc_f32(np)?);
    let mut step = 0;
    let t = time(be, iters, || {
        step += 1;
        let hp = AdamWStep {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step,
            grad_scale: 1.0,
        };
        be.adamw(&mut p, &gr, &mut mm, &mut vm, &hp)
    })?;
    rows.push(BenchRow::new(
        "adamw (per tensor)",
        format!("{np} params"),
        Unit::Bytes,
        np as f64 * (2.0 * e + 4.0 + 16.0),
        t,
    ));
    drop((p, gr, mm, vm));
    Ok(rows)
}

/// The backend's other attention kernel sets (mma.sync and unfused on an H100, where wgmma is
/// the default), timed at the training shapes of `run_all`.
pub fn alternate_attention_rows<B: Backend>(
    be: &B,
    s: &BenchShapes,
    iters: usize,
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for alt in be.attention_variants(s.head_dim).iter().skip(1) {
        rows.extend(train_attention_rows(be, s, iters, Some(alt))?);
    }
    Ok(rows)
}

/// The model of `model_rows` and `decode_rows`: MODEL_LAYERS layers of the bench's shapes and
/// a vocabulary of MODEL_VOCAB, with random weights (built once: drawing 0.5 billion of them
/// takes seconds).
pub fn bench_model<B: Backend>(be: &B, s: &BenchShapes) -> Result<crate::model::Qwen2<B>> {
    let cfg = bench_model_config(s);
    let tensors = crate::model::random_tensors(&cfg, 7, 0.02);
    crate::model::Qwen2::from_host(be, cfg, &tensors)
}

/// The configuration of `bench_model`.
pub fn bench_model_config(s: &BenchShapes) -> crate::config::ModelConfig {
    crate::config::ModelConfig {
        hidden_size: s.hidden,
        intermediate_size: s.inter,
        num_layers: MODEL_LAYERS,
        num_heads: s.heads,
        num_kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        vocab_size: MODEL_VOCAB,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        tie_word_embeddings: false,
        max_position_embeddings: s.tokens.max(s.decode_context.1 + 1),
        dtype: crate::config::DType::BF16,
    }
}

/// What the memory plan counts for a `decode_rows` step of `rows` sequences, in bf16: their
/// KV cache (`memory_plan::cache_bytes`) and one decode step's activations and logits.
pub fn decode_plan_bytes(s: &BenchShapes, rows: usize) -> u64 {
    use crate::memory_plan::{activations_bytes, cache_bytes};
    let c = bench_model_config(s);
    cache_bytes(&c, rows, s.decode_context.1 + 1, 2)
        + activations_bytes(&c, rows, 1, false, false, 2)
}

/// The model's forward and backward over one training sequence of `s.tokens` tokens, as the
/// drivers run it (chunked lm_head statistics, then the backward), through MODEL_LAYERS layers
/// of the bench's shapes and a vocabulary of MODEL_VOCAB, so that the layers' work dominates:
/// with every layer's activations kept, and with each layer recomputed in the backward. Work is
/// the useful FLOPs of both (the GEMMs, and causal attention counted as the attention rows
/// count it), so the recompute row's lower rate is its cost; the extra memory column is what
/// each needed beyond the weights, where the backend tracks it.
pub fn model_rows<B: Backend>(
    be: &B,
    model: &mut crate::model::Qwen2<B>,
    s: &BenchShapes,
    iters: usize,
) -> Result<Vec<BenchRow>> {
    let t = s.tokens;
    let cfg = model.cfg.clone();
    let ids: Vec<u32> = (0..t).map(|i| (i * 7919 % MODEL_VOCAB) as u32).collect();
    let targets = crate::generate::next_token_targets(&ids, 1, t);
    let (h, qd, kvd, inter) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    let per_token =
        2 * (h * qd + 2 * h * kvd + qd * h + 3 * h * inter) * MODEL_LAYERS + 2 * h * MODEL_VOCAB;
    let attention = 2.0 * (t * t * s.head_dim * s.heads) as f64 * MODEL_LAYERS as f64;
    let flops = 3.0 * (per_token * t) as f64 + 3.5 * attention;
    let shape = format!(
        "t {t}, {MODEL_LAYERS} layers of h {h}, i {inter}, heads {}/{}, V {MODEL_VOCAB}",
        s.heads, s.kv_heads
    );
    let coef = |_: usize, _: &crate::backend::RowStats| (0.1, -1.0);
    let mut rows = Vec::new();
    for recompute in [false, true] {
        model.recompute = recompute;
        let model = &*model;
        let (seconds, held) = peak_over(be, || {
            let mut acts = model.alloc_activations(be, 1, t, true)?;
            let mut grads = model.zeros_like_params(be)?;
            let mut failed = None;
            let seconds = time(be, iters.min(20), || {
                let step = model.forward_hidden(be, &ids, &mut acts).and_then(|_| {
                    model.lm_head_stats_grad(
                        be,
                        &mut acts,
                        &targets,
                        1.0,
                        crate::lm_head::Coef::PerRow(&coef),
                        &mut grads,
                    )
                });
                if let Err(e) = step {
                    failed.get_or_insert(e);
                }
            })?;
            failed.map_or(Ok(seconds), Err)
        })?;
        let op = if recompute {
            "model fwd+bwd, recompute"
        } else {
            "model fwd+bwd"
        };
        rows.push(BenchRow {
            extra_bytes: held,
            ..BenchRow::new(op, shape.clone(), Unit::Flops, flops, seconds)
        });
    }
    model.recompute = false;
    Ok(rows)
}

/// Layers and vocabulary of `model_rows`: two 7B layers are 0.9 GB of bf16 weights and 1.9 GB
/// of f32 gradients; the vocabulary is small so that the lm_head (timed on its own above) stays
/// a few percent of the work.
const MODEL_LAYERS: usize = 2;
const MODEL_VOCAB: usize = 4096;

/// One step of batched sampling as `generate::generate_batch` runs it: the model's forward of
/// one new token for each of `rows` sequences over a ragged KV cache, then the draw of the next
/// tokens (which come back to the host). Each row of `s.decode_rows` decodes that many
/// sequences, their contexts spread evenly over `s.decode_context`, each step replayed at the
/// same lengths. Bytes: what the step has to read at least, the weights once (the embedding
/// table's B rows only) and each sequence's keys and values, so a step that streams them at
/// the copy ceiling is at 100%. On a GPU the narrow batches are bound by reading the weights
/// and the wide ones by the GEMMs; `format_decode` gives tokens a second against the narrowest.
pub fn decode_rows<B: Backend>(
    be: &B,
    model: &crate::model::Qwen2<B>,
    s: &BenchShapes,
    iters: usize,
) -> Result<Vec<BenchRow>> {
    use crate::sampling::SamplingParams;
    let (lo, hi) = s.decode_context;
    let cfg = &model.cfg;
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    // One prompt of the longest context, prefilled once: every sequence's cache is a prefix.
    let prompt: Vec<u32> = (0..hi).map(|i| (i * 7919 % v) as u32).collect();
    let mut src = model.alloc_cache(be, 1, hi)?;
    let mut prefill = model.alloc_activations(be, 1, hi, false)?;
    model.forward_cached(be, &prompt, &mut prefill, &mut src)?;
    drop(prefill);
    let weights = (crate::memory_plan::param_count(cfg) - (v * h) as u64) as f64;
    let sampling = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let mut out = Vec::new();
    // A width that cannot run (the widest may not fit beside the rest on a smaller GPU) is
    // reported; the narrower ones' rows stay.
    let free = || be.sync().ok().and(be.device_memory()).map(|m| m.0);
    let width = |rows: usize| -> Result<BenchRow> {
        // Device memory the step holds, as the driver sees it: its cache and activations, and
        // what the plan does not count (decode partials, sampler and cuBLAS scratch) where
        // earlier sections did not already leave it allocated.
        let before = free();
        let lens: Vec<usize> = (0..rows)
            .map(|b| lo + b * (hi - lo) / (rows - 1).max(1))
            .collect();
        let mut cache = model.alloc_cache(be, rows, hi + 1)?;
        for (b, &l) in lens.iter().enumerate() {
            cache.copy_prefix(be, b, &src, 0, l)?;
        }
        let mut acts = model.alloc_activations(be, rows, 1, false)?;
        let ids: Vec<u32> = (0..rows).map(|b| (b * 104729 % v) as u32).collect();
        let mut step = 0;
        let mut err = None;
        let t = time(be, iters, || {
            step += 1;
            for (b, &l) in lens.iter().enumerate() {
                cache.truncate(b, l);
            }
            let keys = draw_keys(5, rows, step);
            let r = model
                .forward_cached(be, &ids, &mut acts, &mut cache)
                .and_then(|_| be.sample(&acts.logits, rows, v, &sampling, &keys));
            if let Err(e) = r {
                err.get_or_insert(e);
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        let held = before.zip(free()).map(|(a, b)| a.saturating_sub(b));
        let context: usize = lens.iter().map(|l| l + 1).sum();
        let kv = (context * 2 * cfg.kv_dim() * MODEL_LAYERS) as f64;
        Ok(BenchRow {
            extra_bytes: held,
            ..BenchRow::new(
                "decode step",
                format!("{rows} rows, context {lo}..{hi}, {MODEL_LAYERS} layers of h {h}, V {v}"),
                Unit::Bytes,
                2.0 * (weights + (rows * h) as f64 + kv),
                t,
            )
        })
    };
    for &rows in s.decode_rows {
        match width(rows) {
            Ok(r) => out.push(r),
            Err(e) => {
                let _ = be.sync();
                eprintln!("bench: decode step at {rows} rows left out: {e:#}");
            }
        }
    }
    Ok(out)
}

/// The draw keys of `rows` sequences at one step of one seed.
fn draw_keys(seed: u64, rows: usize, step: u64) -> Vec<crate::sampling::DrawKey> {
    (0..rows as u64)
        .map(|sequence| crate::sampling::DrawKey {
            seed,
            sequence,
            step,
        })
        .collect()
}

/// Tokens a second of each `decode step` row, and how many times the narrowest batch's; where
/// the device's memory was measured, what the step held against what the memory plan counts.
pub fn format_decode(rows: &[BenchRow], shapes: &BenchShapes) -> String {
    let steps: Vec<(usize, f64, Option<usize>)> = rows
        .iter()
        .filter(|r| r.op == "decode step")
        .filter_map(|r| {
            let n = r.shape.split(' ').next()?.parse::<usize>().ok()?;
            Some((n, n as f64 / r.seconds, r.extra_bytes))
        })
        .collect();
    let Some(&(narrow, base, _)) = steps.first() else {
        return String::new();
    };
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let mut s = String::from("batched decoding (the bench's layers, one step):\n");
    for &(n, rate, held) in &steps {
        s += &format!(
            "  {n:>4} rows: {rate:>9.0} tokens/s, {:.1}x the {narrow}-row step's",
            rate / base
        );
        if let Some(held) = held {
            let plan = decode_plan_bytes(shapes, n) as f64;
            s += &format!(
                "; held {:.0} MiB, the memory plan counts {:.0} MiB ({:.2}x)",
                mib(held as f64),
                mib(plan),
                held as f64 / plan
            );
        }
        s += "\n";
    }
    s
}

/// `sets` lists of m token ids below v, each gathering other rows of the table.
pub fn gather_ids(sets: usize, m: usize, v: usize) -> Vec<Vec<u32>> {
    (0..sets as u32)
        .map(|j| {
            (0..m as u32)
                .map(|t| (t * 7919 + j * 104729) % v as u32)
                .collect()
        })
        .collect()
}

/// How many copies of a [tokens, hidden] operand the memory-bound rows cycle through. One
/// [4096, 3584] bf16 tensor is 29 MB and the H100's L2 holds 50 MB, so repeating one call would
/// time the cache: each op cycles through that many copies, 512 MB or more in all.
fn hidden_sets(m: usize, h: usize) -> usize {
    ((512usize << 20) / (m * h * 2 * 4)).clamp(1, 16)
}

/// The memory-bound ops over [tokens, hidden] and [tokens, intermediate]: residual add, RMSNorm
/// and its backward, the embedding gather, RoPE on q, SwiGLU and its backward.
fn memory_bound_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let e = 2.0;
    let (m, h, i, v) = (s.tokens, s.hidden, s.inter, s.vocab);
    let sets = hidden_sets(m, h);
    let mk = |scale: f32| -> Result<Vec<B::Buf>> {
        (0..sets).map(|_| be.upload(&rnd(m * h, scale))).collect()
    };
    let xa = mk(0.5)?;
    let mut xb = mk(0.25)?;
    let mut out = mk(0.0)?;
    let mut dx = mk(0.0)?;
    let wn = be.upload(&rnd(h, 1.0))?;
    let mut rstd = (0..sets)
        .map(|_| be.alloc_f32(m))
        .collect::<Result<Vec<_>>>()?;
    let mut k = 0;
    let mut next = || {
        k = (k + 1) % sets;
        k
    };
    let t = time(be, iters, || {
        let j = next();
        be.add(&mut xb[j], &xa[j])
    })?;
    rows.push(BenchRow::new(
        "residual add",
        format!("[{m}, {h}]"),
        Unit::Bytes,
        3.0 * (m * h) as f64 * e,
        t,
    ));
    let t = time(be, iters, || {
        let j = next();
        be.rmsnorm(&mut out[j], &mut rstd[j], &xa[j], &wn, m, h, 1e-6)
    })?;
    rows.push(BenchRow::new(
        "rmsnorm",
        format!("[{m}, {h}]"),
        Unit::Bytes,
        2.0 * (m * h) as f64 * e,
        t,
    ));
    let mut dw = be.alloc_f32(h)?;
    let t = time(be, iters, || {
        let j = next();
        be.rmsnorm_bwd(&mut dx[j], &mut dw, &xb[j], &xa[j], &wn, &rstd[j], m, h)
    })?;
    rows.push(BenchRow::new(
        "rmsnorm_bwd",
        format!("[{m}, {h}]"),
        Unit::Bytes,
        4.0 * (m * h) as f64 * e,
        t,
    ));
    let ids = gather_ids(sets, m, v);
    let table = be.upload(&rnd(v * h, 0.05))?;
    let t = time(be, iters, || {
        let j = next();
        be.embedding(&mut out[j], &table, &ids[j], h)
    })?;
    rows.push(BenchRow::new(
        "embedding",
        format!("{m} ids of [{v}, {h}]"),
        Unit::Bytes,
        2.0 * (m * h) as f64 * e,
        t,
    ));
    drop((xb, out, dx, dw, table, rstd));

    // RoPE in place on q: the same cycling, over the [tokens, heads, head_dim] copies.
    let nq = m * s.heads * s.head_dim;
    let qsets = ((512usize << 20) / (nq * 2 * 2)).clamp(1, 16);
    let mut qs = (0..qsets)
        .map(|_| be.upload(&rnd(nq, 0.5)))
        .collect::<Result<Vec<_>>>()?;
    let mut kq = 0;
    let t = time(be, iters, || {
        kq = (kq + 1) % qsets;
        be.rope(
            &mut qs[kq],
            1,
            m,
            s.heads,
            s.head_dim,
            Starts::Same(0),
            1e6,
            false,
        )
    })?;
    rows.push(BenchRow::new(
        "rope (q)",
        format!("[{m}, {}, {}]", s.heads, s.head_dim),
        Unit::Bytes,
        2.0 * nq as f64 * e,
        t,
    ));
    drop((qs, xa));

    let (gate, up) = (be.upload(&rnd(m * i, 0.5))?, be.upload(&rnd(m * i, 0.5))?);
    let mut hh = be.alloc(m * i)?;
    let t = time(be, iters, || be.swiglu(&mut hh, &gate, &up))?;
    rows.push(BenchRow::new(
        "swiglu",
        format!("[{m}, {i}]"),
        Unit::Bytes,
        3.0 * (m * i) as f64 * e,
        t,
    ));
    let (mut dg, mut du) = (be.alloc(m * i)?, be.alloc(m * i)?);
    let t = time(be, iters, || {
        be.swiglu_bwd(&mut dg, &mut du, &hh, &gate, &up)
    })?;
    rows.push(BenchRow::new(
        "swiglu_bwd",
        format!("[{m}, {i}]"),
        Unit::Bytes,
        5.0 * (m * i) as f64 * e,
        t,
    ));
    drop((gate, up, hh, dg, du));
    Ok(rows)
}

/// The rows of `memory_bound_rows` whose kernels allow programmatic dependent launch, again with
/// it the other way (`CudaBackend::with_other_pdl`), as "<op> (no pdl)" (or "(pdl)" under
/// `EMPO_PDL=0`): one run shows what it pays. Empty before sm_90.
pub fn pdl_rows_cuda(
    be: &crate::backend::cuda::CudaBackend,
    s: &BenchShapes,
    iters: usize,
) -> Result<Vec<BenchRow>> {
    let Some((rows, label)) = be.with_other_pdl(|| memory_bound_rows(be, s, iters)) else {
        return Ok(Vec::new());
    };
    Ok(rows?
        .into_iter()
        .filter(|r| r.op != "embedding")
        .map(|mut r| {
            r.op += label;
            r
        })
        .collect())
}

/// The embedding gather with its ids already on the device, as PyTorch's bench has them: the
/// kernel alone, where the "embedding" row also pays the ids' upload, a copy-engine transfer
/// the stream waits for between kernels.
pub fn embedding_device_ids_rows_cuda(
    be: &crate::backend::cuda::CudaBackend,
    s: &BenchShapes,
    iters: usize,
) -> Result<Vec<BenchRow>> {
    let (m, h, v) = (s.tokens, s.hidden, s.vocab);
    let sets = hidden_sets(m, h);
    let ids = gather_ids(sets, m, v)
        .iter()
        .map(|x| be.upload_ids(x))
        .collect::<Result<Vec<_>>>()?;
    let table = be.upload(&rnd(v * h, 0.05))?;
    let mut out = (0..sets)
        .map(|_| be.alloc(m * h))
        .collect::<Result<Vec<_>>>()?;
    let mut k = 0;
    let t = time(be, iters, || {
        k = (k + 1) % sets;
        be.embedding_at(&mut out[k], &table, be.ids_ptr(&ids[k]), m, h)
    })?;
    Ok(vec![BenchRow::new(
        "embedding (ids on the device)",
        format!("{m} ids of [{v}, {h}]"),
        Unit::Bytes,
        2.0 * (m * h) as f64 * 2.0,
        t,
    )])
}

/// The parameter tensors of one decoder layer (shapes as in a Qwen2 checkpoint).
pub fn layer_tensors(s: &BenchShapes) -> Vec<usize> {
    let (h, i, kv) = (s.hidden, s.inter, s.kv_heads * s.head_dim);
    vec![
        h * h,
        h,
        kv * h,
        kv,
        kv * h,
        kv,
        h * h,
        i * h,
        i * h,
        h * i,
        h,
        h,
    ]
}

/// One whole optimizer step over the tensors of one decoder layer: the global gradient norm,
/// clipping folded into the update, and the update, as `optim.rs` calls it. Bytes: the norm
/// reads the f32 gradients once; the update reads them again, reads and writes the bf16
/// parameters and (AdamW) both moments.
pub fn optimizer_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    use crate::backend::OptimizerStep;
    let sizes = layer_tensors(s);
    let total: usize = sizes.iter().sum();
    let mut params = sizes
        .iter()
        .map(|&n| be.upload(&rnd(n, 0.05)))
        .collect::<Result<Vec<_>>>()?;
    let grads = sizes
        .iter()
        .map(|&n| be.upload_f32(&rnd(n, 1e-3)))
        .collect::<Result<Vec<_>>>()?;
    let adamw = AdamWStep {
        lr: 1e-6,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        grad_scale: 1.0,
    };
    let shape = format!("1 layer: {} tensors, {total} params", sizes.len());
    let mut rows = Vec::new();
    let gref: Vec<&B::Buf> = grads.iter().collect();
    for (name, moment_bytes) in [
        ("optimizer step: sgd", 0.0),
        ("optimizer step: adamw, f32 moments", 4.0),
        ("optimizer step: adamw, bf16 moments", 2.0),
    ] {
        let mut moments = match moment_bytes {
            0.0 => (Vec::new(), Vec::new()),
            mb => {
                let mk = |n| {
                    if mb == 4.0 {
                        be.alloc_f32(n)
                    } else {
                        be.alloc(n)
                    }
                };
                (
                    sizes.iter().map(|&n| mk(n)).collect::<Result<Vec<_>>>()?,
                    sizes.iter().map(|&n| mk(n)).collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let h = OptimizerStep {
            adamw: (moment_bytes > 0.0).then_some(adamw),
            lr: 1e-6,
            max_norm: 1.0,
            sumsq: None,
            first_tensor: 0,
        };
        let mut err = None;
        let t = time(be, iters, || {
            let mut pref: Vec<&mut B::Buf> = params.iter_mut().collect();
            let r = if moment_bytes > 0.0 {
                let mut m: Vec<&mut B::Buf> = moments.0.iter_mut().collect();
                let mut v: Vec<&mut B::Buf> = moments.1.iter_mut().collect();
                be.optimizer_step(&mut pref, &gref, Some((&mut m, &mut v)), &h)
            } else {
                be.optimizer_step(&mut pref, &gref, None, &h)
            };
            if let Err(e) = r {
                err = Some(e);
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        rows.push(BenchRow {
            op: name.into(),
            shape: shape.clone(),
            unit: Unit::Bytes,
            work: total as f64 * (4.0 + 4.0 + 4.0 + 4.0 * moment_bytes),
            seconds: t,
            extra_bytes: None,
            copy_peer: None,
        });
    }
    rows.extend(offload_rows(be, &mut params, &gref, &sizes, adamw, iters)?);
    Ok(rows)
}

/// AdamW with its f32 moments in host memory (`--offload-optimizer`) over the same layer: the
/// moments cross the bus up and back each step, so its bytes are those 16 a parameter. Beside
/// it, the crossings alone, which the step can at best match: "of same copy" on the step's row
/// is the fraction of its time the bus needs anyway.
fn offload_rows<B: Backend>(
    be: &B,
    params: &mut [B::Buf],
    grads: &[&B::Buf],
    sizes: &[usize],
    adamw: AdamWStep,
    iters: usize,
) -> Result<Vec<BenchRow>> {
    use crate::backend::OptimizerStep;
    use crate::optim::{offloaded_step, update_groups};
    let total: usize = sizes.iter().sum();
    let bus_bytes = 16.0 * total as f64;
    let host = || -> Result<Vec<B::Host>> { sizes.iter().map(|&n| be.alloc_host(n)).collect() };
    let (mut m, mut v) = (host()?, host()?);
    let mut staging = sizes
        .iter()
        .map(|&n| be.alloc_f32(n))
        .collect::<Result<Vec<_>>>()?;
    let bus = time(be, iters, || {
        for hs in [&mut m, &mut v] {
            for (h, d) in hs.iter_mut().zip(staging.iter_mut()) {
                be.copy_to_device(d, h);
                be.copy_to_host(h, d);
            }
        }
    })?;
    drop(staging);
    let groups = update_groups(sizes);
    let h = OptimizerStep {
        adamw: Some(adamw),
        lr: adamw.lr,
        max_norm: 1.0,
        sumsq: None,
        first_tensor: 0,
    };
    let mut err = None;
    let step = time(be, iters, || {
        let mut pref: Vec<&mut B::Buf> = params.iter_mut().collect();
        if let Err(e) = offloaded_step(be, &mut pref, grads, (&mut m, &mut v), &groups, &h) {
            err = Some(e);
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    let shape = format!("1 layer: {} tensors, {total} params", sizes.len());
    Ok(vec![
        BenchRow::new(
            "host<->device copy: f32 moments up and back",
            shape.clone(),
            Unit::Bytes,
            bus_bytes,
            bus,
        ),
        BenchRow {
            copy_peer: Some(bus),
            ..BenchRow::new(
                "optimizer step: adamw, offloaded f32 moments",
                shape,
                Unit::Bytes,
                bus_bytes,
                step,
            )
        },
    ])
}

/// Sampling the next token of 64 sequences over the full vocabulary, through the backend's
/// `sample` as rollouts call it (the sequence ids go up, the tokens come back). Bytes: one read
/// of the bf16 logits, although truncation makes up to four passes over each row.
pub fn sampling_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    use crate::sampling::SamplingParams;
    let (rows_n, v) = (64, s.vocab);
    let logits = be.upload(&rnd(rows_n * v, 6.0))?;
    let mut out = Vec::new();
    for (name, sp) in [
        (
            "sample (T 0.7)",
            SamplingParams {
                temperature: 0.7,
                top_k: 0,
                top_p: 1.0,
            },
        ),
        (
            "sample (T 1, top-p 0.9)",
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.9,
            },
        ),
        (
            "sample (T 1, top-k 50)",
            SamplingParams {
                temperature: 1.0,
                top_k: 50,
                top_p: 1.0,
            },
        ),
    ] {
        let mut step = 0;
        let mut err = None;
        let t = time(be, iters, || {
            step += 1;
            let keys = draw_keys(7, rows_n, step);
            if let Err(e) = be.sample(&logits, rows_n, v, &sp, &keys) {
                err = Some(e);
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        out.push(BenchRow {
            op: name.into(),
            shape: format!("[{rows_n}, {v}]"),
            unit: Unit::Bytes,
            work: (rows_n * v) as f64 * 2.0,
            seconds: t,
            extra_bytes: None,
            copy_peer: None,
        });
    }
    Ok(out)
}

/// The GPU policy loss (cuda/policy_loss.cu) for 256 sequences of 1024 tokens, as one call of
/// `cuda_rl::policy_loss` including its host transfers. Bytes: logπ, logπ_old and the
/// advantages read, d(loss)/dlogπ written, f32 each.
pub fn policy_loss_rows_cuda(
    be: &crate::backend::cuda::CudaBackend,
    iters: usize,
) -> Result<Vec<BenchRow>> {
    use crate::rl::{ClipConfig, LossAgg, PolicyLoss, SeqSpan};
    let (seqs, len) = (256usize, 1024usize);
    let n = seqs * len;
    let logp: Vec<f32> = rnd(n, 1.0).iter().map(|x| x - 2.0).collect();
    let old: Vec<f32> = logp.iter().zip(rnd(n, 0.3)).map(|(a, d)| a + d).collect();
    let adv = rnd(seqs, 1.0);
    let spans: Vec<SeqSpan> = (0..seqs)
        .map(|i| SeqSpan {
            start: i * len,
            len,
            advantage: adv[i],
        })
        .collect();
    let mut out = Vec::new();
    for kind in [PolicyLoss::Grpo, PolicyLoss::Gspo] {
        let c = ClipConfig {
            kind,
            eps_low: 0.2,
            eps_high: 0.28,
            dual_clip: Some(3.0),
            agg: LossAgg::TokenMean,
        };
        let mut err = None;
        let t = time(be, iters, || {
            if let Err(e) =
                crate::backend::cuda_rl::policy_loss(be, &logp, &old, &spans, &c, n, seqs)
            {
                err = Some(e);
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        out.push(BenchRow {
            op: format!("policy loss {kind:?} (with transfers)"),
            shape: format!("{seqs} seqs × {len} tokens"),
            unit: Unit::Bytes,
            work: n as f64 * 16.0,
            seconds: t,
            extra_bytes: None,
            copy_peer: None,
        });
    }
    Ok(out)
}

/// lm_head + entropy/log-prob, forward and backward. Over 4·tokens rows: the full [N, V]
/// logits against the chunked paths, in two passes (statistics, then a backward that recomputes
/// each chunk's logits) and in one (per-row coefficients). Over `tokens` rows, one chunk: the
/// full logits against one pass. Work is counted as the three useful GEMMs throughout (the
/// two-pass recompute is a fourth), so the rates compare times.
pub fn lm_head_rows<B: Backend>(be: &B, s: &BenchShapes, iters: usize) -> Result<Vec<BenchRow>> {
    let (n, h, v) = (s.tokens * 4, s.hidden, s.vocab);
    let x = be.upload(&rnd(n * h, 1.0))?;
    let w = be.upload(&rnd(v * h, 0.05))?;
    let mut dx = be.alloc(n * h)?;
    let mut dw = be.alloc_f32(v * h)?;
    let targets: Vec<u32> = (0..n as u32).map(|i| i % v as u32).collect();
    let (a, b) = (vec![1.0f32; n], vec![1.0f32; n]);
    let shape = |n: usize| format!("[{n}, {h}] x [{v}, {h}]ᵀ");
    let row = |op: &str, n: usize, seconds: f64, extra_bytes: Option<usize>| BenchRow {
        extra_bytes,
        ..BenchRow::new(
            &format!("lm_head+entropy f+b, {op}"),
            shape(n),
            Unit::Flops,
            3.0 * 2.0 * (n * h * v) as f64,
            seconds,
        )
    };
    let measured = |f: &mut dyn FnMut() -> Result<f64>| peak_over(be, f);
    let full = |n: usize, dx: &mut B::Buf, dw: &mut B::Buf| -> Result<f64> {
        let mut logits = be.alloc(n * v)?;
        let mut dlogits = be.alloc(n * v)?;
        let mut stats = be.alloc_f32(3 * n)?;
        let loss = StatsLoss {
            targets: &targets[..n],
            temperature: 1.0,
            a: &a[..n],
            b: &b[..n],
        };
        time(be, iters, || {
            be.matmul(&mut logits, &x, &w, None, n, h, v);
            let _ = be.softmax_stats_into(&mut stats, &logits, n, v, &targets[..n], 1.0);
            be.softmax_stats_bwd_saved(&mut dlogits, &logits, &stats, n, v, &loss);
            be.zero(dx);
            be.matmul_bwd(Some(dx), Some(dw), None, &dlogits, &x, &w, n, h, v);
        })
    };
    let mut rows = Vec::new();

    let (t, extra) = measured(&mut || full(n, &mut dx, &mut dw))?;
    rows.push(row("full logits", n, t, extra));
    let (t, extra) = measured(&mut || {
        let mut chunks = crate::lm_head::Chunks::new(be, n, h, v)?;
        time(be, iters, || {
            let stats = crate::lm_head::stats(be, &mut chunks, &x, &w, (n, h, v), &targets, 1.0)
                .unwrap_or_default();
            let _ = crate::lm_head::stats_bwd(
                be,
                &mut chunks,
                &mut dx,
                &mut dw,
                &x,
                &w,
                (n, h, v),
                &stats,
                &targets,
                1.0,
                &a,
                &b,
            );
        })
    })?;
    rows.push(row("chunked, two passes", n, t, extra));
    let one_pass = |n: usize, dx: &mut B::Buf, dw: &mut B::Buf| -> Result<f64> {
        let mut chunks = crate::lm_head::Chunks::new(be, n, h, v)?;
        let coef = |r: usize, _: &crate::backend::RowStats| (a[r], b[r]);
        time(be, iters, || {
            let _ = crate::lm_head::stats_and_grad(
                be,
                &mut chunks,
                dx,
                dw,
                &x,
                &w,
                (n, h, v),
                &targets[..n],
                1.0,
                crate::lm_head::Coef::PerRow(&coef),
            );
        })
    };
    let (t, extra) = measured(&mut || one_pass(n, &mut dx, &mut dw))?;
    rows.push(row("chunked, one pass", n, t, extra));

    // One chunk's rows, a training sequence, where PyTorch's autograd fits beside it: the first
    // rows of x, dx and the targets serve.
    let n1 = s.tokens.min(crate::lm_head::chunk_rows(n, v));
    let (t, extra) = measured(&mut || full(n1, &mut dx, &mut dw))?;
    rows.push(row("full logits", n1, t, extra));
    let (t, extra) = measured(&mut || one_pass(n1, &mut dx, &mut dw))?;
    rows.push(row("one pass", n1, t, extra));
    Ok(rows)
}

/// Times, for each memory-bound row, a device-to-device copy that moves the same bytes (half
/// read, half written), cycling through copies of its buffers as the rows do so that L2 cannot
/// serve it. The 1 GiB ceiling copy runs at full speed from start to end; a copy of a row's
/// size pays the same launch, ramp-up and tail as the row's kernel, so the ratio to it says how
/// much of a row's distance from the ceiling comes from its size rather than from the kernel.
/// Sources are left zero: plain device allocations are not compressed, so contents do not
/// change a copy's speed.
pub fn add_copy_peers<B: Backend>(be: &B, rows: &mut [BenchRow], iters: usize) -> Result<()> {
    let mut done: Vec<(f64, f64)> = Vec::new();
    for r in rows.iter_mut() {
        if r.unit != Unit::Bytes
            || r.op.starts_with("ceiling")
            || crosses_bus(&r.op)
            || !(1e6..=8e9).contains(&r.work)
        {
            continue;
        }
        if let Some(&(_, t)) = done.iter().find(|(w, _)| *w == r.work) {
            r.copy_peer = Some(t);
            continue;
        }
        let n = (r.work / 4.0) as usize; // bf16 values read, and as many written
        let sets = ((512usize << 20) / (4 * n)).clamp(1, 8);
        let (Ok(src), Ok(mut dst)) = (
            (0..sets).map(|_| be.alloc(n)).collect::<Result<Vec<_>>>(),
            (0..sets).map(|_| be.alloc(n)).collect::<Result<Vec<_>>>(),
        ) else {
            continue; // no room for the peer: the row keeps its ceiling ratio only
        };
        let mut j = 0;
        let t = time(be, iters, || {
            j = (j + 1) % sets;
            be.copy(&mut dst[j], &src[j])
        })?;
        done.push((r.work, t));
        r.copy_peer = Some(t);
    }
    Ok(())
}

/// Issue 3's attention targets on an H100, TFLOP/s at t 4096, for each kernel set.
/// The plain rows are the default kernels (wgmma on an H100); the others name theirs.
const ATTENTION_TARGETS: [(&str, f64); 6] = [
    ("attention fwd (causal)", 350.0),
    ("attention fwd (causal, wgmma)", 350.0),
    ("attention fwd (causal, mma)", 350.0),
    ("attention bwd (causal)", 250.0),
    ("attention bwd (causal, wgmma)", 250.0),
    ("attention bwd (causal, mma)", 250.0),
];
/// The rows issues 3 and 4 hold to 80% of the copy ceiling, each also as its "(pdl)" or
/// "(no pdl)" row.
const COPY_TARGET_OPS: [&str; 8] = [
    "residual add",
    "rmsnorm",
    "rmsnorm_bwd",
    "rope (q)",
    "swiglu",
    "swiglu_bwd",
    "softmax-entropy fwd",
    "softmax-entropy bwd",
];

/// Each target this run has a row for: the row's figure, the target, met or not. Only an H100
/// run speaks to the issues; elsewhere the lines say how far another GPU is.
pub fn format_targets(rows: &[BenchRow]) -> String {
    let (copy, _) = ceilings(rows);
    let mut s = String::from("targets (issues 3 and 4, on an H100):\n");
    let mut line = |op: &str, shape: &str, got: f64, least: f64, show: &dyn Fn(f64) -> String| {
        let met = if got >= least { "met" } else { "MISSED" };
        s += &format!(
            "  {op}{shape}: {}, target {}: {met}\n",
            show(got),
            show(least)
        );
    };
    for (op, least) in ATTENTION_TARGETS {
        if let Some(r) = rows
            .iter()
            .find(|r| r.op == op && r.shape.starts_with("t 4096"))
        {
            line(op, " t 4096", r.rate(), least, &|x| {
                format!("{x:.0} TFLOP/s")
            });
        }
    }
    for op in COPY_TARGET_OPS {
        for name in [
            op.to_string(),
            format!("{op} (pdl)"),
            format!("{op} (no pdl)"),
        ] {
            if let Some(r) = rows.iter().find(|r| r.op == name) {
                line(&name, "", r.rate() / copy, 0.8, &|x| {
                    format!("{:.0}% of copy", 100.0 * x)
                });
            }
        }
    }
    // Issue 3 holds the elementwise and norm kernels to 80% of copy and lists the embedding
    // among the kernels apart from them: a gather of rows, shown beside the targets.
    for name in ["embedding", "embedding (ids on the device)"] {
        if let Some(r) = rows.iter().find(|r| r.op == name) {
            s += &format!(
                "  {name}: {:.0}% of copy (a gather, not held to the elementwise target)\n",
                100.0 * r.rate() / copy
            );
        }
    }
    s
}

/// Rows whose bytes cross between host and device memory.
fn crosses_bus(op: &str) -> bool {
    op.starts_with("host<->device") || op.contains("offloaded")
}

/// The table: rate, and the fraction of the matching ceiling.
pub fn format_table(rows: &[BenchRow]) -> String {
    let (copy, gemm) = ceilings(rows);
    let w_op = rows.iter().map(|r| r.op.len()).max().unwrap_or(2);
    let w_sh = rows.iter().map(|r| r.shape.len()).max().unwrap_or(5);
    let mut s = format!(
        "{:<w_op$}  {:<w_sh$}  {:>10}  {:>14}  {:>11}  {:>10}  {:>13}\n",
        "op", "shape", "time (ms)", "rate", "of ceiling", "extra mem", "of same copy"
    );
    for r in rows {
        let (rate, ceil) = match r.unit {
            Unit::Bytes => (format!("{:.0} GB/s", r.rate()), copy),
            Unit::Flops => (format!("{:.1} TFLOP/s", r.rate()), gemm),
        };
        let mem = r.extra_bytes.map_or(String::new(), |b| {
            format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
        });
        let peer = r
            .copy_peer
            .map_or(String::new(), |t| format!("{:.0}%", 100.0 * t / r.seconds));
        // Rows bound by the host bus are held to the bus (their copy peer), not to HBM.
        let of_ceiling = if crosses_bus(&r.op) {
            "-".to_string()
        } else {
            format!("{:.0}%", 100.0 * r.rate() / ceil)
        };
        s += &format!(
            "{:<w_op$}  {:<w_sh$}  {:>10.3}  {:>14}  {:>11}  {:>10}  {:>13}\n",
            r.op,
            r.shape,
            r.seconds * 1e3,
            rate,
            of_ceiling,
            mem,
            peer
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn row(op: &str) -> BenchRow {
        BenchRow::new(op, String::new(), Unit::Bytes, 1.0, 1.0)
    }

    /// A section that errors is left out and the rest still run; one named in `skip` is not
    /// run; once one has lost the device, none after it runs.
    #[test]
    fn sections_skip_errors_and_stop_after_a_lost_device() {
        let skip = ["sampling".to_string()];
        let mut sec = Sections::new(&CpuBackend, &skip);
        sec.run("matmul", || Ok(vec![row("a")]));
        sec.run("softmax-entropy", || anyhow::bail!("out of memory"));
        let mut ran = false;
        sec.run("sampling", || {
            ran = true;
            Ok(vec![row("s")])
        });
        assert!(!ran, "a skipped section runs");
        sec.run("optimizer", || Ok(vec![row("b")]));
        sec.probe = |_| true;
        sec.run("lm_head", || anyhow::bail!("CUDA_ERROR_ILLEGAL_ADDRESS"));
        assert_eq!(sec.lost.as_deref(), Some("lm_head"));
        sec.run("model", || {
            ran = true;
            Ok(vec![row("m")])
        });
        assert!(!ran, "a section ran on a lost device");
        let ops: Vec<&str> = sec.rows.iter().map(|r| r.op.as_str()).collect();
        assert_eq!(ops, ["a", "b"]);
    }
}
