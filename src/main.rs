use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use empo_engine::backend::cpu::CpuBackend;
use empo_engine::backend::Backend;
use empo_engine::config::ModelConfig;
use empo_engine::device::{self, Device, DeviceArg};
use empo_engine::eval::{self, EvalOptions};
use empo_engine::generate::{generate, score, GenerateOptions};
use empo_engine::memory_plan::Switch;
use empo_engine::model::Qwen2;
use empo_engine::optim::{MomentDtype, OptimConfig, OptimizerKind};
use empo_engine::rl::{LossAgg, PolicyLoss};
use empo_engine::sampling::SamplingParams;
use empo_engine::tokenizer::{ChatMessage, Tokenizer};
use empo_engine::train::{self, Algo, PromptTemplate, Source, TrainConfig, Trainer};
use empo_engine::{hub, io};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "empo-engine",
    version,
    about = "Label-free reasoning RL (EMPO, one-shot EM) for Qwen2 models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Score a token sequence: logits, next-token log-probs and entropies to a safetensors file.
    Score(ScoreArgs),
    /// Generate completions for a prompt with the KV cache.
    Generate(GenerateArgs),
    /// Train without labels: EMPO (default), one-shot EM, or the GRPO/TTRL baselines.
    Train(Box<TrainArgs>),
    /// Supervised next-token training on completions (cross-entropy, AdamW), same run layout as train.
    Sft(SftArgs),
    /// Rebuild the embedded demo (assets/demo): task data, tokenizer, tiny model, SFT pretraining.
    #[command(hide = true)]
    BuildDemo(BuildDemoArgs),
    /// Evaluate on benchmark files: greedy pass@1, or avg@k / pass@k / maj@k with --n K.
    Eval(EvalArgs),
    /// Rank prompts for one-shot EM (pass@k variance with gold answers, else semantic entropy).
    Select(SelectArgs),
    /// Grade a prediction file against its gold answers.
    Grade(GradeArgs),
    /// Print the version, the compiled kernels and the devices found.
    Info(InfoArgs),
    /// Check every CUDA kernel, then the whole model on the GPU, against the CPU reference;
    /// prints one row per check and exits non-zero on any failure (2 when there is no GPU).
    CheckKernels(CheckArgs),
    /// Kernel throughput at Qwen2.5-7B shapes, as TFLOP/s or GB/s and as a fraction of the
    /// copy-bandwidth and GEMM ceilings measured in the same run (exits 2 when there is no GPU).
    Bench(BenchArgs),
}

#[derive(Args)]
struct InfoArgs {
    /// Also print ptxas's report for every kernel and target: registers, stack, spills,
    /// static shared memory and its performance advisories.
    #[arg(long)]
    resources: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// `cpu` measures the CPU reference (at small shapes).
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceArg,
    /// Small shapes (hidden 256, vocab 4096, 256 tokens) instead of the 7B ones.
    #[arg(long)]
    small: bool,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Also write the rows as JSON (tools/bench_torch_gpu.py reads it for the side-by-side).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Leave out a section (matmul, memory-bound, attention, attention decode, softmax-entropy,
    /// adamw, optimizer, sampling, lm_head, model, decode step, policy loss, (pdl), embedding,
    /// ids on the device, attention variants); repeatable. For a rerun after a fault lost the device in one.
    #[arg(long, value_name = "SECTION")]
    skip: Vec<String>,
}

#[derive(Args)]
struct CheckArgs {
    /// Seed of the random inputs (default: from the clock, so every run draws fresh data).
    #[arg(long)]
    seed: Option<u64>,
    /// Skip the Qwen2.5-7B-sized shapes (vocab 152064, hidden 3584, sequence 1024).
    #[arg(long)]
    quick: bool,
    /// `cpu` runs the same checks over the CPU backend itself: a self-test of the harness.
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceArg,
    /// Leave out a check, or a part of the GPU checks, by the name its rows carry before
    /// ": error" (such as `softmax_stats` or `wgmma probe`); repeatable. Each becomes a failed
    /// row. For a rerun after a fault lost the device in it.
    #[arg(long, value_name = "NAME")]
    skip: Vec<String>,
}

#[derive(Args)]
struct SftArgs {
    #[arg(long)]
    weights: String,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// JSONL of {"prompt"|"problem"|"question", "completion"|"response"}.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value = "chat-suffix")]
    prompt_template: PromptTemplate,
    #[arg(long, default_value = "")]
    suffix: String,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Default: one epoch.
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 1e-4)]
    lr: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f32,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct BuildDemoArgs {
    #[arg(long, default_value = "assets/demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SFT steps between dev-accuracy checks.
    #[arg(long, default_value_t = 100)]
    chunk: usize,
    #[arg(long, default_value_t = 3000)]
    max_steps: usize,
    /// Stop pretraining at this greedy dev accuracy (percent).
    #[arg(long, default_value_t = 70.0)]
    target_accuracy: f64,
    #[arg(long, default_value_t = 2e-3)]
    lr: f32,
}

