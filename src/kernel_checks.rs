//! `check-kernels`: every backend op, then the whole model, against the CPU reference.
//!
//! Each check draws fresh random inputs, rounds those the backend keeps in bf16 to bf16 (so
//! the CPU oracle sees exactly the values the kernel sees and only the kernel's own error is
//! measured), poisons overwritten outputs with NaN and seeds accumulated (+=) outputs with
//! random values, runs the op, and reports the largest error relative to the largest
//! reference value: max|got − want| / max|want|.
//!
//! The harness is generic over `Backend`. On the GPU it checks the CUDA backend; run over the
//! CPU backend itself (a CI test) it checks the harness: every shape and argument order.

use crate::backend::{
    cpu, AdamWStep, AttnShape, Backend, RowStats, Starts, StatsLoss, Traffic, NO_TARGET,
};
use crate::config::{DType, ModelConfig};
use crate::generate::next_token_targets;
use crate::model::{random_tensors, tensor_specs, Qwen2};
use crate::sampling::uniform;
use anyhow::Result;
use half::bf16;

/// One row of the table.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub op: String,
    pub shape: String,
    pub err: f64,
    pub tol: f64,
}

impl CheckRow {
    pub fn pass(&self) -> bool {
        self.err.is_finite() && self.err <= self.tol
    }
}

/// Tolerances. bf16 storage rounds each stored value to 8 significant bits (relative 2^-9 on
/// average, 2^-8 at worst), so an op with a bf16 output is held to about twice that; f32
/// outputs computed from the same bf16 inputs only differ by summation order. The model
/// checks run every activation through bf16, layer after layer, hence their looser bounds.
pub struct Tolerances {
    pub bf16_out: f64,
    pub f32_out: f64,
    pub model_logits: f64,
    pub model_grads: f64,
}

impl Tolerances {
    /// For a backend that stores f32 (the CPU checking itself): only summation order differs.
    pub fn exact() -> Tolerances {
        Tolerances {
            bf16_out: 1e-5,
            f32_out: 1e-5,
            model_logits: 1e-5,
            model_grads: 1e-4,
        }
    }
    pub fn bf16() -> Tolerances {
        Tolerances {
            bf16_out: 1e-2,
            f32_out: 2e-3,
            model_logits: 4e-2,
            model_grads: 1e-1,
        }
    }
}

pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
    let mut worst = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w as f64).abs();
        if d.is_nan() {
            return f64::NAN;
        }
        worst = worst.max(d);
    }
    worst / scale.max(1e-30)
}

/// Deterministic uniform values in [-scale, scale), from (seed, stream).
pub fn rand_vec(n: usize, seed: u64, stream: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (uniform(seed, stream, i as u64) * 2.0 - 1.0) * scale)
        .collect()
}

pub fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

struct Ctx<'a, B: Backend> {
    be: &'a B,
    seed: u64,
    stream: u64,
    tol: &'a Tolerances,
    rows: Vec<CheckRow>,
    gate: Gate<'a, B>,
}

/// Whether a check (or a part of the GPU checks) may run: not when `check-kernels --skip`
/// names it, nor once an earlier one has lost the device.
struct Gate<'a, B: Backend> {
    skip: &'a [String],
    /// The check in which the device was lost, if it was.
    lost: Option<String>,
    /// Whether the device is lost, asked after a check errors (`device_lost`; tests swap it).
    probe: fn(&B) -> bool,
}

impl<'a, B: Backend> Gate<'a, B> {
    fn new(skip: &'a [String]) -> Self {
        Gate {
            skip,
            lost: None,
            probe: device_lost::<B>,
        }
    }

    /// The failed row that stands for `what` where it may not run.
    fn refuse(&self, what: &str) -> Option<CheckRow> {
        if let Some(after) = &self.lost {
            Some(not_run_row(what, after))
        } else if self.skip.iter().any(|s| s == what) {
            Some(skipped_row(what))
        } else {
            None
        }
    }
}

impl<'a, B: Backend> Ctx<'a, B> {
    fn new(be: &'a B, seed: u64, tol: &'a Tolerances, skip: &'a [String]) -> Self {
        Ctx {
            be,
            seed,
            stream: 0,
            tol,
            rows: Vec::new(),
            gate: Gate::new(skip),
        }
    }
    /// Fresh bf16-exact random values.
    fn rnd(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.stream += 1;
        round_bf16(&rand_vec(n, self.seed, self.stream, scale))
    }
    fn nan(&self, n: usize) -> Result<B::Buf> {
        self.be.upload(&vec![f32::NAN; n])
    }
    fn nan_f32(&self, n: usize) -> Result<B::Buf> {
        self.be.upload_f32(&vec![f32::NAN; n])
    }
    fn row(
        &mut self,
        op: &str,
        shape: String,
        got: &B::Buf,
        want: &[f32],
        f32_out: bool,
    ) -> Result<()> {
        let got = self.be.download(got)?;
        let tol = if f32_out {
            self.tol.f32_out
        } else {
            self.tol.bf16_out
        };
        self.push(CheckRow {
            op: op.into(),
            shape,
            err: max_rel_err(&got, want),
            tol,
        });
        Ok(())
    }
    /// Keeps a row, and prints it to stderr at once: should a kernel hang, what ran before it
    /// is already out (the table on stdout comes at the end).
    fn push(&mut self, r: CheckRow) {
        announce(&r);
        self.rows.push(r);
    }
}

/// Names a check on stderr as it starts: should it hang, the last such line names it
/// (`tools/gpu-run.sh` then runs the checks again with `--skip` it).
fn announce_start(what: &str) {
    eprintln!("check-kernels: running {what}");
}

/// Prints a row to stderr as soon as it is known.
fn announce(r: &CheckRow) {
    eprintln!(
        "  {} {} [{}]: {:.3e} (tol {:.1e})",
        if r.pass() { "ok  " } else { "FAIL" },
        r.op,
        r.shape,
        r.err,
        r.tol
    );
}

/// Whether the device is lost. After a fault in a kernel (an illegal address, a trap) every
/// call on the CUDA context fails from then on, so a check run there can only add failed rows
/// that say nothing of its own kernel. An error left pending by an earlier op is cleared
/// first: only one that persists counts.
pub fn device_lost<B: Backend>(be: &B) -> bool {
    let _ = be.sync();
    be.sync().is_err()
}

/// A check that stops with an error (an op refused or failed, memory ran out) becomes a failed
/// row, and the checks after it still run: one broken kernel must not hide the state of every
/// other one. Once the device is lost, the checks after it are failed rows that say so,
/// without running.
fn attempt<'a, B: Backend>(
    c: &mut Ctx<'a, B>,
    what: &str,
    check: impl FnOnce(&mut Ctx<'a, B>) -> Result<()>,
) {
    if let Some(row) = c.gate.refuse(what) {
        return c.push(row);
    }
    announce_start(what);
    if let Err(e) = check(c) {
        c.push(errored_row(what, &e));
        if (c.gate.probe)(c.be) {
            c.gate.lost = Some(what.to_string());
        }
    }
}

/// The failed row of a check left out by `--skip`: it was not checked.
pub fn skipped_row(what: &str) -> CheckRow {
    CheckRow {
        op: format!("{what}: skipped"),
        shape: format!("--skip {what}"),
        err: f64::INFINITY,
        tol: 0.0,
    }
}

const LOST: &str = "the device was lost after ";

/// The failed row of a check skipped because an earlier one lost the device.
pub fn not_run_row(what: &str, after: &str) -> CheckRow {
    CheckRow {
        op: format!("{what}: not run"),
        shape: format!("{LOST}{after}"),
        err: f64::INFINITY,
        tol: 0.0,
    }
}

/// The failed row of a check that could not run: its error in the shape column.
pub fn errored_row(what: &str, e: &anyhow::Error) -> CheckRow {
    let mut msg = format!("{e:#}");
    if msg.len() > 120 {
        let cut = (0..=117)
            .rev()
            .find(|&i| msg.is_char_boundary(i))
            .unwrap_or(0);
        msg.truncate(cut);
        msg += "...";
    }
    CheckRow {
        op: format!("{what}: error"),
        shape: msg,
        err: f64::INFINITY,
        tol: 0.0,
    }
}

/// The parts of a GPU check, run in order, each giving its rows. A part that errors is one
/// failed row and the parts after it still run; once one has lost the device, the parts after
/// it are failed rows that say so.
pub struct Parts<'a, B: Backend> {
    be: &'a B,
    pub rows: Vec<CheckRow>,
    gate: Gate<'a, B>,
}

impl<'a, B: Backend> Parts<'a, B> {
    /// Parts named in `skip` are not run (`check-kernels --skip`).
    pub fn new(be: &'a B, skip: &'a [String]) -> Self {
        Parts {
            be,
            rows: Vec::new(),
            gate: Gate::new(skip),
        }
    }

    pub fn run(&mut self, what: &str, part: impl FnOnce() -> Result<Vec<CheckRow>>) {
        if let Some(row) = self.gate.refuse(what) {
            return self.keep(row);
        }
        announce_start(what);
        let before = self.rows.len();
        match part() {
            Ok(rows) => self.rows.extend(rows),
            Err(e) => self.keep(errored_row(what, &e)),
        }
        if (self.gate.probe)(self.be) {
            // A fault surfaces as an error at the next download or sync, and after it there
            // are no more errors, only rows not run: the part's last error names the check
            // that lost the device.
            let culprit = self.rows[before..]
                .iter()
                .rev()
                .find_map(|r| r.op.strip_suffix(": error"))
                .unwrap_or(what)
                .to_string();
            eprintln!("check-kernels: the device was lost in {culprit}");
            self.gate.lost = Some(culprit);
        }
    }

    fn keep(&mut self, row: CheckRow) {
        announce(&row);
        self.rows.push(row);
    }
}

