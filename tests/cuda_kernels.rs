//! The check-kernels checks as tests. On a machine with a GPU they hold the CUDA backend to the
//! CPU reference; without one they say why they skipped. The harness itself is exercised on
//! every machine by running it over the CPU backend.

use empo_engine::backend::cpu::CpuBackend;
use empo_engine::kernel_checks::{format_table, run_all, Tolerances};

#[test]
fn harness_runs_every_check_over_the_cpu_backend() {
    let rows = run_all(&CpuBackend, 7, &Tolerances::exact(), false, &[]).unwrap();
    println!("{}", format_table(&rows));
    // Every op of the Backend trait and the three model checks appear.
    for op in [
        "add",
        "axpy",
        "swiglu",
        "rmsnorm",
        "embedding",
        "matmul",
        "rope",
        "attention flash",
        "attention decode",
        "attention_bwd",
        "kv_write",
        "softmax_stats",
        "adamw",
        "optimizer_step offloaded moments",
        "optimizer_step offloaded = one launch",
        "sum_squares",
        "model forward",
        "model grads",
        "model KV-cache",
        "model training step, warm",
        "model ragged decode step, warm",
    ] {
        assert!(
            rows.iter().any(|r| r.op.starts_with(op)),
            "no check for {op}"
        );
    }
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass()).collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
fn cuda_backend_matches_the_cpu_reference() {
    let be = match empo_engine::device::open_cuda() {
        Ok(be) => be,
        Err(e) => {
            println!("skipped: no GPU ({e:#})");
            return;
        }
    };
    let rows = empo_engine::kernel_checks::run_cuda(&be, 11, true, &[]);
    println!("{}", format_table(&rows));
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass()).collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
fn max_rel_err_is_relative_to_the_largest_reference_value() {
    use empo_engine::kernel_checks::max_rel_err;
    assert_eq!(max_rel_err(&[1.0, 2.0], &[1.0, 4.0]), 0.5);
    assert!(max_rel_err(&[f32::NAN], &[1.0]).is_nan());
    assert!(max_rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
}

#[test]
fn chi_square_z_rejects_a_wrong_distribution() {
    use empo_engine::kernel_checks::chi_square_z;
    let probs = [0.5, 0.3, 0.2];
    assert!(chi_square_z(&[5010, 2990, 2000], &probs, 10_000).abs() < 2.0);
    // 10% of the mass moved from the first token to the last.
    assert!(chi_square_z(&[4000, 3000, 3000], &probs, 10_000) > 10.0);
}

#[test]
fn the_wgmma_probes_reference_reads_transposed_operands() {
    use empo_engine::kernel_checks::plain_product;
    // A = [[1, 2, 3], [4, 5, 6]] (2 x 3), B = [[1, 0], [0, 1], [1, 1]] (3 x 2): A B = [[4, 5], [10, 11]].
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let at = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
    let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    let bt = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
    let want = vec![4.0, 5.0, 10.0, 11.0];
    assert_eq!(plain_product(&a, &b, [2, 3, 2], false, false), want);
    assert_eq!(plain_product(&at, &b, [2, 3, 2], true, false), want);
    assert_eq!(plain_product(&a, &bt, [2, 3, 2], false, true), want);
    assert_eq!(plain_product(&at, &bt, [2, 3, 2], true, true), want);
}

#[test]
fn the_wgmma_probes_decoder_names_the_rows_and_columns_read() {
    use empo_engine::kernel_checks::{plain_product, probe_decode};
    let dims = [8, 16, 4];
    // Right: every row and column of D reads its own.
    let right = |a: &[f32], b: &[f32]| Ok(plain_product(a, b, dims, true, false));
    let t = probe_decode(&right, dims, true, false).unwrap();
    assert!(
        t.contains("0 of 8 rows") && t.contains("0 of 4 columns"),
        "{t}"
    );
    assert!(t.contains("both right"), "{t}");
    // D's rows 0 and 1 swapped, and its column 3 a copy of column 2.
    let wrong = |a: &[f32], b: &[f32]| {
        let mut d = plain_product(a, b, dims, false, true);
        for j in 0..4 {
            d.swap(j, 4 + j);
        }
        for i in 0..8 {
            d[i * 4 + 3] = d[i * 4 + 2];
        }
        Ok(d)
    };
    let t = probe_decode(&wrong, dims, false, true).unwrap();
    assert!(
        t.contains("2 of 8 rows") && t.contains("[1, 0, 2, 3, 4, 5, 6, 7]"),
        "{t}"
    );
    assert!(
        t.contains("1 of 4 columns") && t.contains("[0, 1, 2, 2]"),
        "{t}"
    );
    assert!(!t.contains("both right"), "{t}");
}