#[derive(Args)]
struct SampleArgs {
    #[arg(long, value_enum, default_value = "chat-suffix")]
    prompt_template: PromptTemplate,
    #[arg(long, default_value = train::DEFAULT_SUFFIX)]
    suffix: String,
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only the first N problems of each file.
    #[arg(long)]
    limit: Option<usize>,
    /// Sequences decoded together, across problems (continuous batching).
    #[arg(long, default_value_t = 64)]
    rollout_rows: usize,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Benchmark files (JSONL or Parquet), each with gold answers.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Samples per problem; 1 is greedy pass@1.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Sampling temperature (default 0 with --n 1, else 0.6).
    #[arg(long)]
    temperature: Option<f32>,
    #[command(flatten)]
    sample: SampleArgs,
    /// Directory for the per-problem JSONL files (default runs/eval-<model>).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct SelectArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 16)]
    k: usize,
    #[arg(long, default_value_t = 0.6)]
    temperature: f32,
    #[command(flatten)]
    sample: SampleArgs,
    /// Ranking output (JSONL, best first).
    #[arg(long, default_value = "selection.jsonl")]
    out: PathBuf,
}

#[derive(Args)]
struct GradeArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    pred_field: String,
    #[arg(long)]
    answer_field: String,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Preset {
    /// EMPO paper (arXiv 2504.05812, TRL recipe): G 7, lr 3e-7, max 2048 new tokens.
    EmpoPaper,
    /// EMPO repository's verl recipe (README): G 16, temperature 1.0, lr 5e-7, max 3072 new tokens, GSPO.
    EmpoVerl,
    /// One-shot EM paper: temperature 0.5, lr 2e-5, 10 steps, batch 64, max 512 new tokens.
    OneShotEm,
}