/// Runs every op check at small and at Qwen2.5-like shapes, then the model checks.
/// Checks named in `skip` are failed rows, not run.
pub fn run_all<B: Backend>(
    be: &B,
    seed: u64,
    tol: &Tolerances,
    big: bool,
    skip: &[String],
) -> Result<Vec<CheckRow>> {
    let mut c = Ctx::new(be, seed, tol, skip);
    let dims: &[(usize, usize)] = if big {
        &[(7, 96), (64, 3584)]
    } else {
        &[(7, 96), (16, 256)]
    };
    for &(rows, dim) in dims {
        attempt(&mut c, "elementwise", |c| check_elementwise(c, rows, dim));
        attempt(&mut c, "rmsnorm", |c| check_rmsnorm(c, rows, dim));
        attempt(&mut c, "embedding", |c| check_embedding(c, rows, dim));
    }
    let mats: &[(usize, usize, usize)] = if big {
        &[(5, 24, 40), (256, 3584, 512)]
    } else {
        &[(5, 24, 40), (64, 128, 96)]
    };
    for &(m, k, n) in mats {
        attempt(&mut c, "matmul", |c| check_matmul(c, m, k, n));
    }
    attempt(&mut c, "rope", |c| {
        check_rope(c, 2, 9, 4, 16, Starts::Same(3))
    });
    attempt(&mut c, "rope", |c| {
        check_rope(c, 1, 33, 28, 128, Starts::Same(3))
    });
    // Positions of a 4K training sequence and of Qwen2.5's 32K context, where a fast sine
    // without range reduction, or a fast pow in the inverse frequencies, drifts from the oracle.
    attempt(&mut c, "rope", |c| {
        check_rope(c, 1, 33, 28, 128, Starts::Same(4000))
    });
    attempt(&mut c, "rope", |c| {
        check_rope(c, 1, 33, 28, 128, Starts::Same(32700))
    });
    // A decode step over a ragged cache: each sequence's one new token at its own position.
    attempt(&mut c, "rope", |c| {
        check_rope(c, 5, 1, 28, 128, Starts::Each(&[0, 17, 4000, 3, 1200]))
    });
    attempt(&mut c, "rope", |c| {
        check_rope(c, 3, 1, 4, 16, Starts::Each(&[9, 0, 31]))
    });
    if big {
        // More rows than the blocks that fit on the GPU at once, so the resident grids of the
        // embedding and RoPE kernels go round several times, loading ahead as they do.
        attempt(&mut c, "embedding", |c| check_embedding(c, 4096, 3584));
        attempt(&mut c, "rope", |c| {
            check_rope(c, 2, 2048, 28, 128, Starts::Same(5))
        });
    }
    for s in attention_shapes(big) {
        attempt(&mut c, "attention", |c| {
            check_attention(c, s, Kernels::Default)
        });
    }
    attempt(&mut c, "kv_write", |c| {
        check_kv_write(c, 5, Starts::Same(7))
    });
    attempt(&mut c, "kv_write", |c| {
        check_kv_write(c, 1, Starts::Each(&[19, 0, 6]))
    });
    {
        let s = |batch, cap, head_dim| AttnShape {
            batch,
            tq: 1,
            tk: cap,
            cap,
            heads: 4,
            kv_heads: 2,
            head_dim,
        };
        attempt(&mut c, "attention_ragged", |c| {
            check_attention_ragged(c, s(4, 300, 128), &[1, 300, 37, 129])
        });
        attempt(&mut c, "attention_ragged", |c| {
            check_attention_ragged(c, s(3, 40, 64), &[40, 2, 17])
        });
        attempt(&mut c, "attention_ragged", |c| {
            check_attention_ragged(c, s(2, 24, 16), &[5, 24])
        });
    }
    let vocab = if big { 152064 } else { 5000 };
    attempt(&mut c, "softmax_stats", |c| check_softmax_stats(c, 6, 1000));
    attempt(&mut c, "softmax_stats", |c| check_softmax_stats(c, 5, 1001)); // odd vocabulary: the scalar path
    attempt(&mut c, "softmax_stats", |c| {
        check_softmax_stats(c, 300, 1000)
    }); // more CTAs than rows fill the GPU: splits by fill
    attempt(&mut c, "softmax_stats", |c| {
        check_softmax_stats(c, 70_000, 16)
    }); // past grid y's 65535 rows: two launches
    attempt(&mut c, "softmax_stats", |c| {
        check_softmax_stats(c, 4, vocab)
    });
    attempt(&mut c, "softmax_stats", |c| {
        check_softmax_stats_masked(c, 4, 1000)
    }); // −inf logits (masked tokens), packed
    attempt(&mut c, "softmax_stats", |c| {
        check_softmax_stats_masked(c, 4, 1001)
    }); // and on the scalar path
    attempt(&mut c, "adamw", |c| check_adamw(c, 1000));
    attempt(&mut c, "optimizer_step", check_optimizer_step);
    attempt(&mut c, "optimizer_offloaded", check_optimizer_offloaded);
    attempt(
        &mut c,
        "optimizer_bf16_moments",
        check_optimizer_bf16_moments,
    );
    attempt(&mut c, "sampling", |c| {
        check_sampling(c, if big { 152064 } else { 1000 })
    });
    attempt(&mut c, "sum_squares", |c| check_sum_squares(c, 100_000));
    for cfg in model_configs() {
        attempt(&mut c, "model", |c| check_model(c, &cfg));
    }
    let wide = if big { 96 } else { 9 };
    let cfg = model_configs().remove(1);
    attempt(&mut c, "wide decode", |c| check_wide_decode(c, &cfg, wide));
    attempt(&mut c, "layer traffic", |c| check_layer_traffic(c, &cfg));
    Ok(c.rows)
}

/// The training attention shapes: the fallback kernel, GQA, ragged tiles, prefill after a
/// cache, a single query, and with `big` a Qwen2.5-7B layer at 1K.
fn attention_shapes(big: bool) -> Vec<AttnShape> {
    let s = |batch, tq, tk, cap, heads, kv_heads, head_dim| AttnShape {
        batch,
        tq,
        tk,
        cap,
        heads,
        kv_heads,
        head_dim,
    };
    let mut v = vec![
        s(2, 13, 13, 13, 4, 2, 16), // tiny head_dim: fallback kernel
        s(2, 70, 70, 70, 4, 1, 64), // GQA 4, ragged tiles
        s(1, 5, 37, 40, 4, 2, 64),  // prefill after a cache prefix
        s(3, 1, 29, 32, 4, 2, 128), // decode: one query over the cache
        s(1, 130, 130, 130, 4, 2, 128),
        s(2, 100, 300, 310, 4, 1, 128), // prefill over a cache, several key tiles, GQA 4
    ];
    if big {
        v.push(s(1, 1024, 1024, 1024, 28, 4, 128));
    }
    v
}

/// Which attention kernels a pass checks: the backend's default set, or its others (on the GPU
/// the unfused cuBLAS path, and wgmma on an H100, neither yet run on one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Default,
    Alternates,
}

/// The attention shapes again, for the backend's other attention kernels only. On the GPU this
/// pass runs after every other check: a fault there loses the device, and with it whatever
/// would have run after.
pub fn run_alternates<B: Backend>(
    be: &B,
    seed: u64,
    tol: &Tolerances,
    big: bool,
    skip: &[String],
) -> Result<Vec<CheckRow>> {
    let mut c = Ctx::new(be, seed ^ 0xa17, tol, skip);
    for s in attention_shapes(big) {
        attempt(&mut c, "attention variants", |c| {
            check_attention(c, s, Kernels::Alternates)
        });
    }
    Ok(c.rows)
}

fn check_elementwise<B: Backend>(c: &mut Ctx<B>, rows: usize, dim: usize) -> Result<()> {
    let n = rows * dim;
    let shape = format!("[{rows}, {dim}]");
    let (x, y0) = (c.rnd(n, 1.0), c.rnd(n, 1.0));
    let (bx, mut by) = (c.be.upload(&x)?, c.be.upload(&y0)?);
    c.be.add(&mut by, &bx);
    let want: Vec<f32> = y0.iter().zip(&x).map(|(a, b)| a + b).collect();
    c.row("add (bf16 += bf16)", shape.clone(), &by, &want, false)?;

    let g = c.rnd(n, 1.0);
    let (bg, mut bp) = (c.be.upload_f32(&g)?, c.be.upload(&y0)?);
    c.be.axpy(&mut bp, -0.5, &bg);
    let want: Vec<f32> = y0.iter().zip(&g).map(|(p, g)| p - 0.5 * g).collect();
    c.row("axpy (bf16 += a·f32)", shape.clone(), &bp, &want, false)?;

    let (gate, up, dout) = (c.rnd(n, 3.0), c.rnd(n, 1.0), c.rnd(n, 1.0));
    let (bgate, bup, bdout) = (c.be.upload(&gate)?, c.be.upload(&up)?, c.be.upload(&dout)?);
    let mut out = c.nan(n)?;
    c.be.swiglu(&mut out, &bgate, &bup);
    let mut want = vec![0.0; n];
    cpu::swiglu(&mut want, &gate, &up);
    c.row("swiglu", shape.clone(), &out, &want, false)?;
    let (mut dg, mut du) = (c.nan(n)?, c.nan(n)?);
    c.be.swiglu_bwd(&mut dg, &mut du, &bdout, &bgate, &bup);
    let (mut wg, mut wu) = (vec![0.0; n], vec![0.0; n]);
    cpu::swiglu_bwd(&mut wg, &mut wu, &dout, &gate, &up);
    c.row("swiglu_bwd dgate", shape.clone(), &dg, &wg, false)?;
    c.row("swiglu_bwd dup", shape, &du, &wu, false)?;
    Ok(())
}

fn check_rmsnorm<B: Backend>(c: &mut Ctx<B>, rows: usize, dim: usize) -> Result<()> {
    let shape = format!("[{rows}, {dim}]");
    let (x, w, dout) = (
        c.rnd(rows * dim, 2.0),
        c.rnd(dim, 1.0),
        c.rnd(rows * dim, 1.0),
    );
    let (bx, bw, bdout) = (c.be.upload(&x)?, c.be.upload(&w)?, c.be.upload(&dout)?);
    let (mut out, mut rstd) = (c.nan(rows * dim)?, c.nan_f32(rows)?);
    c.be.rmsnorm(&mut out, &mut rstd, &bx, &bw, rows, dim, 1e-6);
    let (mut wo, mut wr) = (vec![0.0; rows * dim], vec![0.0; rows]);
    cpu::rmsnorm(&mut wo, &mut wr, &x, &w, rows, dim, 1e-6);
    c.row("rmsnorm out", shape.clone(), &out, &wo, false)?;
    c.row("rmsnorm rstd", shape.clone(), &rstd, &wr, true)?;
    // Backward accumulates: start both from random values.
    let (dx0, dw0) = (c.rnd(rows * dim, 1.0), c.rnd(dim, 1.0));
    let (mut bdx, mut bdw) = (c.be.upload(&dx0)?, c.be.upload_f32(&dw0)?);
    let brstd = c.be.upload_f32(&wr)?;
    c.be.rmsnorm_bwd(&mut bdx, &mut bdw, &bdout, &bx, &bw, &brstd, rows, dim);
    let (mut wdx, mut wdw) = (dx0, dw0);
    cpu::rmsnorm_bwd(&mut wdx, &mut wdw, &dout, &x, &w, &wr, rows, dim);
    c.row("rmsnorm_bwd dx (+=)", shape.clone(), &bdx, &wdx, false)?;
    c.row("rmsnorm_bwd dw (+=)", shape, &bdw, &wdw, true)?;
    Ok(())
}

fn check_embedding<B: Backend>(c: &mut Ctx<B>, rows: usize, dim: usize) -> Result<()> {
    let vocab = 50;
    let shape = format!("{rows} ids, [{vocab}, {dim}]");
    let table = c.rnd(vocab * dim, 1.0);
    // Repeated ids on purpose: the backward must add, not overwrite.
    let ids: Vec<u32> = (0..rows).map(|i| ((i * 7) % 11) as u32).collect();
    let bt = c.be.upload(&table)?;
    let mut out = c.nan(rows * dim)?;
    c.be.embedding(&mut out, &bt, &ids, dim);
    let mut want = vec![0.0; rows * dim];
    cpu::embedding(&mut want, &table, &ids, dim);
    c.row("embedding", shape.clone(), &out, &want, false)?;
    let (dout, d0) = (c.rnd(rows * dim, 1.0), c.rnd(vocab * dim, 1.0));
    let mut bd = c.be.upload_f32(&d0)?;
    c.be.embedding_bwd(&mut bd, &c.be.upload(&dout)?, &ids, dim);
    let mut want = d0;
    cpu::embedding_bwd(&mut want, &dout, &ids, dim);
    c.row("embedding_bwd (+=)", shape, &bd, &want, true)?;
    Ok(())
}

