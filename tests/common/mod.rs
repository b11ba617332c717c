//! Shared test helpers. The model checks are generic over `Backend`, so the CUDA backend runs
//! exactly the same assertions as the CPU reference.
#![allow(dead_code)]

use empo_engine::backend::{Backend, StatsLoss, NO_TARGET};
use empo_engine::generate::next_token_targets;
use empo_engine::model::{tensor_specs, Qwen2};
use empo_engine::weights::decode_f32;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;

/// tests/fixtures of this checkout, or EMPO_FIXTURES: a test executable carried to the GPU
/// machine (tools/gpu-run.sh) finds them in the copy of the repository there.
pub fn fixtures() -> PathBuf {
    std::env::var_os("EMPO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

pub const MODELS: [&str; 2] = ["tiny-qwen2-a", "tiny-qwen2-b"];

pub enum RefTensor {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

/// transformers' outputs recorded by tools/make_fixtures.py.
pub struct Reference {
    pub tensors: HashMap<String, RefTensor>,
    pub meta: HashMap<String, String>,
}

impl Reference {
    pub fn load(model: &str) -> Reference {
        let path = fixtures().join(format!("{model}.reference.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let t = match view.dtype() {
                Dtype::I64 => RefTensor::I64(
                    shape,
                    view.data()
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                dt => RefTensor::F32(shape, decode_f32(view.data(), dt).unwrap()),
            };
            tensors.insert(name, t);
        }
        Reference {
            tensors,
            meta: meta.metadata().clone().unwrap_or_default(),
        }
    }

    pub fn f32(&self, name: &str) -> &[f32] {
        match self.tensors.get(name) {
            Some(RefTensor::F32(_, v)) => v,
            _ => panic!("reference tensor {name} missing or not f32"),
        }
    }

    pub fn ids(&self, name: &str) -> (Vec<usize>, Vec<u32>) {
        match self.tensors.get(name) {
            Some(RefTensor::I64(s, v)) => (s.clone(), v.iter().map(|&x| x as u32).collect()),
            _ => panic!("reference tensor {name} missing or not i64"),
        }
    }

    pub fn meta_f32(&self, key: &str) -> f32 {
        self.meta[key].parse().unwrap()
    }
}

/// Normwise relative error: max |got − want| / max |want|.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    if got.iter().any(|x| !x.is_finite()) {
        return f32::INFINITY;
    }
    diff / scale
}

pub struct Tolerances {
    pub logits: f32,
    pub grads: f32,
    pub decode: f32,
}

pub const F32_TOL: Tolerances = Tolerances {
    logits: 1e-4,
    grads: 1e-4,
    decode: 1e-5,
};

/// The loss the fixtures differentiate: −mean(logprob) + c·mean(entropy), both at temperature
/// T. Returns (loss, per-row entropy coefficient a, per-row logprob coefficient b).
pub fn fixture_loss_coefs(
    stats: &[empo_engine::backend::RowStats],
    targets: &[u32],
    coef: f32,
) -> (f32, Vec<f32>, Vec<f32>) {
    let rows = stats.len();
    let n_tgt = targets.iter().filter(|&&t| t != NO_TARGET).count() as f32;
    let mut loss = 0.0f64;
    let a = vec![coef / rows as f32; rows];
    let mut b = vec![0.0f32; rows];
    for r in 0..rows {
        loss += (coef * stats[r].entropy / rows as f32) as f64;
        if targets[r] != NO_TARGET {
            loss -= (stats[r].logprob / n_tgt) as f64;
            b[r] = -1.0 / n_tgt;
        }
    }
    (loss as f32, a, b)
}

/// Every check of one fixture model on one backend. Returns rows of (check, max rel err, tol).
pub fn check_model<B: Backend>(
    be: &B,
    model_name: &str,
    tol: &Tolerances,
) -> Vec<(String, f32, f32)> {
    let dir = fixtures().join(model_name);
    let r = Reference::load(model_name);
    let model = Qwen2::load_dir(be, &dir).unwrap();
    let v = model.cfg.vocab_size;
    let (shape, ids) = r.ids("input_ids");
    let (batch, seq) = (shape[0], shape[1]);
    let temp = r.meta_f32("temperature");
    let coef = r.meta_f32("entropy_coef");
    let mut rows = Vec::new();

    // Forward logits.
    let mut acts = model.alloc_activations(be, batch, seq, true).unwrap();
    model.forward_train(be, &ids, &mut acts).unwrap();
    let logits = be.download(&acts.logits).unwrap();
    rows.push((
        "logits".into(),
        rel_err(&logits, r.f32("logits")),
        tol.logits,
    ));

    // Log-probs and entropies at the temperature.
    let targets = next_token_targets(&ids, batch, seq);
    let stats = be
        .softmax_stats(&acts.logits, batch * seq, v, &targets, temp)
        .unwrap();
    let lp: Vec<f32> = (0..batch * seq)
        .filter(|&i| i % seq + 1 < seq)
        .map(|i| stats[i].logprob)
        .collect();
    let ent: Vec<f32> = stats.iter().map(|s| s.entropy).collect();
    rows.push((
        "logprobs".into(),
        rel_err(&lp, r.f32("logprobs")),
        tol.logits,
    ));
    rows.push((
        "entropy".into(),
        rel_err(&ent, r.f32("entropy")),
        tol.logits,
    ));

    // Loss and the gradient of every parameter.
    let (loss, a, b) = fixture_loss_coefs(&stats, &targets, coef);
    rows.push(("loss".into(), rel_err(&[loss], r.f32("loss")), tol.logits));
    let mut dlogits = be.alloc(batch * seq * v).unwrap();
    be.softmax_stats_bwd(
        &mut dlogits,
        &acts.logits,
        batch * seq,
        v,
        &StatsLoss {
            targets: &targets,
            temperature: temp,
            a: &a,
            b: &b,
        },
    );
    let mut grads = model.zeros_like_params(be).unwrap();
    model.backward(be, &mut acts, &dlogits, &mut grads).unwrap();
    for ((name, _), g) in tensor_specs(&model.cfg).iter().zip(grads.list()) {
        let got = be.download(g).unwrap();
        rows.push((
            format!("grad {name}"),
            rel_err(&got, r.f32(&format!("grad.{name}"))),
            tol.grads,
        ));
    }

    // KV-cache decode equals the full forward: prefill 5 tokens, then one at a time.
    let prefill = 5;
    let mut cache = model.alloc_cache(be, batch, seq).unwrap();
    let mut pre = model.alloc_activations(be, batch, prefill, false).unwrap();
    let pre_ids: Vec<u32> = (0..batch)
        .flat_map(|bi| ids[bi * seq..bi * seq + prefill].to_vec())
        .collect();
    model
        .forward_cached(be, &pre_ids, &mut pre, &mut cache)
        .unwrap();
    let mut worst = 0.0f32;
    let full_row = |bi: usize, t: usize| &logits[(bi * seq + t) * v..(bi * seq + t + 1) * v];
    let got = be.download(&pre.logits).unwrap();
    for bi in 0..batch {
        worst = worst.max(rel_err(
            &got[bi * v..(bi + 1) * v],
            full_row(bi, prefill - 1),
        ));
    }
    let mut step = model.alloc_activations(be, batch, 1, false).unwrap();
    for t in prefill..seq {
        let step_ids: Vec<u32> = (0..batch).map(|bi| ids[bi * seq + t]).collect();
        model
            .forward_cached(be, &step_ids, &mut step, &mut cache)
            .unwrap();
        let got = be.download(&step.logits).unwrap();
        for bi in 0..batch {
            worst = worst.max(rel_err(&got[bi * v..(bi + 1) * v], full_row(bi, t)));
        }
    }
    rows.push(("kv-cache decode vs full forward".into(), worst, tol.decode));
    rows
}

pub fn assert_rows(model: &str, rows: &[(String, f32, f32)]) {
    let mut bad = Vec::new();
    for (name, err, tol) in rows {
        println!("{model:>14} {name:<58} rel err {err:.2e} (tol {tol:.0e})");
        if err.is_nan() || err > tol {
            bad.push(format!("{name}: {err:e} > {tol:e}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{model}: {} checks failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
