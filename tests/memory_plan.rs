//! The memory plan: its parameter counts against the published sizes of Qwen2.5 models, its
//! activation, cache and chunk counts against what the model really allocates, and its
//! verdicts for a 7B run on an 80 GB and a 141 GB GPU, with and without the host memory to
//! offload AdamW's moments to.

mod common;

use common::*;
use empo_engine::backend::cpu::CpuBackend;
use empo_engine::backend::{Backend, RowStats};
use empo_engine::config::ModelConfig;
use empo_engine::generate::next_token_targets;
use empo_engine::lm_head::Coef;
use empo_engine::memory_plan::{self, Budget, MemoryPlan, RunShape, Switch};
use empo_engine::model::Qwen2;
use empo_engine::optim::{MomentDtype, OptimConfig, OptimizerKind};
use std::path::Path;

fn config(json: &str) -> ModelConfig {
    ModelConfig::from_json_str(json, Path::new("config.json")).unwrap()
}

/// config.json of Qwen/Qwen2.5-Math-7B (the fields the engine reads).
fn qwen_7b() -> ModelConfig {
    config(
        r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16"}"#,
    )
}

/// config.json of Qwen/Qwen2.5-Math-1.5B.
fn qwen_1_5b() -> ModelConfig {
    config(
        r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "tie_word_embeddings": true, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16"}"#,
    )
}

/// The model cards give 7.61B parameters (6.53B without embeddings) for Qwen2.5-7B and 1.54B
/// (1.31B) for Qwen2.5-1.5B, whose embeddings are tied.
#[test]
fn parameter_counts_match_the_model_cards() {
    let billions = |x: u64| x as f64 / 1e9;
    let near = |x: u64, card: f64| (billions(x) - card).abs() < 0.01;
    let p = memory_plan::param_count(&qwen_7b());
    assert!(near(p, 7.61) && near(p - 2 * 152064 * 3584, 6.53), "{p}");
    let p = memory_plan::param_count(&qwen_1_5b());
    assert!(near(p, 1.54) && near(p - 151936 * 1536, 1.31), "{p}");
}

/// Every count the plan makes of activations, gradient scratch, lm_head chunks and the KV
/// cache is what the model allocates on the CPU backend (4 bytes a value there), with and
/// without recompute.
#[test]
fn the_plan_counts_what_the_model_allocates() {
    let be = CpuBackend;
    for m in MODELS {
        let dir = fixtures().join(m);
        let r = Reference::load(m);
        let (shape, ids) = r.ids("input_ids");
        let (batch, seq) = (shape[0], shape[1]);
        let targets = next_token_targets(&ids, batch, seq);
        for recompute in [false, true] {
            let mut model = Qwen2::load_dir(&be, &dir).unwrap();
            model.recompute = recompute;
            let c = &model.cfg;
            let mut acts = model.alloc_activations(&be, batch, seq, true).unwrap();
            model.forward_hidden(&be, &ids, &mut acts).unwrap();
            let mut grads = model.zeros_like_params(&be).unwrap();
            let coef = |_: usize, _: &RowStats| (1.0, 0.5);
            model
                .lm_head_stats_grad(
                    &be,
                    &mut acts,
                    &targets,
                    0.8,
                    Coef::PerRow(&coef),
                    &mut grads,
                )
                .unwrap();
            let (saved, scratch, chunk) = acts.held(&be);
            let n = batch * seq;
            assert_eq!(
                4 * saved as u64,
                memory_plan::activations_bytes(c, batch, seq, true, recompute, 4),
                "{m} recompute {recompute}: saved activations"
            );
            assert_eq!(
                4 * scratch as u64,
                memory_plan::scratch_bytes(c, n, 4),
                "{m}"
            );
            assert_eq!(4 * chunk as u64, memory_plan::chunk_bytes(c, n, 4), "{m}");
            let grads_held: usize = grads.list().iter().map(|g| be.len(g)).sum();
            assert_eq!(grads_held as u64, memory_plan::param_count(c), "{m}");
        }
        let model = Qwen2::load_dir(&be, &dir).unwrap();
        let c = &model.cfg;
        let cache = model.alloc_cache(&be, 3, 40).unwrap();
        assert_eq!(
            4 * cache.held(&be) as u64,
            memory_plan::cache_bytes(c, 3, 40, 4)
        );
        let prefill = model.alloc_activations(&be, 3, 17, false).unwrap();
        let (saved, _, _) = prefill.held(&be);
        assert_eq!(
            4 * saved as u64,
            memory_plan::activations_bytes(c, 3, 17, false, false, 4),
            "{m}: inference activations"
        );
    }
}

fn adamw(moments: MomentDtype) -> OptimConfig {
    OptimConfig {
        kind: OptimizerKind::Adamw,
        lr: 1e-6,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        grad_clip: 1.0,
        moments,
    }
}

