//! Picks the backend for `--device cpu|cuda|auto`.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
}

/// Whether this binary carries compiled CUDA kernels (set by build.rs when nvcc ran).
pub fn kernels_compiled() -> bool {
    option_env!("EMPO_CUDA_KERNELS").is_some_and(|v| v == "1")
}

/// The embedded fatbin (empty when built without nvcc), for the CUDA backend to load.
pub static KERNELS_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// A cheap look for an NVIDIA driver, without loading any CUDA library.
pub fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
}

/// Resolves the device and says which in one line on stderr (stdout stays clean for --json).
pub fn select(arg: DeviceArg) -> Result<Device> {
    let why_not_cuda = if !kernels_compiled() {
        "built without CUDA kernels"
    } else if !nvidia_driver_present() {
        "no NVIDIA GPU driver found"
    } else {
        "the CUDA backend is not part of this build yet"
    };
    match arg {
        DeviceArg::Cpu => {
            eprintln!("device: cpu");
            Ok(Device::Cpu)
        }
        DeviceArg::Cuda => bail!("--device cuda is unavailable: {why_not_cuda}; use --device cpu"),
        DeviceArg::Auto => {
            eprintln!("device: cpu (auto: {why_not_cuda})");
            Ok(Device::Cpu)
        }
    }
}
