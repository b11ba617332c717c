//! The host-side checks of the RL kernels' device code (tools/cuda_host_checks): Philox against
//! its known-answer vectors and the CPU's uniform, the top-k/top-p threshold against the CPU's
//! truncation, the policy-loss math and stochastic rounding. They compile the kernels' own
//! __host__ __device__ functions with nvcc and run on the CPU, so CI checks them without a GPU.
//! Skipped (with the reason printed) when nvcc is not installed.

use std::path::PathBuf;
use std::process::Command;

fn nvcc() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let local = root.join(".cuda/nvidia/cu13/bin/nvcc");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("NVCC").map(PathBuf::from)
}

fn run_check(name: &str) {
    let Some(nvcc) = nvcc() else {
        println!("skipped: nvcc not found (run tools/install-nvcc.sh)");
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = nvcc.parent().unwrap().parent().unwrap().join("lib");
    let exe = std::env::temp_dir().join(format!("empo-{name}-{}", std::process::id()));
    let out = Command::new(&nvcc)
        .args(["-O2", "-std=c++17", "-arch=sm_80", "-I"])
        .arg(root.join("cuda"))
        .arg("-L")
        .arg(&lib)
        .arg(root.join(format!("tools/cuda_host_checks/{name}.cu")))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("nvcc runs");
    assert!(
        out.status.success(),
        "nvcc failed on {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("host check runs");
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{text}");
    let _ = std::fs::remove_file(&exe);
    assert!(
        run.status.success(),
        "{name} failed: {text}{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn sampling_device_code_matches_the_cpu_sampler() {
    run_check("sampling_check");
}

#[test]
fn policy_loss_and_optimizer_device_code_match_the_cpu() {
    run_check("rl_optim_check");
}
