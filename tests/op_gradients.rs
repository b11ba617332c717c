//! Finite-difference checks of every CPU op's backward. Each op is wrapped as a scalar
//! L = Σ r ⊙ op(x) with a fixed random r, and ∂L/∂x from the op's backward is compared with
//! central differences.

use empo_engine::backend::cpu;
use empo_engine::backend::{AttnShape, Starts, StatsLoss};

/// A small deterministic generator, so the checks need no rand crate.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn weighted_sum(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Central differences of `loss` at `x`, compared normwise with `analytic`.
fn fd_check(name: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    let eps = 1e-2f32;
    let mut xp = x.to_vec();
    let mut numeric = vec![0.0f32; x.len()];
    for i in 0..x.len() {
        xp[i] = x[i] + eps;
        let lp = loss(&xp);
        xp[i] = x[i] - eps;
        let lm = loss(&xp);
        xp[i] = x[i];
        numeric[i] = ((lp - lm) / (2.0 * eps as f64)) as f32;
    }
    let scale = numeric.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let err = numeric
        .iter()
        .zip(analytic)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    println!("{name:<28} finite-difference rel err {err:.2e}");
    assert!(
        err < 5e-3,
        "{name}: analytic gradient differs from finite differences by {err:e}"
    );
}

#[test]
fn matmul_backward() {
    let (m, k, n) = (5, 7, 6);
    let mut g = Lcg(1);
    let (a, w, bias, r) = (
        g.vec(m * k, 1.0),
        g.vec(n * k, 1.0),
        g.vec(n, 1.0),
        g.vec(m * n, 1.0),
    );
    let f = |a: &[f32], w: &[f32], b: &[f32]| {
        let mut out = vec![0.0; m * n];
        cpu::matmul(&mut out, a, w, Some(b), m, k, n);
        weighted_sum(&out, &r)
    };
    let (mut da, mut dw, mut db) = (vec![0.0; m * k], vec![0.0; n * k], vec![0.0; n]);
    cpu::matmul_bwd(
        Some(&mut da),
        Some(&mut dw),
        Some(&mut db),
        &r,
        &a,
        &w,
        m,
        k,
        n,
    );
    fd_check("matmul da", &a, &da, |x| f(x, &w, &bias));
    fd_check("matmul dw", &w, &dw, |x| f(&a, x, &bias));
    fd_check("matmul dbias", &bias, &db, |x| f(&a, &w, x));
}

