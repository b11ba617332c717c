//! The bench table's bookkeeping, over the CPU backend (the GPU numbers need a GPU).

use empo_engine::backend::cpu::CpuBackend;
use empo_engine::kernel_bench::{
    add_copy_peers, decode_plan_bytes, format_decode, format_table, format_targets, BenchRow,
    BenchShapes, Unit,
};

fn row(op: &str, unit: Unit, work: f64) -> BenchRow {
    BenchRow {
        op: op.into(),
        shape: "s".into(),
        unit,
        work,
        seconds: 1e-3,
        extra_bytes: None,
        copy_peer: None,
    }
}

#[test]
fn copy_peers_pair_memory_bound_rows_only() {
    let mut rows = vec![
        row("ceiling: copy", Unit::Bytes, 8e6),
        row("ceiling: GEMM", Unit::Flops, 1e9),
        row("rmsnorm", Unit::Bytes, 8e6),
        row("residual add", Unit::Bytes, 8e6),
        row("attention fwd (causal)", Unit::Flops, 1e9),
        row("tiny", Unit::Bytes, 1e3),
    ];
    add_copy_peers(&CpuBackend, &mut rows, 2).unwrap();
    let paired: Vec<&str> = rows
        .iter()
        .filter(|r| r.copy_peer.is_some())
        .map(|r| r.op.as_str())
        .collect();
    assert_eq!(paired, ["rmsnorm", "residual add"]);
    let t = rows[2].copy_peer.unwrap();
    assert!(t > 0.0 && t.is_finite(), "{t}");
    // Rows of the same size share one timed copy.
    assert_eq!(rows[3].copy_peer, Some(t));
    let table = format_table(&rows);
    let line = table.lines().find(|l| l.starts_with("rmsnorm")).unwrap();
    assert!(
        line.trim_end()
            .ends_with(&format!("{:.0}%", 100.0 * t / 1e-3)),
        "{line}"
    );
    assert!(table.lines().next().unwrap().contains("of same copy"));
}

#[test]
fn targets_are_read_off_the_right_rows() {
    let mut rows = vec![
        row("ceiling: copy", Unit::Bytes, 3e9), // 3000 GB/s in 1 ms
        row("rmsnorm", Unit::Bytes, 2.5e9),     // 83%
        row("rmsnorm_bwd", Unit::Bytes, 2.2e9), // 73%
        row("rmsnorm_bwd (pdl)", Unit::Bytes, 2.4e9), // 80%
        row("attention fwd (causal)", Unit::Flops, 3.07e11),
        row("attention fwd (causal)", Unit::Flops, 4.0e11),
        row("embedding", Unit::Bytes, 1.65e9), // 55%
    ];
    rows[4].shape = "t 1024, heads 28/4, d 128".into();
    rows[5].shape = "t 4096, heads 28/4, d 128".into();
    let t = format_targets(&rows);
    assert!(
        t.contains("rmsnorm: 83% of copy, target 80% of copy: met"),
        "{t}"
    );
    assert!(
        t.contains("rmsnorm_bwd: 73% of copy, target 80% of copy: MISSED"),
        "{t}"
    );
    assert!(
        t.contains("rmsnorm_bwd (pdl): 80% of copy, target 80% of copy: met"),
        "{t}"
    );
    // The t 4096 row, not the first attention row.
    assert!(
        t.contains("attention fwd (causal) t 4096: 400 TFLOP/s, target 350 TFLOP/s: met"),
        "{t}"
    );
    assert!(
        t.contains("embedding: 55% of copy (a gather, not held to the elementwise target)"),
        "{t}"
    );
    // No row, no line.
    assert!(!t.contains("softmax"), "{t}");
}

#[test]
fn decode_summary_gives_tokens_a_second_against_the_narrowest_step() {
    let step = |rows: usize, seconds: f64| BenchRow {
        shape: format!("{rows} rows, context 256..1324, 2 layers of h 3584, V 4096"),
        seconds,
        ..row("decode step", Unit::Bytes, 1e9)
    };
    let rows = vec![
        row("ceiling: copy", Unit::Bytes, 3e9),
        step(8, 1e-3),
        step(841, 1e-2),
    ];
    let shapes = BenchShapes::qwen_7b();
    let s = format_decode(&rows, &shapes);
    assert!(
        s.contains("   8 rows:      8000 tokens/s, 1.0x the 8-row step's\n"),
        "{s}"
    );
    assert!(
        s.contains(" 841 rows:     84100 tokens/s, 10.5x the 8-row step's\n"),
        "{s}"
    );
    // Without decode rows there is nothing to say.
    assert_eq!(format_decode(&rows[..1], &shapes), "");
    // Where the device memory was measured: against the plan's count, which is the 2-layer
    // cache of 841 × 1325 positions × 512 keys and as many values in bf16 (4.56 GB) and a
    // step's activations (151 MiB at 841 rows).
    let plan = decode_plan_bytes(&shapes, 841);
    let cache: u64 = 2 * 2 * 841 * 1325 * 512 * 2;
    assert!(plan > cache && plan < cache + (256 << 20), "{plan}");
    let mut measured = rows.clone();
    measured[2].extra_bytes = Some(plan as usize * 5 / 4);
    let s = format_decode(&measured, &shapes);
    assert!(
        s.contains(" 841 rows:     84100 tokens/s, 10.5x the 8-row step's; held "),
        "{s}"
    );
    assert!(s.trim_end().ends_with("(1.25x)"), "{s}");
}
