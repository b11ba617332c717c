//! ptxas's resource report, parsed (`empo_engine::kernel_resources`) and held to the rules the
//! hot kernels' speed depends on: no kernel spills or keeps a stack frame, and no wgmma pipeline
//! is serialized. Without a GPU this is what CI can check of a kernel's performance; the report
//! comes from the build's own nvcc (tools/install-nvcc.sh in CI).

use empo_engine::device::kernels_compiled;
use empo_engine::kernel_resources::{format_table, kernel_names, parse, PTXAS_REPORT};

/// tests/fixtures/ptxas-report.txt is real `nvcc -Xptxas=-v` output (nvcc 13.0): an excerpt of
/// the build's report (two targets, an advisory before the sm_90a entries) and a register-starved
/// kernel compiled on purpose to spill (`pressure`, __launch_bounds__(1024, 2) over a 64-float
/// array indexed at run time).
#[test]
fn parses_real_ptxas_output() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ptxas-report.txt"),
    )
    .unwrap();
    let rows = parse(&text).unwrap();
    let names: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.kernel.as_str(), r.arch.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("softmax_stats_bwd_saved", "sm_90a"),
            ("wgmma_probe", "sm_90a"),
            ("attention_bwd_d128_wgmma", "sm_90a"),
            ("attention_fwd_d128_wgmma", "sm_90a"),
            ("attention_fwd_d64", "sm_90a"),
            ("softmax_stats_bwd_saved", "sm_80"),
            ("attention_fwd_d128_wgmma", "sm_80"),
            ("pressure", "sm_80"),
        ]
    );
    let get = |k: &str, a: &str| rows.iter().find(|r| r.kernel == k && r.arch == a).unwrap();
    assert_eq!(get("attention_bwd_d128_wgmma", "sm_90a").registers, 246);
    assert_eq!(get("attention_fwd_d128_wgmma", "sm_90a").registers, 202);
    assert_eq!(get("softmax_stats_bwd_saved", "sm_80").registers, 48);
    let probe = get("wgmma_probe", "sm_90a");
    assert_eq!(probe.registers, 135);
    assert_eq!(probe.advisories.len(), 1);
    assert!(probe.advisories[0].starts_with("(C7511)"));
    assert!(rows
        .iter()
        .filter(|r| r.kernel != "wgmma_probe")
        .all(|r| r.advisories.is_empty()));
    let p = get("pressure", "sm_80");
    assert_eq!(
        (
            p.registers,
            p.stack_bytes,
            p.spill_store_bytes,
            p.spill_load_bytes
        ),
        (32, 936, 1936, 1960)
    );
    assert!(p.spills());
    assert!(rows
        .iter()
        .filter(|r| r.kernel != "pressure")
        .all(|r| !r.spills() && r.stack_bytes == 0));
    let table = format_table(&rows);
    assert!(table.contains("wgmma_probe (sm_90a): (C7511)"), "{table}");
}

#[test]
fn a_malformed_report_names_its_line() {
    let bad = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
               ptxas info    : Function properties for k\n\
               \x20   x bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n";
    let err = parse(bad).unwrap_err().to_string();
    assert!(err.contains("line 3") && err.contains("spill"), "{err}");
    let orphan = "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized in the function 'ghost'\n";
    let err = parse(orphan).unwrap_err().to_string();
    assert!(err.contains("ghost"), "{err}");
}

/// Every kernel of this build, for every target: no spill, no stack frame, and no ptxas
/// advisory except on wgmma_probe (the layout probe, which runs once and is never timed).
#[test]
fn the_build_has_no_spills_and_no_serialized_wgmma() {
    if !kernels_compiled() {
        println!("skipped: built without nvcc (tools/install-nvcc.sh)");
        return;
    }
    let rows = parse(PTXAS_REPORT).unwrap();
    println!("{}", format_table(&rows));
    let mut archs: Vec<&str> = rows.iter().map(|r| r.arch.as_str()).collect();
    archs.sort_unstable();
    archs.dedup();
    assert!(!archs.is_empty(), "ptxas reported no kernel");
    for arch in &archs {
        for k in kernel_names() {
            let n = rows
                .iter()
                .filter(|r| r.kernel == k && r.arch == *arch)
                .count();
            assert_eq!(n, 1, "{k} compiled {n} times for {arch}");
        }
    }
    let mut bad = Vec::new();
    for r in &rows {
        if r.spills() || r.stack_bytes > 0 {
            bad.push(format!(
                "{} ({}): {} B stack, {}/{} B spilled",
                r.kernel, r.arch, r.stack_bytes, r.spill_store_bytes, r.spill_load_bytes
            ));
        }
        // The sampler launches 1024 threads and has no __launch_bounds__ (with one, ptxas held
        // sm_80 to 32 registers and spilled): a block that big fits 64 registers a thread.
        if r.kernel == "sample_tokens" && r.registers * 1024 > 65536 {
            bad.push(format!(
                "sample_tokens ({}): {} registers, too many for its 1024-thread block",
                r.arch, r.registers
            ));
        }
        if r.kernel != "wgmma_probe" {
            for a in &r.advisories {
                bad.push(format!("{} ({}): {a}", r.kernel, r.arch));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
