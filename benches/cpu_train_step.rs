//! CPU reference throughput: one training step (forward, mean next-token NLL, backward) of a
//! small random Qwen2, in tokens/s. tools/bench_torch_cpu.py times PyTorch on the same shape.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use empo_engine::backend::cpu::CpuBackend;
use empo_engine::backend::{Backend, StatsLoss};
use empo_engine::config::{DType, ModelConfig};
use empo_engine::generate::next_token_targets;
use empo_engine::model::{random_tensors, Qwen2};

/// The shape tools/bench_torch_cpu.py uses by default.
fn bench_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 688,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 32,
        vocab_size: 4096,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        max_position_embeddings: 512,
        dtype: DType::F32,
    }
}

fn train_step(c: &mut Criterion) {
    let be = CpuBackend;
    let cfg = bench_config();
    let (batch, seq) = (4, 128);
    let model = Qwen2::from_host(&be, cfg.clone(), &random_tensors(&cfg, 0, 0.02)).unwrap();
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let targets = next_token_targets(&ids, batch, seq);
    let rows = batch * seq;
    let n_tgt = (batch * (seq - 1)) as f32;
    let a = vec![0.0; rows];
    let b: Vec<f32> = targets
        .iter()
        .map(|&t| if t == u32::MAX { 0.0 } else { -1.0 / n_tgt })
        .collect();
    let mut acts = model.alloc_activations(&be, batch, seq, true).unwrap();
    let mut grads = model.zeros_like_params(&be).unwrap();
    let mut dlogits = be.alloc(rows * cfg.vocab_size).unwrap();

    let mut g = c.benchmark_group("cpu_reference");
    g.sample_size(10);
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function("train_step_fwd_bwd_h256_l4_v4096_b4x128", |bench| {
        bench.iter(|| {
            model.forward_train(&be, &ids, &mut acts).unwrap();
            be.softmax_stats_bwd(
                &mut dlogits,
                &acts.logits,
                rows,
                cfg.vocab_size,
                &StatsLoss {
                    targets: &targets,
                    temperature: 1.0,
                    a: &a,
                    b: &b,
                },
            );
            for gr in grads.list_mut() {
                be.zero(gr);
            }
            model
                .backward(&be, &mut acts, &dlogits, &mut grads)
                .unwrap();
        })
    });
    g.bench_function("forward_h256_l4_v4096_b4x128", |bench| {
        bench.iter(|| model.forward_train(&be, &ids, &mut acts).unwrap())
    });
    g.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
