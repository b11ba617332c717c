//! empo-engine: label-free reasoning RL (EMPO, one-shot entropy minimization) for Qwen2 models,
//! with one model code path over a CPU reference backend and a CUDA backend.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod demo_task;
pub mod device;
pub mod eval;
pub mod generate;
pub mod grader;
pub mod hub;
pub mod io;
pub mod kernel_bench;
pub mod kernel_checks;
pub mod kernel_resources;
pub mod lm_head;
pub mod memory_plan;
pub mod model;
pub mod optim;
pub mod rl;
pub mod sampling;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