#[derive(Args)]
struct TrainArgs {
    #[arg(long)]
    weights: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Prompt file (JSONL or Parquet); gold answers in it are only logged, never trained on.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Replay pre-generated completions instead of sampling (JSONL).
    #[arg(long)]
    rollouts: Option<PathBuf>,
    #[arg(long, value_enum)]
    algo: Option<Algo>,
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Questions (or rollout records) per step; default: all of a rollout file, 1 for em, 8 otherwise.
    #[arg(long)]
    prompts_per_step: Option<usize>,
    #[arg(long, value_enum)]
    prompt_template: Option<PromptTemplate>,
    /// Appended to the question with --prompt-template chat-suffix.
    #[arg(long)]
    suffix: Option<String>,
    /// Completions per question (G); for --algo em, completions per step.
    #[arg(long, alias = "n")]
    group_size: Option<usize>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Drop questions whose semantic entropy is below this.
    #[arg(long)]
    entropy_min: Option<f32>,
    /// Drop questions whose semantic entropy is above this (default 0.75·ln G).
    #[arg(long)]
    entropy_max: Option<f32>,
    #[arg(long)]
    max_refill_rounds: Option<usize>,
    #[arg(long, value_enum)]
    policy_loss: Option<PolicyLoss>,
    #[arg(long, value_enum)]
    loss_agg: Option<LossAgg>,
    #[arg(long)]
    clip_low: Option<f32>,
    #[arg(long)]
    clip_high: Option<f32>,
    #[arg(long)]
    dual_clip: Option<f32>,
    /// KL penalty to the initial weights (loads a second copy of the model); 0 disables it.
    #[arg(long)]
    kl_coef: Option<f32>,
    #[arg(long)]
    mini_batches: Option<usize>,
    #[arg(long)]
    ppo_epochs: Option<usize>,
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKind>,
    /// Storage of AdamW's moments: bf16 halves their memory, with stochastic rounding on the
    /// GPU (the CPU reference stays f32).
    #[arg(long, value_enum, default_value = "f32")]
    moments: MomentDtype,
    /// Activation checkpointing: keep each layer's input only and recompute the layer in the
    /// backward. auto: on where the run would not fit on the GPU without it.
    #[arg(long, value_enum, default_value = "auto")]
    recompute: Switch,
    /// Keep AdamW's f32 moments in host memory and stream them through the GPU group by group
    /// at each update. auto: on where the run would not fit on the GPU otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    offload_optimizer: Switch,
    /// Sequences decoded together while sampling, across the step's prompts (continuous
    /// batching: a finished sequence's slot takes the next at once). Default: as many as the
    /// GPU has room for beside the weights, up to a step's prompts × G; 64 on the CPU.
    #[arg(long)]
    rollout_rows: Option<usize>,
    #[arg(long)]
    lr: Option<f32>,
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Global gradient-norm clip; 0 disables it.
    #[arg(long)]
    grad_clip: Option<f32>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Save OUT/step-N every this many steps (0: only OUT/final).
    #[arg(long)]
    save_every: Option<usize>,
    /// Run directory (default runs/<UTC timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its newest checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Demo only: measure on the first N held-out questions (shortened runs).
    #[arg(long, hide = true)]
    heldout: Option<usize>,
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory, or a model name in the local Hugging Face cache (never downloaded).
    #[arg(long)]
    weights: String,
    /// cpu, cuda, or auto (CUDA when a GPU and compiled kernels are present).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to tokenize and score.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    text: Option<String>,
    /// Comma-separated token ids.
    #[arg(long)]
    tokens: Option<String>,
    /// Temperature of the softmax behind logprobs and entropy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Output safetensors file with `logits` [T, V], `logprobs` [T-1], `entropy` [T].
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    prompt: Option<String>,
    /// Comma-separated prompt token ids.
    #[arg(long)]
    tokens: Option<String>,
    /// Wrap the prompt as a user message in the model's chat template, with the generation prompt.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past the EOS tokens up to --max-new-tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// One JSON object per completion, with `text` and `ids`.
    #[arg(long)]
    json: bool,
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--tokens: {t:?} is not a token id"))
        })
        .collect()
}

struct Loaded {
    dir: PathBuf,
    device: Device,
}

fn open(m: &ModelArgs) -> Result<Loaded> {
    let dir = hub::resolve_weights(&m.weights)?;
    let device = device::select(m.device)?;
    Ok(Loaded { dir, device })
}

fn run_score<B: Backend>(be: &B, dir: &Path, a: &ScoreArgs) -> Result<()> {
    let model = Qwen2::load_dir(be, dir)?;
    let ids = match (&a.text, &a.tokens) {
        (Some(text), _) => Tokenizer::from_dir(dir)?.encode(text)?,
        (None, Some(t)) => parse_ids(t)?,
        (None, None) => bail!("give --text or --tokens"),
    };
    let s = score(be, &model, &ids, a.temperature)?;
    let (t, v) = (ids.len(), model.cfg.vocab_size);
    io::save_f32_safetensors(
        &a.out,
        &[
            ("logits", vec![t, v], &s.logits),
            ("logprobs", vec![t - 1], &s.logprobs),
            ("entropy", vec![t], &s.entropy),
        ],
        None,
    )?;
    let mean_nll = -s.logprobs.iter().sum::<f32>() / (t.max(2) - 1) as f32;
    eprintln!(
        "scored {t} tokens: mean next-token NLL {mean_nll:.4} at T={}; wrote {}",
        a.temperature,
        a.out.display()
    );
    Ok(())
}

