//! Criterion throughput of the backend ops: the CUDA backend at Qwen2.5-7B shapes when a GPU
//! is present, otherwise the CPU reference at small shapes (it says which). Every sample ends
//! with a device sync, so GPU time is counted in full. `empo-engine bench` prints the same ops
//! with the fraction of the copy and GEMM ceilings measured in the same run.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use empo_engine::backend::cpu::CpuBackend;
use empo_engine::backend::{AttnShape, Backend, StatsLoss};
use empo_engine::kernel_bench::{rnd, BenchShapes};
use std::time::{Duration, Instant};

fn ops<B: Backend>(c: &mut Criterion, be: &B, s: &BenchShapes) {
    let (m, h, i, v) = (s.tokens, s.hidden, s.inter, s.vocab);
    let mut g = c.benchmark_group(be.name());
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let timed = |iters: u64, f: &mut dyn FnMut()| {
        be.sync().unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        be.sync().unwrap();
        t.elapsed()
    };

    // One [4096, 3584] operand is 29 MB and the H100's L2 holds 50 MB: as in `empo-engine
    // bench`, the call cycles through copies of its operands, 512 MB in all, so HBM is timed.
    let sets = ((512usize << 20) / (m * h * 2 * 2)).clamp(1, 16);
    let xs: Vec<_> = (0..sets)
        .map(|_| be.upload(&rnd(m * h, 0.5)).unwrap())
        .collect();
    let x = &xs[0];
    let w = be.upload(&rnd(h, 1.0)).unwrap();
    let mut outs: Vec<_> = (0..sets).map(|_| be.alloc(m * h).unwrap()).collect();
    let mut rstd = be.alloc_f32(m).unwrap();
    let mut k = 0;
    g.throughput(Throughput::Bytes((2 * m * h * 2) as u64));
    g.bench_function(format!("rmsnorm [{m}, {h}]"), |b| {
        b.iter_custom(|n| {
            timed(n, &mut || {
                k = (k + 1) % sets;
                be.rmsnorm(&mut outs[k], &mut rstd, &xs[k], &w, m, h, 1e-6)
            })
        })
    });

    let (gate, up) = (
        be.upload(&rnd(m * i, 0.5)).unwrap(),
        be.upload(&rnd(m * i, 0.5)).unwrap(),
    );
    let mut hh = be.alloc(m * i).unwrap();
    g.throughput(Throughput::Bytes((3 * m * i * 2) as u64));
    g.bench_function(format!("swiglu [{m}, {i}]"), |b| {
        b.iter_custom(|n| timed(n, &mut || be.swiglu(&mut hh, &gate, &up)))
    });

    let wt = be.upload(&rnd(i * h, 0.01)).unwrap();
    let mut o = be.alloc(m * i).unwrap();
    g.throughput(Throughput::Elements((2 * m * h * i) as u64));
    g.bench_function(
        format!("matmul [{m}, {h}] x [{i}, {h}]ᵀ (elements = flops)"),
        |b| b.iter_custom(|n| timed(n, &mut || be.matmul(&mut o, x, &wt, None, m, h, i))),
    );

    let rows = (m / 4).max(1);
    let logits = be.upload(&rnd(rows * v, 4.0)).unwrap();
    let targets: Vec<u32> = (0..rows as u32).collect();
    let mut dl = be.alloc(rows * v).unwrap();
    let mut stats = be.alloc_f32(3 * rows).unwrap();
    let (ca, cb) = (vec![1.0; rows], vec![1.0; rows]);
    g.throughput(Throughput::Bytes((rows * v * 2) as u64));
    g.bench_function(format!("softmax-entropy fwd [{rows}, {v}]"), |b| {
        b.iter_custom(|n| {
            timed(n, &mut || {
                be.softmax_stats_into(&mut stats, &logits, rows, v, &targets, 0.7)
                    .unwrap();
            })
        })
    });
    g.throughput(Throughput::Bytes((2 * rows * v * 2) as u64));
    g.bench_function(format!("softmax-entropy bwd [{rows}, {v}]"), |b| {
        b.iter_custom(|n| {
            timed(n, &mut || {
                be.softmax_stats_bwd_saved(
                    &mut dl,
                    &logits,
                    &stats,
                    rows,
                    v,
                    &StatsLoss {
                        targets: &targets,
                        temperature: 0.7,
                        a: &ca,
                        b: &cb,
                    },
                )
            })
        })
    });

    let t = *s.seqs.last().unwrap();
    let sh = AttnShape {
        batch: 1,
        tq: t,
        tk: t,
        cap: t,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
    };
    let (nq, nkv) = (t * s.heads * s.head_dim, t * s.kv_heads * s.head_dim);
    let q = be.upload(&rnd(nq, 1.0)).unwrap();
    let (k, vv) = (
        be.upload(&rnd(nkv, 1.0)).unwrap(),
        be.upload(&rnd(nkv, 1.0)).unwrap(),
    );
    let (mut ao, mut lse) = (be.alloc(nq).unwrap(), be.alloc_f32(t * s.heads).unwrap());
    let flops = 2 * t * t * s.head_dim * s.heads;
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function(
        format!("attention fwd causal t {t} (elements = flops)"),
        |b| b.iter_custom(|n| timed(n, &mut || be.attention(&mut ao, &mut lse, &q, &k, &vv, sh))),
    );
    let (mut dq, mut dk, mut dv) = (
        be.alloc(nq).unwrap(),
        be.alloc(nkv).unwrap(),
        be.alloc(nkv).unwrap(),
    );
    g.throughput(Throughput::Elements((flops as f64 * 2.5) as u64));
    g.bench_function(
        format!("attention bwd causal t {t} (elements = flops)"),
        |b| {
            b.iter_custom(|n| {
                timed(n, &mut || {
                    be.attention_bwd(&mut dq, &mut dk, &mut dv, &ao, &ao, &lse, &q, &k, &vv, sh)
                })
            })
        },
    );
    g.finish();
}

fn kernels(c: &mut Criterion) {
    match empo_engine::device::open_cuda() {
        Ok(be) => ops(c, &be, &BenchShapes::qwen_7b()),
        Err(e) => {
            eprintln!("no GPU ({e:#}): benchmarking the CPU reference at small shapes instead");
            ops(c, &CpuBackend, &BenchShapes::small());
        }
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
