//! The demo's synthetic reasoning task (column addition with a short chain of thought and a
//! boxed answer) and its byte-level BPE tokenizer, trained with the tokenizers crate.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, TokenizerImpl};

pub struct Problem {
    pub question: String,
    pub completion: String,
    pub answer: String,
}

/// splitmix64: enough randomness for data generation, with no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The worked column addition of a + b, least significant digit first.
pub fn solve(a: u64, b: u64) -> Problem {
    let (da, db): (Vec<u64>, Vec<u64>) = (digits(a), digits(b));
    let n = da.len().max(db.len());
    let mut steps = Vec::new();
    let mut carry = 0;
    for i in 0..n {
        let (x, y) = (*da.get(i).unwrap_or(&0), *db.get(i).unwrap_or(&0));
        let s = x + y + carry;
        let lhs = if carry > 0 {
            format!("{x} + {y} + {carry}")
        } else {
            format!("{x} + {y}")
        };
        if i + 1 == n {
            steps.push(format!("{lhs} = {s}, write {s}."));
        } else if s >= 10 {
            steps.push(format!("{lhs} = {s}, write {} carry 1.", s % 10));
        } else {
            steps.push(format!("{lhs} = {s}, write {s}."));
        }
        carry = s / 10;
    }
    let sum = a + b;
    Problem {
        question: format!("What is {a} + {b}?"),
        completion: format!("{} So {a} + {b} = {sum}. \\boxed{{{sum}}}", steps.join(" ")),
        answer: sum.to_string(),
    }
}

fn digits(mut x: u64) -> Vec<u64> {
    let mut d = vec![x % 10];
    x /= 10;
    while x > 0 {
        d.push(x % 10);
        x /= 10;
    }
    d
}

/// `n` distinct problems with `digits`-digit operands, none in `exclude`.
pub fn make_problems(
    seed: u64,
    n: usize,
    digits: u32,
    exclude: &mut HashSet<(u64, u64)>,
) -> Result<Vec<Problem>> {
    let (lo, hi) = (
        10u64.pow(digits - 1).max(if digits == 1 { 0 } else { 1 }),
        10u64.pow(digits) - 1,
    );
    let space = ((hi - lo + 1) * (hi - lo + 1)) as usize;
    if exclude.len() + n > space {
        bail!(
            "only {space} distinct {digits}-digit problems exist; {} requested",
            exclude.len() + n
        );
    }
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (a, b) = (rng.range(lo, hi), rng.range(lo, hi));
        if exclude.insert((a, b)) {
            out.push(solve(a, b));
        }
    }
    Ok(out)
}

/// sft.jsonl (prompt, completion), prompts.jsonl (unlabeled training questions; the answer is
/// only for logged metrics) and heldout.jsonl, pairwise disjoint.
pub fn write_task_files(
    dir: &Path,
    seed: u64,
    n_sft: usize,
    n_prompts: usize,
    n_heldout: usize,
    digits: u32,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut seen = HashSet::new();
    // Held-out first, so its questions never depend on how many training rows were asked for.
    let heldout = make_problems(seed ^ 0x4845_4c44, n_heldout, digits, &mut seen)?;
    let prompts = make_problems(seed ^ 0x5052_4f4d, n_prompts, digits, &mut seen)?;
    let sft = make_problems(seed ^ 0x5346_5400, n_sft, digits, &mut seen)?;
    let lines = |ps: &[Problem], f: &dyn Fn(&Problem) -> serde_json::Value| -> String {
        ps.iter().map(|p| f(p).to_string() + "\n").collect()
    };
    let labeled = |p: &Problem| serde_json::json!({"problem": p.question, "answer": p.answer});
    crate::io::write_atomic(
        &dir.join("heldout.jsonl"),
        lines(&heldout, &labeled).as_bytes(),
    )?;
    crate::io::write_atomic(
        &dir.join("prompts.jsonl"),
        lines(&prompts, &labeled).as_bytes(),
    )?;
    let sup = |p: &Problem| serde_json::json!({"prompt": p.question, "completion": p.completion});
    crate::io::write_atomic(&dir.join("sft.jsonl"), lines(&sft, &sup).as_bytes())
}

pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML without a default system turn, so demo prompts stay short.
const CHAT_TEMPLATE: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] | trim) + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// Digits one at a time (as Qwen2 splits them), words with their leading space, punctuation
/// runs, and whitespace.
const SPLIT_PATTERN: &str = r"\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Trains a byte-level BPE on `texts` and writes tokenizer.json, tokenizer_config.json and
/// generation_config.json into `dir`. Returns the vocabulary size, special tokens included.
pub fn train_tokenizer(texts: &[String], vocab_size: usize, dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let split = Split::new(
        SplitPattern::Regex(SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow!("bad split pattern: {e}"))?;
    let byte_level = ByteLevel::new(false, true, false);
    let mut tk: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    tk.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ]))));
    tk.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(alphabet.into_iter().collect())
        .build();
    tk.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    tk.add_special_tokens(&specials);
    let path = dir.join("tokenizer.json");
    tk.save(&path, true)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    let id = |t: &str| {
        tk.token_to_id(t)
            .with_context(|| format!("{t} missing from the vocabulary"))
    };
    let (eot, im_end) = (id("<|endoftext|>")?, id("<|im_end|>")?);
    let cfg = serde_json::json!({
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": null,
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 512,
    });
    crate::io::write_atomic(
        &dir.join("tokenizer_config.json"),
        &serde_json::to_vec_pretty(&cfg)?,
    )?;
    let gen = serde_json::json!({"eos_token_id": [im_end, eot], "bos_token_id": eot, "pad_token_id": eot});
    crate::io::write_atomic(
        &dir.join("generation_config.json"),
        &serde_json::to_vec_pretty(&gen)?,
    )?;
    Ok(tk.get_vocab_size(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_addition_with_carries() {
        let p = solve(47, 38);
        assert_eq!(p.question, "What is 47 + 38?");
        assert_eq!(
            p.completion,
            "7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8, write 8. So 47 + 38 = 85. \\boxed{85}"
        );
        assert_eq!(
            solve(99, 99).completion,
            "9 + 9 = 18, write 8 carry 1. 9 + 9 + 1 = 19, write 19. So 99 + 99 = 198. \\boxed{198}"
        );
        for (a, b) in [(10, 10), (55, 45), (99, 1), (123, 877)] {
            let p = solve(a, b);
            assert_eq!(
                crate::grader::extract_boxed(&p.completion),
                Some((a + b).to_string())
            );
        }
    }

    #[test]
    fn sets_are_disjoint_and_seeded() {
        let dir = std::env::temp_dir().join(format!("empo-task-{}", std::process::id()));
        write_task_files(&dir, 3, 300, 100, 50, 2).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let qs = |f: &str| -> HashSet<String> {
            read(f)
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v.get("problem")
                        .or(v.get("prompt"))
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        let (s, p, h) = (qs("sft.jsonl"), qs("prompts.jsonl"), qs("heldout.jsonl"));
        assert_eq!((s.len(), p.len(), h.len()), (300, 100, 50));
        assert!(s.is_disjoint(&p) && s.is_disjoint(&h) && p.is_disjoint(&h));
        let first = read("heldout.jsonl");
        write_task_files(&dir, 3, 10, 10, 50, 2).unwrap();
        assert_eq!(
            read("heldout.jsonl"),
            first,
            "held-out set depends only on the seed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokenizer_splits_digits_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("empo-tok-{}", std::process::id()));
        let mut seen = HashSet::new();
        let texts: Vec<String> = make_problems(1, 300, 2, &mut seen)
            .unwrap()
            .iter()
            .map(|p| format!("{}\n{}", p.question, p.completion))
            .collect();
        let v = train_tokenizer(&texts, 320, &dir).unwrap();
        assert!(v > 259 && v <= 323, "vocab {v}");
        let first = std::fs::read(dir.join("tokenizer.json")).unwrap();
        train_tokenizer(&texts, 320, &dir).unwrap();
        assert_eq!(
            std::fs::read(dir.join("tokenizer.json")).unwrap(),
            first,
            "training is deterministic"
        );
        let tok = crate::tokenizer::Tokenizer::from_dir(&dir).unwrap();
        let chat = tok
            .apply_chat_template(
                &[crate::tokenizer::ChatMessage {
                    role: "user".into(),
                    content: "What is 47 + 38?".into(),
                }],
                true,
            )
            .unwrap();
        assert_eq!(
            chat,
            "<|im_start|>user\nWhat is 47 + 38?<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = format!("{chat}{}<|im_end|>", texts[0]);
        let ids = tok.encode(&text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
        let digits = tok.encode("47 + 38 = 85").unwrap();
        for d in ["4", "7", "3", "8", "5"] {
            assert!(
                digits.contains(&tok.token_to_id(d).unwrap()),
                "digit {d} is its own token"
            );
        }
        assert_eq!(tok.eos_ids[0], tok.token_to_id("<|im_end|>").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