fn run_generate<B: Backend>(be: &B, dir: &Path, a: &GenerateArgs) -> Result<()> {
    let model = Qwen2::load_dir(be, dir)?;
    let tok = Tokenizer::from_dir(dir)?;
    let prompt = match (&a.prompt, &a.tokens) {
        (Some(p), _) if a.chat => {
            let msgs = [ChatMessage {
                role: "user".into(),
                content: p.clone(),
            }];
            tok.encode(&tok.apply_chat_template(&msgs, true)?)?
        }
        (Some(p), _) => tok.encode(p)?,
        (None, Some(t)) => parse_ids(t)?,
        (None, None) => bail!("give --prompt or --tokens"),
    };
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be >= 0, got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    let opt = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
        },
        n: a.n,
        seed: a.seed,
        stop_ids: tok.eos_ids.clone(),
        ignore_eos: a.ignore_eos,
    };
    let t0 = std::time::Instant::now();
    let outs = generate(be, &model, &prompt, &opt)?;
    let secs = t0.elapsed().as_secs_f64();
    let total: usize = outs.iter().map(|c| c.ids.len()).sum();
    for (i, c) in outs.iter().enumerate() {
        let text = tok.decode(&c.ids, true)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"index": i, "text": text, "ids": c.ids, "stopped": c.stopped})
            );
        } else {
            if outs.len() > 1 {
                println!("--- completion {i} ---");
            }
            println!("{text}");
        }
    }
    eprintln!(
        "generated {total} tokens in {secs:.2}s ({:.1} tokens/s)",
        total as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// UTC time as YYYYmmdd-HHMMSS, for default run directories.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's date algorithms.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Explicit flags win over the preset, which wins over the algorithm's defaults.
fn resolve_train_config(a: &TrainArgs, weights: PathBuf) -> Result<TrainConfig> {
    let algo = a.algo.unwrap_or(match a.preset {
        Some(Preset::OneShotEm) => Algo::Em,
        _ => Algo::Empo,
    });
    let em = algo == Algo::Em;
    let (mut g, mut temp, mut lr, mut max_new, mut steps) = if em {
        (64, 0.5, 2e-5, 512, 10)
    } else {
        (8, 1.0, 1e-6, 1024, 100)
    };
    let mut policy = PolicyLoss::Grpo;
    match a.preset {
        Some(Preset::EmpoPaper) => (g, lr, max_new) = (7, 3e-7, 2048),
        Some(Preset::EmpoVerl) => {
            (g, temp, lr, max_new, policy) = (16, 1.0, 5e-7, 3072, PolicyLoss::Gspo)
        }
        Some(Preset::OneShotEm) => (g, temp, lr, steps, max_new) = (64, 0.5, 2e-5, 10, 512),
        None => {}
    }
    let policy_loss = a.policy_loss.unwrap_or(policy);
    // GSPO's sequence ratios live much closer to 1, so its trust region is far narrower.
    let (clip_lo, clip_hi, agg) = match policy_loss {
        PolicyLoss::Grpo => (0.2, 0.2, LossAgg::TokenMean),
        PolicyLoss::Gspo => (3e-4, 4e-4, LossAgg::SeqMeanTokenMean),
    };
    let group_size = a.group_size.unwrap_or(g);
    if group_size == 0 {
        bail!("--group-size must be at least 1");
    }
    if a.data.is_none() && a.rollouts.is_none() {
        bail!(
            "give --data PROMPTS.jsonl|.parquet to sample from, or --rollouts FILE.jsonl to replay"
        );
    }
    let lr = a.lr.unwrap_or(lr);
    if !(lr.is_finite() && lr >= 0.0) {
        bail!("--lr must be a non-negative number, got {lr}");
    }
    Ok(TrainConfig {
        engine_version: empo_engine::VERSION.to_string(),
        algo,
        weights,
        data: a.data.clone(),
        rollouts: a.rollouts.clone(),
        // A rollout file is replayed whole each step; one-shot EM samples its batch from one
        // prompt; EMPO takes 8 questions a step.
        prompts_per_step: a.prompts_per_step.or(match (a.rollouts.is_some(), em) {
            (true, _) => None,
            (false, true) => Some(1),
            (false, false) => Some(8),
        }),
        prompt_template: a.prompt_template.unwrap_or(PromptTemplate::ChatSuffix),
        suffix: a
            .suffix
            .clone()
            .unwrap_or_else(|| train::DEFAULT_SUFFIX.to_string()),
        group_size,
        temperature: a.temperature.unwrap_or(temp),
        top_p: a.top_p.unwrap_or(1.0),
        top_k: a.top_k.unwrap_or(0),
        max_new_tokens: a.max_new_tokens.unwrap_or(max_new),
        entropy_min: a.entropy_min.unwrap_or(0.0),
        entropy_max: a
            .entropy_max
            .unwrap_or(0.75 * (group_size.max(2) as f32).ln()),
        max_refill_rounds: a.max_refill_rounds.unwrap_or(2),
        policy_loss,
        loss_agg: a.loss_agg.unwrap_or(agg),
        clip_low: a.clip_low.unwrap_or(clip_lo),
        clip_high: a.clip_high.unwrap_or(clip_hi),
        dual_clip: a.dual_clip,
        kl_coef: a.kl_coef.unwrap_or(0.0),
        recompute: a.recompute,
        offload_optimizer: a.offload_optimizer,
        rollout_rows: a.rollout_rows.unwrap_or(0),
        mini_batches: a.mini_batches.unwrap_or(1),
        ppo_epochs: a.ppo_epochs.unwrap_or(1),
        optim: OptimConfig {
            kind: a.optimizer.unwrap_or(OptimizerKind::Adamw),
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: a.weight_decay.unwrap_or(0.01),
            grad_clip: a.grad_clip.unwrap_or(1.0),
            moments: a.moments,
        },
        steps: a.steps.unwrap_or(steps),
        seed: a.seed.unwrap_or(0),
        save_every: a.save_every.unwrap_or(0),
        out: a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(utc_stamp())),
    })
}