fn check_matmul<B: Backend>(c: &mut Ctx<B>, m: usize, k: usize, n: usize) -> Result<()> {
    let shape = format!("m {m}, k {k}, n {n}");
    let (a, w, bias, dout) = (
        c.rnd(m * k, 1.0),
        c.rnd(n * k, 0.1),
        c.rnd(n, 1.0),
        c.rnd(m * n, 1.0),
    );
    let (ba, bw, bb, bdout) = (
        c.be.upload(&a)?,
        c.be.upload(&w)?,
        c.be.upload(&bias)?,
        c.be.upload(&dout)?,
    );
    let mut out = c.nan(m * n)?;
    c.be.matmul(&mut out, &ba, &bw, Some(&bb), m, k, n);
    let mut want = vec![0.0; m * n];
    cpu::matmul(&mut want, &a, &w, Some(&bias), m, k, n);
    c.row("matmul + bias (cuBLAS)", shape.clone(), &out, &want, false)?;
    let mut out = c.nan(m * n)?;
    c.be.matmul(&mut out, &ba, &bw, None, m, k, n);
    cpu::matmul(&mut want, &a, &w, None, m, k, n);
    c.row("matmul (cuBLAS)", shape.clone(), &out, &want, false)?;

    let (da0, dw0, db0) = (c.rnd(m * k, 1.0), c.rnd(n * k, 1.0), c.rnd(n, 1.0));
    let (mut bda, mut bdw, mut bdb) = (
        c.be.upload(&da0)?,
        c.be.upload_f32(&dw0)?,
        c.be.upload_f32(&db0)?,
    );
    c.be.matmul_bwd(
        Some(&mut bda),
        Some(&mut bdw),
        Some(&mut bdb),
        &bdout,
        &ba,
        &bw,
        m,
        k,
        n,
    );
    let (mut wda, mut wdw, mut wdb) = (da0, dw0, db0);
    cpu::matmul_bwd(
        Some(&mut wda),
        Some(&mut wdw),
        Some(&mut wdb),
        &dout,
        &a,
        &w,
        m,
        k,
        n,
    );
    c.row("matmul_bwd da (+=)", shape.clone(), &bda, &wda, false)?;
    c.row("matmul_bwd dw (+=, f32)", shape.clone(), &bdw, &wdw, true)?;
    c.row("matmul_bwd dbias (+=, f32)", shape, &bdb, &wdb, true)?;
    Ok(())
}

fn check_rope<B: Backend>(
    c: &mut Ctx<B>,
    batch: usize,
    seq: usize,
    heads: usize,
    hd: usize,
    starts: Starts,
) -> Result<()> {
    let n = batch * seq * heads * hd;
    let at = match starts {
        Starts::Same(p) => format!("pos {p}"),
        Starts::Each(s) => format!("per-sequence pos {s:?}"),
    };
    let shape = format!("[{batch}, {seq}, {heads}, {hd}] at {at}");
    let x = c.rnd(n, 1.0);
    for inverse in [false, true] {
        let mut bx = c.be.upload(&x)?;
        c.be.rope(&mut bx, batch, seq, heads, hd, starts, 1e6, inverse);
        let mut want = x.clone();
        cpu::rope(&mut want, batch, seq, heads, hd, starts, 1e6, inverse);
        let op = if inverse {
            "rope inverse (= bwd)"
        } else {
            "rope"
        };
        c.row(op, shape.clone(), &bx, &want, false)?;
    }
    Ok(())
}

/// The attention kernels of `which` against the CPU oracle: the forward's output and
/// log-sum-exp, and over full sequences the backward from the oracle's own forward.
fn check_attention<B: Backend>(c: &mut Ctx<B>, s: AttnShape, which: Kernels) -> Result<()> {
    let alternates = which == Kernels::Alternates;
    if alternates && !has_alternates(c.be, s) {
        return Ok(());
    }
    let shape = format!(
        "b {} tq {} tk {} heads {}/{} d {}",
        s.batch, s.tq, s.tk, s.heads, s.kv_heads, s.head_dim
    );
    let nq = s.batch * s.tq * s.heads * s.head_dim;
    let nkv = s.batch * s.cap * s.kv_heads * s.head_dim;
    let nl = s.batch * s.tq * s.heads;
    let (q, k, v, dout) = (
        c.rnd(nq, 2.0),
        c.rnd(nkv, 2.0),
        c.rnd(nkv, 1.0),
        c.rnd(nq, 1.0),
    );
    let (bq, bk, bv) = (c.be.upload(&q)?, c.be.upload(&k)?, c.be.upload(&v)?);
    let (mut wo, mut wl) = (vec![0.0; nq], vec![0.0; nl]);
    cpu::attention(&mut wo, &mut wl, &q, &k, &v, s);
    if !alternates {
        let (mut out, mut lse) = (c.nan(nq)?, c.nan_f32(nl)?);
        c.be.attention(&mut out, &mut lse, &bq, &bk, &bv, s);
        let kind = if s.tq == 1 { "decode" } else { "flash" };
        c.row(
            &format!("attention {kind} out"),
            shape.clone(),
            &out,
            &wo,
            false,
        )?;
        c.row(
            &format!("attention {kind} lse"),
            shape.clone(),
            &lse,
            &wl,
            true,
        )?;
    }
    if s.tq != s.tk {
        // training backward only runs over full sequences
        return match which {
            Kernels::Default => Ok(()),
            Kernels::Alternates => alt_attention(c, s, &shape, [&bq, &bk, &bv], [&wo, &wl], None),
        };
    }
    // Backward from the oracle's own forward (rounded as the backend stores it).
    let wo_b = round_bf16(&wo);
    let (bo, bl, bdout) = (
        c.be.upload(&wo_b)?,
        c.be.upload_f32(&wl)?,
        c.be.upload(&dout)?,
    );
    let (mut wdq, mut wdk, mut wdv) = (vec![0.0; nq], vec![0.0; nkv], vec![0.0; nkv]);
    cpu::attention_bwd(
        &mut wdq, &mut wdk, &mut wdv, &dout, &wo_b, &wl, &q, &k, &v, s,
    );
    if alternates {
        let bwd = ([&bo, &bl, &bdout], [&wdq[..], &wdk, &wdv]);
        return alt_attention(c, s, &shape, [&bq, &bk, &bv], [&wo, &wl], Some(bwd));
    }
    let (mut dq, mut dk, mut dv) = (c.nan(nq)?, c.nan(nkv)?, c.nan(nkv)?);
    c.be.attention_bwd(
        &mut dq, &mut dk, &mut dv, &bdout, &bo, &bl, &bq, &bk, &bv, s,
    );
    c.row("attention_bwd dq", shape.clone(), &dq, &wdq, false)?;
    c.row("attention_bwd dk", shape.clone(), &dk, &wdk, false)?;
    c.row("attention_bwd dv", shape, &dv, &wdv, false)
}

/// Whether the backend has other attention kernels for this shape (one query is decode, which
/// has one set).
fn has_alternates<B: Backend>(be: &B, s: AttnShape) -> bool {
    s.tq > 1 && be.attention_variants(s.head_dim).len() > 1
}

/// The backward's inputs for `alt_attention`: [out, lse, dout] on the device, and the oracle's
/// [dq, dk, dv].
type AltBwd<'a, B> = ([&'a <B as Backend>::Buf; 3], [&'a [f32]; 3]);

/// The other attention kernels this backend has for several queries (unfused; wgmma on an
/// H100 at head_dim 128), against the same oracle values as the default ones: the forward's [out, lse], and
/// with `bwd` the backward's.
fn alt_attention<B: Backend>(
    c: &mut Ctx<B>,
    s: AttnShape,
    shape: &str,
    [bq, bk, bv]: [&B::Buf; 3],
    [wo, wl]: [&[f32]; 2],
    bwd: Option<AltBwd<'_, B>>,
) -> Result<()> {
    let variants = c.be.attention_variants(s.head_dim);
    // The setting, not variants[0]: at other head dims the wgmma setting runs the mma kernels.
    let setting = c.be.attention_variant().unwrap_or(variants[0]);
    let (nq, nkv) = (
        s.batch * s.tq * s.heads * s.head_dim,
        s.batch * s.cap * s.kv_heads * s.head_dim,
    );
    for alt in variants.iter().skip(1) {
        c.be.set_attention_variant(alt)?;
        let (mut out, mut lse) = (c.nan(nq)?, c.nan_f32(s.batch * s.tq * s.heads)?);
        c.be.attention(&mut out, &mut lse, bq, bk, bv, s);
        let mut grads = None;
        if let Some(([bo, bl, bdout], want)) = bwd {
            let (mut dq, mut dk, mut dv) = (c.nan(nq)?, c.nan(nkv)?, c.nan(nkv)?);
            c.be.attention_bwd(&mut dq, &mut dk, &mut dv, bdout, bo, bl, bq, bk, bv, s);
            grads = Some(([dq, dk, dv], want));
        }
        c.be.set_attention_variant(setting)?;
        let name = |what: &str| format!("attention {what} ({alt})");
        c.row(&name("out"), shape.to_string(), &out, wo, false)?;
        c.row(&name("lse"), shape.to_string(), &lse, wl, true)?;
        if let Some((got, want)) = grads {
            for ((what, g), w) in ["bwd dq", "bwd dk", "bwd dv"].iter().zip(&got).zip(want) {
                c.row(&name(what), shape.to_string(), g, w, false)?;
            }
        }
    }
    Ok(())
}

fn check_kv_write<B: Backend>(c: &mut Ctx<B>, tq: usize, starts: Starts) -> Result<()> {
    let (batch, cap, row) = (3, 20, 64);
    let cache0 = c.rnd(batch * cap * row, 1.0);
    let new = c.rnd(batch * tq * row, 1.0);
    let mut bc = c.be.upload(&cache0)?;
    c.be.kv_write(&mut bc, &c.be.upload(&new)?, batch, cap, starts, tq, row);
    let mut want = cache0;
    cpu::kv_write(&mut want, &new, batch, cap, starts, tq, row);
    let at = match starts {
        Starts::Same(p) => format!("{p}"),
        Starts::Each(s) => format!("{s:?}"),
    };
    c.row(
        "kv_write",
        format!("b {batch} cap {cap} at {at}+{tq}, row {row}"),
        &bc,
        &want,
        false,
    )
}

/// Decode over a ragged cache: each sequence's one query sees its own number of keys, the
/// rows past it holding values that must not leak in.
fn check_attention_ragged<B: Backend>(c: &mut Ctx<B>, s: AttnShape, kv_len: &[u32]) -> Result<()> {
    let shape = format!(
        "b {} keys {:?} cap {} heads {}/{} d {}",
        s.batch, kv_len, s.cap, s.heads, s.kv_heads, s.head_dim
    );
    let nq = s.batch * s.heads * s.head_dim;
    let nkv = s.batch * s.cap * s.kv_heads * s.head_dim;
    let (q, k, v) = (c.rnd(nq, 2.0), c.rnd(nkv, 2.0), c.rnd(nkv, 1.0));
    let (mut out, mut lse) = (c.nan(nq)?, c.nan_f32(s.batch * s.heads)?);
    let (bq, bk, bv) = (c.be.upload(&q)?, c.be.upload(&k)?, c.be.upload(&v)?);
    c.be.attention_decode(&mut out, &mut lse, &bq, &bk, &bv, s, kv_len);
    let (mut wo, mut wl) = (vec![0.0; nq], vec![0.0; s.batch * s.heads]);
    cpu::attention_ragged(&mut wo, &mut wl, &q, &k, &v, s, Some(kv_len));
    c.row(
        "attention decode ragged out",
        shape.clone(),
        &out,
        &wo,
        false,
    )?;
    c.row("attention decode ragged lse", shape, &lse, &wl, true)
}

fn check_softmax_stats<B: Backend>(c: &mut Ctx<B>, rows: usize, vocab: usize) -> Result<()> {
    let logits = c.rnd(rows * vocab, 8.0);
    softmax_stats_rows(c, logits, rows, vocab, "")
}

/// Masked tokens (−inf logits) add nothing to the statistics and get a zero gradient: the
/// first 8 logits of row 3 (one thread's whole first pack) and every fifth of row 2 but its
/// target.
fn check_softmax_stats_masked<B: Backend>(c: &mut Ctx<B>, rows: usize, vocab: usize) -> Result<()> {
    let mut logits = c.rnd(rows * vocab, 8.0);
    logits[3 * vocab..3 * vocab + 8].fill(f32::NEG_INFINITY);
    let target = (2 * 977) % vocab;
    for j in (1..vocab).step_by(5).filter(|&j| j != target) {
        logits[2 * vocab + j] = f32::NEG_INFINITY;
    }
    softmax_stats_rows(c, logits, rows, vocab, ", masked")
}

fn softmax_stats_rows<B: Backend>(
    c: &mut Ctx<B>,
    logits: Vec<f32>,
    rows: usize,
    vocab: usize,
    note: &str,
) -> Result<()> {
    let shape = format!("[{rows}, {vocab}] T 0.7{note}");
    let targets: Vec<u32> = (0..rows)
        .map(|r| {
            if r == 1 {
                NO_TARGET
            } else {
                ((r * 977) % vocab) as u32
            }
        })
        .collect();
    let bl = c.be.upload(&logits)?;
    let mut stats = c.nan_f32(3 * rows)?;
    c.be.softmax_stats_into(&mut stats, &bl, rows, vocab, &targets, 0.7)?;
    let want = RowStats::flatten(&cpu::softmax_stats(&logits, rows, vocab, &targets, 0.7));
    c.row(
        "softmax_stats (lse, entropy, logprob)",
        shape.clone(),
        &stats,
        &want,
        true,
    )?;
    let (a, b) = (c.rnd(rows, 1.0), c.rnd(rows, 1.0));
    let loss = StatsLoss {
        targets: &targets,
        temperature: 0.7,
        a: &a,
        b: &b,
    };
    // From the backend's own statistics, as the chunked lm_head runs it.
    let mut bd = c.nan(rows * vocab)?;
    c.be.softmax_stats_bwd_saved(&mut bd, &bl, &stats, rows, vocab, &loss);
    let mut want = vec![0.0; rows * vocab];
    cpu::softmax_stats_bwd(&mut want, &logits, rows, vocab, &loss);
    c.row(
        "softmax_stats_bwd_saved dlogits",
        shape.clone(),
        &bd,
        &want,
        false,
    )?;
    // Over the logits themselves, as the chunked lm_head now runs it.
    let mut bp = c.be.upload(&logits)?;
    c.be.softmax_stats_bwd_saved_in_place(&mut bp, &stats, rows, vocab, &loss);
    c.row(
        "softmax_stats_bwd_saved in place",
        shape.clone(),
        &bp,
        &want,
        false,
    )?;
    let mut bd = c.nan(rows * vocab)?;
    c.be.softmax_stats_bwd(&mut bd, &bl, rows, vocab, &loss);
    c.row("softmax_stats_bwd dlogits", shape, &bd, &want, false)
}

fn check_adamw<B: Backend>(c: &mut Ctx<B>, n: usize) -> Result<()> {
    let (p0, g) = (c.rnd(n, 1.0), c.rnd(n, 1.0));
    let m0 = c.rnd(n, 0.1);
    let v0: Vec<f32> = c.rnd(n, 0.1).iter().map(|x| x * x).collect();
    let h = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
        grad_scale: 0.5,
    };
    let mut bp = c.be.upload_f32(&p0)?;
    let bg = c.be.upload_f32(&g)?;
    let (mut bm, mut bv) = (c.be.upload_f32(&m0)?, c.be.upload_f32(&v0)?);
    c.be.adamw(&mut bp, &bg, &mut bm, &mut bv, &h);
    let (mut p, mut m, mut v) = (p0, m0, v0);
    cpu::adamw(&mut p, &g, &mut m, &mut v, &h);
    let shape = format!("{n} values, f32 params");
    c.row("adamw p", shape.clone(), &bp, &p, true)?;
    c.row("adamw m", shape.clone(), &bm, &m, true)?;
    c.row("adamw v", shape, &bv, &v, true)
}

