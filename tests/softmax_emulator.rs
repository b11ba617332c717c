//! cuda/softmax_entropy.cu run on the host by tools/kernel_emulator (softmax_main.cpp): the
//! split-row forward with its last-CTA merge and the saved-statistics backward against
//! double-precision copies of the CPU oracles. Skipped, with the reason printed, without g++.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn softmax_kernels_match_the_oracles_under_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tool = root.join("tools/kernel_emulator");
    let dir = std::env::temp_dir().join(format!("empo-softmax-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["emu.h", "softmax_main.cpp"] {
        std::fs::copy(tool.join(f), dir.join(f)).unwrap();
    }
    let src = std::fs::read_to_string(root.join("cuda/softmax_entropy.cu")).unwrap();
    assert!(src.contains("#include \"common.cuh\""));
    let host = src.replace("#include \"common.cuh\"", "#include \"emu.h\"");
    std::fs::write(dir.join("softmax_emu.cpp"), host).unwrap();
    let exe = dir.join("softmax-emu");
    let cc = Command::new("g++")
        .args(["-O2", "-std=c++17", "-fno-strict-aliasing", "-w", "-o"])
        .arg(&exe)
        .arg(dir.join("softmax_main.cpp"))
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
    for seed in ["0", "5"] {
        let out = Command::new(&exe).env("EMU_SEED", seed).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}");
        assert!(
            out.status.success() && text.contains("all ok") && !text.contains("FAIL"),
            "seed {seed}: {text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
