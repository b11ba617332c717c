//! cuda/elementwise.cu, cuda/rmsnorm.cu and cuda/rope.cu run on the host by
//! tools/kernel_emulator (ops_main.cpp): every kernel at its launcher's geometry, packed and
//! scalar paths, against double-precision copies of the CPU oracles. Skipped, with the reason
//! printed, without python3 or g++.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn memory_bound_kernels_match_the_oracles_under_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tool = root.join("tools/kernel_emulator");
    let dir = std::env::temp_dir().join(format!("empo-ops-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["emu.h", "ops_main.cpp"] {
        std::fs::copy(tool.join(f), dir.join(f)).unwrap();
    }
    let gen = Command::new("python3")
        .arg(tool.join("gen_ops.py"))
        .arg(root.join("cuda"))
        .arg(&dir)
        .status();
    if !gen.is_ok_and(|s| s.success()) {
        println!("skipped: python3 could not run tools/kernel_emulator/gen_ops.py");
        return;
    }
    let exe = dir.join("ops-emu");
    let cc = Command::new("g++")
        .args(["-O2", "-std=c++17", "-fno-strict-aliasing", "-w", "-o"])
        .arg(&exe)
        .arg(dir.join("ops_main.cpp"))
        .output();
    let Ok(cc) = cc else {
        println!("skipped: no g++");
        return;
    };
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    // Two fiber schedules: warps drift apart differently, which exposes a missing barrier.
    for seed in ["7", "3"] {
        let out = Command::new(&exe).env("EMU_SEED", seed).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}");
        assert!(
            out.status.success() && text.contains("all ok") && !text.contains("FAIL"),
            "seed {seed} ({}): {text}",
            out.status
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