fn check_sum_squares<B: Backend>(c: &mut Ctx<B>, n: usize) -> Result<()> {
    let x = c.rnd(n, 1.0);
    let got = c.be.sum_squares(&c.be.upload_f32(&x)?)?;
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    c.push(CheckRow {
        op: "sum_squares (grad norm)".into(),
        shape: format!("{n} values"),
        err: (got - want).abs() / want,
        tol: c.tol.f32_out,
    });
    Ok(())
}

/// The model shapes the whole-model checks run at: GQA, both head sizes of the fast kernels,
/// tied and untied lm_head.
pub fn model_configs() -> Vec<ModelConfig> {
    let base = ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        vocab_size: 1000,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        tie_word_embeddings: false,
        max_position_embeddings: 512,
        dtype: DType::BF16,
    };
    let mut b = base.clone();
    b.num_heads = 2;
    b.num_kv_heads = 1;
    b.head_dim = 128;
    b.tie_word_embeddings = true;
    vec![base, b]
}

fn check_model<B: Backend>(c: &mut Ctx<B>, cfg: &ModelConfig) -> Result<()> {
    let be = c.be;
    let tensors: Vec<Vec<f32>> = random_tensors(cfg, c.seed ^ 0x5eed, 0.05)
        .iter()
        .map(|t| round_bf16(t))
        .collect();
    let mut gpu = Qwen2::from_host(be, cfg.clone(), &tensors)?;
    let cpu_be = cpu::CpuBackend;
    let cpu_m = Qwen2::from_host(&cpu_be, cfg.clone(), &tensors)?;
    let (batch, seq) = (2, 37);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| {
            (uniform(c.seed, 99, i as u64) * cfg.vocab_size as f32) as u32 % cfg.vocab_size as u32
        })
        .collect();
    let tag = format!(
        "h {} L {} heads {}/{} d {} V {}{}, {batch}×{seq}",
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        if cfg.tie_word_embeddings { " tied" } else { "" }
    );

    // Forward logits, and the gradients of every parameter for the scalar loss
    // Σ entropy(T=1) + Σ logprob(next), on the oracle once; on the backend with every layer's
    // activations kept, then with each layer recomputed in the backward (`Qwen2::recompute`).
    let mut ca = cpu_m.alloc_activations(&cpu_be, batch, seq, true)?;
    cpu_m.forward_train(&cpu_be, &ids, &mut ca)?;
    let v = cfg.vocab_size;
    let targets = next_token_targets(&ids, batch, seq);
    let (a, b) = (vec![1.0f32; batch * seq], vec![1.0f32; batch * seq]);
    let loss = StatsLoss {
        targets: &targets,
        temperature: 1.0,
        a: &a,
        b: &b,
    };
    let mut cd = vec![0.0; batch * seq * v];
    cpu::softmax_stats_bwd(&mut cd, &ca.logits, batch * seq, v, &loss);
    let mut cg = cpu_m.zeros_like_params(&cpu_be)?;
    cpu_m.backward(&cpu_be, &mut ca, &cd, &mut cg)?;
    let names = tensor_specs(cfg);
    for recompute in [false, true] {
        gpu.recompute = recompute;
        let mut ga = gpu.alloc_activations(be, batch, seq, true)?;
        gpu.forward_train(be, &ids, &mut ga)?;
        if !recompute {
            c.push(CheckRow {
                op: "model forward logits".into(),
                shape: tag.clone(),
                err: max_rel_err(&be.download(&ga.logits)?, &ca.logits),
                tol: c.tol.model_logits,
            });
        }
        let mut gd = be.alloc(batch * seq * v)?;
        be.softmax_stats_bwd(&mut gd, &ga.logits, batch * seq, v, &loss);
        let mut gg = gpu.zeros_like_params(be)?;
        gpu.backward(be, &mut ga, &gd, &mut gg)?;
        let mut worst = (0.0f64, String::new());
        for ((g, w), (name, _)) in gg.list().into_iter().zip(cg.list()).zip(&names) {
            let e = max_rel_err(&be.download(g)?, w);
            if e.is_nan() || e > worst.0 || worst.1.is_empty() {
                worst = (e, name.clone());
            }
        }
        c.push(CheckRow {
            op: format!(
                "model grads{}, all {} tensors (worst: {})",
                if recompute { " (recompute)" } else { "" },
                names.len(),
                worst.1
            ),
            shape: tag.clone(),
            err: worst.0,
            tol: c.tol.model_grads,
        });
    }
    gpu.recompute = false;

    // KV-cache decode: prefill 20 tokens, then 4 single-token steps; the last step's logits
    // against the oracle's.
    let prompt: Vec<u32> = ids[..batch * 20].to_vec();
    let mut got_cache = gpu.alloc_cache(be, batch, 32)?;
    let mut want_cache = cpu_m.alloc_cache(&cpu_be, batch, 32)?;
    let mut gp = gpu.alloc_activations(be, batch, 20, false)?;
    let mut cp = cpu_m.alloc_activations(&cpu_be, batch, 20, false)?;
    gpu.forward_cached(be, &prompt, &mut gp, &mut got_cache)?;
    cpu_m.forward_cached(&cpu_be, &prompt, &mut cp, &mut want_cache)?;
    let mut gs = gpu.alloc_activations(be, batch, 1, false)?;
    let mut cs = cpu_m.alloc_activations(&cpu_be, batch, 1, false)?;
    for step in 0..4 {
        let next: Vec<u32> = (0..batch).map(|b| ids[b * seq + 20 + step]).collect();
        gpu.forward_cached(be, &next, &mut gs, &mut got_cache)?;
        cpu_m.forward_cached(&cpu_be, &next, &mut cs, &mut want_cache)?;
    }
    c.push(CheckRow {
        op: "model KV-cache decode logits (20 + 4 steps)".into(),
        shape: tag.clone(),
        err: max_rel_err(&be.download(&gs.logits)?, &cs.logits),
        tol: c.tol.model_logits,
    });

    // The same over a ragged cache, as batched sampling leaves it: sequence b's prompt is
    // 20 - 7b tokens long, prefilled alone and copied into its slot, then 4 steps together.
    let mut got_cache = gpu.alloc_cache(be, batch, 32)?;
    let mut want_cache = cpu_m.alloc_cache(&cpu_be, batch, 32)?;
    let lens: Vec<usize> = (0..batch).map(|b| 20 - 7 * (b % 3)).collect();
    for (b, &len) in lens.iter().enumerate() {
        let prompt = &ids[b * seq..b * seq + len];
        let mut g1 = gpu.alloc_cache(be, 1, len)?;
        let mut c1 = cpu_m.alloc_cache(&cpu_be, 1, len)?;
        let mut ga = gpu.alloc_activations(be, 1, len, false)?;
        let mut ca = cpu_m.alloc_activations(&cpu_be, 1, len, false)?;
        gpu.forward_cached(be, prompt, &mut ga, &mut g1)?;
        cpu_m.forward_cached(&cpu_be, prompt, &mut ca, &mut c1)?;
        got_cache.copy_prefix(be, b, &g1, 0, len)?;
        want_cache.copy_prefix(&cpu_be, b, &c1, 0, len)?;
    }
    for step in 0..4 {
        let next: Vec<u32> = (0..batch).map(|b| ids[b * seq + lens[b] + step]).collect();
        gpu.forward_cached(be, &next, &mut gs, &mut got_cache)?;
        cpu_m.forward_cached(&cpu_be, &next, &mut cs, &mut want_cache)?;
    }
    c.push(CheckRow {
        op: format!("model ragged KV-cache decode logits ({lens:?} + 4 steps)"),
        shape: tag,
        err: max_rel_err(&be.download(&gs.logits)?, &cs.logits),
        tol: c.tol.model_logits,
    });
    Ok(())
}

