//! Compiles every `cuda/*.cu` with nvcc into one fatbin that the binary embeds.
//!
//! nvcc is looked for in `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, then the project-local
//! `.cuda/` that tools/install-nvcc.sh fills from PyPI. Without nvcc the build still succeeds
//! (one cargo warning) and the binary reports "built without CUDA kernels".

use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    // pip puts nvcc at site-packages/nvidia/cuda_nvcc/bin (CUDA 12) or nvidia/cu13/bin (CUDA 13).
    let local = root.join(".cuda");
    ["nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc"]
        .iter()
        .map(|rel| local.join(rel))
        .find(|p| p.exists())
}

/// `-gencode` flags: sm_90a and sm_80 SASS plus compute_90 PTX by default, or CUDA_COMPUTE_CAP
/// (comma-separated, e.g. "89,120").
fn gencode_flags() -> Vec<String> {
    match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(caps) if !caps.trim().is_empty() => caps
            .split(',')
            .map(|c| c.trim().trim_start_matches("sm_").to_string())
            .flat_map(|c| {
                let base = c.trim_end_matches('a').to_string();
                vec![
                    format!("-gencode=arch=compute_{c},code=sm_{c}"),
                    format!("-gencode=arch=compute_{base},code=compute_{base}"),
                ]
            })
            .collect(),
        _ => vec![
            "-gencode=arch=compute_90a,code=sm_90a".into(),
            "-gencode=arch=compute_80,code=sm_80".into(),
            "-gencode=arch=compute_90,code=compute_90".into(),
        ],
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let fatbin = out.join("kernels.fatbin");
    println!("cargo:rerun-if-changed=cuda");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("cuda"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    let mut compiled = false;
    if sources.is_empty() {
        // Nothing to compile yet; no warning.
    } else if let Some(nvcc) = find_nvcc(&root) {
        // One translation unit that includes every op file: one fatbin, one module to load.
        let unity = out.join("all_kernels.cu");
        let body: String = sources
            .iter()
            .map(|s| format!("#include \"{}\"\n", s.display()))
            .collect();
        std::fs::write(&unity, body).unwrap();
        let names: Vec<String> = sources
            .iter()
            .map(|s| s.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        // Kernel names for `empo-engine info`: every extern "C" __global__ entry point.
        let mut kernels = Vec::new();
        for s in &sources {
            let text = std::fs::read_to_string(s).unwrap_or_default();
            for part in text.split("extern \"C\" ").skip(1) {
                // Declarations only (a comment may say extern "C" too); `__launch_bounds__(…)`
                // may stand before `__global__` or between `void` and the name.
                let first_line = part.lines().next().unwrap_or("");
                let Some((_, mut rest)) = part.split_once("__global__ void") else {
                    continue;
                };
                if !first_line.contains("__global__ void") {
                    continue;
                }
                if let Some(r) = rest.trim_start().strip_prefix("__launch_bounds__") {
                    rest = r.split_once(')').map_or("", |(_, r)| r);
                }
                let head = rest.split('(').next().unwrap_or("");
                kernels.push(head.split_whitespace().last().unwrap_or("").to_string());
            }
        }
        // ptxas's resource report (registers, stack, spills, and its advisories such as a
        // serialized wgmma) is kept for `empo-engine info --resources` and tests/kernel_resources.rs:
        // the one performance property of a kernel that can be checked without a GPU.
        let output = Command::new(&nvcc)
            .arg("-fatbin")
            .args([
                "-O3",
                "-std=c++17",
                "--use_fast_math",
                "-lineinfo",
                "-Xptxas=-v",
            ])
            .args(gencode_flags())
            .arg("-I")
            .arg(root.join("cuda"))
            .arg(&unity)
            .arg("-o")
            .arg(&fatbin)
            .output();
        match output {
            Ok(o) if o.status.success() => {
                // Lossy: include_str! needs UTF-8, and host-compiler warnings may quote in another encoding.
                std::fs::write(
                    out.join("ptxas.txt"),
                    String::from_utf8_lossy(&o.stderr).as_bytes(),
                )
                .unwrap();
                compiled = true;
                println!(
                    "cargo:rustc-env=EMPO_CUDA_TARGETS={}",
                    gencode_flags().join(" ")
                );
                println!("cargo:rustc-env=EMPO_CUDA_FILES={}", names.join(","));
                println!(
                    "cargo:rustc-env=EMPO_CUDA_KERNEL_NAMES={}",
                    kernels.join(",")
                );
            }
            // A kernel that does not compile fails the build: CI must catch it.
            Ok(o) => panic!(
                "nvcc ({}) failed with {} compiling cuda/*.cu:\n{}",
                nvcc.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run nvcc at {}: {e}", nvcc.display()),
        }
    } else {
        println!("cargo:warning=nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH, .cuda/): building without CUDA kernels; run tools/install-nvcc.sh to compile them");
    }
    if !compiled {
        std::fs::write(&fatbin, b"").unwrap();
        std::fs::write(out.join("ptxas.txt"), b"").unwrap();
    }
    println!(
        "cargo:rustc-env=EMPO_CUDA_KERNELS={}",
        if compiled { "1" } else { "0" }
    );
}