/// EMPO's defaults on the GPU: 8 completions of up to 1024 tokens after a 300-token prompt.
fn empo_7b(moments: MomentDtype) -> RunShape {
    RunShape {
        storage: 2,
        prompt: 300,
        max_new: 1024,
        rollout_rows: 8,
        train_seq: 1324,
        optim: adamw(moments),
        reference: false,
        recompute: false,
        offload: false,
        unfused_attention: false,
    }
}

const H100_FREE: u64 = 78 << 30;
const H200_FREE: u64 = 139 << 30;
/// The device machines' 128 GiB, less what the system holds.
const HOST_AVAILABLE: u64 = 120 << 30;

fn budget(device: u64, host: u64) -> Budget {
    Budget {
        device: Some(device),
        host: Some(host),
    }
}

/// The EMPO 7B run planned with the given moments and settings.
fn resolve_7b(
    moments: MomentDtype,
    recompute: Switch,
    offload: Switch,
    budget: Budget,
) -> anyhow::Result<MemoryPlan> {
    memory_plan::resolve(&qwen_7b(), empo_7b(moments), recompute, offload, budget)
}

fn gb(x: u64) -> f64 {
    (x as f64 / 1e8).round() / 10.0
}

/// A 7B model's bf16 weights (15.2 GB), f32 gradients (30.5 GB) and f32 AdamW moments
/// (60.9 GB) do not fit in an H100's 80 GB, even with recompute. Under auto the moments go to
/// host memory, and the GPU holds only the largest group of them during the update: the
/// embedding's, 2 × 545M f32 values (4.4 GB), less than the 5.9 GB of activations it takes
/// turns with, so recompute stays off. An H200 takes the run as it is.
#[test]
fn a_7b_run_is_planned_against_the_gpu_it_has() {
    let c = qwen_7b();
    let plan = resolve_7b(
        MomentDtype::F32,
        Switch::Auto,
        Switch::Auto,
        budget(H100_FREE, HOST_AVAILABLE),
    )
    .unwrap();
    println!("{}", plan.summary(Some(H100_FREE)));
    assert!(plan.shape.offload && !plan.shape.recompute);
    assert_eq!(plan.moments, 0);
    assert_eq!(gb(plan.host_moments), 60.9);
    assert_eq!(plan.staging, 2 * 4 * 152064 * 3584);
    assert!(plan.staging < plan.activations);
    assert_eq!(gb(plan.weights), 15.2);
    assert_eq!(gb(plan.gradients), 30.5);
    assert!(plan.peak() <= memory_plan::usable(H100_FREE));
    let resident = MemoryPlan::new(
        &c,
        RunShape {
            recompute: true,
            ..empo_7b(MomentDtype::F32)
        },
    );
    assert!(resident.peak() > memory_plan::usable(H100_FREE));

    let h200 = resolve_7b(
        MomentDtype::F32,
        Switch::Auto,
        Switch::Auto,
        budget(H200_FREE, HOST_AVAILABLE),
    )
    .unwrap();
    assert!(!h200.shape.recompute && !h200.shape.offload);
    assert_eq!(gb(h200.moments), 60.9);
    // Asked for explicitly, a setting is on whatever the memory.
    let on = resolve_7b(
        MomentDtype::F32,
        Switch::On,
        Switch::On,
        budget(H200_FREE, HOST_AVAILABLE),
    )
    .unwrap();
    assert!(on.shape.recompute && on.shape.offload);
    // Without a device to plan against (the CPU reference) nothing is refused or turned on.
    let cpu = resolve_7b(
        MomentDtype::F32,
        Switch::Auto,
        Switch::Auto,
        Budget::default(),
    )
    .unwrap();
    assert!(!cpu.shape.recompute && !cpu.shape.offload);
}

/// While sampling, the GPU holds the weights (and the moments, where they are not offloaded)
/// and nothing of the update, so the rest goes to decoding more sequences at once: the 7B run
/// on an H100 decodes hundreds where a group is 8, on an H200 with its moments on the GPU fewer.
/// The widest batch fits and one more sequence would not, and a step that needs fewer gets
/// only those.
#[test]
fn the_sampling_batch_widens_to_the_memory_left() {
    let c = qwen_7b();
    for (free, name) in [(H100_FREE, "H100"), (H200_FREE, "H200")] {
        let plan = resolve_7b(
            MomentDtype::F32,
            Switch::Auto,
            Switch::Auto,
            budget(free, HOST_AVAILABLE),
        )
        .unwrap();
        let usable = memory_plan::usable(free);
        let rows = plan.widest_rollout(&c, usable, 100_000);
        let with = |rows| {
            MemoryPlan::new(
                &c,
                RunShape {
                    rollout_rows: rows,
                    ..plan.shape
                },
            )
        };
        println!(
            "{name}: {rows} sequences: {}",
            with(rows).summary(Some(free))
        );
        assert!(rows >= 64, "{name}: {rows}");
        if name == "H100" {
            // The decode bench times a step at this width: it should be the plan's.
            assert_eq!(
                rows,
                empo_engine::kernel_bench::PLANNED_ROLLOUT_ROWS_7B_H100
            );
        }
        assert!(with(rows).peak() <= usable, "{name}");
        assert!(with(rows + 1).peak() > usable, "{name}");
        assert_eq!(
            plan.widest_rollout(&c, usable, 40),
            40,
            "{name}: capped by the step"
        );
        // Less room than a group: the group's G stands, and the plan's own verdict decides.
        assert_eq!(plan.widest_rollout(&c, 0, 100), 8, "{name}");
    }
}