fn sft_config(a: &SftArgs, weights: PathBuf, records: usize) -> TrainConfig {
    let batch = a.batch_size.max(1);
    TrainConfig {
        engine_version: empo_engine::VERSION.to_string(),
        algo: Algo::Sft,
        weights,
        data: Some(a.data.clone()),
        rollouts: None,
        prompts_per_step: Some(batch),
        prompt_template: a.prompt_template,
        suffix: a.suffix.clone(),
        group_size: 1,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: 0,
        entropy_min: 0.0,
        entropy_max: f32::MAX,
        max_refill_rounds: 0,
        policy_loss: PolicyLoss::Grpo,
        loss_agg: LossAgg::TokenMean,
        clip_low: 0.0,
        clip_high: 0.0,
        dual_clip: None,
        kl_coef: 0.0,
        recompute: Default::default(),
        offload_optimizer: Default::default(),
        rollout_rows: 0,
        mini_batches: 1,
        ppo_epochs: 1,
        optim: OptimConfig {
            kind: a.optimizer,
            lr: a.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: a.weight_decay,
            grad_clip: a.grad_clip,
            moments: MomentDtype::F32,
        },
        steps: a.steps.unwrap_or(records.div_ceil(batch)),
        seed: a.seed,
        save_every: a.save_every,
        out: a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(format!("sft-{}", utc_stamp()))),
    }
}

