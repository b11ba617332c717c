//! Picks the backend for `--device cpu|cuda|auto`.

use crate::backend::cuda::CudaBackend;
use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

pub enum Device {
    Cpu,
    Cuda(Box<CudaBackend>),
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

/// The CUDA backend on GPU 0, or why there is none.
pub fn open_cuda() -> Result<CudaBackend> {
    if !kernels_compiled() {
        bail!("built without CUDA kernels");
    }
    if !nvidia_driver_present() {
        bail!("no NVIDIA GPU driver found");
    }
    CudaBackend::new(0)
}

/// Resolves the device and says which in one line on stderr (stdout stays clean for --json).
pub fn select(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => {
            eprintln!("device: cpu");
            Ok(Device::Cpu)
        }
        DeviceArg::Cuda => match open_cuda() {
            Ok(be) => {
                eprintln!("device: {}", crate::backend::Backend::name(&be));
                Ok(Device::Cuda(Box::new(be)))
            }
            Err(e) => bail!("--device cuda is unavailable: {e:#}; use --device cpu"),
        },
        DeviceArg::Auto => match open_cuda() {
            Ok(be) => {
                eprintln!("device: {} (auto)", crate::backend::Backend::name(&be));
                Ok(Device::Cuda(Box::new(be)))
            }
            Err(e) => {
                eprintln!("device: cpu (auto: {e:#})");
                Ok(Device::Cpu)
            }
        },
    }
}

/// Runs `$body` with `$be` bound to the selected backend: the drivers are generic over
/// `Backend`, so each command is written once and monomorphized for both.
#[macro_export]
macro_rules! on_device {
    ($dev:expr, |$be:ident| $body:expr) => {
        match $dev {
            $crate::device::Device::Cpu => {
                let $be = &$crate::backend::cpu::CpuBackend;
                $body
            }
            $crate::device::Device::Cuda(cuda) => {
                let $be: &$crate::backend::cuda::CudaBackend = &cuda;
                $body
            }
        }
    };
}
