//! The CPU reference backend against transformers' outputs for the fixture models.

mod common;

use common::*;
use empo_engine::backend::cpu::CpuBackend;
use empo_engine::generate::{generate, GenerateOptions};
use empo_engine::model::Qwen2;
use empo_engine::sampling::SamplingParams;
use empo_engine::tokenizer::{ChatMessage, Tokenizer};

#[test]
fn logits_logprobs_entropy_grads_and_decode_match_transformers() {
    for m in MODELS {
        let rows = check_model(&CpuBackend, m, &F32_TOL);
        assert!(rows.len() > 20, "every parameter gets a gradient row");
        assert_rows(m, &rows);
    }
}

/// Activation checkpointing recomputes each layer from its saved input, on the same backend
/// with the same operands, so every gradient must come out bit for bit the same, through the
/// full-logits backward and through the chunked lm_head the drivers use.
#[test]
fn recomputed_layers_give_bit_identical_gradients() {
    use empo_engine::backend::{Backend, RowStats, StatsLoss};
    use empo_engine::generate::next_token_targets;
    use empo_engine::lm_head::Coef;
    let be = CpuBackend;
    for m in MODELS {
        let r = Reference::load(m);
        let (shape, ids) = r.ids("input_ids");
        let (batch, seq) = (shape[0], shape[1]);
        let targets = next_token_targets(&ids, batch, seq);
        let grads = |recompute: bool, chunked: bool| -> Vec<Vec<f32>> {
            let mut model = Qwen2::load_dir(&be, &fixtures().join(m)).unwrap();
            model.recompute = recompute;
            let v = model.cfg.vocab_size;
            let mut acts = model.alloc_activations(&be, batch, seq, true).unwrap();
            let mut grads = model.zeros_like_params(&be).unwrap();
            let coef = |i: usize, _: &RowStats| (0.3 + (i % 5) as f32 * 0.1, -1.0);
            if chunked {
                model.forward_hidden(&be, &ids, &mut acts).unwrap();
                model
                    .lm_head_stats_grad(
                        &be,
                        &mut acts,
                        &targets,
                        0.7,
                        Coef::PerRow(&coef),
                        &mut grads,
                    )
                    .unwrap();
            } else {
                model.forward_train(&be, &ids, &mut acts).unwrap();
                let n = batch * seq;
                let stats = be.softmax_stats(&acts.logits, n, v, &targets, 0.7).unwrap();
                let (a, b): (Vec<f32>, Vec<f32>) =
                    stats.iter().enumerate().map(|(i, s)| coef(i, s)).unzip();
                let mut dlogits = be.alloc(n * v).unwrap();
                let loss = StatsLoss {
                    targets: &targets,
                    temperature: 0.7,
                    a: &a,
                    b: &b,
                };
                be.softmax_stats_bwd(&mut dlogits, &acts.logits, n, v, &loss);
                model
                    .backward(&be, &mut acts, &dlogits, &mut grads)
                    .unwrap();
            }
            grads
                .list()
                .iter()
                .map(|g| be.download(g).unwrap())
                .collect()
        };
        for chunked in [false, true] {
            let kept = grads(false, chunked);
            let recomputed = grads(true, chunked);
            for (i, (k, rc)) in kept.iter().zip(&recomputed).enumerate() {
                assert!(
                    k.iter().any(|&x| x != 0.0),
                    "{m}: tensor {i} has no gradient"
                );
                let same = k.iter().zip(rc).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{m} (chunked {chunked}): tensor {i} differs under recompute"
                );
            }
        }
    }
}

#[test]
fn greedy_generation_is_identical_to_transformers() {
    for m in MODELS {
        let r = Reference::load(m);
        let (_, prompt) = r.ids("gen_prompt_ids");
        let (_, want) = r.ids("gen_greedy_ids");
        let model = Qwen2::load_dir(&CpuBackend, &fixtures().join(m)).unwrap();
        let opt = GenerateOptions {
            max_new_tokens: want.len(),
            sampling: SamplingParams::greedy(),
            n: 2,
            seed: 0,
            stop_ids: vec![],
            ignore_eos: true,
        };
        let outs = generate(&CpuBackend, &model, &prompt, &opt).unwrap();
        for o in outs {
            assert_eq!(o.ids, want, "{m}: greedy tokens differ from transformers");
        }
    }
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let path = fixtures().join("tokenizer_reference.json");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = Tokenizer::from_dir(&fixtures().join(r["tokenizer_dir"].as_str().unwrap())).unwrap();
    for t in r["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let want: Vec<u32> = t["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            t["decoded"].as_str().unwrap()
        );
    }
    for c in r["chat"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
            })
            .collect();
        let rendered = tok
            .apply_chat_template(&msgs, c["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(rendered, c["chat_rendered"].as_str().unwrap());
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(&rendered).unwrap(), want);
    }
    let im_end = r["special_tokens"]["<|im_end|>"].as_u64().unwrap() as u32;
    assert!(
        tok.eos_ids.contains(&im_end),
        "generation_config eos ids are read"
    );
}
