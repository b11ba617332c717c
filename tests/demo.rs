//! The embedded demo end to end, shortened: `train` with no model and no data runs EMPO (and
//! one-shot EM) on assets/demo and writes summary.json with finite numbers and the curves.

use std::process::Command;

fn run_demo(algo: &str) -> serde_json::Value {
    let out = std::env::temp_dir().join(format!("empo-demo-{algo}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_empo-engine"))
        .args([
            "train",
            "--algo",
            algo,
            "--steps",
            "2",
            "--heldout",
            "3",
            "--group-size",
            "4",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("greedy accuracy") && stdout.contains("semantic entropy"),
        "{stdout}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for k in [
        "accuracy_before",
        "accuracy_after",
        "semantic_entropy_before",
        "semantic_entropy_after",
        "seconds",
    ] {
        assert!(s[k].as_f64().is_some_and(f64::is_finite), "{k}: {}", s[k]);
    }
    assert_eq!(s["steps"], 2);
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "curves.png is a PNG");
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    std::fs::remove_dir_all(&out).unwrap();
    s
}

#[test]
fn demo_empo_writes_summary_and_curves() {
    run_demo("empo");
}

#[test]
fn demo_one_shot_em_writes_summary_and_curves() {
    run_demo("em");
}