#[test]
fn rmsnorm_backward() {
    let (rows, dim) = (4, 9);
    let mut g = Lcg(2);
    let (x, w, r) = (
        g.vec(rows * dim, 1.0),
        g.vec(dim, 1.0),
        g.vec(rows * dim, 1.0),
    );
    let f = |x: &[f32], w: &[f32]| {
        let (mut out, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        cpu::rmsnorm(&mut out, &mut rstd, x, w, rows, dim, 1e-5);
        weighted_sum(&out, &r)
    };
    let (mut out, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
    cpu::rmsnorm(&mut out, &mut rstd, &x, &w, rows, dim, 1e-5);
    let (mut dx, mut dw) = (vec![0.0; rows * dim], vec![0.0; dim]);
    cpu::rmsnorm_bwd(&mut dx, &mut dw, &r, &x, &w, &rstd, rows, dim);
    fd_check("rmsnorm dx", &x, &dx, |x| f(x, &w));
    fd_check("rmsnorm dw", &w, &dw, |w| f(&x, w));
}

#[test]
fn rope_backward_is_the_inverse_rotation() {
    let (b, s, h, d) = (2, 5, 3, 8);
    let mut g = Lcg(3);
    let (x, r) = (g.vec(b * s * h * d, 1.0), g.vec(b * s * h * d, 1.0));
    let f = |x: &[f32]| {
        let mut y = x.to_vec();
        cpu::rope(&mut y, b, s, h, d, Starts::Same(3), 10000.0, false);
        weighted_sum(&y, &r)
    };
    let mut dx = r.clone();
    cpu::rope(&mut dx, b, s, h, d, Starts::Same(3), 10000.0, true);
    fd_check("rope dx", &x, &dx, f);
}

/// The ragged forms of rope, kv_write and decode attention (one start or key count per
/// sequence) against each sequence computed alone with the uniform forms.
#[test]
fn ragged_ops_equal_each_sequence_alone() {
    let (h, kvh, d, cap) = (4, 2, 16, 12);
    let starts = [5u32, 0, 11];
    let b = starts.len();
    let mut g = Lcg(11);

    let x = g.vec(b * h * d, 1.0);
    let mut ragged = x.clone();
    cpu::rope(&mut ragged, b, 1, h, d, Starts::Each(&starts), 1e6, false);
    for (i, &p) in starts.iter().enumerate() {
        let mut alone = x[i * h * d..(i + 1) * h * d].to_vec();
        cpu::rope(&mut alone, 1, 1, h, d, Starts::Same(p as usize), 1e6, false);
        assert_eq!(
            &ragged[i * h * d..(i + 1) * h * d],
            &alone[..],
            "rope, sequence {i}"
        );
    }

    let row = kvh * d;
    let cache0 = g.vec(b * cap * row, 1.0);
    let new = g.vec(b * row, 1.0);
    let mut ragged = cache0.clone();
    cpu::kv_write(&mut ragged, &new, b, cap, Starts::Each(&starts), 1, row);
    for (i, &p) in starts.iter().enumerate() {
        let mut alone = cache0[i * cap * row..(i + 1) * cap * row].to_vec();
        cpu::kv_write(
            &mut alone,
            &new[i * row..(i + 1) * row],
            1,
            cap,
            Starts::Same(p as usize),
            1,
            row,
        );
        assert_eq!(
            &ragged[i * cap * row..(i + 1) * cap * row],
            &alone[..],
            "kv_write, sequence {i}"
        );
    }

    let kv_len: Vec<u32> = starts.iter().map(|&p| p + 1).collect();
    let s = AttnShape {
        batch: b,
        tq: 1,
        tk: cap,
        cap,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
    };
    let (q, k, v) = (
        g.vec(b * h * d, 2.0),
        g.vec(b * cap * row, 2.0),
        g.vec(b * cap * row, 1.0),
    );
    let (mut out, mut lse) = (vec![0.0; b * h * d], vec![0.0; b * h]);
    cpu::attention_ragged(&mut out, &mut lse, &q, &k, &v, s, Some(&kv_len));
    for (i, &n) in kv_len.iter().enumerate() {
        let one = AttnShape {
            batch: 1,
            tk: n as usize,
            ..s
        };
        let (mut o1, mut l1) = (vec![0.0; h * d], vec![0.0; h]);
        let kv = i * cap * row..(i + 1) * cap * row;
        cpu::attention(
            &mut o1,
            &mut l1,
            &q[i * h * d..(i + 1) * h * d],
            &k[kv.clone()],
            &v[kv],
            one,
        );
        assert_eq!(
            &out[i * h * d..(i + 1) * h * d],
            &o1[..],
            "attention out, sequence {i}"
        );
        assert_eq!(
            &lse[i * h..(i + 1) * h],
            &l1[..],
            "attention lse, sequence {i}"
        );
    }
}

fn check_attention(s: AttnShape, seed: u64) {
    let mut g = Lcg(seed);
    let qn = s.batch * s.tq * s.heads * s.head_dim;
    let kn = s.batch * s.cap * s.kv_heads * s.head_dim;
    let (q, k, v, r) = (
        g.vec(qn, 1.0),
        g.vec(kn, 1.0),
        g.vec(kn, 1.0),
        g.vec(qn, 1.0),
    );
    let run = |q: &[f32], k: &[f32], v: &[f32]| {
        let (mut out, mut lse) = (vec![0.0; qn], vec![0.0; s.batch * s.tq * s.heads]);
        cpu::attention(&mut out, &mut lse, q, k, v, s);
        (out, lse)
    };
    let (out, lse) = run(&q, &k, &v);
    let (mut dq, mut dk, mut dv) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn]);
    cpu::attention_bwd(&mut dq, &mut dk, &mut dv, &r, &out, &lse, &q, &k, &v, s);
    let tag = format!("attention tq{} tk{}", s.tq, s.tk);
    fd_check(&format!("{tag} dq"), &q, &dq, |x| {
        weighted_sum(&run(x, &k, &v).0, &r)
    });
    fd_check(&format!("{tag} dk"), &k, &dk, |x| {
        weighted_sum(&run(&q, x, &v).0, &r)
    });
    fd_check(&format!("{tag} dv"), &v, &dv, |x| {
        weighted_sum(&run(&q, &k, x).0, &r)
    });
}

