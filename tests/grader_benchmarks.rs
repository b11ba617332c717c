//! Runs the grader over the real benchmark files in `../shared/data/benchmarks`
//! (or `EMPO_BENCHMARK_DIR`). They sit beside every checkout and CI clone, so a missing
//! file fails the test rather than skipping it.

use empo_engine::grader::{extract_boxed, grade, is_equiv, normalize_answer, GoldAnswer};
use serde_json::Value;
use std::path::PathBuf;

fn benchmark_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("EMPO_BENCHMARK_DIR") {
        candidates.push(dir.into());
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    candidates.push(manifest.join("../shared/data/benchmarks"));
    candidates
        .into_iter()
        .find(|d| d.join("math500.jsonl").is_file())
}

fn load(name: &str) -> Option<Vec<Value>> {
    let dir = benchmark_dir()
        .expect("../shared/data/benchmarks (or EMPO_BENCHMARK_DIR) holds the benchmark files");
    let text = std::fs::read_to_string(dir.join(name)).expect("benchmark file is readable");
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("benchmark line is valid JSON"))
        .collect();
    assert!(!rows.is_empty(), "{name} has no rows");
    Some(rows)
}

fn str_field<'a>(row: &'a Value, key: &str) -> &'a str {
    row[key]
        .as_str()
        .unwrap_or_else(|| panic!("field {key} is a string"))
}

fn rate(ok: usize, total: usize) -> f64 {
    ok as f64 / total as f64
}

/// Counts adjacent-row pairs with different gold strings that are judged
/// equivalent; a grader that says yes to everything would score near 100% here.
/// (Pairs with the identical gold string are genuinely equal and not counted.)
fn adjacent_equiv_count(answers: &[String]) -> usize {
    answers
        .windows(2)
        .filter(|w| w[0] != w[1] && is_equiv(&w[0], &w[1]))
        .inspect(|w| println!("  adjacent pair judged equivalent: {:?} ~ {:?}", w[0], w[1]))
        .count()
}

/// Bumps the first digit of each gold (`3/4` -> `4/4`) and counts how many are
/// still judged equivalent to the original; returns (mutated, still equivalent).
fn digit_mutation_equiv_count(name: &str, answers: &[String]) -> (usize, usize) {
    let mut mutated = 0;
    let mut still_equal = 0;
    for a in answers {
        let Some((pos, d)) = a.char_indices().find(|(_, c)| c.is_ascii_digit()) else {
            continue;
        };
        let bumped = char::from(b'0' + (d as u8 - b'0' + 1) % 10);
        let mut b = a.clone();
        b.replace_range(pos..pos + 1, &bumped.to_string());
        mutated += 1;
        if is_equiv(a, &b) {
            still_equal += 1;
            println!("  {name} digit-mutated gold still equivalent: {a:?} ~ {b:?}");
        }
    }
    println!("{name}: digit-mutated golds judged equivalent: {still_equal}/{mutated}");
    (mutated, still_equal)
}

#[test]
fn math500_boxed_solution_matches_answer() {
    let Some(rows) = load("math500.jsonl") else {
        return;
    };
    let mut ok = 0;
    let mut reformatted_ok = 0;
    for row in &rows {
        let answer = str_field(row, "answer");
        let gold = GoldAnswer::Text(answer.to_string());
        match extract_boxed(str_field(row, "solution")) {
            Some(pred) if grade(&pred, &gold) => ok += 1,
            pred => println!("math500 miss: pred={pred:?} gold={answer:?}"),
        }
        // The same answer as a model might write it: in math mode, with \dfrac,
        // extra spaces and a trailing period.
        let restyled = format!(
            "$ {} $.",
            answer.replace("\\frac", "\\dfrac").replace(',', ", ")
        );
        if grade(&restyled, &gold) {
            reformatted_ok += 1;
        } else {
            println!("math500 restyled miss: {restyled:?} vs {answer:?}");
        }
    }
    let n = rows.len();
    println!("math500: boxed {ok}/{n} = {:.4}", rate(ok, n));
    println!(
        "math500: restyled {reformatted_ok}/{n} = {:.4}",
        rate(reformatted_ok, n)
    );
    assert!(rate(ok, n) >= 0.98);
    assert!(rate(reformatted_ok, n) >= 0.95);

    let answers: Vec<String> = rows
        .iter()
        .map(|r| str_field(r, "answer").to_string())
        .collect();
    let same = adjacent_equiv_count(&answers);
    println!(
        "math500: adjacent answers judged equivalent: {same}/{}",
        n - 1
    );
    assert!(rate(same, n - 1) < 0.05);

    let (mutated, still_equal) = digit_mutation_equiv_count("math500", &answers);
    assert!(rate(still_equal, mutated) < 0.01);

    // All pairs among the first 150 distinct golds: equivalences must be rare.
    let mut distinct: Vec<&String> = Vec::new();
    for a in &answers {
        if distinct.len() < 150
            && !distinct
                .iter()
                .any(|d| normalize_answer(d) == normalize_answer(a))
        {
            distinct.push(a);
        }
    }
    let mut pairs = 0;
    let mut equal = 0;
    for (i, a) in distinct.iter().enumerate() {
        for b in &distinct[i + 1..] {
            pairs += 1;
            if is_equiv(a, b) {
                equal += 1;
                println!("math500 distinct golds judged equivalent: {a:?} ~ {b:?}");
            }
        }
    }
    println!("math500: distinct gold pairs judged equivalent: {equal}/{pairs}");
    assert!(rate(equal, pairs) < 0.002);
}

