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