fn run_train<B: Backend>(be: &B, mut cfg: TrainConfig, resume_from: Option<PathBuf>) -> Result<()> {
    let tok = Tokenizer::from_dir(&cfg.weights)?;
    let source = match (&cfg.rollouts, &cfg.data) {
        (None, Some(d)) if cfg.algo == Algo::Sft => Source::Supervised(train::load_sft(d)?),
        (Some(r), _) => Source::Rollouts(train::load_rollouts(r)?),
        (None, Some(d)) => Source::Prompts(empo_engine::data::load_examples(d)?),
        (None, None) => bail!("no --data or --rollouts"),
    };
    // Planned before the weights are uploaded, so that a run that cannot fit says so first.
    let model_cfg = ModelConfig::from_file(&cfg.weights.join("config.json"))?;
    let settings = train::plan_memory(be, &model_cfg, &cfg, &tok, &source)?;
    cfg.rollout_rows = settings.rollout_rows;
    let mut model = Qwen2::load_dir(be, &cfg.weights)?;
    model.recompute = settings.recompute;
    let mut t = Trainer::new(be, cfg, model, tok, source, settings.offload_optimizer)?;
    if let Some(ck) = resume_from {
        t.restore(&ck)?;
        eprintln!("resuming from {} at step {}", ck.display(), t.state.step);
    }
    let final_dir = t.run()?;
    eprintln!("wrote {}", final_dir.display());
    Ok(())
}

fn eval_options(s: &SampleArgs, n: usize, temperature: f32) -> EvalOptions {
    EvalOptions {
        n,
        temperature,
        top_p: s.top_p,
        max_new_tokens: s.max_new_tokens,
        template: s.prompt_template,
        suffix: s.suffix.clone(),
        seed: s.seed,
        limit: s.limit,
        rows: s.rollout_rows,
    }
}

fn run_eval<B: Backend>(be: &B, dir: &Path, a: &EvalArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let model = Qwen2::load_dir(be, dir)?;
    let tok = Tokenizer::from_dir(dir)?;
    let temp = a.temperature.unwrap_or(if a.n == 1 { 0.0 } else { 0.6 });
    let opt = eval_options(&a.sample, a.n, temp);
    let out_dir = a.out.clone().unwrap_or_else(|| eval::default_eval_out(dir));
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut scores = Vec::new();
    for f in &a.data {
        let stem = f
            .file_stem()
            .map_or("data".into(), |s| s.to_string_lossy().into_owned());
        let mut buf = Vec::new();
        let s = eval::eval_file(be, &model, &tok, f, &opt, &mut buf)?;
        io::write_atomic(&out_dir.join(format!("{stem}.jsonl")), &buf)?;
        eprintln!(
            "{}: {} problems, {:.1}%",
            f.display(),
            s.problems,
            100.0 * s.avg
        );
        scores.push(s);
    }
    eval::print_table(&scores, a.n);
    eprintln!("per-problem results in {}", out_dir.display());
    Ok(())
}

fn run_select<B: Backend>(be: &B, dir: &Path, a: &SelectArgs) -> Result<()> {
    let model = Qwen2::load_dir(be, dir)?;
    let tok = Tokenizer::from_dir(dir)?;
    let mut examples = empo_engine::data::load_examples(&a.data)?;
    if let Some(l) = a.sample.limit {
        examples.truncate(l);
    }
    let rows = eval::select_prompts(
        be,
        &model,
        &tok,
        &examples,
        a.k.max(1),
        &eval_options(&a.sample, a.k, a.temperature),
    )?;
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    io::write_atomic(&a.out, text.as_bytes())?;
    for r in rows.iter().take(5) {
        println!(
            "#{} index {} score {:.4} ({})",
            r["rank"],
            r["index"],
            r["score"].as_f64().unwrap_or(0.0),
            r["criterion"].as_str().unwrap_or("")
        );
    }
    eprintln!(
        "wrote the ranking of {} prompts to {}",
        rows.len(),
        a.out.display()
    );
    Ok(())
}