/// The hot-path rule: a warm layer neither allocates nor copies between host and device. A
/// training step (forward, loss gradient, backward) and a ragged decode step run twice through
/// the same model at 1 and at 3 layers, and the second run's counts (`Backend::traffic`) must
/// not grow with depth. What a step does once (ids and lengths staged, a loss read back) stays
/// out of the comparison; what a layer does twice would show as a difference.
fn check_layer_traffic<B: Backend>(c: &mut Ctx<B>, cfg: &ModelConfig) -> Result<()> {
    let be = c.be;
    let (batch, seq) = (2, 16);
    let mut counts = Vec::new();
    for layers in [1, 3] {
        let cfg = ModelConfig {
            num_layers: layers,
            ..cfg.clone()
        };
        let tensors = random_tensors(&cfg, c.seed ^ 0x7a1f, 0.05);
        let model = Qwen2::from_host(be, cfg.clone(), &tensors)?;
        let v = cfg.vocab_size;
        let ids: Vec<u32> = (0..batch * seq)
            .map(|i| ((i * 7919 + 13) % v) as u32)
            .collect();
        let targets = next_token_targets(&ids, batch, seq);
        let ones = vec![1.0f32; batch * seq];
        let loss = StatsLoss {
            targets: &targets,
            temperature: 1.0,
            a: &ones,
            b: &ones,
        };
        let mut acts = model.alloc_activations(be, batch, seq, true)?;
        let mut dlogits = be.alloc(batch * seq * v)?;
        let mut grads = model.zeros_like_params(be)?;
        let mut train = || -> Result<()> {
            model.forward_train(be, &ids, &mut acts)?;
            be.softmax_stats_bwd(&mut dlogits, &acts.logits, batch * seq, v, &loss);
            model.backward(be, &mut acts, &dlogits, &mut grads)?;
            be.sync()
        };
        // Three sequences left at 8, 5 and 0 positions, as batched sampling leaves its slots.
        let lens = [8usize, 5, 0];
        let mut cache = model.alloc_cache(be, lens.len(), 24)?;
        let mut prefill = model.alloc_activations(be, lens.len(), 8, false)?;
        model.forward_cached(be, &ids[..lens.len() * 8], &mut prefill, &mut cache)?;
        let mut step_acts = model.alloc_activations(be, lens.len(), 1, false)?;
        let next: Vec<u32> = ids[..lens.len()].to_vec();
        let mut decode = || -> Result<()> {
            for (b, &len) in lens.iter().enumerate() {
                cache.truncate(b, len);
            }
            model.forward_cached(be, &next, &mut step_acts, &mut cache)?;
            be.sync()
        };
        let measured = |run: &mut dyn FnMut() -> Result<()>| -> Result<Traffic> {
            run()?; // grows scratch and staging
            let before = be.traffic();
            run()?;
            Ok(be.traffic().since(before))
        };
        counts.push([measured(&mut train)?, measured(&mut decode)?]);
    }
    let show = |t: Traffic| format!("{}/{}/{}", t.allocs, t.to_device, t.to_host);
    for (i, what) in ["training step", "ragged decode step"].iter().enumerate() {
        let (one, three) = (counts[0][i], counts[1][i]);
        let grown = three.allocs.saturating_sub(one.allocs)
            + three.to_device.saturating_sub(one.to_device)
            + three.to_host.saturating_sub(one.to_host);
        c.push(CheckRow {
            op: format!("model {what}, warm: allocations and copies a layer adds"),
            shape: format!(
                "L 1: {}, L 3: {} (allocs/to device/to host)",
                show(one),
                show(three)
            ),
            err: grown as f64,
            tol: 0.0,
        });
    }
    Ok(())
}

/// Batched sampling's decode at a realistic width: `rows` sequences whose prompts (1 to 40
/// tokens) are each prefilled alone and copied into their slots, three steps together over the
/// ragged cache, then every third slot cleared (as a finished sequence's slot is, decoding a
/// placeholder at position 0) and one more step; the last step's logits against the oracle's.
fn check_wide_decode<B: Backend>(c: &mut Ctx<B>, cfg: &ModelConfig, rows: usize) -> Result<()> {
    let be = c.be;
    let cpu_be = cpu::CpuBackend;
    let tensors: Vec<Vec<f32>> = random_tensors(cfg, c.seed ^ 0xdec0, 0.05)
        .iter()
        .map(|t| round_bf16(t))
        .collect();
    let dev = Qwen2::from_host(be, cfg.clone(), &tensors)?;
    let oracle = Qwen2::from_host(&cpu_be, cfg.clone(), &tensors)?;
    let v = cfg.vocab_size as u32;
    let token = |b: usize, i: usize| ((b * 7919 + i * 104729 + c.seed as usize) as u32) % v;
    let (mut got, mut want) = (
        dev.alloc_cache(be, rows, 48)?,
        oracle.alloc_cache(&cpu_be, rows, 48)?,
    );
    let lens: Vec<usize> = (0..rows).map(|b| 1 + (b * 13) % 40).collect();
    for (b, &len) in lens.iter().enumerate() {
        let prompt: Vec<u32> = (0..len).map(|i| token(b, i)).collect();
        let (mut g1, mut c1) = (
            dev.alloc_cache(be, 1, len)?,
            oracle.alloc_cache(&cpu_be, 1, len)?,
        );
        let mut ga = dev.alloc_activations(be, 1, len, false)?;
        let mut ca = oracle.alloc_activations(&cpu_be, 1, len, false)?;
        dev.forward_cached(be, &prompt, &mut ga, &mut g1)?;
        oracle.forward_cached(&cpu_be, &prompt, &mut ca, &mut c1)?;
        got.copy_prefix(be, b, &g1, 0, len)?;
        want.copy_prefix(&cpu_be, b, &c1, 0, len)?;
    }
    let mut gs = dev.alloc_activations(be, rows, 1, false)?;
    let mut cs = oracle.alloc_activations(&cpu_be, rows, 1, false)?;
    for step in 0..4 {
        if step == 3 {
            for b in (0..rows).step_by(3) {
                got.clear(b);
                want.clear(b);
            }
        }
        let next: Vec<u32> = (0..rows).map(|b| token(b, 100 + step)).collect();
        dev.forward_cached(be, &next, &mut gs, &mut got)?;
        oracle.forward_cached(&cpu_be, &next, &mut cs, &mut want)?;
    }
    c.push(CheckRow {
        op: format!(
            "model ragged decode, {rows} sequences (prompts 1..40, 4 steps, slots cleared)"
        ),
        shape: format!(
            "h {} L {} heads {}/{} d {} V {}",
            cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, v
        ),
        err: max_rel_err(&be.download(&gs.logits)?, &cs.logits),
        tol: c.tol.model_logits,
    });
    Ok(())
}

/// The table `check-kernels` prints.
pub fn format_table(rows: &[CheckRow]) -> String {
    let w_op = rows.iter().map(|r| r.op.len()).max().unwrap_or(2).max(2);
    let w_sh = rows.iter().map(|r| r.shape.len()).max().unwrap_or(5).max(5);
    let mut s = format!(
        "{:<w_op$}  {:<w_sh$}  {:>12}  {:>9}  pass\n",
        "op", "shape", "max rel err", "tolerance"
    );
    for r in rows {
        s += &format!(
            "{:<w_op$}  {:<w_sh$}  {:>12.3e}  {:>9.1e}  {}\n",
            r.op,
            r.shape,
            r.err,
            r.tol,
            if r.pass() { "ok" } else { "FAIL" }
        );
    }
    s
}

/// Random bf16 parameters and f32 gradients of the given sizes, on the host and on the
/// backend, and an AdamW step with the clipping active.
struct OptimCase<B: Backend> {
    host_p: Vec<Vec<f32>>,
    host_g: Vec<Vec<f32>>,
    h: crate::backend::OptimizerStep,
    dp: Vec<B::Buf>,
    dg: Vec<B::Buf>,
}

fn optim_case<B: Backend>(c: &mut Ctx<B>, sizes: &[usize], step: u64) -> Result<OptimCase<B>> {
    let host_p: Vec<Vec<f32>> = sizes.iter().map(|&n| c.rnd(n, 1.0)).collect();
    let host_g: Vec<Vec<f32>> = sizes.iter().map(|&n| c.rnd(n, 1.0)).collect();
    let h = crate::backend::OptimizerStep {
        adamw: Some(AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
            grad_scale: 1.0,
        }),
        lr: 1e-2,
        max_norm: 1.0,
        sumsq: None,
        first_tensor: 0,
    };
    let dp = host_p
        .iter()
        .map(|p| c.be.upload(p))
        .collect::<Result<_>>()?;
    let dg = host_g
        .iter()
        .map(|g| c.be.upload_f32(g))
        .collect::<Result<_>>()?;
    Ok(OptimCase {
        host_p,
        host_g,
        h,
        dp,
        dg,
    })
}

/// The CPU reference's update of host parameters and moments; the gradient norm.
fn cpu_optimizer_step(
    p: &mut [Vec<f32>],
    g: &[Vec<f32>],
    m: &mut [Vec<f32>],
    v: &mut [Vec<f32>],
    h: &crate::backend::OptimizerStep,
) -> Result<f64> {
    let mut p: Vec<&mut Vec<f32>> = p.iter_mut().collect();
    let g: Vec<&Vec<f32>> = g.iter().collect();
    let mut m: Vec<&mut Vec<f32>> = m.iter_mut().collect();
    let mut v: Vec<&mut Vec<f32>> = v.iter_mut().collect();
    cpu::CpuBackend.optimizer_step(&mut p, &g, Some((&mut m, &mut v)), h)
}

