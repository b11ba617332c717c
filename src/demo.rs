//! The embedded demo: a tiny Qwen2 of our own (assets/demo/), pretrained by `sft` on a synthetic
//! addition task just far enough to be right often but not always, so that `empo-engine train`
//! with no arguments shows EMPO (or one-shot EM) working on a CPU in minutes.

use crate::backend::Backend;
use crate::checkpoint;
use crate::config::{DType, ModelConfig};
use crate::data::{load_examples, Example};
use crate::generate::{generate_batch, GenerateOptions, Request};
use crate::grader;
use crate::model::{random_tensors, Qwen2};
use crate::optim::{OptimConfig, OptimizerKind};
use crate::rl::{self, LossAgg, PolicyLoss};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::train::{render_prompt, Algo, PromptTemplate, Source, TrainConfig, Trainer};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// assets/demo of this checkout, or EMPO_DEMO_DIR.
pub fn demo_dir() -> PathBuf {
    std::env::var("EMPO_DEMO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo"))
}

/// Sampling settings shared by the before/after measurement and training.
pub const GROUP: usize = 8;
pub const TEMPERATURE: f32 = 0.8;
pub const MAX_NEW_TOKENS: usize = 72;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measure {
    /// Greedy accuracy in percent.
    pub accuracy: f64,
    /// Mean semantic entropy of GROUP samples per question.
    pub semantic_entropy: f64,
}

/// Sequences the demo's measurements decode together.
const ROWS: usize = 64;

