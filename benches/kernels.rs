//! Criterion throughput of the backend ops: the CUDA backend at Qwen2.5-7B shapes when a GPU
//! is present, otherwise the CPU reference at small shapes (it says which). Every sample ends
//! with a device sync, so GPU time is counted in full. The run also times the two ceilings (a
//! large device copy and a large bf16 GEMM) and ends with a table of each op's mean rate as a
//! fraction of the matching ceiling; `empo-engine bench` prints more ops the same way.

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use empo_engine::backend::cpu::CpuBackend;
use empo_engine::backend::{AttnShape, Backend, Starts, StatsLoss};
use empo_engine::kernel_bench::{gather_ids, rnd, BenchShapes};
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// What one call of an op does: bytes moved (bf16 on the GPU) or floating-point operations.
#[derive(Clone, Copy)]
enum Work {
    Bytes(u64),
    Flops(u64),
}

/// Every timed call of one benchmark, warm-up included: its mean is what the closing table shows.
struct Spent {
    name: String,
    work: Work,
    time: Duration,
    calls: u64,
}

/// A criterion group that also keeps each benchmark's total time and calls.
struct Group<'a, 'c, B: Backend> {
    g: BenchmarkGroup<'c, WallTime>,
    be: &'a B,
    spent: &'a RefCell<Vec<Spent>>,
}

impl<B: Backend> Group<'_, '_, B> {
    fn bench(&mut self, name: String, work: Work, f: &mut dyn FnMut()) {
        let (be, spent) = (self.be, self.spent);
        let i = spent.borrow().len();
        spent.borrow_mut().push(Spent {
            name: name.clone(),
            work,
            time: Duration::ZERO,
            calls: 0,
        });
        self.g.throughput(match work {
            Work::Bytes(b) => Throughput::Bytes(b),
            Work::Flops(n) => Throughput::Elements(n),
        });
        let label = match work {
            Work::Bytes(_) => name,
            Work::Flops(_) => format!("{name} (elements = flops)"),
        };
        self.g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                be.sync().unwrap();
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                be.sync().unwrap();
                let took = t.elapsed();
                let mut sp = spent.borrow_mut();
                sp[i].time += took;
                sp[i].calls += iters;
                took
            })
        });
    }
}

/// Each op's mean rate and its fraction of the ceiling of its kind, both timed in this run.
fn ratio_table(spent: &[Spent]) {
    let rate = |s: &Spent| {
        let per = s.time.as_secs_f64() / s.calls.max(1) as f64;
        match s.work {
            Work::Bytes(b) => b as f64 / per / 1e9,
            Work::Flops(n) => n as f64 / per / 1e12,
        }
    };
    let find = |prefix: &str| spent.iter().find(|s| s.name.starts_with(prefix)).map(rate);
    let (copy, gemm) = (find("ceiling: copy"), find("ceiling: GEMM"));
    println!("\nmean over every timed call, against the ceilings of this run:");
    println!(
        "{:<52} {:>11} {:>16} {:>11}",
        "op", "time (ms)", "rate", "of ceiling"
    );
    // A benchmark a filter left out was never called.
    for s in spent.iter().filter(|s| s.calls > 0) {
        let r = rate(s);
        let (unit, ceiling) = match s.work {
            Work::Bytes(_) => ("GB/s", copy),
            Work::Flops(_) => ("TFLOP/s", gemm),
        };
        let frac = ceiling.map_or("-".to_string(), |c| format!("{:.0}%", 100.0 * r / c));
        let ms = 1e3 * s.time.as_secs_f64() / s.calls.max(1) as f64;
        println!(
            "{:<52} {:>11.3} {:>8.1} {:<7} {:>11}",
            s.name, ms, r, unit, frac
        );
    }
}

