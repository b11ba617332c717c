//! The chunked lm_head (logits never materialized for the whole batch) against the plain path
//! (full logits, softmax statistics, their gradient, the model's backward): in one chunk and
//! over more rows than one chunk, so the last chunk is ragged; in one pass and in two.

use empo_engine::backend::cpu::{self, CpuBackend};
use empo_engine::backend::{Backend, RowStats, StatsLoss, NO_TARGET};
use empo_engine::config::{DType, ModelConfig};
use empo_engine::kernel_checks::max_rel_err;
use empo_engine::lm_head::{chunk_rows, Coef};
use empo_engine::model::{random_tensors, Qwen2, LM_HEAD_CHUNK};

fn cfg(tied: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 1,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        vocab_size: 300,
        rms_norm_eps: 1e-6,
        rope_theta: 1e4,
        tie_word_embeddings: tied,
        max_position_embeddings: 4096,
        dtype: DType::F32,
    }
}

/// Per-row coefficients that depend on the statistics, as the policy loss's do.
fn coef_row(s: &RowStats) -> (f32, f32) {
    (0.2 + 0.1 * s.entropy, -0.5 * s.logprob.exp())
}

fn coef(stats: &[RowStats]) -> (Vec<f32>, Vec<f32>) {
    stats.iter().map(coef_row).unzip()
}

/// The statistics and parameter gradients of Σ a·entropy + b·logprob, with (a, b) from
/// `coef`, through the full [N, V] logits: the plain path the chunked one must match.
fn full_logits_reference(
    be: &CpuBackend,
    model: &Qwen2<CpuBackend>,
    (batch, seq): (usize, usize),
    ids: &[u32],
    targets: &[u32],
    temperature: f32,
) -> (Vec<RowStats>, Vec<Vec<f32>>) {
    let (n, v) = (batch * seq, model.cfg.vocab_size);
    let mut full = model.alloc_activations(be, batch, seq, true).unwrap();
    model.forward_train(be, ids, &mut full).unwrap();
    let stats = cpu::softmax_stats(&full.logits, n, v, targets, temperature);
    let (a, b) = coef(&stats);
    let mut dlogits = vec![0.0; n * v];
    let loss = StatsLoss {
        targets,
        temperature,
        a: &a,
        b: &b,
    };
    cpu::softmax_stats_bwd(&mut dlogits, &full.logits, n, v, &loss);
    let mut g = model.zeros_like_params(be).unwrap();
    model.backward(be, &mut full, &dlogits, &mut g).unwrap();
    let grads = g.list().into_iter().cloned().collect();
    (stats, grads)
}

#[test]
fn chunked_statistics_and_gradients_match_the_full_logits_path() {
    let be = CpuBackend;
    // 300 rows fit in one chunk (one pass). LM_HEAD_CHUNK + 154 rows are a full chunk and a
    // ragged one: a sequence-level loss takes two passes there (statistics, then a backward that
    // recomputes each chunk's logits) and a per-row one still takes one.
    for (batch, seq, tied, per_row) in [
        (1, 300, false, false),
        (1, 300, true, false),
        (1, 300, false, true),
        (2, LM_HEAD_CHUNK / 2 + 77, false, false),
        (2, LM_HEAD_CHUNK / 2 + 77, true, false),
        (2, LM_HEAD_CHUNK / 2 + 77, true, true),
    ] {
        let c = cfg(tied);
        let model = Qwen2::from_host(&be, c.clone(), &random_tensors(&c, 5, 0.2)).unwrap();
        let n = batch * seq;
        let ids: Vec<u32> = (0..n)
            .map(|i| ((i * 31 + 7) % c.vocab_size) as u32)
            .collect();
        let targets: Vec<u32> = (0..n)
            .map(|r| {
                if r % 5 == 0 {
                    NO_TARGET
                } else {
                    ids[(r + 1) % n]
                }
            })
            .collect();
        let (want, want_g) = full_logits_reference(&be, &model, (batch, seq), &ids, &targets, 0.8);

        let mut acts = model.alloc_activations(&be, batch, seq, true).unwrap();
        model.forward_hidden(&be, &ids, &mut acts).unwrap();
        assert_eq!(
            be.len(&acts.logits),
            0,
            "the chunked path must not allocate [N, V] logits"
        );
        let stats_only = model.lm_head_stats(&be, &mut acts, &targets, 0.8).unwrap();

        let seen = std::cell::RefCell::new(vec![None; n]);
        let by_row = |r: usize, s: &RowStats| {
            seen.borrow_mut()[r] = Some(*s);
            coef_row(s)
        };
        let whole = |s: &[RowStats]| {
            for (r, s) in s.iter().enumerate() {
                seen.borrow_mut()[r] = Some(*s);
            }
            coef(s)
        };
        let how = if per_row {
            Coef::PerRow(&by_row)
        } else {
            Coef::Whole(Box::new(whole))
        };
        let mut got_g = model.zeros_like_params(&be).unwrap();
        let got = model
            .lm_head_stats_grad(&be, &mut acts, &targets, 0.8, how, &mut got_g)
            .unwrap();
        let seen: Vec<RowStats> = seen.into_inner().into_iter().map(|s| s.unwrap()).collect();
        let flat = RowStats::flatten(&want);
        let case = format!("{n} rows, tied {tied}, per row {per_row}");
        for (what, s) in [
            ("lm_head_stats", &stats_only),
            ("returned", &got),
            ("given to coef", &seen),
        ] {
            let e = max_rel_err(&RowStats::flatten(s), &flat);
            assert!(e < 1e-6, "{what} statistics differ by {e} ({case})");
        }
        for (g, w) in got_g.list().into_iter().zip(&want_g) {
            let e = max_rel_err(g, w);
            assert!(e < 1e-5, "gradient differs by {e} ({case})");
        }
    }
}

#[test]
fn chunks_shrink_for_large_vocabularies() {
    // Qwen2.5's vocabulary takes the full chunk: 4096 rows of bf16 logits, 1.25 GB.
    assert_eq!(chunk_rows(1 << 20, 152064), LM_HEAD_CHUNK);
    assert_eq!(chunk_rows(100, 152064), 100);
    // A 1M-token vocabulary would not fit: 640 rows, a multiple of 64, 1.34 GB.
    let r = chunk_rows(1 << 20, 1 << 20);
    assert_eq!(r, 640);
    assert!(2 * r * (1 << 20) <= 1280 << 20);
    assert_eq!(chunk_rows(10, 1 << 40), 1);
}