/// Greedy accuracy and mean semantic entropy over labeled examples.
pub fn measure<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    tok: &Tokenizer,
    examples: &[Example],
    seed: u64,
) -> Result<Measure> {
    let mut golds = Vec::with_capacity(examples.len());
    let mut prompts = Vec::with_capacity(examples.len());
    for e in examples {
        golds.push(
            e.gold
                .as_ref()
                .context("demo evaluation rows need an answer")?,
        );
        prompts.push(tok.encode(&render_prompt(
            tok,
            &e.prompt,
            PromptTemplate::ChatSuffix,
            "",
        )?)?);
    }
    // Every question's greedy answer, then its G samples, decoded together (each question from
    // its own stream, as alone).
    let requests = |n: usize| -> Vec<Request> {
        prompts
            .iter()
            .zip(examples)
            .map(|(prompt, e)| Request {
                prompt,
                n,
                seed: seed ^ (e.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            })
            .collect()
    };
    let mut opt = GenerateOptions {
        max_new_tokens: MAX_NEW_TOKENS,
        sampling: SamplingParams::greedy(),
        n: 1,
        seed,
        stop_ids: tok.eos_ids.clone(),
        ignore_eos: false,
    };
    let greedy = generate_batch(be, model, &requests(1), &opt, ROWS)?;
    opt.sampling = SamplingParams {
        temperature: TEMPERATURE,
        top_k: 0,
        top_p: 1.0,
    };
    let sampled = generate_batch(be, model, &requests(GROUP), &opt, ROWS)?;
    let (mut correct, mut se) = (0usize, 0.0f64);
    for ((gold, greedy), samples) in golds.iter().zip(greedy).zip(sampled) {
        let text = tok.decode(&greedy[0].ids, true)?;
        correct += grader::extract_boxed(&text).is_some_and(|a| grader::grade(&a, gold)) as usize;
        let answers: Vec<Option<String>> = samples
            .iter()
            .map(|c| tok.decode(&c.ids, true).map(|t| grader::extract_boxed(&t)))
            .collect::<Result<_>>()?;
        let (ids, sizes) = rl::cluster_answers(&answers, grader::is_equiv);
        se += rl::group_stats(&ids, &sizes).semantic_entropy as f64;
    }
    let n = examples.len().max(1) as f64;
    Ok(Measure {
        accuracy: 100.0 * correct as f64 / n,
        semantic_entropy: se / n,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub algo: Algo,
    pub accuracy_before: f64,
    pub accuracy_after: f64,
    pub semantic_entropy_before: f64,
    pub semantic_entropy_after: f64,
    pub steps: usize,
    pub seconds: f64,
    pub heldout_questions: usize,
}

pub struct DemoOptions {
    pub algo: Algo,
    pub out: PathBuf,
    pub steps: Option<usize>,
    pub heldout: Option<usize>,
    pub seed: u64,
    pub lr: Option<f32>,
    pub temperature: Option<f32>,
    pub group_size: Option<usize>,
}

/// The training settings of the demo (chosen on the training prompts, never the held-out set).
pub fn demo_config(dir: &Path, o: &DemoOptions) -> TrainConfig {
    let em = o.algo == Algo::Em;
    let mut c = TrainConfig {
        engine_version: crate::VERSION.to_string(),
        algo: o.algo,
        weights: dir.join("model"),
        data: Some(dir.join("prompts.jsonl")),
        rollouts: None,
        prompts_per_step: Some(if em { 1 } else { 8 }),
        prompt_template: PromptTemplate::ChatSuffix,
        suffix: String::new(),
        group_size: if em { 32 } else { GROUP },
        rollout_rows: 0,
        temperature: if em { 0.5 } else { TEMPERATURE },
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: MAX_NEW_TOKENS,
        entropy_min: 0.0,
        entropy_max: 0.75 * (GROUP as f32).ln(),
        max_refill_rounds: 1,
        policy_loss: PolicyLoss::Grpo,
        loss_agg: LossAgg::TokenMean,
        clip_low: 0.2,
        clip_high: 0.2,
        dual_clip: None,
        kl_coef: 0.0,
        recompute: Default::default(),
        offload_optimizer: Default::default(),
        mini_batches: 1,
        ppo_epochs: 1,
        optim: OptimConfig {
            kind: OptimizerKind::Adamw,
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
            moments: crate::optim::MomentDtype::F32,
        },
        steps: o.steps.unwrap_or(if em { 10 } else { 60 }),
        seed: o.seed,
        save_every: 0,
        out: o.out.clone(),
    };
    c.optim.lr = o.lr.unwrap_or(c.optim.lr);
    c.temperature = o.temperature.unwrap_or(c.temperature);
    c.group_size = o.group_size.unwrap_or(c.group_size);
    c
}

/// Measures, trains, measures again; writes summary.json and curves.png into the run dir.
pub fn run<B: Backend>(be: &B, o: &DemoOptions) -> Result<Summary> {
    let dir = demo_dir();
    if !dir.join("model/config.json").exists() {
        bail!(
            "{}: the embedded demo model is missing (rebuild it with tools/build-demo.sh)",
            dir.display()
        );
    }
    let t0 = std::time::Instant::now();
    let cfg = demo_config(&dir, o);
    let tok = Tokenizer::from_dir(&cfg.weights)?;
    let mut heldout = load_examples(&dir.join("heldout.jsonl"))?;
    heldout.truncate(o.heldout.unwrap_or(heldout.len()));
    let model = Qwen2::load_dir(be, &cfg.weights)?;
    eprintln!(
        "demo: measuring {} held-out questions before training",
        heldout.len()
    );
    let before = measure(be, &model, &tok, &heldout, o.seed)?;
    eprintln!(
        "before: greedy accuracy {:.1}%, semantic entropy {:.3}",
        before.accuracy, before.semantic_entropy
    );
    let source = Source::Prompts(load_examples(cfg.data.as_ref().expect("demo data"))?);
    let steps = cfg.steps;
    let mut t = Trainer::new(be, cfg, model, tok, source, false)?;
    t.run()?;
    let after = measure(be, &t.model, &t.tok, &heldout, o.seed)?;
    eprintln!(
        "after:  greedy accuracy {:.1}%, semantic entropy {:.3}",
        after.accuracy, after.semantic_entropy
    );
    let s = Summary {
        algo: o.algo,
        accuracy_before: before.accuracy,
        accuracy_after: after.accuracy,
        semantic_entropy_before: before.semantic_entropy,
        semantic_entropy_after: after.semantic_entropy,
        steps,
        seconds: t0.elapsed().as_secs_f64(),
        heldout_questions: heldout.len(),
    };
    crate::io::write_atomic(&o.out.join("summary.json"), &serde_json::to_vec_pretty(&s)?)?;
    plot_curves(&o.out.join("metrics.jsonl"), &o.out.join("curves.png"))?;
    Ok(s)
}

/// Semantic entropy, majority share and label accuracy per step, from metrics.jsonl.
pub fn plot_curves(metrics: &Path, png: &Path) -> Result<()> {
    use plotters::prelude::*;
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let series = |key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .collect()
    };
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("cannot load the embedded font"))?;
    let root = BitMapBackend::new(png, (900, 520)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw {}: {e}", png.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let last = rows.len().max(2) as f64;
    let y_max = series("semantic_entropy")
        .iter()
        .map(|p| p.1)
        .fold(1.0f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption("empo-engine demo: training curves", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(1.0..last, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| err(&e))?;
    for (key, color, label) in [
        ("semantic_entropy", &RED, "semantic entropy"),
        ("majority_share", &BLUE, "majority share"),
        ("label_accuracy", &GREEN, "label accuracy (logged only)"),
    ] {
        chart
            .draw_series(LineSeries::new(series(key), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The tiny model: Qwen2 layout, small enough to train on two cores in minutes.
pub fn tiny_config(vocab: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: 128,
        intermediate_size: 352,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        vocab_size: vocab.div_ceil(64) * 64,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        max_position_embeddings: 512,
        dtype: DType::BF16,
    }
}

pub struct BuildOptions {
    pub out: PathBuf,
    pub seed: u64,
    pub sft_chunk: usize,
    pub max_sft_steps: usize,
    /// Stop pretraining once greedy accuracy on the dev prompts reaches this (percent).
    pub target_accuracy: f64,
    pub lr: f32,
}

/// Builds assets/demo from scratch: task files, tokenizer, random model, SFT until the dev
/// accuracy reaches the target, then the final weights as assets/demo/model.
pub fn build<B: Backend>(be: &B, o: &BuildOptions) -> Result<()> {
    let data = &o.out;
    std::fs::create_dir_all(data)?;
    crate::demo_task::write_task_files(data, o.seed, 5_000, 1_500, 200, 2)?;
    let work = data.join("build");
    let tok_dir = work.join("tokenizer");
    std::fs::create_dir_all(&tok_dir)?;
    let sft = crate::train::load_sft(&data.join("sft.jsonl"))?;
    let texts: Vec<String> = sft
        .iter()
        .take(4000)
        .map(|r| match &r.prompt {
            crate::data::Prompt::Text(q) => format!("{q}\n{}", r.completion),
            crate::data::Prompt::Chat(m) => format!(
                "{}\n{}",
                m.iter().map(|x| x.content.as_str()).collect::<String>(),
                r.completion
            ),
        })
        .collect();
    let vocab = crate::demo_task::train_tokenizer(&texts, 400, &tok_dir)?;
    let cfg = tiny_config(vocab);
    let init = Qwen2::from_host(be, cfg.clone(), &random_tensors(&cfg, o.seed, 0.05))?;
    let init_dir = work.join("init");
    checkpoint::save_model_dir(be, &init, &tok_dir, &init_dir, |_| Ok(()))?;
    let tok = Tokenizer::from_dir(&init_dir)?;
    let dev: Vec<Example> = load_examples(&data.join("prompts.jsonl"))?
        .into_iter()
        .take(100)
        .collect();
    let mut tcfg = TrainConfig {
        algo: Algo::Sft,
        weights: init_dir.clone(),
        data: Some(data.join("sft.jsonl")),
        prompts_per_step: Some(32),
        steps: 0,
        out: work.join("sft"),
        ..demo_config(
            data,
            &DemoOptions {
                algo: Algo::Empo,
                out: work.join("sft"),
                steps: None,
                heldout: None,
                seed: o.seed,
                lr: None,
                temperature: None,
                group_size: None,
            },
        )
    };
    tcfg.optim.lr = o.lr;
    tcfg.optim.weight_decay = 0.01;
    let model = Qwen2::load_dir(be, &init_dir)?;
    let mut t = Trainer::new(be, tcfg, model, tok, Source::Supervised(sft), false)?;
    loop {
        t.cfg.steps += o.sft_chunk;
        t.run()?;
        let m = measure(be, &t.model, &t.tok, &dev, o.seed)?;
        eprintln!(
            "sft step {}: dev greedy accuracy {:.1}%, semantic entropy {:.3}",
            t.state.step, m.accuracy, m.semantic_entropy
        );
        if m.accuracy >= o.target_accuracy || t.state.step >= o.max_sft_steps {
            break;
        }
    }
    let model_dir = data.join("model");
    checkpoint::save_model_dir(be, &t.model, &init_dir, &model_dir, |_| Ok(()))?;
    std::fs::remove_dir_all(&work)?;
    std::fs::remove_file(data.join("sft.jsonl"))?;
    eprintln!("wrote {}", model_dir.display());
    Ok(())
}
