//! Evaluation (greedy pass@1, or avg@k / pass@k / maj@k with samples), prompt selection for
//! one-shot EM, and grading of prediction files.

use crate::backend::Backend;
use crate::data::{load_examples, Example};
use crate::generate::{generate_batch, GenerateOptions, Request};
use crate::grader::{self, GoldAnswer};
use crate::model::Qwen2;
use crate::rl;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::train::{render_prompt, PromptTemplate};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// The unbiased pass@k estimator of Chen et al. (2021): 1 − C(n−c, k) / C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // Product form avoids huge binomials.
    let mut miss = 1.0;
    for i in (n - c + 1)..=n {
        miss *= 1.0 - k as f64 / i as f64;
    }
    1.0 - miss
}

pub struct EvalOptions {
    pub n: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub template: PromptTemplate,
    pub suffix: String,
    pub seed: u64,
    pub limit: Option<usize>,
    /// Sequences decoded together (`generate_batch`): the problems of a batch sample together.
    pub rows: usize,
}

#[derive(Debug, Clone, Default)]
pub struct FileScore {
    pub file: String,
    pub problems: usize,
    /// Mean correctness over all samples (pass@1 when greedy).
    pub avg: f64,
    pub pass_k: f64,
    pub maj_k: f64,
}

/// The rendered prompt of each example and `n` completions of it, seeded per problem, so that
/// a problem's samples do not depend on the problems beside it.
fn sample_texts<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    tok: &Tokenizer,
    examples: &[Example],
    n: usize,
    opt: &EvalOptions,
) -> Result<Vec<(String, Vec<String>)>> {
    let texts: Vec<String> = examples
        .iter()
        .map(|e| render_prompt(tok, &e.prompt, opt.template, &opt.suffix))
        .collect::<Result<_>>()?;
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect::<Result<_>>()?;
    let requests: Vec<Request> = prompts
        .iter()
        .zip(examples)
        .map(|(prompt, e)| Request {
            prompt,
            n,
            seed: opt.seed ^ (e.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        })
        .collect();
    let gen = GenerateOptions {
        max_new_tokens: opt.max_new_tokens,
        sampling: SamplingParams {
            temperature: opt.temperature,
            top_k: 0,
            top_p: opt.top_p,
        },
        n,
        seed: opt.seed,
        stop_ids: tok.eos_ids.clone(),
        ignore_eos: false,
    };
    let outs = generate_batch(be, model, &requests, &gen, opt.rows.max(n))?;
    texts
        .into_iter()
        .zip(outs)
        .map(|(text, outs)| {
            let decoded = outs
                .iter()
                .map(|c| tok.decode(&c.ids, true))
                .collect::<Result<_>>()?;
            Ok((text, decoded))
        })
        .collect()
}

/// Problems sampled in one call: enough to fill the batch's rows twice, so that slots freed by
/// short completions have sequences waiting, while rows are still written as they are done.
fn problems_per_call(opt: &EvalOptions, n: usize) -> usize {
    (2 * opt.rows / n.max(1)).max(1)
}

/// One problem's graded samples.
fn grade_samples(texts: &[String], gold: &GoldAnswer) -> (Vec<Option<String>>, Vec<bool>, bool) {
    let answers: Vec<Option<String>> = texts
        .iter()
        .map(|t| grader::extract_answer_eval(t))
        .collect();
    let correct: Vec<bool> = answers
        .iter()
        .map(|a| a.as_deref().is_some_and(|a| grader::grade(a, gold)))
        .collect();
    let (ids, sizes) = rl::cluster_answers(&answers, grader::is_equiv);
    let maj = rl::group_stats(&ids, &sizes)
        .majority_member
        .is_some_and(|m| correct[m]);
    (answers, correct, maj)
}

pub fn eval_file<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    tok: &Tokenizer,
    path: &Path,
    opt: &EvalOptions,
    out: &mut dyn Write,
) -> Result<FileScore> {
    let mut examples = load_examples(path)?;
    if let Some(l) = opt.limit {
        examples.truncate(l);
    }
    let mut s = FileScore {
        file: path.display().to_string(),
        ..Default::default()
    };
    if let Some(e) = examples.iter().find(|e| e.gold.is_none()) {
        bail!(
            "{}: row {} has no gold answer to evaluate against",
            path.display(),
            e.index + 1
        );
    }
    for chunk in examples.chunks(problems_per_call(opt, opt.n)) {
        let sampled = sample_texts(be, model, tok, chunk, opt.n, opt)?;
        for (e, (text, texts)) in chunk.iter().zip(sampled) {
            let gold = e.gold.as_ref().expect("checked above");
            let (answers, correct, maj) = grade_samples(&texts, gold);
            let c = correct.iter().filter(|&&x| x).count();
            s.avg += c as f64 / opt.n as f64;
            s.pass_k += pass_at_k(opt.n, c, opt.n);
            s.maj_k += maj as u8 as f64;
            s.problems += 1;
            let row = json!({
                "index": e.index,
                "prompt": text,
                "gold": gold_json(gold),
                "completions": texts.iter().zip(&answers).zip(&correct)
                    .map(|((t, a), ok)| json!({"text": t, "answer": a, "correct": ok})).collect::<Vec<_>>(),
                "num_correct": c,
                "maj_correct": maj,
            });
            writeln!(out, "{row}")?;
        }
    }
    let n = s.problems.max(1) as f64;
    s.avg /= n;
    s.pass_k /= n;
    s.maj_k /= n;
    Ok(s)
}