fn ops<B: Backend>(c: &mut Criterion, be: &B, s: &BenchShapes) {
    let (m, h, i, v) = (s.tokens, s.hidden, s.inter, s.vocab);
    let spent = RefCell::new(Vec::new());
    let mut g = c.benchmark_group(be.name());
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let mut g = Group {
        g,
        be,
        spent: &spent,
    };

    // The ceilings, as `empo-engine bench` times them (bf16: 2 bytes a value on the GPU).
    let n = s.copy_bytes / 2;
    let (src, mut dst) = (be.upload(&rnd(n, 1.0)).unwrap(), be.alloc(n).unwrap());
    g.bench(
        format!("ceiling: copy {} MiB", s.copy_bytes >> 20),
        Work::Bytes(2 * s.copy_bytes as u64),
        &mut || be.copy(&mut dst, &src),
    );
    drop((src, dst));
    let n = s.gemm;
    let (a, b) = (
        be.upload(&rnd(n * n, 0.01)).unwrap(),
        be.upload(&rnd(n * n, 0.01)).unwrap(),
    );
    let mut out = be.alloc(n * n).unwrap();
    g.bench(
        format!("ceiling: GEMM {n}³"),
        Work::Flops(2 * (n as u64).pow(3)),
        &mut || be.matmul(&mut out, &a, &b, None, n, n, n),
    );
    drop((a, b, out));

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
    g.bench(
        format!("rmsnorm [{m}, {h}]"),
        Work::Bytes((2 * m * h * 2) as u64),
        &mut || {
            k = (k + 1) % sets;
            be.rmsnorm(&mut outs[k], &mut rstd, &xs[k], &w, m, h, 1e-6)
        },
    );
    let mut dw = be.alloc_f32(h).unwrap();
    g.bench(
        format!("rmsnorm_bwd [{m}, {h}]"),
        Work::Bytes((4 * m * h * 2) as u64),
        &mut || {
            k = (k + 1) % sets;
            let dout = &xs[(k + 1) % sets];
            be.rmsnorm_bwd(&mut outs[k], &mut dw, dout, &xs[k], &w, &rstd, m, h)
        },
    );
    g.bench(
        format!("residual add [{m}, {h}]"),
        Work::Bytes((3 * m * h * 2) as u64),
        &mut || {
            k = (k + 1) % sets;
            be.add(&mut outs[k], &xs[k])
        },
    );
    let table = be.upload(&rnd(v * h, 0.05)).unwrap();
    let ids = gather_ids(sets, m, v);
    g.bench(
        format!("embedding {m} ids of [{v}, {h}]"),
        Work::Bytes((2 * m * h * 2) as u64),
        &mut || {
            k = (k + 1) % sets;
            be.embedding(&mut outs[k], &table, &ids[k], h)
        },
    );
    drop(table);
    let nq = m * s.heads * s.head_dim;
    let qsets = ((512usize << 20) / (nq * 2 * 2)).clamp(1, 16);
    let mut qs: Vec<_> = (0..qsets)
        .map(|_| be.upload(&rnd(nq, 0.5)).unwrap())
        .collect();
    g.bench(
        format!("rope (q) [{m}, {}, {}]", s.heads, s.head_dim),
        Work::Bytes((2 * nq * 2) as u64),
        &mut || {
            k = (k + 1) % qsets;
            be.rope(
                &mut qs[k],
                1,
                m,
                s.heads,
                s.head_dim,
                Starts::Same(0),
                1e6,
                false,
            )
        },
    );
    drop(qs);

    let (gate, up) = (
        be.upload(&rnd(m * i, 0.5)).unwrap(),
        be.upload(&rnd(m * i, 0.5)).unwrap(),
    );
    let mut hh = be.alloc(m * i).unwrap();
    g.bench(
        format!("swiglu [{m}, {i}]"),
        Work::Bytes((3 * m * i * 2) as u64),
        &mut || be.swiglu(&mut hh, &gate, &up),
    );

    let wt = be.upload(&rnd(i * h, 0.01)).unwrap();
    let mut o = be.alloc(m * i).unwrap();
    g.bench(
        format!("matmul [{m}, {h}] x [{i}, {h}]ᵀ"),
        Work::Flops((2 * m * h * i) as u64),
        &mut || be.matmul(&mut o, x, &wt, None, m, h, i),
    );

    let rows = (m / 4).max(1);
    let logits = be.upload(&rnd(rows * v, 4.0)).unwrap();
    let targets: Vec<u32> = (0..rows as u32).collect();
    let mut dl = be.alloc(rows * v).unwrap();
    let mut stats = be.alloc_f32(3 * rows).unwrap();
    let (ca, cb) = (vec![1.0; rows], vec![1.0; rows]);
    g.bench(
        format!("softmax-entropy fwd [{rows}, {v}]"),
        Work::Bytes((rows * v * 2) as u64),
        &mut || {
            be.softmax_stats_into(&mut stats, &logits, rows, v, &targets, 0.7)
                .unwrap();
        },
    );
    g.bench(
        format!("softmax-entropy bwd [{rows}, {v}]"),
        Work::Bytes((2 * rows * v * 2) as u64),
        &mut || {
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
        },
    );

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
    g.bench(
        format!("attention fwd causal t {t}"),
        Work::Flops(flops as u64),
        &mut || be.attention(&mut ao, &mut lse, &q, &k, &vv, sh),
    );
    let (mut dq, mut dk, mut dv) = (
        be.alloc(nq).unwrap(),
        be.alloc(nkv).unwrap(),
        be.alloc(nkv).unwrap(),
    );
    g.bench(
        format!("attention bwd causal t {t}"),
        Work::Flops((flops as f64 * 2.5) as u64),
        &mut || be.attention_bwd(&mut dq, &mut dk, &mut dv, &ao, &ao, &lse, &q, &k, &vv, sh),
    );
    g.g.finish();
    ratio_table(&spent.borrow());
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
