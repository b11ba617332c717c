//! `grade`, `eval` and `select` on the real benchmark files in ../shared/data.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Output};

fn shared(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel)
}

fn run(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_empo-engine"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("empo-eval-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn accuracy(o: &Output) -> f64 {
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("accuracy: "), "{last}");
    last["accuracy: ".len()..]
        .split('%')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn grade_reference_solutions_of_math500_and_a_shuffled_control() {
    let dir = tmp("grade");
    let out = dir.join("graded.jsonl");
    let data = shared("benchmarks/math500.jsonl");
    let o = run(&[
        "grade",
        "--data",
        data.to_str().unwrap(),
        "--pred-field",
        "solution",
        "--answer-field",
        "answer",
        "--out",
        out.to_str().unwrap(),
    ]);
    let acc = accuracy(&o);
    assert!(
        acc >= 98.0,
        "the reference solutions grade as correct: {acc}%"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 500);
    assert!(
        rows[0]["pred_answer"].is_string()
            && rows[0]["correct"].is_boolean()
            && rows[0]["unique_id"].is_string()
    );

    // Each solution against the next problem's answer: a grader that says yes to everything fails.
    let shuffled = dir.join("shuffled.jsonl");
    let text: String = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            serde_json::json!({"pred": r["solution"], "gold": rows[(i + 1) % rows.len()]["answer"]})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&shuffled, text).unwrap();
    let o = run(&[
        "grade",
        "--data",
        shuffled.to_str().unwrap(),
        "--pred-field",
        "pred",
        "--answer-field",
        "gold",
        "--out",
        dir.join("s.jsonl").to_str().unwrap(),
    ]);
    assert!(accuracy(&o) < 10.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_writes_per_problem_results_and_a_table() {
    let dir = tmp("eval");
    let model = fixtures().join("tiny-qwen2-a");
    let (a, b) = (
        shared("benchmarks/aime24.jsonl"),
        shared("benchmarks/amc23.jsonl"),
    );
    let o = run(&[
        "eval",
        "--weights",
        model.to_str().unwrap(),
        "--data",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--limit",
        "2",
        "--n",
        "3",
        "--max-new-tokens",
        "6",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("| aime24.jsonl | 2 |")
            && table.contains("| amc23.jsonl | 2 |")
            && table.contains("maj@k"),
        "{table}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("amc23.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["completions"].as_array().unwrap().len(), 3);
    assert_eq!(rows[0]["gold"], 27.0, "amc23 gold is the JSON number");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn select_ranks_by_pass_variance_with_gold_and_by_entropy_without() {
    let dir = tmp("select");
    let model = fixtures().join("tiny-qwen2-a");
    let with_gold = shared("train/one_shot_pi1_r128.parquet");
    let out = dir.join("rank.jsonl");
    run(&[
        "select",
        "--weights",
        model.to_str().unwrap(),
        "--data",
        with_gold.to_str().unwrap(),
        "--k",
        "4",
        "--limit",
        "3",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["criterion"] == "pass@k variance"));
    assert_eq!(rows[0]["rank"], 1);
    let plain = dir.join("plain.jsonl");
    std::fs::write(
        &plain,
        "{\"problem\": \"What is 1+1?\"}\n{\"problem\": \"What is 2+2?\"}\n",
    )
    .unwrap();
    run(&[
        "select",
        "--weights",
        model.to_str().unwrap(),
        "--data",
        plain.to_str().unwrap(),
        "--k",
        "4",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.contains("semantic entropy"));
    std::fs::remove_dir_all(&dir).unwrap();
}
