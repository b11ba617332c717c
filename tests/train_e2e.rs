//! Short end-to-end CPU runs of every algorithm with real sampling, and stop/resume giving the
//! same final weights as an uninterrupted run.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("empo-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    let rows = [
        r#"{"problem": "What is 1+1?", "answer": "2"}"#,
        r#"{"problem": "Compute 2+3.", "answer": "5"}"#,
        r#"{"problem": "What is 3*3?", "answer": "9"}"#,
    ];
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    p
}

fn train(args: &[&str]) -> Output {
    let model = fixtures().join("tiny-qwen2-a");
    let o = Command::new(env!("CARGO_BIN_EXE_empo-engine"))
        .args([
            "train",
            "--weights",
            model.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .args([
            "--max-new-tokens",
            "6",
            "--group-size",
            "3",
            "--prompts-per-step",
            "2",
            "--lr",
            "1e-3",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_algorithm_runs_end_to_end_on_the_cpu() {
    let dir = tmp("algos");
    let data = prompts(&dir);
    for algo in ["empo", "em", "grpo", "ttrl"] {
        let out = dir.join(algo);
        // One of them keeps AdamW's moments in the backend's bf16 storage.
        let moments = if algo == "em" { "bf16" } else { "f32" };
        train(&[
            "--algo",
            algo,
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "2",
            "--moments",
            moments,
            "--out",
            out.to_str().unwrap(),
        ]);
        let m = metrics(&out);
        assert_eq!(m.len(), 2, "{algo}: one metrics line per step");
        for k in [
            "loss",
            "semantic_entropy",
            "majority_share",
            "kept_fraction",
            "clip_fraction",
            "grad_norm",
            "lr",
            "tokens_per_s",
        ] {
            assert!(
                m[1][k].as_f64().is_some_and(f64::is_finite),
                "{algo}: metric {k} = {}",
                m[1][k]
            );
        }
        assert!(m[0]["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(out.join("final/model.safetensors").exists() && out.join("config.json").exists());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["algo"], algo);
        assert_eq!(cfg["optim"]["moments"], moments);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_continues_to_the_same_weights() {
    let dir = tmp("resume");
    let data = prompts(&dir);
    let d = data.to_str().unwrap();
    let straight = dir.join("straight");
    train(&[
        "--algo",
        "em",
        "--data",
        d,
        "--steps",
        "3",
        "--out",
        straight.to_str().unwrap(),
    ]);
    // The split run keeps AdamW's moments in host memory, streamed through the backend group
    // by group: on the CPU that must change nothing, down to the last bit, and the moments it
    // checkpoints must resume the run.
    let split = dir.join("split");
    train(&[
        "--algo",
        "em",
        "--data",
        d,
        "--steps",
        "2",
        "--save-every",
        "1",
        "--offload-optimizer",
        "on",
        "--out",
        split.to_str().unwrap(),
    ]);
    assert!(split.join("step-1/resume/trainer_state.json").exists());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(split.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["offload_optimizer"], "on");
    let model = fixtures().join("tiny-qwen2-a");
    let o = Command::new(env!("CARGO_BIN_EXE_empo-engine"))
        .args([
            "train",
            "--weights",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--resume",
            split.to_str().unwrap(),
            "--steps",
            "3",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(split.join("final/model.safetensors")).unwrap();
    assert!(a == b, "resumed run must end with the same weights");
    let (ma, mb) = (metrics(&straight), metrics(&split));
    assert_eq!(mb.len(), 3);
    assert_eq!(
        ma[2]["loss"], mb[2]["loss"],
        "the third step sees the same samples and weights"
    );
    let initial = std::fs::read(model.join("model.safetensors")).unwrap();
    assert!(a != initial, "training changed the weights");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_in_training_is_a_clear_error() {
    let dir = tmp("nan");
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let src = fixtures().join("tiny-qwen2-a");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model_dir.join(e.file_name())).unwrap();
    }
    // A checkpoint with a NaN weight: the gradient norm is NaN and training must stop cleanly.
    let st_path = model_dir.join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec(), v.shape().to_vec()))
        .collect();
    for (n, data, _) in tensors.iter_mut() {
        if n == "model.norm.weight" {
            data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(&st_path, safetensors::serialize(views, None).unwrap()).unwrap();
    let data = prompts(&dir);
    let o = Command::new(env!("CARGO_BIN_EXE_empo-engine"))
        .args([
            "train",
            "--weights",
            model_dir.to_str().unwrap(),
            "--algo",
            "em",
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--steps",
            "1",
            "--max-new-tokens",
            "3",
            "--group-size",
            "2",
            "--out",
            dir.join("run").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("not finite"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ppo_epochs_and_mini_batches_move_off_policy_and_clip() {
    let dir = tmp("ppo");
    let out = dir.join("run");
    let r = fixtures().join("train/empo_rollouts.jsonl");
    train(&[
        "--rollouts",
        r.to_str().unwrap(),
        "--prompt-template",
        "raw",
        "--kl-coef",
        "0.1",
        "--ppo-epochs",
        "2",
        "--mini-batches",
        "2",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let m = &metrics(&out)[0];
    // After the first of four updates the stored old log-probs no longer match the policy.
    assert!(m["approx_kl"].as_f64().unwrap() > 0.0, "{m}");
    assert!(m["clip_fraction"].as_f64().unwrap() > 0.0, "{m}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sft_learns_a_small_dataset() {
    let dir = tmp("sft");
    let data = dir.join("sft.jsonl");
    let rows: String = (0..24)
        .map(|i| {
            let (a, b) = (10 + (i * 7) % 90, 10 + (i * 13) % 90);
            serde_json::json!({"prompt": format!("What is {a} + {b}?"), "completion": format!("So {a} + {b} = {}. \\boxed{{{}}}", a + b, a + b)})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = dir.join("run");
    let model = fixtures().join("tiny-qwen2-a");
    let o = Command::new(env!("CARGO_BIN_EXE_empo-engine"))
        .args([
            "sft",
            "--weights",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .args([
            "--batch-size",
            "8",
            "--steps",
            "30",
            "--lr",
            "3e-3",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&out);
    assert_eq!(m.len(), 30);
    let (first, last) = (
        m[0]["loss"].as_f64().unwrap(),
        m[29]["loss"].as_f64().unwrap(),
    );
    // Untrained, the loss is near ln(vocab) = ln 448 ≈ 6.1; the set is small enough to memorize.
    assert!(first > 4.0 && last < first / 3.0, "loss {first} -> {last}");
    assert!(out.join("final/model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