fn info(a: &InfoArgs) -> Result<()> {
    use empo_engine::kernel_resources::{format_table, kernel_names, parse, PTXAS_REPORT};
    println!("empo-engine {}", empo_engine::VERSION);
    if device::kernels_compiled() {
        println!(
            "CUDA kernels: compiled ({})",
            option_env!("EMPO_CUDA_TARGETS").unwrap_or("")
        );
        println!("  files: {}", option_env!("EMPO_CUDA_FILES").unwrap_or(""));
        println!("  kernels: {}", kernel_names().join(", "));
        let res = parse(PTXAS_REPORT)?;
        let spilling: Vec<String> = res
            .iter()
            .filter(|r| r.spills() || r.stack_bytes > 0)
            .map(|r| format!("{} ({})", r.kernel, r.arch))
            .collect();
        let advised = res.iter().filter(|r| !r.advisories.is_empty()).count();
        println!(
            "  ptxas: {} kernel builds; stack or spills: {}; with advisories: {advised}{}",
            res.len(),
            if spilling.is_empty() {
                "none".to_string()
            } else {
                spilling.join(", ")
            },
            if a.resources {
                ""
            } else {
                " (info --resources)"
            }
        );
        if a.resources {
            print!("{}", format_table(&res));
        }
    } else {
        println!("CUDA kernels: not compiled (built without nvcc)");
    }
    println!("devices:");
    println!("  cpu ({} threads)", rayon::current_num_threads());
    match device::open_cuda() {
        Ok(be) => {
            let (maj, min) = be.compute_capability();
            println!(
                "  cuda:0 {} (sm_{maj}{min}, {} SMs)",
                be.device_name(),
                be.sm_count()
            );
            println!(
                "    attention kernels: {} (can run at head_dim 128: {})",
                be.attention_kernels().name(),
                be.attention_variants(128).join(", ")
            );
        }
        Err(e) => println!("  cuda: none ({e:#})"),
    }
    Ok(())
}

fn check_kernels(a: &CheckArgs) -> Result<()> {
    use empo_engine::kernel_checks::{format_table, run_all, Tolerances};
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let rows = if a.device == DeviceArg::Cpu {
        println!("check-kernels: the CPU backend against its own free functions (harness self-test), seed {seed}");
        run_all(&CpuBackend, seed, &Tolerances::exact(), !a.quick, &a.skip)?
    } else {
        let be = match device::open_cuda() {
            Ok(be) => be,
            Err(e) => {
                eprintln!("check-kernels: no GPU to check: {e:#}");
                std::process::exit(2);
            }
        };
        println!(
            "check-kernels: {} against the CPU reference, seed {seed}",
            empo_engine::backend::Backend::name(&be)
        );
        empo_engine::kernel_checks::run_cuda(&be, seed, !a.quick, &a.skip)
    };
    print!("{}", format_table(&rows));
    for name in &a.skip {
        let op = format!("{name}: skipped");
        if !rows.iter().any(|r| r.op == op) {
            eprintln!("check-kernels: --skip {name:?} matched no check or part (a name is what a row carries before \": error\")");
        }
    }
    let failed = rows.iter().filter(|r| !r.pass()).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", rows.len());
    }
    println!("all {} checks passed", rows.len());
    Ok(())
}