#[test]
fn minerva_gold_is_stable_under_normalization() {
    let Some(rows) = load("minerva_math.jsonl") else {
        return;
    };
    let mut golds = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let gold = extract_boxed(str_field(row, "solution"))
            .unwrap_or_else(|| panic!("minerva row {i} has a boxed gold"));
        let norm = normalize_answer(&gold);
        assert!(!norm.is_empty(), "row {i}: {gold:?} normalizes to empty");
        assert!(
            is_equiv(&gold, &gold),
            "row {i}: {gold:?} not equivalent to itself"
        );
        assert!(
            is_equiv(&norm, &gold),
            "row {i}: normalized {norm:?} not equivalent to {gold:?}"
        );
        assert_eq!(
            normalize_answer(&norm),
            norm,
            "row {i}: normalization not idempotent"
        );
        golds.push(gold);
    }
    let (mutated, still_equal) = digit_mutation_equiv_count("minerva", &golds);
    assert!(rate(still_equal, mutated) < 0.02);
    let same = adjacent_equiv_count(&golds);
    println!(
        "minerva: {} golds; adjacent judged equivalent: {same}/{}",
        golds.len(),
        golds.len() - 1
    );
    assert!(rate(same, golds.len() - 1) < 0.05);
}

#[test]
fn olympiadbench_final_answer_grades_against_its_list() {
    let Some(rows) = load("olympiadbench.jsonl") else {
        return;
    };
    let mut ok = 0;
    let mut firsts = Vec::new();
    for row in &rows {
        let list: Vec<String> = row["final_answer"]
            .as_array()
            .expect("final_answer is a list")
            .iter()
            .map(|v| {
                v.as_str()
                    .expect("final_answer items are strings")
                    .to_string()
            })
            .collect();
        let first = list.first().cloned().unwrap_or_default();
        if grade(&first, &GoldAnswer::List(list.clone())) {
            ok += 1;
        } else {
            println!("olympiadbench miss: {first:?}");
        }
        firsts.push(first);
    }
    let n = rows.len();
    println!("olympiadbench: {ok}/{n} = {:.4}", rate(ok, n));
    assert!(rate(ok, n) >= 0.99);
    let same = adjacent_equiv_count(&firsts);
    println!(
        "olympiadbench: adjacent answers judged equivalent: {same}/{}",
        n - 1
    );
    assert!(rate(same, n - 1) < 0.05);
}

#[test]
fn amc23_numbers_grade_as_strings() {
    let Some(rows) = load("amc23.jsonl") else {
        return;
    };
    let mut golds = Vec::new();
    for row in &rows {
        let x = row["answer"].as_f64().expect("amc23 answer is a number");
        let gold = GoldAnswer::Number(x);
        let text = if x.fract() == 0.0 {
            format!("{}", x as i64)
        } else {
            x.to_string()
        };
        assert!(grade(&text, &gold), "{text} should match {x}");
        let boxed =
            extract_boxed(&format!("so the answer is $\\boxed{{{text}}}$.")).expect("boxed");
        assert!(grade(&boxed, &gold));
        assert!(
            !grade(&format!("{}", x + 1.0), &gold),
            "{} should not match {x}",
            x + 1.0
        );
        assert!(!grade(&format!("{}", -x), &gold) || x == 0.0);
        golds.push(text);
    }
    assert!(grade("27", &GoldAnswer::Number(27.0)));
    assert!(!grade("28", &GoldAnswer::Number(27.0)));
    let same = adjacent_equiv_count(&golds);
    println!(
        "amc23: {} rows all graded; adjacent judged equivalent: {same}/{}",
        rows.len(),
        rows.len() - 1
    );
    assert!(rate(same, rows.len() - 1) < 0.05);
}

#[test]
fn aime24_answers_grade_with_and_without_leading_zeros() {
    let Some(rows) = load("aime24.jsonl") else {
        return;
    };
    let mut golds = Vec::new();
    for row in &rows {
        let answer = str_field(row, "answer");
        let gold = GoldAnswer::Text(answer.to_string());
        let value: i64 = answer.trim().parse().expect("aime answers are integers");
        assert!(grade(answer, &gold));
        // Gold `025` must accept a model's `25`.
        assert!(grade(&value.to_string(), &gold), "{value} vs {answer:?}");
        assert!(grade(&format!("{value}.0"), &gold));
        assert!(!grade(&(value + 1).to_string(), &gold));
        assert!(!grade(&(value - 1).to_string(), &gold));
        golds.push(answer.to_string());
    }
    let same = adjacent_equiv_count(&golds);
    println!(
        "aime24: {} rows all graded; adjacent judged equivalent: {same}/{}",
        rows.len(),
        rows.len() - 1
    );
    assert!(rate(same, rows.len() - 1) < 0.05);
}