/// The whole optimizer update (norm, clipping, AdamW) over several tensors against the CPU
/// reference's, with the clipping active; then a NaN gradient must leave the weights alone.
fn check_optimizer_step<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let sizes = [3usize, 16384, 40000, 7];
    let OptimCase {
        mut host_p,
        host_g,
        h,
        mut dp,
        dg,
    } = optim_case(c, &sizes, 1)?;
    let mut dm: Vec<B::Buf> = sizes
        .iter()
        .map(|&n| c.be.alloc_f32(n))
        .collect::<Result<_>>()?;
    let mut dv: Vec<B::Buf> = sizes
        .iter()
        .map(|&n| c.be.alloc_f32(n))
        .collect::<Result<_>>()?;
    let norm = {
        let mut p: Vec<&mut B::Buf> = dp.iter_mut().collect();
        let g: Vec<&B::Buf> = dg.iter().collect();
        let mut m: Vec<&mut B::Buf> = dm.iter_mut().collect();
        let mut v: Vec<&mut B::Buf> = dv.iter_mut().collect();
        c.be.optimizer_step(&mut p, &g, Some((&mut m, &mut v)), &h)?
    };
    let mut hm: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut hv = hm.clone();
    let want_norm = cpu_optimizer_step(&mut host_p, &host_g, &mut hm, &mut hv, &h)?;
    let shape = format!(
        "{} tensors, {} values, clipped",
        sizes.len(),
        sizes.iter().sum::<usize>()
    );
    c.push(CheckRow {
        op: "optimizer_step grad norm".into(),
        shape: shape.clone(),
        err: (norm - want_norm).abs() / want_norm,
        tol: c.tol.f32_out,
    });
    let cat = |v: &[Vec<f32>]| -> Vec<f32> { v.concat() };
    let mut got = Vec::new();
    for b in &dp {
        got.extend(c.be.download(b)?);
    }
    // bf16 parameters are written with stochastic rounding: within one bf16 step of the f32 value.
    c.push(CheckRow {
        op: "optimizer_step AdamW params".into(),
        shape: shape.clone(),
        err: max_rel_err(&got, &cat(&host_p)),
        tol: c.tol.bf16_out,
    });
    let mut got = Vec::new();
    for b in &dv {
        got.extend(c.be.download(b)?);
    }
    c.push(CheckRow {
        op: "optimizer_step AdamW v".into(),
        shape: shape.clone(),
        err: max_rel_err(&got, &cat(&hv)),
        tol: c.tol.f32_out,
    });

    // A NaN anywhere in the gradient: the norm says so and no weight moves.
    let before: Vec<f32> = c.be.download(&dp[1])?;
    let mut bad = host_g[1].clone();
    bad[123] = f32::NAN;
    let dg_bad: Vec<B::Buf> = vec![c.be.upload_f32(&host_g[0])?, c.be.upload_f32(&bad)?];
    let norm = {
        let mut p: Vec<&mut B::Buf> = dp.iter_mut().take(2).collect();
        let g: Vec<&B::Buf> = dg_bad.iter().collect();
        let mut m: Vec<&mut B::Buf> = dm.iter_mut().take(2).collect();
        let mut v: Vec<&mut B::Buf> = dv.iter_mut().take(2).collect();
        c.be.optimizer_step(&mut p, &g, Some((&mut m, &mut v)), &h)?
    };
    let after = c.be.download(&dp[1])?;
    c.push(CheckRow {
        op: "optimizer_step NaN grad: norm NaN, weights kept".into(),
        shape: "2 tensors".into(),
        err: if norm.is_finite() {
            f64::INFINITY
        } else {
            max_rel_err(&after, &before)
        },
        tol: 0.0,
    });
    Ok(())
}

/// AdamW with the moments in host memory (`--offload-optimizer`): copied up, updated and copied
/// back a group at a time, each group clipped by the whole gradient's norm. Against the CPU
/// reference's one update of every tensor with its moments on the device, from moments that are
/// not zero, so that a group copied up from the wrong place or never copied back shows.
fn check_optimizer_offloaded<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    use crate::optim::{offloaded_step, update_groups};
    let sizes = [40000usize, 3, 16384, 7, 25000];
    let groups = update_groups(&sizes);
    let OptimCase {
        mut host_p,
        host_g,
        h,
        mut dp,
        dg,
    } = optim_case(c, &sizes, 3)?;
    let mut hm: Vec<Vec<f32>> = sizes.iter().map(|&n| c.rnd(n, 0.1)).collect();
    let mut hv: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| c.rnd(n, 0.1).iter().map(|x| x * x).collect())
        .collect();
    let to_host = |values: &[Vec<f32>]| -> Result<Vec<B::Host>> {
        values
            .iter()
            .map(|x| {
                let mut h = c.be.alloc_host(x.len())?;
                c.be.set_host_values(&mut h, x)?;
                Ok(h)
            })
            .collect()
    };
    let (mut om, mut ov) = (to_host(&hm)?, to_host(&hv)?);
    let norm = {
        let mut p: Vec<&mut B::Buf> = dp.iter_mut().collect();
        let g: Vec<&B::Buf> = dg.iter().collect();
        offloaded_step(c.be, &mut p, &g, (&mut om, &mut ov), &groups, &h)?
    };
    // The same step with the moments kept on the device, from the same values, as one launch.
    let mut kept_p: Vec<B::Buf> = host_p
        .iter()
        .map(|p| c.be.upload(p))
        .collect::<Result<_>>()?;
    let upload_f32 =
        |x: &[Vec<f32>]| -> Result<Vec<B::Buf>> { x.iter().map(|x| c.be.upload_f32(x)).collect() };
    let (mut kept_m, mut kept_v) = (upload_f32(&hm)?, upload_f32(&hv)?);
    {
        let mut p: Vec<&mut B::Buf> = kept_p.iter_mut().collect();
        let g: Vec<&B::Buf> = dg.iter().collect();
        let mut m: Vec<&mut B::Buf> = kept_m.iter_mut().collect();
        let mut v: Vec<&mut B::Buf> = kept_v.iter_mut().collect();
        c.be.optimizer_step(&mut p, &g, Some((&mut m, &mut v)), &h)?;
    }
    let want_norm = cpu_optimizer_step(&mut host_p, &host_g, &mut hm, &mut hv, &h)?;
    let shape = format!(
        "{} tensors in {} groups, clipped",
        sizes.len(),
        groups.len()
    );
    // Bit for bit: the stochastic rounding keys on each tensor's place in the model, which the
    // grouped launches are told, so splitting the update changes no bit.
    let mut differ = 0;
    for (a, b) in dp.iter().zip(&kept_p) {
        let (a, b) = (c.be.download(a)?, c.be.download(b)?);
        differ += a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
    }
    c.push(CheckRow {
        op: "optimizer_step offloaded = one launch: params differing".into(),
        shape: shape.clone(),
        err: differ as f64,
        tol: 0.0,
    });
    c.push(CheckRow {
        op: "optimizer_step offloaded moments: grad norm".into(),
        shape: shape.clone(),
        err: (norm - want_norm).abs() / want_norm,
        tol: c.tol.f32_out,
    });
    let mut got = Vec::new();
    for b in &dp {
        got.extend(c.be.download(b)?);
    }
    c.push(CheckRow {
        op: "optimizer_step offloaded moments: params".into(),
        shape: shape.clone(),
        err: max_rel_err(&got, &host_p.concat()),
        tol: c.tol.bf16_out,
    });
    for (what, got, want) in [("m", &om, &hm), ("v", &ov, &hv)] {
        let mut all = Vec::new();
        for x in got {
            all.extend(c.be.host_values(x)?);
        }
        c.push(CheckRow {
            op: format!("optimizer_step offloaded moments: {what}"),
            shape: shape.clone(),
            err: max_rel_err(&all, &want.concat()),
            tol: c.tol.f32_out,
        });
    }
    Ok(())
}

/// AdamW with moments in the backend's storage type (bf16 on the GPU, written with stochastic
/// rounding) over three steps against the CPU's f32 moments and weights, element by element
/// against what that rounding may cost (`sr_error_in_bounds`). Then the rounding's bias: 65536
/// elements with the same update, whose exact first moment lies halfway between two bf16 values,
/// must average to it; round-to-nearest would be off by half a bf16 step (0.4% here).
fn check_optimizer_bf16_moments<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    use crate::backend::OptimizerStep;
    let sizes = [5usize, 40000];
    let cpu_be = cpu::CpuBackend;
    let h = |step: u64, max_norm: f32, weight_decay: f32| OptimizerStep {
        adamw: Some(AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            step,
            grad_scale: 1.0,
        }),
        lr: 1e-2,
        max_norm,
        sumsq: None,
        first_tensor: 0,
    };
    let mut host_p: Vec<Vec<f32>> = sizes.iter().map(|&n| c.rnd(n, 1.0)).collect();
    let mut dp: Vec<B::Buf> = host_p
        .iter()
        .map(|p| c.be.upload(p))
        .collect::<Result<_>>()?;
    let mut dm: Vec<B::Buf> = sizes
        .iter()
        .map(|&n| c.be.alloc(n))
        .collect::<Result<_>>()?;
    let mut dv: Vec<B::Buf> = sizes
        .iter()
        .map(|&n| c.be.alloc(n))
        .collect::<Result<_>>()?;
    let mut hm: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut hv = hm.clone();
    // The largest magnitude each value of the reference passes through: a stochastic rounding
    // on the way errs by up to one bf16 spacing there.
    let p0: Vec<f32> = host_p.concat().iter().map(|x| x.abs()).collect();
    let n = p0.len();
    let mut reach = [p0, vec![0.0; n], vec![0.0; n]];
    let steps = 3;
    for step in 1..=steps {
        let g: Vec<Vec<f32>> = sizes.iter().map(|&n| c.rnd(n, 1.0)).collect();
        let dg: Vec<B::Buf> = g
            .iter()
            .map(|g| c.be.upload_f32(g))
            .collect::<Result<_>>()?;
        {
            let mut p: Vec<&mut B::Buf> = dp.iter_mut().collect();
            let g: Vec<&B::Buf> = dg.iter().collect();
            let mut m: Vec<&mut B::Buf> = dm.iter_mut().collect();
            let mut v: Vec<&mut B::Buf> = dv.iter_mut().collect();
            c.be.optimizer_step(&mut p, &g, Some((&mut m, &mut v)), &h(step, 1.0, 0.1))?;
        }
        let mut p: Vec<&mut Vec<f32>> = host_p.iter_mut().collect();
        let g: Vec<&Vec<f32>> = g.iter().collect();
        let mut m: Vec<&mut Vec<f32>> = hm.iter_mut().collect();
        let mut v: Vec<&mut Vec<f32>> = hv.iter_mut().collect();
        cpu_be.optimizer_step(&mut p, &g, Some((&mut m, &mut v)), &h(step, 1.0, 0.1))?;
        for (r, now) in reach.iter_mut().zip([&host_p, &hm, &hv]) {
            for (r, x) in r.iter_mut().zip(now.iter().flatten()) {
                *r = r.max(x.abs());
            }
        }
    }
    let shape = format!(
        "{} tensors, {} values, {steps} steps; error / its bound",
        sizes.len(),
        sizes.iter().sum::<usize>()
    );
    let lr = 1e-2;
    // Weights: a rounding per step and the upload's round to nearest; and the moments' own
    // roundings move each update by a few percent of lr at most (the bound allows 10%).
    // Moments: a rounding per step, each carried forward scaled by beta < 1.
    let allowances = [
        (steps as f64 + 0.5, 0.1 * lr * steps as f64),
        (steps as f64, 0.0),
        (steps as f64, 0.0),
    ];
    for ((what, bufs, want), (reach, (roundings, slack))) in
        [("params", &dp, &host_p), ("m", &dm, &hm), ("v", &dv, &hv)]
            .into_iter()
            .zip(reach.iter().zip(allowances))
    {
        let mut got = Vec::new();
        for b in bufs {
            got.extend(c.be.download(b)?);
        }
        c.push(CheckRow {
            op: format!("optimizer_step AdamW, backend-type moments: {what}"),
            shape: shape.clone(),
            err: sr_error_in_bounds(&got, &want.concat(), reach, roundings, slack),
            tol: 1.0,
        });
    }

    // 0.1·g = 2^-5 + 2.5·2^-12: halfway between the bf16 values 2^-5 + 2·2^-12 and + 3·2^-12.
    let n = 65536;
    let g0 = (2f32.powi(-5) + 2.5 * 2f32.powi(-12)) / 0.1;
    let mut p = c.be.upload(&vec![0.0; n])?;
    let g = c.be.upload_f32(&vec![g0; n])?;
    let (mut m, mut v) = (c.be.alloc(n)?, c.be.alloc(n)?);
    c.be.optimizer_step(
        &mut [&mut p],
        &[&g],
        Some((&mut [&mut m], &mut [&mut v])),
        &h(1, 0.0, 0.0),
    )?;
    let (mut hp, mut hm1, mut hv1) = (vec![0.0f32], vec![0.0f32], vec![0.0f32]);
    cpu_be.optimizer_step(
        &mut [&mut hp],
        &[&vec![g0]],
        Some((&mut [&mut hm1], &mut [&mut hv1])),
        &h(1, 0.0, 0.0),
    )?;
    let mean = |b: &B::Buf| -> Result<f64> {
        Ok(c.be.download(b)?.iter().map(|&x| x as f64).sum::<f64>() / n as f64)
    };
    let got = mean(&m)?;
    c.push(CheckRow {
        op: "AdamW backend-type moments: mean of m (unbiased rounding)".into(),
        shape: format!("{n} values, m halfway between bf16 steps"),
        err: (got - hm1[0] as f64).abs() / hm1[0] as f64,
        tol: 1e-3,
    });
    Ok(())
}

