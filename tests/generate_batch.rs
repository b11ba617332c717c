//! Continuous batching (`generate_batch`): prompts of different lengths decoded together over a
//! ragged KV cache, finished slots refilled, against two references that share none of that
//! machinery: the full uncached forward, and each request decoded alone.

use empo_engine::backend::cpu::CpuBackend;
use empo_engine::backend::Backend;
use empo_engine::generate::{generate, generate_batch, Completion, GenerateOptions, Request};
use empo_engine::kernel_checks::model_configs;
use empo_engine::model::{random_tensors, Qwen2};
use empo_engine::sampling::{sample, DrawKey, SamplingParams};

fn setup() -> (Qwen2<CpuBackend>, Vec<Vec<u32>>, GenerateOptions) {
    let cfg = model_configs().remove(0);
    // Weights large enough that the logits are far from uniform: completions of one prompt
    // then share tokens, and some stop early where others run to the limit.
    let model = Qwen2::from_host(&CpuBackend, cfg.clone(), &random_tensors(&cfg, 21, 0.3)).unwrap();
    let v = cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = [3usize, 11, 1, 6, 8]
        .iter()
        .enumerate()
        .map(|(p, &len)| {
            (0..len as u32)
                .map(|i| (i * 37 + p as u32 * 101 + 5) % v)
                .collect()
        })
        .collect();
    let opt = GenerateOptions {
        max_new_tokens: 24,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.95,
        },
        n: 1,
        seed: 0,
        // A tenth of the vocabulary ends a completion: lengths spread over the whole range.
        stop_ids: (0..v).filter(|t| t % 10 == 3).collect(),
        ignore_eos: false,
    };
    (model, prompts, opt)
}

fn requests(prompts: &[Vec<u32>]) -> Vec<Request<'_>> {
    let ns = [3, 2, 4, 1, 2];
    prompts
        .iter()
        .zip(ns)
        .enumerate()
        .map(|(i, (p, n))| Request {
            prompt: p,
            n,
            seed: 1000 + i as u64 * 7,
        })
        .collect()
}

#[test]
fn every_batched_token_is_the_draw_of_its_key_from_the_uncached_forward() {
    let be = CpuBackend;
    let (model, prompts, opt) = setup();
    let reqs = requests(&prompts);
    // 4 slots for 12 sequences: slots are refilled mid-run and the cache is ragged throughout.
    let out = generate_batch(&be, &model, &reqs, &opt, 4).unwrap();
    let lens: Vec<usize> = out.iter().flatten().map(|c| c.ids.len()).collect();
    assert!(
        lens.iter().any(|&l| l < opt.max_new_tokens) && lens.iter().any(|&l| l > 3),
        "the completions should stop at different lengths: {lens:?}"
    );
    let v = model.cfg.vocab_size;
    for (r, (req, comps)) in reqs.iter().zip(&out).enumerate() {
        assert_eq!(comps.len(), req.n);
        for (j, c) in comps.iter().enumerate() {
            let ids: Vec<u32> = req.prompt.iter().chain(&c.ids).copied().collect();
            let mut acts = model.alloc_activations(&be, 1, ids.len(), true).unwrap();
            model.forward_train(&be, &ids, &mut acts).unwrap();
            let logits = be.download(&acts.logits).unwrap();
            for (t, &tok) in c.ids.iter().enumerate() {
                let at = req.prompt.len() - 1 + t;
                let key = DrawKey {
                    seed: req.seed,
                    sequence: j as u64,
                    step: t as u64,
                };
                let want = sample(&logits[at * v..(at + 1) * v], &opt.sampling, key.uniform());
                assert_eq!(tok, want, "request {r}, sample {j}, token {t}");
            }
            let ends_on_stop = c.ids.last().is_some_and(|t| opt.stop_ids.contains(t));
            assert_eq!(c.stopped, ends_on_stop, "request {r}, sample {j}");
            assert!(c.stopped || c.ids.len() == opt.max_new_tokens);
            assert!(!c.ids[..c.ids.len() - 1]
                .iter()
                .any(|t| opt.stop_ids.contains(t)));
        }
    }
}

#[test]
fn a_request_gets_the_same_completions_alone_as_in_any_batch() {
    let be = CpuBackend;
    let (model, prompts, opt) = setup();
    let reqs = requests(&prompts);
    let alone: Vec<Vec<Completion>> = reqs
        .iter()
        .map(|r| {
            let o = GenerateOptions {
                n: r.n,
                seed: r.seed,
                ..opt.clone()
            };
            generate(&be, &model, r.prompt, &o).unwrap()
        })
        .collect();
    for rows in [1, 5, 12, 64] {
        let got = generate_batch(&be, &model, &reqs, &opt, rows).unwrap();
        assert_eq!(got, alone, "{rows} slots");
    }
}

#[test]
fn empty_prompts_and_zero_lengths_are_handled() {
    let be = CpuBackend;
    let (model, prompts, opt) = setup();
    let mut reqs = requests(&prompts);
    let zero = GenerateOptions {
        max_new_tokens: 0,
        ..opt.clone()
    };
    let out = generate_batch(&be, &model, &reqs, &zero, 4).unwrap();
    assert!(out
        .iter()
        .zip(&reqs)
        .all(|(o, r)| o.len() == r.n && o.iter().all(|c| c.ids.is_empty())));
    reqs[2].prompt = &[];
    let err = generate_batch(&be, &model, &reqs, &opt, 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt 2 is empty"), "{err}");
}

/// A cache truncated back to earlier lengths decodes as if the later positions had never been
/// written: the decode bench replays one step this way, and its rows are only honest if the
/// replayed step computes what the first one did.
#[test]
fn a_truncated_cache_replays_the_same_step() {
    let be = CpuBackend;
    let (model, prompts, _) = setup();
    let v = model.cfg.vocab_size;
    let rows = prompts.len();
    let mut cache = model.alloc_cache(&be, rows, 16).unwrap();
    for (b, p) in prompts.iter().enumerate() {
        let mut one = model.alloc_cache(&be, 1, p.len()).unwrap();
        let mut acts = model.alloc_activations(&be, 1, p.len(), false).unwrap();
        model.forward_cached(&be, p, &mut acts, &mut one).unwrap();
        cache.copy_prefix(&be, b, &one, 0, p.len()).unwrap();
    }
    let lens: Vec<u32> = cache.lens().to_vec();
    let mut acts = model.alloc_activations(&be, rows, 1, false).unwrap();
    let step = |ids: &[u32], cache: &mut _, acts: &mut _| {
        model.forward_cached(&be, ids, acts, cache).unwrap();
        be.download(&acts.logits).unwrap()
    };
    let first = step(&[4, 9, 2, 7, 1], &mut cache, &mut acts);
    // Two more steps write other tokens past the prompts, then every sequence goes back.
    step(&[5, 5, 5, 5, 5], &mut cache, &mut acts);
    step(&[8, 3, 6, 0, 2], &mut cache, &mut acts);
    for (b, &l) in lens.iter().enumerate() {
        cache.truncate(b, l as usize);
    }
    assert_eq!(cache.lens(), &lens[..]);
    let replay = step(&[4, 9, 2, 7, 1], &mut cache, &mut acts);
    assert_eq!(first.len(), rows * v);
    assert_eq!(first, replay, "the replayed step's logits");
    // Truncating past a sequence's length leaves it as it is.
    cache.truncate(0, 100);
    assert_eq!(cache.len(0), lens[0] as usize + 1);
}
