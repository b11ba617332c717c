use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use empo_engine::backend::cpu::CpuBackend;
use empo_engine::backend::Backend;
use empo_engine::device::{self, Device, DeviceArg};
use empo_engine::generate::{generate, score, GenerateOptions};
use empo_engine::model::Qwen2;
use empo_engine::sampling::SamplingParams;
use empo_engine::tokenizer::{ChatMessage, Tokenizer};
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
    /// Print the version, the compiled kernels and the devices found.
    Info,
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

fn info() {
    println!("empo-engine {}", empo_engine::VERSION);
    if device::kernels_compiled() {
        println!("CUDA kernels: compiled");
    } else {
        println!("CUDA kernels: not compiled (built without nvcc)");
    }
    println!(
        "devices: cpu ({} threads){}",
        rayon::current_num_threads(),
        if device::nvidia_driver_present() {
            ", NVIDIA driver present"
        } else {
            ""
        }
    );
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Score(a) => {
            let l = open(&a.model)?;
            match l.device {
                Device::Cpu => run_score(&CpuBackend, &l.dir, &a),
            }
        }
        Cmd::Generate(a) => {
            let l = open(&a.model)?;
            match l.device {
                Device::Cpu => run_generate(&CpuBackend, &l.dir, &a),
            }
        }
        Cmd::Info => {
            info();
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