/// The largest of |got − want| / bound over the elements, with bound = `roundings` bf16
/// spacings at the element's largest magnitude on the way (`reach`, widened by one spacing for a
/// rounding that carried it past a power of two) plus `slack`: at most 1 when the difference is
/// no more than that many roundings to bf16 and the slack. NaN on a NaN.
pub fn sr_error_in_bounds(
    got: &[f32],
    want: &[f32],
    reach: &[f32],
    roundings: f64,
    slack: f64,
) -> f64 {
    if got.len() != want.len() || got.len() != reach.len() {
        return f64::INFINITY;
    }
    let spacing = |x: f64| {
        let x = x.max(f64::from(f32::MIN_POSITIVE));
        2f64.powi(x.log2().floor() as i32 - 7)
    };
    let mut worst = 0.0f64;
    for ((&g, &w), &r) in got.iter().zip(want).zip(reach) {
        let d = (g as f64 - w as f64).abs();
        if d.is_nan() {
            return f64::NAN;
        }
        let r = r as f64 * (1.0 + 2f64.powi(-7));
        worst = worst.max(d / (roundings * spacing(r) + slack + 1e-6 * r));
    }
    worst
}

/// z-score of Pearson's χ² through the Wilson–Hilferty cube-root approximation: about
/// standard normal when the draws follow the expected distribution.
pub fn chi_square_z(counts: &[u64], probs: &[f64], draws: u64) -> f64 {
    // Bins with an expected count under 5 are pooled, as the test requires.
    let (mut chi, mut df, mut pool_o, mut pool_e) = (0.0, 0usize, 0.0, 0.0);
    for (&o, &p) in counts.iter().zip(probs) {
        let e = p * draws as f64;
        if e < 5.0 {
            pool_o += o as f64;
            pool_e += e;
        } else {
            chi += (o as f64 - e).powi(2) / e;
            df += 1;
        }
    }
    if pool_e > 0.0 {
        chi += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        df += 1;
    }
    let df = (df.max(2) - 1) as f64;
    let k = 2.0 / (9.0 * df);
    ((chi / df).powf(1.0 / 3.0) - (1.0 - k)) / k.sqrt()
}

/// Sampling on the backend against the CPU's truncated distribution: many draws from one row
/// (the row repeated, each copy with its own key), a χ² test per setting; greedy must equal the
/// argmax exactly, and untruncated draws must be the CPU's own draws for the same keys.
fn check_sampling<B: Backend>(c: &mut Ctx<B>, vocab: usize) -> Result<()> {
    use crate::sampling::{argmax, sample, truncated_distribution, DrawKey, SamplingParams};
    // A peaked row, so that top-k and top-p cut inside the mass.
    let row: Vec<f32> = c
        .rnd(vocab, 1.0)
        .iter()
        .enumerate()
        .map(|(i, x)| x * 4.0 - (i % 97) as f32 * 0.05)
        .collect();
    let row = round_bf16(&row);
    let rows = 2048;
    let logits = c.be.upload(&row.repeat(rows))?;
    // Every row's key differs in seed, sequence and step, as rows of different groups at
    // different points of their completions do in one batched decode step.
    let seed = c.seed;
    let keys = move |round: u64| -> Vec<DrawKey> {
        (0..rows as u64)
            .map(|r| DrawKey {
                seed: seed.wrapping_add(r % 3),
                sequence: r / 3,
                step: round * 5 + r % 5,
            })
            .collect()
    };
    let greedy =
        c.be.sample(&logits, rows, vocab, &SamplingParams::greedy(), &keys(0))?;
    let best = argmax(&row);
    c.push(CheckRow {
        op: "sample greedy (mismatches)".into(),
        shape: format!("[{rows}, {vocab}]"),
        err: greedy.iter().filter(|&&t| t != best).count() as f64,
        tol: 0.0,
    });
    let settings = [(0.7, 0, 1.0), (1.0, 50, 1.0), (0.8, 0, 0.9), (1.0, 40, 0.8)];
    for (t, k, p) in settings {
        let sp = SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
        };
        let dist = truncated_distribution(&row, &sp);
        let mut probs = vec![0.0f64; vocab];
        for (tok, q) in dist {
            probs[tok as usize] = q;
        }
        let mut counts = vec![0u64; vocab];
        let steps = 10u64;
        for step in 0..steps {
            for tok in c.be.sample(&logits, rows, vocab, &sp, &keys(step))? {
                counts[tok as usize] += 1;
            }
        }
        let outside = counts
            .iter()
            .zip(&probs)
            .filter(|(&n, &q)| n > 0 && q == 0.0)
            .count();
        let z = chi_square_z(&counts, &probs, rows as u64 * steps);
        c.push(CheckRow {
            op: format!("sample χ² z-score (T {t}, top-k {k}, top-p {p})"),
            shape: format!("{} draws, vocab {vocab}", rows as u64 * steps),
            // A token the truncation removed must never be drawn.
            err: if outside > 0 { f64::INFINITY } else { z },
            tol: 4.0,
        });
    }
    // Without truncation the GPU walks the tokens in the CPU's order, so a key draws the CPU's
    // token but where the uniform falls within rounding of a token's edge: a row reading
    // another row's key would miss nearly always.
    let sp = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let ks = keys(3);
    let got = c.be.sample(&logits, rows, vocab, &sp, &ks)?;
    let differ = got
        .iter()
        .zip(&ks)
        .filter(|(&t, k)| t != sample(&row, &sp, k.uniform()))
        .count();
    c.push(CheckRow {
        op: "sample per-row keys vs CPU draws (mismatches)".into(),
        shape: format!("[{rows}, {vocab}] T 1"),
        err: differ as f64,
        tol: (rows / 100) as f64,
    });
    Ok(())
}