#[test]
fn attention_backward_gqa_and_cache_offset() {
    let base = AttnShape {
        batch: 2,
        tq: 5,
        tk: 5,
        cap: 5,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
    };
    check_attention(base, 4);
    // Queries at the end of a longer, partly filled cache (prefill after earlier tokens).
    check_attention(
        AttnShape {
            tq: 3,
            tk: 6,
            cap: 8,
            heads: 6,
            ..base
        },
        5,
    );
}

#[test]
fn attention_matches_naive_softmax() {
    // One head, two keys: the output is the softmax-weighted mix, computed by hand.
    let s = AttnShape {
        batch: 1,
        tq: 2,
        tk: 2,
        cap: 2,
        heads: 1,
        kv_heads: 1,
        head_dim: 2,
    };
    let q = [1.0, 0.0, 0.5, 2.0];
    let k = [1.0, 1.0, -1.0, 0.5];
    let v = [1.0, 2.0, 3.0, -4.0];
    let (mut out, mut lse) = (vec![0.0; 4], vec![0.0; 2]);
    cpu::attention(&mut out, &mut lse, &q, &k, &v, s);
    assert_eq!(
        &out[..2],
        &[1.0, 2.0],
        "the first query sees only the first key"
    );
    let scale = 1.0 / 2f32.sqrt();
    let (s0, s1) = ((0.5 + 2.0) * scale, (-0.5 + 1.0) * scale);
    let p0 = s0.exp() / (s0.exp() + s1.exp());
    assert!((out[2] - (p0 * 1.0 + (1.0 - p0) * 3.0)).abs() < 1e-6);
    assert!((out[3] - (p0 * 2.0 + (1.0 - p0) * -4.0)).abs() < 1e-6);
    assert!((lse[1] - (s0.exp() + s1.exp()).ln()).abs() < 1e-6);
}

#[test]
fn swiglu_backward() {
    let n = 17;
    let mut g = Lcg(6);
    let (gate, up, r) = (g.vec(n, 3.0), g.vec(n, 1.0), g.vec(n, 1.0));
    let f = |gt: &[f32], u: &[f32]| {
        let mut out = vec![0.0; n];
        cpu::swiglu(&mut out, gt, u);
        weighted_sum(&out, &r)
    };
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    cpu::swiglu_bwd(&mut dg, &mut du, &r, &gate, &up);
    fd_check("swiglu dgate", &gate, &dg, |x| f(x, &up));
    fd_check("swiglu dup", &up, &du, |x| f(&gate, x));
}

