//! The chunked lm_head statistics path (logits never materialized for the whole batch) against
//! the plain path (full logits, then softmax statistics), over more rows than one chunk so the
//! last chunk is ragged; and the one-pass path (statistics and gradients in one call) against
//! the two calls it replaces.

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

#[test]
fn chunked_stats_and_gradients_match_the_full_logits_path() {
    let be = CpuBackend;
    for tied in [false, true] {
        let c = cfg(tied);
        let model = Qwen2::from_host(&be, c.clone(), &random_tensors(&c, 3, 0.2)).unwrap();
        let (batch, seq) = (2, LM_HEAD_CHUNK / 2 + 77); // one full chunk + a ragged one
        let n = batch * seq;
        assert!(n > LM_HEAD_CHUNK && n % LM_HEAD_CHUNK != 0);
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
        let a: Vec<f32> = (0..n).map(|r| 0.3 + (r % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..n).map(|r| -0.5 + (r % 3) as f32 * 0.2).collect();

        let mut full = model.alloc_activations(&be, batch, seq, true).unwrap();
        model.forward_train(&be, &ids, &mut full).unwrap();
        let want = cpu::softmax_stats(&full.logits, n, c.vocab_size, &targets, 0.8);
        let mut dlogits = vec![0.0; n * c.vocab_size];
        cpu::softmax_stats_bwd(
            &mut dlogits,
            &full.logits,
            n,
            c.vocab_size,
            &StatsLoss {
                targets: &targets,
                temperature: 0.8,
                a: &a,
                b: &b,
            },
        );
        let mut want_g = model.zeros_like_params(&be).unwrap();
        model
            .backward(&be, &mut full, &dlogits, &mut want_g)
            .unwrap();

        let mut acts = model.alloc_activations(&be, batch, seq, true).unwrap();
        model.forward_hidden(&be, &ids, &mut acts).unwrap();
        assert_eq!(
            be.len(&acts.logits),
            0,
            "the chunked path must not allocate [N, V] logits"
        );
        let got = model.lm_head_stats(&be, &mut acts, &targets, 0.8).unwrap();
        let e = max_rel_err(&RowStats::flatten(&got), &RowStats::flatten(&want));
        assert!(e < 1e-6, "stats differ by {e} (tied {tied})");
        let mut got_g = model.zeros_like_params(&be).unwrap();
        model
            .lm_head_stats_bwd(&be, &mut acts, &got, &targets, 0.8, &a, &b, &mut got_g)
            .unwrap();
        for (g, w) in got_g.list().into_iter().zip(want_g.list()) {
            let e = max_rel_err(g, w);
            assert!(e < 1e-5, "gradient differs by {e} (tied {tied})");
        }
    }
}

/// Per-row coefficients that depend on the statistics, as the policy loss's do.
fn coef_row(s: &RowStats) -> (f32, f32) {
    (0.2 + 0.1 * s.entropy, -0.5 * s.logprob.exp())
}

fn coef(stats: &[RowStats]) -> (Vec<f32>, Vec<f32>) {
    stats.iter().map(coef_row).unzip()
}

#[test]
fn one_pass_matches_statistics_then_backward() {
    let be = CpuBackend;
    // 300 rows fit in one chunk; LM_HEAD_CHUNK + 6 do not, where a sequence-level loss takes two
    // passes and a per-row one still takes one.
    for (batch, seq, tied, per_row) in [
        (1, 300, false, false),
        (1, 300, true, false),
        (1, 300, false, true),
        (2, LM_HEAD_CHUNK / 2 + 3, false, false),
        (2, LM_HEAD_CHUNK / 2 + 3, true, true),
    ] {
        let c = cfg(tied);
        let model = Qwen2::from_host(&be, c.clone(), &random_tensors(&c, 5, 0.2)).unwrap();
        let n = batch * seq;
        let ids: Vec<u32> = (0..n)
            .map(|i| ((i * 17 + 3) % c.vocab_size) as u32)
            .collect();
        let targets: Vec<u32> = (0..n)
            .map(|r| {
                if r % 7 == 0 {
                    NO_TARGET
                } else {
                    ids[(r + 1) % n]
                }
            })
            .collect();

        let mut acts = model.alloc_activations(&be, batch, seq, true).unwrap();
        model.forward_hidden(&be, &ids, &mut acts).unwrap();
        let want = model.lm_head_stats(&be, &mut acts, &targets, 0.6).unwrap();
        let (a, b) = coef(&want);
        let mut want_g = model.zeros_like_params(&be).unwrap();
        model
            .lm_head_stats_bwd(&be, &mut acts, &want, &targets, 0.6, &a, &b, &mut want_g)
            .unwrap();

        let mut acts = model.alloc_activations(&be, batch, seq, true).unwrap();
        model.forward_hidden(&be, &ids, &mut acts).unwrap();
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
            .lm_head_stats_grad(&be, &mut acts, &targets, 0.6, how, &mut got_g)
            .unwrap();
        let seen: Vec<RowStats> = seen.into_inner().into_iter().map(|s| s.unwrap()).collect();
        let flat = RowStats::flatten(&want);
        for (what, s) in [("returned", &got), ("given to coef", &seen)] {
            let e = max_rel_err(&RowStats::flatten(s), &flat);
            assert!(e < 1e-6, "{what} statistics differ by {e} ({n} rows)");
        }
        for (g, w) in got_g.list().into_iter().zip(want_g.list()) {
            let e = max_rel_err(g, w);
            assert!(
                e < 1e-6,
                "gradient differs by {e} ({n} rows, tied {tied}, per row {per_row})"
            );
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