fn bench(a: &BenchArgs) -> Result<()> {
    use empo_engine::kernel_bench::{
        format_decode, format_table, format_targets, run_all, BenchShapes,
    };
    let shapes = if a.small || a.device == DeviceArg::Cpu {
        BenchShapes::small()
    } else {
        BenchShapes::qwen_7b()
    };
    let iters = a.iters.max(1);
    let rows = if a.device == DeviceArg::Cpu {
        println!(
            "bench: {}",
            empo_engine::backend::Backend::name(&CpuBackend)
        );
        run_all(&CpuBackend, &shapes, iters, &a.skip)?
    } else {
        let be = match device::open_cuda() {
            Ok(be) => be,
            Err(e) => {
                eprintln!(
                    "bench: no GPU to measure: {e:#} (--device cpu measures the CPU reference)"
                );
                std::process::exit(2);
            }
        };
        println!("bench: {}", empo_engine::backend::Backend::name(&be));
        empo_engine::kernel_bench::run_cuda(&be, &shapes, iters, &a.skip)?
    };
    print!("{}", format_table(&rows));
    print!("{}", format_decode(&rows, &shapes));
    if a.device != DeviceArg::Cpu {
        print!("{}", format_targets(&rows));
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&rows)?;
        empo_engine::io::write_atomic(path, text.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Score(a) => {
            let l = open(&a.model)?;
            empo_engine::on_device!(l.device, |be| run_score(be, &l.dir, &a))
        }
        Cmd::Generate(a) => {
            let l = open(&a.model)?;
            empo_engine::on_device!(l.device, |be| run_generate(be, &l.dir, &a))
        }
        Cmd::Train(a)
            if a.weights.is_none()
                && a.data.is_none()
                && a.rollouts.is_none()
                && a.resume.is_none() =>
        {
            // No model and no data: the embedded demo, before/after numbers included.
            let o = empo_engine::demo::DemoOptions {
                algo: a.algo.unwrap_or(Algo::Empo),
                out: a
                    .out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("runs").join(format!("demo-{}", utc_stamp()))),
                steps: a.steps,
                heldout: a.heldout,
                seed: a.seed.unwrap_or(0),
                lr: a.lr,
                temperature: a.temperature,
                group_size: a.group_size,
            };
            let s =
                empo_engine::on_device!(device::select(a.device)?, |be| empo_engine::demo::run(
                    be, &o
                )?);
            println!(
                "{:?} on the embedded demo: greedy accuracy {:.1}% -> {:.1}%, semantic entropy {:.3} -> {:.3}, {} steps in {:.0}s",
                s.algo, s.accuracy_before, s.accuracy_after, s.semantic_entropy_before, s.semantic_entropy_after, s.steps, s.seconds
            );
            println!("wrote {}/summary.json and curves.png", o.out.display());
            Ok(())
        }
        Cmd::BuildDemo(a) => {
            let o = empo_engine::demo::BuildOptions {
                out: a.out.clone(),
                seed: a.seed,
                sft_chunk: a.chunk,
                max_sft_steps: a.max_steps,
                target_accuracy: a.target_accuracy,
                lr: a.lr,
            };
            empo_engine::demo::build(&CpuBackend, &o)
        }
        Cmd::Train(a) => {
            let (cfg, resume_from) = match &a.resume {
                Some(run_dir) => {
                    let path = run_dir.join("config.json");
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("--resume: cannot read {}", path.display()))?;
                    let mut cfg: TrainConfig = serde_json::from_str(&text)
                        .with_context(|| format!("{}: not a run config", path.display()))?;
                    if let Some(s) = a.steps {
                        cfg.steps = s;
                    }
                    (cfg, Some(train::latest_checkpoint(run_dir)?))
                }
                None => {
                    let spec = a.weights.as_deref().context("--weights is required")?;
                    (resolve_train_config(&a, hub::resolve_weights(spec)?)?, None)
                }
            };
            empo_engine::on_device!(device::select(a.device)?, |be| run_train(
                be,
                cfg,
                resume_from
            ))
        }
        Cmd::Sft(a) => {
            let weights = hub::resolve_weights(&a.weights)?;
            let n = train::load_sft(&a.data)?.len();
            let cfg = sft_config(&a, weights, n);
            empo_engine::on_device!(device::select(a.device)?, |be| run_train(be, cfg, None))
        }
        Cmd::Eval(a) => {
            let l = open(&a.model)?;
            empo_engine::on_device!(l.device, |be| run_eval(be, &l.dir, &a))
        }
        Cmd::Select(a) => {
            let l = open(&a.model)?;
            empo_engine::on_device!(l.device, |be| run_select(be, &l.dir, &a))
        }
        Cmd::Grade(a) => {
            let (c, n) = eval::grade_file(&a.data, &a.pred_field, &a.answer_field, &a.out)?;
            println!(
                "accuracy: {:.2}% ({c}/{n})",
                100.0 * c as f64 / n.max(1) as f64
            );
            Ok(())
        }
        Cmd::Info(a) => info(&a),
        Cmd::CheckKernels(a) => check_kernels(&a),
        Cmd::Bench(a) => bench(&a),
    }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, which turns a closed pipe into a panic inside println!; a CLI should
    // just stop, as other Unix tools do.
    // SAFETY: setting a signal disposition at startup, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