fn gold_json(g: &GoldAnswer) -> Value {
    match g {
        GoldAnswer::Text(t) => json!(t),
        GoldAnswer::Number(x) => json!(x),
        GoldAnswer::List(l) => json!(l),
    }
}

pub fn print_table(scores: &[FileScore], n: usize) {
    let (a, p, m) = if n == 1 {
        ("pass@1", "", "")
    } else {
        ("avg@k", "pass@k", "maj@k")
    };
    println!(
        "| file | problems | {a} |{}",
        if n == 1 {
            String::new()
        } else {
            format!(" {p} | {m} |")
        }
    );
    println!(
        "| --- | --- | --- |{}",
        if n == 1 { "" } else { " --- | --- |" }
    );
    for s in scores {
        let name = Path::new(&s.file)
            .file_name()
            .map_or(s.file.clone(), |f| f.to_string_lossy().into_owned());
        if n == 1 {
            println!("| {name} | {} | {:.1}% |", s.problems, 100.0 * s.avg);
        } else {
            println!(
                "| {name} | {} | {:.1}% | {:.1}% | {:.1}% |",
                s.problems,
                100.0 * s.avg,
                100.0 * s.pass_k,
                100.0 * s.maj_k
            );
        }
    }
}

/// Ranks prompts for one-shot EM: by the variance p(1 − p) of the k samples' correctness when
/// gold answers exist (the paper's rule), else by their semantic entropy. Highest first.
pub fn select_prompts<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    tok: &Tokenizer,
    examples: &[Example],
    k: usize,
    opt: &EvalOptions,
) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    let mut sampled = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(problems_per_call(opt, k)) {
        sampled.extend(sample_texts(be, model, tok, chunk, k, opt)?);
    }
    for (e, (text, texts)) in examples.iter().zip(sampled) {
        let (score, criterion, extra) = match &e.gold {
            Some(gold) => {
                let (_, correct, _) = grade_samples(&texts, gold);
                let p = correct.iter().filter(|&&x| x).count() as f64 / k as f64;
                (p * (1.0 - p), "pass@k variance", json!({"accuracy": p}))
            }
            None => {
                let answers: Vec<Option<String>> =
                    texts.iter().map(|t| grader::extract_boxed(t)).collect();
                let (ids, sizes) = rl::cluster_answers(&answers, grader::is_equiv);
                let g = rl::group_stats(&ids, &sizes);
                (
                    g.semantic_entropy as f64,
                    "semantic entropy",
                    json!({"majority_share": g.majority_share}),
                )
            }
        };
        rows.push(json!({"index": e.index, "score": score, "criterion": criterion, "stats": extra, "prompt": text}));
    }
    rows.sort_by(|a, b| {
        b["score"]
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&a["score"].as_f64().unwrap_or(0.0))
    });
    for (rank, r) in rows.iter_mut().enumerate() {
        r["rank"] = json!(rank + 1);
    }
    Ok(rows)
}

fn gold_from_value(v: &Value) -> Option<GoldAnswer> {
    match v {
        Value::String(s) => Some(GoldAnswer::Text(
            grader::extract_boxed(s).unwrap_or_else(|| s.clone()),
        )),
        Value::Number(n) => n.as_f64().map(GoldAnswer::Number),
        Value::Array(a) => Some(GoldAnswer::List(
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
        )),
        _ => None,
    }
}

/// `grade`: adds `pred_answer` and `correct` to every row; returns (correct, total).
pub fn grade_file(
    data: &Path,
    pred_field: &str,
    answer_field: &str,
    out: &Path,
) -> Result<(usize, usize)> {
    let f = std::fs::File::open(data).with_context(|| format!("cannot open {}", data.display()))?;
    let mut lines = Vec::new();
    let (mut c, mut n) = (0, 0);
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}:{}: cannot read line", data.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", data.display(), i + 1);
        let mut row: Value =
            serde_json::from_str(&line).with_context(|| format!("{}: not valid JSON", at()))?;
        let pred = row
            .get(pred_field)
            .and_then(Value::as_str)
            .with_context(|| format!("{}: no string field `{pred_field}`", at()))?;
        let gold = row
            .get(answer_field)
            .and_then(gold_from_value)
            .with_context(|| {
                format!(
                    "{}: field `{answer_field}` is missing or not a string, number or list",
                    at()
                )
            })?;
        let answer = grader::extract_answer_eval(pred);
        let ok = answer.as_deref().is_some_and(|a| grader::grade(a, &gold));
        row["pred_answer"] = json!(answer);
        row["correct"] = json!(ok);
        c += ok as usize;
        n += 1;
        lines.push(row.to_string());
    }
    crate::io::write_atomic(out, (lines.join("\n") + "\n").as_bytes())?;
    Ok((c, n))
}

pub fn default_eval_out(weights: &Path) -> PathBuf {
    let name = weights
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().into_owned());
    PathBuf::from("runs").join(format!("eval-{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_estimator() {
        assert_eq!(pass_at_k(4, 0, 1), 0.0);
        assert!((pass_at_k(4, 1, 1) - 0.25).abs() < 1e-12);
        assert!((pass_at_k(5, 2, 2) - (1.0 - 3.0 / 10.0)).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 1, 4), 1.0);
    }
}
