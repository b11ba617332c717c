//! The `empo-engine` binary: exact command spellings, outputs against the transformers
//! fixtures, and one clear error (no panic) for each kind of bad input.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_empo-engine"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("empo-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Asserts a clean failure: non-zero exit, an `error:` line naming every `needles`, no panic.
fn assert_clean_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert!(err.contains("error:"), "{err}");
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn score_writes_transformers_logits_logprobs_entropy() {
    let r = Reference::load("tiny-qwen2-b");
    let (shape, ids) = r.ids("input_ids");
    let seq = shape[1];
    let out = tmpdir("score").join("s.safetensors");
    let dir = fixtures().join("tiny-qwen2-b");
    let o = run(&[
        "score",
        "--weights",
        dir.to_str().unwrap(),
        "--tokens",
        &join_ids(&ids[..seq]),
        "--temperature",
        &r.meta["temperature"],
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let get = |n: &str| {
        let t = st.tensor(n).unwrap();
        (
            t.shape().to_vec(),
            empo_engine::weights::decode_f32(t.data(), t.dtype()).unwrap(),
        )
    };
    let v = r.f32("logits").len() / (2 * seq);
    let (ls, logits) = get("logits");
    assert_eq!(ls, vec![seq, v]);
    assert!(rel_err(&logits, &r.f32("logits")[..seq * v]) < 1e-4);
    let (ps, lp) = get("logprobs");
    assert_eq!(ps, vec![seq - 1]);
    assert!(rel_err(&lp, &r.f32("logprobs")[..seq - 1]) < 1e-4);
    let (es, ent) = get("entropy");
    assert_eq!(es, vec![seq]);
    assert!(rel_err(&ent, &r.f32("entropy")[..seq]) < 1e-4);
}

#[test]
fn generate_greedy_json_matches_transformers_and_sampling_is_seeded() {
    let r = Reference::load("tiny-qwen2-a");
    let (_, prompt) = r.ids("gen_prompt_ids");
    let (_, want) = r.ids("gen_greedy_ids");
    let dir = fixtures().join("tiny-qwen2-a");
    let d = dir.to_str().unwrap();
    let o = run(&[
        "generate",
        "--weights",
        d,
        "--tokens",
        &join_ids(&prompt),
        "--temperature",
        "0",
        "--max-new-tokens",
        &want.len().to_string(),
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value =
        serde_json::from_slice(o.stdout.split(|&c| c == b'\n').next().unwrap()).unwrap();
    let got: Vec<u32> = line["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got, want);
    assert!(line["text"].is_string());
    assert!(
        stderr(&o).contains("device: cpu"),
        "auto says which device it picked"
    );

    let sample = |seed: &str| {
        let o = run(&[
            "generate",
            "--weights",
            d,
            "--prompt",
            "What is 2+3?",
            "--chat",
            "--n",
            "3",
            "--seed",
            seed,
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--max-new-tokens",
            "12",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let a = sample("7");
    assert_eq!(a.lines().count(), 3);
    assert_eq!(a, sample("7"), "same seed, same completions");
    assert_ne!(a, sample("8"), "another seed, other completions");
}

#[test]
fn cuda_without_gpu_is_a_clear_error() {
    let dir = fixtures().join("tiny-qwen2-a");
    let o = run(&[
        "score",
        "--weights",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--out",
        "unused.safetensors",
        "--device",
        "cuda",
    ]);
    assert_clean_error(&o, &["--device cuda"]);
}

#[test]
fn missing_model_lists_where_it_looked() {
    let o = bin()
        .args([
            "score",
            "--weights",
            "no-such-model-7b",
            "--tokens",
            "1",
            "--out",
            "unused.safetensors",
        ])
        .env("HF_HUB_CACHE", "/nonexistent/hub-cache")
        .output()
        .unwrap();
    assert_clean_error(
        &o,
        &[
            "no-such-model-7b",
            "/nonexistent/hub-cache",
            "never downloads",
        ],
    );
}

fn score_dir(dir: &Path) -> Output {
    let out = dir.join("scores.safetensors");
    run(&[
        "score",
        "--weights",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ])
}

#[test]
fn corrupt_checkpoints_name_the_file_or_tensor() {
    let src = fixtures().join("tiny-qwen2-a");
    let base = tmpdir("bad");

    let d = base.join("truncated");
    copy_dir(&src, &d);
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(&score_dir(&d), &["model.safetensors", "truncated"]);

    let d = base.join("header");
    copy_dir(&src, &d);
    let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
    assert_clean_error(&score_dir(&d), &["model.safetensors"]);

    let d = base.join("missing-tensor");
    copy_dir(&src, &d);
    let st = safetensors::SafeTensors::deserialize(
        &std::fs::read(src.join("model.safetensors")).unwrap(),
    )
    .unwrap()
    .tensors()
    .into_iter()
    .filter(|(n, _)| n != "model.norm.weight")
    .map(|(n, v)| (n, v.data().to_vec(), v.shape().to_vec(), v.dtype()))
    .collect::<Vec<_>>();
    let views: Vec<_> = st
        .iter()
        .map(|(n, data, shape, dt)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        d.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    assert_clean_error(&score_dir(&d), &["model.norm.weight", "missing"]);

    let d = base.join("shape");
    copy_dir(&src, &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["intermediate_size"] = (v["intermediate_size"].as_u64().unwrap() + 1).into();
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    assert_clean_error(&score_dir(&d), &["mlp.gate_proj.weight", "expected"]);

    let d = base.join("model-type");
    copy_dir(&src, &d);
    v = serde_json::from_str(&cfg).unwrap();
    v["model_type"] = "llama".into();
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    assert_clean_error(&score_dir(&d), &["config.json", "llama"]);

    let d = base.join("no-config");
    copy_dir(&src, &d);
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert_clean_error(&score_dir(&d), &["config.json"]);

    let d = base.join("no-tokenizer");
    copy_dir(&src, &d);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let o = run(&[
        "score",
        "--weights",
        d.to_str().unwrap(),
        "--text",
        "hi",
        "--out",
        "unused.safetensors",
    ]);
    assert_clean_error(&o, &["tokenizer.json"]);

    let d = base.join("intact");
    copy_dir(&src, &d);
    let o = score_dir(&d);
    assert!(
        o.status.success(),
        "the intact fixture still scores: {}",
        stderr(&o)
    );
    let o = run(&[
        "score",
        "--weights",
        src.to_str().unwrap(),
        "--tokens",
        "1,99999",
        "--out",
        "unused.safetensors",
    ]);
    assert_clean_error(&o, &["99999", "vocab_size"]);
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn score_to_a_device_writes_through_it() {
    let dir = fixtures().join("tiny-qwen2-a");
    let o = run(&[
        "score",
        "--weights",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--out",
        "/dev/null",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device(),
        "/dev/null must stay a device"
    );
}

#[test]
fn check_kernels_without_a_gpu_says_so_and_exits_2() {
    if empo_engine::device::open_cuda().is_ok() {
        println!("skipped: this machine has a GPU (tests/cuda_kernels.rs checks it)");
        return;
    }
    let o = run(&["check-kernels", "--quick"]);
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("no GPU"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn info_lists_the_kernels_and_the_devices() {
    let o = run(&["info"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("devices:") && out.contains("cpu ("), "{out}");
    if empo_engine::device::kernels_compiled() {
        for k in [
            "rmsnorm_fwd",
            "softmax_stats_fwd",
            "embedding_bwd",
            "swiglu_bwd",
            "softmax_stats_bwd_saved",
            "attention_bwd_d128",
            "attention_decode_d128",
            "multi_adamw_m32",
        ] {
            assert!(out.contains(k), "info does not list {k}: {out}");
        }
        assert!(
            !out.contains("__launch_bounds__"),
            "an attribute listed as a kernel: {out}"
        );
        assert!(out.contains("stack or spills: none"), "{out}");
        // --resources: a row per kernel with its registers for each target.
        let o = run(&["info", "--resources"]);
        assert!(o.status.success());
        let out = String::from_utf8_lossy(&o.stdout);
        let row = out
            .lines()
            .find(|l| l.starts_with("attention_fwd_d128_wgmma "))
            .unwrap_or_else(|| panic!("no attention_fwd_d128_wgmma row: {out}"));
        let header = out.lines().find(|l| l.starts_with("kernel ")).unwrap();
        // Without sm_90a among the targets (CUDA_COMPUTE_CAP) the wgmma kernels are empty.
        if let Some(col) = header.split('|').position(|c| c.contains("sm_90a")) {
            let regs: u32 = row
                .split('|')
                .nth(col)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                regs > 128 && regs <= 255,
                "the sm_90a wgmma forward should hold its accumulators in registers: {row}"
            );
        }
    }
}
