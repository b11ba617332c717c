//! cuda/attention.cu run on the host by tools/kernel_emulator, against double-precision
//! copies of the CPU oracles. Skipped, with the reason printed, without python3 or g++.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn attention_kernels_match_the_oracles_under_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tool = root.join("tools/kernel_emulator");
    let dir = std::env::temp_dir().join(format!("empo-attn-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["emu.h", "emu_tc.h", "main.cpp"] {
        std::fs::copy(tool.join(f), dir.join(f)).unwrap();
    }
    let gen = Command::new("python3")
        .arg(tool.join("gen.py"))
        .arg(root.join("cuda/attention.cu"))
        .arg(&dir)
        .status();
    if !gen.is_ok_and(|s| s.success()) {
        println!("skipped: python3 could not run tools/kernel_emulator/gen.py");
        return;
    }
    let exe = dir.join("emu");
    let cc = Command::new("g++")
        .args(["-O2", "-std=c++17", "-fno-strict-aliasing", "-w", "-o"])
        .arg(&exe)
        .arg(dir.join("main.cpp"))
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
    for (seed, eager) in [("7", false), ("3", true)] {
        let mut cmd = Command::new(&exe);
        cmd.env("EMU_SEED", seed);
        if eager {
            cmd.env("EMU_EAGER", "1");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}");
        assert!(
            out.status.success() && text.contains("all ok"),
            "seed {seed} eager {eager}: {text}"
        );
        assert!(!text.contains("FAIL"), "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