/// The GPU policy loss (cuda/policy_loss.cu) against `rl::policy_loss` for GRPO and GSPO,
/// every aggregation, with and without the dual clip.
pub fn check_policy_loss_cuda(
    be: &crate::backend::cuda::CudaBackend,
    seed: u64,
    tol: &Tolerances,
) -> Result<Vec<CheckRow>> {
    use crate::rl::{policy_loss, ClipConfig, LossAgg, PolicyLoss, SeqSpan};
    let lens = [5usize, 1, 37, 300, 12];
    let n: usize = lens.iter().sum();
    let logp: Vec<f32> = rand_vec(n, seed, 1, 1.0).iter().map(|x| x - 2.0).collect();
    // Old log-probs near the new ones, some far enough that the clip is active.
    let old: Vec<f32> = logp
        .iter()
        .zip(rand_vec(n, seed, 2, 0.4))
        .map(|(l, d)| l + d)
        .collect();
    let mut spans = Vec::new();
    let mut start = 0;
    for (i, &len) in lens.iter().enumerate() {
        spans.push(SeqSpan {
            start,
            len,
            advantage: if i % 2 == 0 { 0.8 } else { -1.1 },
        });
        start += len;
    }
    let mut rows = Vec::new();
    for kind in [PolicyLoss::Grpo, PolicyLoss::Gspo] {
        for agg in [
            LossAgg::TokenMean,
            LossAgg::SeqMeanTokenMean,
            LossAgg::SeqMeanTokenSum,
        ] {
            for dual_clip in [None, Some(3.0)] {
                let c = ClipConfig {
                    kind,
                    eps_low: 0.2,
                    eps_high: 0.28,
                    dual_clip,
                    agg,
                };
                let (ws, wd) = policy_loss(&logp, &old, &spans, &c, n, lens.len());
                let (gs, gd) = crate::backend::cuda_rl::policy_loss(
                    be,
                    &logp,
                    &old,
                    &spans,
                    &c,
                    n,
                    lens.len(),
                )?;
                let stats_err = max_rel_err(
                    &[gs.loss as f32, gs.clip_fraction as f32, gs.approx_kl as f32],
                    &[ws.loss as f32, ws.clip_fraction as f32, ws.approx_kl as f32],
                );
                let row = CheckRow {
                    op: format!("policy loss {kind:?} {agg:?} dual {dual_clip:?}: loss, clipfrac, kl, dlogp"),
                    shape: format!("{} seqs, {n} tokens", lens.len()),
                    err: stats_err.max(max_rel_err(&gd, &wd)),
                    tol: tol.f32_out,
                };
                announce(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// Every GPU check, against the CPU reference with bf16 tolerances. The wgmma probe and the
/// attention kernel sets that are not the default go last: a fault there loses the device, and
/// every part after it could only fail.
/// Parts and checks named in `skip` are failed rows, not run: `tools/gpu-run.sh` runs the checks
/// again without the one that lost the device.
pub fn run_cuda(
    be: &crate::backend::cuda::CudaBackend,
    seed: u64,
    big: bool,
    skip: &[String],
) -> Vec<CheckRow> {
    let tol = Tolerances::bf16();
    let mut parts = Parts::new(be, skip);
    parts.run("ops", || run_all(be, seed, &tol, big, skip));
    parts.run("policy loss", || check_policy_loss_cuda(be, seed, &tol));
    parts.run("pdl", || check_pdl_cuda(be, seed, &tol));
    parts.run("wgmma probe", || check_wgmma_probe_cuda(be, seed));
    parts.run("attention variants", || {
        run_alternates(be, seed, &tol, big, skip)
    });
    parts.rows
}

/// The wgmma layout probe on an H100 (`cuda_attention::wgmma_probe`): each wgmma form of the
/// attention kernels alone, on integers in [-3, 3], whose products are exact in fp32, so D must
/// equal the plain product bit for bit. Where the attention rows fail, these rows say which PTX
/// layout the hardware reads differently from the kernels and the emulator, and a failing form
/// prints where its wrong cells lie. Empty without wgmma.
pub fn check_wgmma_probe_cuda(
    be: &crate::backend::cuda::CudaBackend,
    seed: u64,
) -> Result<Vec<CheckRow>> {
    use crate::backend::cuda_attention::{wgmma_probe, WGMMA_FORMS};
    let mut rows = Vec::new();
    if !be.has_wgmma() {
        return Ok(rows);
    }
    for (f, &(name, [m, k, n], at, bt)) in WGMMA_FORMS.iter().enumerate() {
        let ints = |len: usize, stream: u64| -> Vec<f32> {
            rand_vec(len, seed, 900 + stream, 3.5)
                .iter()
                .map(|x| x.round().clamp(-3.0, 3.0))
                .collect()
        };
        let (a, b) = (ints(m * k, 2 * f as u64), ints(k * n, 2 * f as u64 + 1));
        let got = wgmma_probe(be, f, &a, &b)?;
        let want = plain_product(&a, &b, [m, k, n], at, bt);
        let err = max_rel_err(&got, &want);
        if !(err == 0.0) {
            println!("{}", probe_mismatches(name, &got, &want, n));
            let run = |a: &[f32], b: &[f32]| wgmma_probe(be, f, a, b);
            println!("{}", probe_decode(&run, [m, k, n], at, bt)?);
        }
        let row = CheckRow {
            op: format!("wgmma probe {f}: {name}"),
            shape: format!("[{m}, {k}] x [{k}, {n}], exact"),
            err,
            tol: 0.0,
        };
        announce(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// D of one probe form from A and B as stored.
pub type ProbeRun<'a> = dyn Fn(&[f32], &[f32]) -> Result<Vec<f32>> + 'a;

/// Which row of A and which column of B the hardware paired with each row and column of D, for
/// a form whose product came out wrong: A coded by row (every value of row i is i + 1) times a B
/// of ones gives D[i][j] = k (r + 1), where r is the row of A that D's row i read; a matrix of
/// ones times B coded by column gives the column likewise. Both right, yet the product wrong:
/// then A and B disagree on the order of k. `run` computes D from A and B as stored.
pub fn probe_decode(run: &ProbeRun, [m, k, n]: [usize; 3], at: bool, bt: bool) -> Result<String> {
    // A logical rows × cols matrix of value(r, c), stored transposed or not.
    let fill = |rows: usize, cols: usize, transposed: bool, value: &dyn Fn(usize, usize) -> f32| {
        let mut v = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                v[if transposed {
                    c * rows + r
                } else {
                    r * cols + c
                }] = value(r, c);
            }
        }
        v
    };
    let d_rows = run(
        &fill(m, k, at, &|r, _| (r + 1) as f32),
        &fill(k, n, bt, &|_, _| 1.0),
    )?;
    let d_cols = run(
        &fill(m, k, at, &|_, _| 1.0),
        &fill(k, n, bt, &|_, c| (c + 1) as f32),
    )?;
    // The code a cell of D carries; -1 where it is not a whole multiple of k (NaN, a mix).
    let decode = |x: f32| {
        let q = x / k as f32;
        if q.is_finite() && q == q.round() {
            q as i64 - 1
        } else {
            -1
        }
    };
    let row_of: Vec<i64> = (0..m).map(|i| decode(d_rows[i * n])).collect();
    let col_of: Vec<i64> = (0..n).map(|j| decode(d_cols[j])).collect();
    let off = |v: &[i64]| {
        v.iter()
            .enumerate()
            .filter(|&(i, &r)| r != i as i64)
            .count()
    };
    let (bad_r, bad_c) = (off(&row_of), off(&col_of));
    let show = |v: &[i64]| format!("{:?}", &v[..v.len().min(16)]);
    Ok(format!(
        "  decode: {bad_r} of {m} rows of D read another row of A (D row -> A row, first 16: {}); {bad_c} of {n} columns read another column of B (first 16: {}){}",
        show(&row_of),
        show(&col_of),
        if bad_r == 0 && bad_c == 0 {
            "; both right, so A and B disagree on the order of k"
        } else {
            ""
        }
    ))
}

/// D (m × n) = A B, with A stored [k][m] where `at` (else [m][k]) and B stored [n][k] where `bt`
/// (else [k][n]).
pub fn plain_product(a: &[f32], b: &[f32], [m, k, n]: [usize; 3], at: bool, bt: bool) -> Vec<f32> {
    let mut d = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            d[i * n + j] = (0..k)
                .map(|kk| {
                    let x = if at { a[kk * m + i] } else { a[i * k + kk] };
                    let y = if bt { b[j * k + kk] } else { b[kk * n + j] };
                    x * y
                })
                .sum();
        }
    }
    d
}

/// Where a probe's wrong cells lie: how many, how many per row mod 8 (the 128-byte swizzle's
/// period) and per 8-column block (one core matrix), and the first few.
fn probe_mismatches(name: &str, got: &[f32], want: &[f32], n: usize) -> String {
    let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
    let mut by_row8 = [0usize; 8];
    let mut by_colblk = vec![0usize; n.div_ceil(8)];
    for &i in &bad {
        by_row8[(i / n) % 8] += 1;
        by_colblk[(i % n) / 8] += 1;
    }
    let first: Vec<String> = bad
        .iter()
        .take(6)
        .map(|&i| format!("({}, {}) {} for {}", i / n, i % n, got[i], want[i]))
        .collect();
    format!(
        "wgmma probe {name}: {} of {} cells wrong; by row mod 8 {by_row8:?}; by 8-column block {by_colblk:?}; first: {}",
        bad.len(),
        want.len(),
        first.join(", ")
    )
}

/// The kernels that allow programmatic dependent launch, again with it the other way
/// (`CudaBackend::with_other_pdl`, sm_90 and later), as "<op> (no pdl)" rows ("(pdl)" under
/// `EMPO_PDL=0`): the elementwise, RMSNorm
/// and RoPE checks, and the model checks, whose forward and backward chain those kernels
/// directly after one another and after cuBLAS, where a missing wait would read a result
/// before it is written. Empty before sm_90.
pub fn check_pdl_cuda(
    be: &crate::backend::cuda::CudaBackend,
    seed: u64,
    tol: &Tolerances,
) -> Result<Vec<CheckRow>> {
    let mut c = Ctx::new(be, seed ^ 0x9d1, tol, &[]);
    let run = |c: &mut Ctx<crate::backend::cuda::CudaBackend>| -> Result<()> {
        for (rows, dim) in [(64, 3584), (4096, 3584)] {
            check_elementwise(c, rows, dim)?;
            check_rmsnorm(c, rows, dim)?;
        }
        check_rope(c, 2, 2048, 28, 128, Starts::Same(5))?;
        for cfg in model_configs() {
            check_model(c, &cfg)?;
        }
        Ok(())
    };
    let label = match be.with_other_pdl(|| run(&mut c)) {
        None => return Ok(Vec::new()),
        Some((r, label)) => {
            r?;
            label
        }
    };
    Ok(c.rows
        .into_iter()
        .map(|mut r| {
            r.op += label;
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// Three roundings' worth of error passes wherever it lands; an update off by half of lr
    /// (dropping AdamW's bias correction costs 0.55 lr at step 1) fails on the small weights,
    /// where a bf16 spacing is far below lr, though the large ones hide it.
    #[test]
    fn rounding_bound_passes_roundings_and_fails_a_wrong_update() {
        let want: Vec<f32> = (0..1000).map(|i| (i as f32 - 499.5) / 400.0).collect();
        let reach: Vec<f32> = want.iter().map(|w| w.abs()).collect();
        let spacing = |x: f32| 2f32.powi(x.abs().max(1e-30).log2().floor() as i32 - 7);
        let rounded: Vec<f32> = want.iter().map(|&w| w + 2.9 * spacing(w)).collect();
        let e = sr_error_in_bounds(&rounded, &want, &reach, 3.0, 0.0);
        assert!(e > 0.9 && e <= 1.0, "{e}");
        let lr = 1e-2f32;
        let wrong: Vec<f32> = want.iter().map(|&w| w + lr / 2.0).collect();
        let e = sr_error_in_bounds(&wrong, &want, &reach, 3.5, 0.1 * lr as f64 * 3.0);
        assert!(e > 1.5, "{e}");
        let mut nan = want.clone();
        nan[7] = f32::NAN;
        assert!(sr_error_in_bounds(&nan, &want, &reach, 3.0, 0.0).is_nan());
    }

    /// A check that errors is one failed row naming it, and the checks after it still run.
    #[test]
    fn a_check_that_errors_fails_its_row_and_the_rest_still_run() {
        let tol = Tolerances::exact();
        let mut c = Ctx::new(&CpuBackend, 3, &tol, &[]);
        attempt(&mut c, "broken", |_| {
            anyhow::bail!("kernel x: launch failed")
        });
        attempt(&mut c, "rmsnorm", |c| check_rmsnorm(c, 3, 16));
        assert_eq!(c.rows[0].op, "broken: error");
        assert_eq!(c.rows[0].shape, "kernel x: launch failed");
        assert!(!c.rows[0].pass());
        assert!(c.rows.len() > 1 && c.rows[1..].iter().all(CheckRow::pass));
        let long = anyhow::anyhow!("é{}", "x".repeat(300));
        assert!(errored_row("y", &long).shape.len() <= 120);
    }

    /// Once a check loses the device, the checks after it are failed rows naming the one that
    /// lost it, without running; and so are the parts after it.
    #[test]
    fn after_the_device_is_lost_the_rest_are_failed_rows_that_say_so() {
        let tol = Tolerances::exact();
        let mut c = Ctx::new(&CpuBackend, 3, &tol, &[]);
        c.gate.probe = |_| true;
        attempt(&mut c, "rmsnorm", |c| check_rmsnorm(c, 3, 16));
        let healthy = c.rows.len();
        assert!(healthy > 0 && c.rows.iter().all(CheckRow::pass));
        attempt(&mut c, "faulty", |_| {
            anyhow::bail!("CUDA_ERROR_ILLEGAL_ADDRESS")
        });
        let mut ran = false;
        attempt(&mut c, "elementwise", |_| {
            ran = true;
            Ok(())
        });
        assert!(!ran);
        let after: Vec<(&str, &str)> = c.rows[healthy..]
            .iter()
            .map(|r| (r.op.as_str(), r.shape.as_str()))
            .collect();
        assert_eq!(
            after,
            [
                ("faulty: error", "CUDA_ERROR_ILLEGAL_ADDRESS"),
                ("elementwise: not run", "the device was lost after faulty"),
            ]
        );
        assert!(c.rows[healthy..].iter().all(|r| !r.pass()));

        // Parts: the check that lost the device is the part's last error, or the part itself.
        let mut parts = Parts::new(&CpuBackend, &[]);
        parts.run("policy loss", || anyhow::bail!("launch failed"));
        parts.run("ops", || Ok(vec![]));
        assert_eq!(parts.rows.len(), 1, "a healthy device runs every part");
        parts.gate.probe = |_| true;
        parts.run("ops", || Ok(c.rows.clone()));
        parts.run("wgmma probe", || {
            ran = true;
            Ok(vec![])
        });
        assert!(!ran);
        let last = parts.rows.last().unwrap();
        assert_eq!(last.op, "wgmma probe: not run");
        assert_eq!(last.shape, "the device was lost after faulty");
        let mut parts = Parts::new(&CpuBackend, &[]);
        parts.gate.probe = |_| true;
        parts.run("pdl", || Ok(vec![]));
        parts.run("attention variants", || Ok(vec![]));
        assert_eq!(parts.rows[0].shape, "the device was lost after pdl");
    }

    /// `--skip` leaves a check, or a whole part, out as a failed row, and runs the rest.
    #[test]
    fn skipped_checks_are_failed_rows_and_the_rest_still_run() {
        let tol = Tolerances::exact();
        let skip = ["rmsnorm".to_string(), "pdl".to_string()];
        let rows = run_all(&CpuBackend, 5, &tol, false, &skip).unwrap();
        let skipped: Vec<&CheckRow> = rows.iter().filter(|r| !r.pass()).collect();
        assert_eq!(skipped.len(), 2, "rmsnorm is attempted at two sizes");
        assert!(skipped
            .iter()
            .all(|r| r.op == "rmsnorm: skipped" && r.shape == "--skip rmsnorm"));
        assert!(!rows.iter().any(|r| r.op.starts_with("rmsnorm ")));
        assert!(rows.iter().any(|r| r.op.starts_with("swiglu")));
        let mut parts = Parts::new(&CpuBackend, &skip);
        let mut ran = false;
        parts.run("pdl", || {
            ran = true;
            Ok(vec![])
        });
        assert!(!ran);
        assert_eq!(parts.rows[0].op, "pdl: skipped");
    }
}