#[test]
fn softmax_entropy_logprob_backward() {
    let (rows, vocab, temp) = (3, 11, 0.7);
    let mut g = Lcg(7);
    let logits = g.vec(rows * vocab, 3.0);
    let targets = [4u32, empo_engine::backend::NO_TARGET, 0];
    let (a, b) = (g.vec(rows, 1.0), g.vec(rows, 1.0));
    let f = |l: &[f32]| {
        cpu::softmax_stats(l, rows, vocab, &targets, temp)
            .iter()
            .enumerate()
            .map(|(i, s)| a[i] as f64 * s.entropy as f64 + b[i] as f64 * s.logprob as f64)
            .sum::<f64>()
    };
    let loss = StatsLoss {
        targets: &targets,
        temperature: temp,
        a: &a,
        b: &b,
    };
    let mut d = vec![0.0; rows * vocab];
    cpu::softmax_stats_bwd(&mut d, &logits, rows, vocab, &loss);
    fd_check("softmax entropy+logprob", &logits, &d, f);
    // From saved statistics (what the chunked lm_head backward uses): the same gradient.
    let stats = empo_engine::backend::RowStats::flatten(&cpu::softmax_stats(
        &logits, rows, vocab, &targets, temp,
    ));
    let mut ds = vec![f32::NAN; rows * vocab];
    cpu::softmax_stats_bwd_saved(&mut ds, &logits, &stats, rows, vocab, &loss);
    fd_check("softmax entropy+logprob, saved stats", &logits, &ds, f);
    // In place (what the chunked lm_head runs): the gradient over the logits it came from.
    let mut dp = logits.clone();
    cpu::softmax_stats_bwd_saved_in_place(&mut dp, &stats, rows, vocab, &loss);
    fd_check("softmax entropy+logprob, in place", &logits, &dp, f);
    // Entropy of a uniform row is ln V, and a target's log-prob there is −ln V.
    let s = cpu::softmax_stats(&[2.0; 8], 1, 8, &[3], 0.5)[0];
    assert!((s.entropy - 8f32.ln()).abs() < 1e-6 && (s.logprob + 8f32.ln()).abs() < 1e-6);
}

/// A masked logit (−inf) leaves the softmax: the statistics are those of the row without it,
/// and its gradient is 0, not the NaN of 0·(−inf).
#[test]
fn masked_logits_drop_out_of_the_softmax_statistics() {
    let (vocab, temp) = (12, 0.8);
    let mut g = Lcg(9);
    let row = g.vec(vocab, 3.0);
    let masked: Vec<usize> = vec![0, 1, 5, 11];
    let mut with_mask = row.clone();
    for &j in &masked {
        with_mask[j] = f32::NEG_INFINITY;
    }
    let kept: Vec<usize> = (0..vocab).filter(|j| !masked.contains(j)).collect();
    let compact: Vec<f32> = kept.iter().map(|&j| row[j]).collect();
    let (target, compact_target) = (7u32, kept.iter().position(|&j| j == 7).unwrap() as u32);
    let s = cpu::softmax_stats(&with_mask, 1, vocab, &[target], temp)[0];
    let c = cpu::softmax_stats(&compact, 1, kept.len(), &[compact_target], temp)[0];
    for (what, got, want) in [
        ("logsumexp", s.logsumexp, c.logsumexp),
        ("entropy", s.entropy, c.entropy),
        ("logprob", s.logprob, c.logprob),
    ] {
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{what}: {got} with the mask, {want} without the masked entries"
        );
    }
    let (a, b) = ([0.6f32], [-1.3f32]);
    let (t, ct) = ([target], [compact_target]);
    let loss = |targets| StatsLoss {
        targets,
        temperature: temp,
        a: &a,
        b: &b,
    };
    let mut d = vec![f32::NAN; vocab];
    cpu::softmax_stats_bwd(&mut d, &with_mask, 1, vocab, &loss(&t));
    let mut dc = vec![f32::NAN; kept.len()];
    cpu::softmax_stats_bwd(&mut dc, &compact, 1, kept.len(), &loss(&ct));
    for &j in &masked {
        assert_eq!(d[j], 0.0, "gradient at masked logit {j}");
    }
    for (k, &j) in kept.iter().enumerate() {
        assert!(
            (d[j] - dc[k]).abs() <= 1e-6 * dc[k].abs().max(1e-3),
            "gradient at logit {j}: {} with the mask, {} without",
            d[j],
            dc[k]
        );
    }
}

#[test]
fn embedding_backward() {
    let (vocab, dim) = (6, 4);
    let ids = [2u32, 5, 2, 0];
    let mut g = Lcg(8);
    let (table, r) = (g.vec(vocab * dim, 1.0), g.vec(ids.len() * dim, 1.0));
    let f = |t: &[f32]| {
        let mut out = vec![0.0; ids.len() * dim];
        cpu::embedding(&mut out, t, &ids, dim);
        weighted_sum(&out, &r)
    };
    let mut dt = vec![0.0; vocab * dim];
    cpu::embedding_bwd(&mut dt, &r, &ids, dim);
    fd_check("embedding dtable", &table, &dt, f);
}
