//! One SGD update of `train` on fixed rollouts, against PyTorch autograd
//! (tools/make_train_fixtures.py): the weights written to OUT/final/ must move exactly as
//! transformers' do, and the logged loss and gradient norm must agree.

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

fn expected(case: &str) -> (WeightFiles, std::collections::HashMap<String, String>) {
    let path = fixtures().join(format!("train/{case}.expected.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    (
        WeightFiles::open_files(&[path]).unwrap(),
        meta.metadata().clone().unwrap(),
    )
}

/// Runs one step and compares the weight change and the logged loss and gradient norm.
fn check_case(case: &str, args: &[&str]) {
    let model = fixtures().join("tiny-qwen2-a");
    let out = train_dir(case);
    let (want, meta) = expected(case);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_empo-engine"));
    cmd.args([
        "train",
        "--weights",
        model.to_str().unwrap(),
        "--device",
        "cpu",
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
        let delta = |w: Vec<f32>| w.iter().zip(&w0).map(|(a, b)| a - b).collect::<Vec<f32>>();
        let d_got = delta(got.load_f32(&name, &shape).unwrap());
        let d_want = delta(want.load_f32(&name, &shape).unwrap());
        let err = rel_err(&d_got, &d_want);
        worst = worst.max(err);
        assert!(
            err < 1e-3,
            "{case}: update of {name} differs from PyTorch: rel err {err:e}"
        );
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let m: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1e-3);
    let want_loss: f64 = meta["loss_f64"].parse().unwrap();
    let want_norm: f64 = meta["grad_norm_f64"].parse().unwrap();
    println!("{case}: max rel err of the update {worst:.2e}; loss {} vs {want_loss}; grad norm {} vs {want_norm}", m["loss"], m["grad_norm"]);
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

#[test]
fn em_one_step_matches_pytorch() {
    check_case(
        "em",
        &["--algo", "em", "--rollouts", &rollouts("em_rollouts.jsonl")],
    );
}

#[test]
fn empo_token_mean_one_step_matches_pytorch() {
    let r = rollouts("empo_rollouts.jsonl");
    let args = [
        "--algo",
        "empo",
        "--rollouts",
        &r,
        "--prompt-template",
        "raw",
        "--entropy-min",
        "0.05",
    ];
    check_case(
        "empo_token_mean",
        &[
            &args[..],
            &["--entropy-max", "10", "--loss-agg", "token-mean"],
        ]
        .concat(),
    );
}

#[test]
fn empo_seq_mean_token_mean_one_step_matches_pytorch_for_grpo_and_gspo() {
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
    check_case(
        "empo_seq_mean_token_mean",
        &[&base[..], &["--loss-agg", "seq-mean-token-mean"]].concat(),
    );
    // On the first, on-policy step GSPO's gradient is GRPO's with seq-mean-token-mean.
    check_case(
        "empo_seq_mean_token_mean",
        &[&base[..], &["--policy-loss", "gspo"]].concat(),
    );
}