/// Without the host memory to offload to, or with offloading turned off, the 7B run does not
/// fit on the H100: the error gives the plan, the host memory missing, and that bf16 moments
/// with recompute fit. With bf16 moments auto turns recompute on, since the 5.9 GB of saved
/// activations no longer fit beside the rest.
#[test]
fn a_7b_run_that_cannot_fit_says_what_would() {
    let c = qwen_7b();
    let err = resolve_7b(
        MomentDtype::F32,
        Switch::Auto,
        Switch::Auto,
        budget(H100_FREE, 32 << 30),
    )
    .unwrap_err()
    .to_string();
    println!("{err}");
    assert!(err.contains("does not fit"), "{err}");
    assert!(err.contains("need 60.9 GB of host memory"), "{err}");
    assert!(
        err.contains("--moments bf16 --offload-optimizer off --recompute on: peak 77.3 GB (fits)"),
        "{err}"
    );

    let err = resolve_7b(
        MomentDtype::F32,
        Switch::Auto,
        Switch::Off,
        budget(H100_FREE, HOST_AVAILABLE),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--offload-optimizer on --recompute on: peak") && err.contains("(fits)"),
        "{err}"
    );

    let plan = resolve_7b(
        MomentDtype::Bf16,
        Switch::Auto,
        Switch::Auto,
        budget(H100_FREE, HOST_AVAILABLE),
    )
    .unwrap();
    println!("{}", plan.summary(Some(H100_FREE)));
    assert!(plan.shape.recompute && !plan.shape.offload);
    assert_eq!(gb(plan.moments), 30.5);
    let kept = MemoryPlan::new(&c, empo_7b(MomentDtype::Bf16));
    // A layer saves, per token, 4 hidden-sized, 2 q-sized, 2 kv-sized and 3 intermediate-sized
    // bf16 rows (2 × 79,360 bytes) and 30 f32 statistics: 158,840 bytes. Recompute keeps one
    // layer's worth and each layer's input (7,168 bytes a token) instead of 28 layers' worth.
    assert_eq!(
        kept.activations - plan.activations,
        27 * 1324 * 158_840 - 28 * 1324 * 7_168
    );
    assert!(kept.peak() > memory_plan::usable(H100_FREE));
    assert!(plan.peak() <= memory_plan::usable(H100_FREE));

    // Offloaded moments are f32: asking for them with bf16 moments is refused up front.
    let err = resolve_7b(
        MomentDtype::Bf16,
        Switch::Auto,
        Switch::On,
        Budget::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("choose one"), "{err}");
}

/// `EMPO_ATTENTION=unfused` holds one sequence's scores through the attention backward: 12
/// bytes per score (f32 scores and their gradient, bf16 probabilities and score gradients), on
/// top of delta and the f32 dk/dv accumulator. For 7B's 28 heads that is 5.6 GB at 4096 tokens
/// and 90 GB at 16384, which no H100 holds beside the weights; the refusal names the flash
/// kernels as the way out, and with them the same run fits.
#[test]
fn the_unfused_attention_scores_are_planned() {
    let c = qwen_7b();
    let (n, heads) = (4096u64, 28u64);
    let delta = heads * n * 4;
    let accum = 2 * n * 4 * 128 * 4;
    assert_eq!(
        memory_plan::attention_scores_bytes(&c, n as usize),
        12 * heads * n * n + delta + accum
    );
    let long = RunShape {
        train_seq: 16384,
        unfused_attention: true,
        ..empo_7b(MomentDtype::F32)
    };
    let err = memory_plan::resolve(
        &c,
        long,
        Switch::Auto,
        Switch::Auto,
        budget(H100_FREE, HOST_AVAILABLE),
    )
    .unwrap_err()
    .to_string();
    println!("{err}");
    assert!(
        err.contains("EMPO_ATTENTION=mma --recompute on: peak") && err.contains("(fits)"),
        "{err}"
    );
    let flash = memory_plan::resolve(
        &c,
        RunShape {
            unfused_attention: false,
            ..long
        },
        Switch::Auto,
        Switch::Auto,
        budget(H100_FREE, HOST_AVAILABLE),
    )
    .unwrap();
    assert!(flash.shape.offload);
}
