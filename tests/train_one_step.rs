//! One SGD update of `train` on fixed rollouts, against PyTorch autograd
//! (tools/make_train_fixtures.py): the weights written to OUT/final/ must move exactly as
//! transformers' do, and the logged loss and gradient norm must agree.
//!
//! The same steps run on the GPU when one is present (they skip with a reason otherwise): the
//! whole driver on the CUDA backend, bf16 weights, against the same PyTorch numbers. On the GPU
//! machine, which has no cargo, tools/gpu-run.sh runs this executable with EMPO_BIN and
//! EMPO_FIXTURES pointing into its copy of the repository.

mod common;

use common::*;
use empo_engine::weights::WeightFiles;
use std::path::PathBuf;
use std::process::Command;

fn train_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("empo-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn engine() -> PathBuf {
    std::env::var_os("EMPO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_empo-engine")))
}

fn expected(case: &str) -> (WeightFiles, std::collections::HashMap<String, String>) {
    let path = fixtures().join(format!("train/{case}.expected.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    (
        WeightFiles::open_files(&[path]).unwrap(),
        meta.metadata().clone().unwrap(),
    )
}

#[derive(Clone, Copy, PartialEq)]
enum On {
    Cpu,
    /// bf16 weights and activations, f32 gradients: the update is held to the PyTorch one
    /// rounded as the GPU must round it (below), the loss and gradient norm to 2%.
    Cuda,
}

/// bf16(x), round to nearest even: the weights the CUDA backend holds.
fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The spacing of bf16 values at |x|: 2^(exponent − 7), bf16 keeping 7 fraction bits.
fn bf16_ulp(x: f32) -> f32 {
    f32::from_bits(x.abs().max(f32::MIN_POSITIVE).to_bits() & 0x7f80_0000) / 128.0
}

/// The bound on a GPU step's weights, as a fraction of each tensor's largest update beyond bf16
/// rounding: check-kernels' bound on the model gradients (`Tolerances::bf16().model_grads`).
/// Rounding the fixture's weights to bf16 alone, on the CPU, moves the updates by 1.7% of that.
const GPU_UPDATE_TOL: f32 = 0.1;
/// The bound on the GPU step's logged loss and gradient norm, relative (bf16 weights alone: 0.1%).
const GPU_STAT_TOL: f64 = 2e-2;

/// How far a GPU step's weights `got` are from PyTorch's `want` (both from `w0`), as a fraction
/// of the tensor's largest update, and where. The GPU stores bf16(bf16(w0) − lr·g): against
/// PyTorch's update applied to bf16(w0) the same way, a weight may differ by one bf16 spacing
/// (the two results round apart) plus lr times its gradient's error, which bf16 activations keep
/// to a few percent of the largest update. A wrong gradient is off by whole updates.
fn bf16_update_excess(w0: &[f32], want: &[f32], got: &[f32]) -> (f32, usize) {
    let scale = w0
        .iter()
        .zip(want)
        .fold(1e-30f32, |m, (a, b)| m.max((b - a).abs()));
    let (mut worst, mut at) = (0.0f32, 0);
    for i in 0..w0.len() {
        let exp = bf16(bf16(w0[i]) + (want[i] - w0[i]));
        let e = if got[i].is_finite() {
            let slack = bf16_ulp(exp.abs().max(got[i].abs()));
            ((got[i] - exp).abs() - slack).max(0.0) / scale
        } else {
            f32::INFINITY
        };
        if e > worst {
            (worst, at) = (e, i);
        }
    }
    (worst, at)
}

/// Runs one step and compares the weight change and the logged loss and gradient norm.
fn check_case(case: &str, args: &[&str], on: On) {
    let model = fixtures().join("tiny-qwen2-a");
    let out = train_dir(case);
    let (want, meta) = expected(case);
    let mut cmd = Command::new(engine());
    cmd.args([
        "train",
        "--weights",
        model.to_str().unwrap(),
        "--device",
        if on == On::Cpu { "cpu" } else { "cuda" },
    ])
    .args([
        "--optimizer",
        "sgd",
        "--lr",
        &meta["lr"],
        "--grad-clip",
        "0",
        "--steps",
        "1",
    ])
    .args([
        "--temperature",
        &meta["temperature"],
        "--out",
        out.to_str().unwrap(),
    ])
    .args(args);
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{case}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let got = WeightFiles::open_dir(&out.join("final")).unwrap();
    let before = WeightFiles::open_dir(&model).unwrap();
    let mut worst = 0.0f32;
    for name in want.names().map(str::to_string).collect::<Vec<_>>() {
        let shape = want.shape(&name).unwrap().to_vec();
        let w0 = before.load_f32(&name, &shape).unwrap();
        let w_got = got.load_f32(&name, &shape).unwrap();
        let w_want = want.load_f32(&name, &shape).unwrap();
        let delta = |w: &[f32]| w.iter().zip(&w0).map(|(a, b)| a - b).collect::<Vec<f32>>();
        let err = rel_err(&delta(&w_got), &delta(&w_want));
        match on {
            On::Cpu => {
                worst = worst.max(err);
                assert!(
                    err < 1e-3,
                    "{case}: update of {name} differs from PyTorch: rel err {err:e}"
                );
            }
            On::Cuda => {
                let (excess, at) = bf16_update_excess(&w0, &w_want, &w_got);
                worst = worst.max(excess);
                assert!(
                    excess <= GPU_UPDATE_TOL,
                    "{case}: {name}[{at}] is {} after the GPU step where PyTorch's update, \
                     rounded to bf16, gives {}: off by {excess:.2e} of the tensor's largest \
                     update beyond one bf16 spacing (update rel err {err:.2e})",
                    w_got[at],
                    bf16(bf16(w0[at]) + (w_want[at] - w0[at]))
                );
            }
        }
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let m: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let rel = if on == On::Cpu { 1e-4 } else { GPU_STAT_TOL };
    let close = |a: f64, b: f64| (a - b).abs() <= rel * b.abs().max(1e-3);
    let want_loss: f64 = meta["loss_f64"].parse().unwrap();
    let want_norm: f64 = meta["grad_norm_f64"].parse().unwrap();
    let unit = if on == On::Cpu {
        "max rel err of the update"
    } else {
        "worst error beyond bf16 rounding, of the largest update"
    };
    println!(
        "{case} ({}): {unit} {worst:.2e}; loss {} vs {want_loss}; grad norm {} vs {want_norm}",
        if on == On::Cpu { "cpu" } else { "cuda" },
        m["loss"],
        m["grad_norm"]
    );
    assert!(
        close(m["loss"].as_f64().unwrap(), want_loss),
        "{case}: loss {} vs {want_loss}",
        m["loss"]
    );
    assert!(
        close(m["grad_norm"].as_f64().unwrap(), want_norm),
        "{case}: grad norm {} vs {want_norm}",
        m["grad_norm"]
    );
    assert_eq!(
        m["num_tokens"].as_u64().unwrap().to_string(),
        meta["num_tokens"]
    );
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(
            out.join("final").join(f).exists(),
            "{case}: final/{f} is copied"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["engine_version"], empo_engine::VERSION);
    std::fs::remove_dir_all(&out).unwrap();
}

fn rollouts(name: &str) -> String {
    fixtures()
        .join("train")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// The EMPO cases share rollouts, which keep two of the three groups (the third is unanimous).
fn empo_args(extra: &[&str]) -> Vec<String> {
    let r = rollouts("empo_rollouts.jsonl");
    let base = [
        "--algo",
        "empo",
        "--rollouts",
        &r,
        "--prompt-template",
        "raw",
        "--entropy-min",
        "0.05",
        "--entropy-max",
        "10",
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn run(case: &str, args: &[String], on: On) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    check_case(case, &args, on);
}

fn em_case(on: On, extra: &[&str]) {
    let r = rollouts("em_rollouts.jsonl");
    let args = [&["--algo", "em", "--rollouts", &r], extra].concat();
    check_case("em", &args, on);
}

fn empo_token_mean_case(on: On) {
    run(
        "empo_token_mean",
        &empo_args(&["--loss-agg", "token-mean"]),
        on,
    );
}

fn empo_seq_mean_token_mean_cases(on: On) {
    let case = "empo_seq_mean_token_mean";
    run(case, &empo_args(&["--loss-agg", "seq-mean-token-mean"]), on);
    // On the first, on-policy step GSPO's gradient is GRPO's with seq-mean-token-mean.
    run(case, &empo_args(&["--policy-loss", "gspo"]), on);
}

#[test]
fn em_one_step_matches_pytorch() {
    em_case(On::Cpu, &[]);
    // Recomputing each layer in the backward changes nothing here but memory.
    em_case(On::Cpu, &["--recompute", "on"]);
}

#[test]
fn empo_token_mean_one_step_matches_pytorch() {
    empo_token_mean_case(On::Cpu);
}

#[test]
fn empo_seq_mean_token_mean_one_step_matches_pytorch_for_grpo_and_gspo() {
    empo_seq_mean_token_mean_cases(On::Cpu);
}

/// The steps above on the GPU: sampling aside, everything `train` does on a GPU (the
/// forward and backward through every kernel, the chunked lm_head statistics, the policy loss,
/// the optimizer and the checkpoint) against PyTorch autograd.
#[test]
fn one_step_on_the_gpu_matches_pytorch_within_bf16() {
    if let Err(e) = empo_engine::device::open_cuda() {
        println!("skipped: no GPU ({e:#})");
        return;
    }
    em_case(On::Cuda, &[]);
    em_case(On::Cuda, &["--recompute", "on"]);
    empo_token_mean_case(On::Cuda);
    empo_seq_mean_token_mean_cases(On::Cuda);
}

/// One AdamW step of `train` on the EM rollouts, moments offloaded or not; the run directory.
fn adamw_step(on: On, offload: &str) -> PathBuf {
    let out = train_dir(&format!("adamw-offload-{offload}"));
    let r = rollouts("em_rollouts.jsonl");
    let model = fixtures().join("tiny-qwen2-a");
    let device = if on == On::Cpu { "cpu" } else { "cuda" };
    let o = Command::new(engine())
        .args([
            "train",
            "--weights",
            model.to_str().unwrap(),
            "--device",
            device,
        ])
        .args(["--algo", "em", "--rollouts", &r, "--optimizer", "adamw"])
        .args(["--lr", "1e-3", "--grad-clip", "1", "--steps", "1"])
        .args([
            "--offload-optimizer",
            offload,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// AdamW with its moments in host memory, copied through the device a group of tensors at a
/// time, takes the step it takes with them in place. On the CPU the two are bit-identical. On
/// the GPU the f32 moments agree to the gradient's run-to-run noise, and the bf16 weights may
/// stand one bf16 spacing apart: stochastic rounding draws the same bits for an element either
/// way (they are keyed on its tensor's place in the model, which the grouped launches are told;
/// tools/kernel_emulator checks that bit for bit), but that noise can carry an f32 weight across
/// its rounding threshold.
fn offload_case(on: On) {
    let (kept, off) = (adamw_step(on, "off"), adamw_step(on, "on"));
    let files = |d: &PathBuf, f: &str| WeightFiles::open_files(&[d.join("final").join(f)]).unwrap();
    let cfg = empo_engine::config::ModelConfig::from_file(
        &fixtures().join("tiny-qwen2-a").join("config.json"),
    )
    .unwrap();
    for f in [
        "model.safetensors",
        "resume/optimizer_m.safetensors",
        "resume/optimizer_v.safetensors",
    ] {
        let (a, b) = (files(&kept, f), files(&off, f));
        let (mut moved, mut worst) = (false, 0.0f32);
        for (name, shape) in empo_engine::model::tensor_specs(&cfg) {
            let (x, y) = (
                a.load_f32(&name, &shape).unwrap(),
                b.load_f32(&name, &shape).unwrap(),
            );
            moved |= x.iter().any(|&v| v != 0.0);
            let scale = x.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
            for (&p, &q) in x.iter().zip(&y) {
                let e = match (on, f) {
                    (On::Cpu, _) => (p - q).abs(),
                    (On::Cuda, "model.safetensors") => ((p - q).abs() - bf16_ulp(p)).max(0.0),
                    (On::Cuda, _) => ((p - q).abs() / scale - 1e-3).max(0.0),
                };
                worst = worst.max(if e.is_nan() { f32::INFINITY } else { e });
            }
        }
        assert!(moved, "{f}: all zero");
        assert!(
            worst == 0.0,
            "{f}: offloaded and kept moments differ by {worst}"
        );
    }
    std::fs::remove_dir_all(&kept).unwrap();
    std::fs::remove_dir_all(&off).unwrap();
}

#[test]
fn offloaded_adamw_moments_take_the_same_step() {
    offload_case(On::Cpu);
    if let Err(e) = empo_engine::device::open_cuda() {
        println!("GPU half skipped: no GPU ({e:#})");
        return;
    }
    offload_case(On::Cuda);
}

/// The GPU criterion on made-up updates: a bf16 step whose gradient is 4% off passes, one whose
/// gradient is 20% off, or whose weights were never updated, or NaN, fails.
#[test]
fn the_bf16_update_criterion_separates_rounding_from_a_wrong_gradient() {
    let w0: Vec<f32> = (0..4096)
        .map(|i| {
            ((i * 7919 % 4096) as f32 / 4096.0 - 0.5) * 0.1 + if i % 64 == 0 { 1.0 } else { 0.0 }
        })
        .collect();
    let g: Vec<f32> = (0..4096)
        .map(|i| ((i * 104729 % 4093) as f32 / 4093.0 - 0.5) * 0.2)
        .collect();
    let lr = 0.5;
    let want: Vec<f32> = w0.iter().zip(&g).map(|(w, g)| w - lr * g).collect();
    let gpu = |gerr: f32| -> Vec<f32> {
        w0.iter()
            .zip(&g)
            .enumerate()
            .map(|(i, (w, g))| {
                // An error of gerr of the largest gradient, alternating in sign.
                let e = if i % 2 == 0 { gerr } else { -gerr } * 0.1;
                bf16(bf16(*w) - lr * (g + e))
            })
            .collect()
    };
    let (ok, _) = bf16_update_excess(&w0, &want, &gpu(0.04));
    assert!(ok <= GPU_UPDATE_TOL, "{ok}");
    let (bad, _) = bf16_update_excess(&w0, &want, &gpu(0.2));
    assert!(bad > GPU_UPDATE_TOL, "{bad}");
    let stale: Vec<f32> = w0.iter().map(|&w| bf16(w)).collect();
    assert!(bf16_update_excess(&w0, &want, &stale).0 > 0.5);
    let mut nan = gpu(0.0);
    nan[17] = f32::NAN;
    assert_eq!(bf16_update_excess(&w0, &want, &nan), (f32::INFINITY, 17));
}
