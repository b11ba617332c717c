//! What a training run holds in device memory, counted from the model's config and the run's
//! settings before anything is allocated. A 7B model's f32 gradients and AdamW moments alone
//! take 91 GB, so on an 80 GB GPU a run must know before its first generation whether it fits,
//! and with which settings, rather than fail on an allocation an hour in.
//!
//! The counts follow the allocations of `Qwen2::alloc_activations`, `alloc_scratch`,
//! `alloc_cache`, `lm_head::Chunks`, `Optimizer::new` (and its offloaded groups) and the CUDA
//! attention backward.

use crate::config::ModelConfig;
use crate::lm_head::chunk_rows;
use crate::optim::{
    largest_group, tensor_sizes, MomentDtype, OptimConfig, OptimizerKind, OFFLOAD_IS_F32,
};
use anyhow::{bail, Result};

/// A memory-saving setting (`--recompute`, `--offload-optimizer`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// On only where the run would not fit on the GPU without it (`resolve`).
    #[default]
    Auto,
    On,
    Off,
}

/// The shape of a run, as far as memory goes.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    /// Bytes of a stored value: 2 on the GPU (bf16), 4 on the CPU reference.
    pub storage: usize,
    /// Tokens of the longest prompt.
    pub prompt: usize,
    /// New tokens sampled per completion at most (0 when nothing is sampled).
    pub max_new: usize,
    /// Sequences decoded together while sampling (`generate_batch`'s rows): at least a group's
    /// G, raised by `MemoryPlan::widest_rollout` to what the memory holds.
    pub rollout_rows: usize,
    /// Tokens of the longest sequence a backward runs over.
    pub train_seq: usize,
    pub optim: OptimConfig,
    /// A frozen copy of the weights for the KL penalty.
    pub reference: bool,
    /// The backward recomputes each layer from its saved input (`Qwen2::recompute`).
    pub recompute: bool,
    /// AdamW's moments live in host memory (`optim::MomentStore::Host`).
    pub offload: bool,
    /// Training attention keeps a sequence's [heads, n, n] scores (`EMPO_ATTENTION=unfused`).
    pub unfused_attention: bool,
}

impl RunShape {
    /// Whether AdamW's moments are stored in bf16: asked for, and on a backend that stores bf16
    /// (the CPU reference keeps them in f32 either way).
    fn bf16_moments(&self) -> bool {
        self.optim.moments == MomentDtype::Bf16 && self.storage == 2
    }
}

/// Bytes by what holds them. Weights, reference and moments live for the whole run; the
/// generation and the update phases take turns.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub weights: u64,
    pub reference: u64,
    /// AdamW's moments on the device (0 when offloaded).
    pub moments: u64,
    /// AdamW's moments in host memory, when offloaded.
    pub host_moments: u64,
    /// The device copy of the largest group of offloaded moments, held during the optimizer
    /// step, when the backward's activations are gone.
    pub staging: u64,
    pub gradients: u64,
    /// Activations and gradient scratch of one sequence's forward and backward, lm_head
    /// chunk included.
    pub activations: u64,
    /// KV cache, prefill and decode-step activations and logits of the sampling batch.
    pub generation: u64,
    pub shape: RunShape,
}

pub fn param_count(cfg: &ModelConfig) -> u64 {
    tensor_sizes(cfg).iter().map(|&n| n as u64).sum()
}

/// Bytes of one layer's saved activations per token (`LayerActs`).
fn layer_bytes_per_token(c: &ModelConfig, w: u64) -> u64 {
    let (h, qd, kvd, i) = (
        c.hidden_size as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.intermediate_size as u64,
    );
    (4 * h + 2 * qd + 2 * kvd + 3 * i) * w + (2 + c.num_heads as u64) * 4
}

/// Bytes of `Qwen2::alloc_activations(batch, seq, train)` with `recompute`, storage width w.
pub fn activations_bytes(
    c: &ModelConfig,
    batch: usize,
    seq: usize,
    train: bool,
    recompute: bool,
    w: u64,
) -> u64 {
    let n = (batch * seq) as u64;
    let (h, layers) = (c.hidden_size as u64, c.num_layers as u64);
    let (sets, inputs) = match (train, recompute) {
        (true, false) => (layers, 0),
        (true, true) => (1, layers),
        (false, _) => (1, 0),
    };
    let logit_rows = if train { 0 } else { batch as u64 };
    sets * n * layer_bytes_per_token(c, w)
        + inputs * n * h * w
        + 3 * n * h * w
        + n * 4
        + logit_rows * c.vocab_size as u64 * w
}

/// Bytes of the scratch the unfused attention backward takes over one sequence of n tokens
/// (`cuda_attention_unfused::backward_scratch`), quadratic in n.
pub fn attention_scores_bytes(c: &ModelConfig, n: usize) -> u64 {
    let s = crate::backend::AttnShape {
        batch: 1,
        tq: n,
        tk: n,
        cap: n,
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let floats: usize = crate::backend::cuda_attention_unfused::backward_scratch(&s)
        .iter()
        .map(|&(_, f)| f)
        .sum();
    floats as u64 * 4
}

/// Bytes of the gradient scratch a backward over n tokens allocates (`alloc_scratch`).
pub fn scratch_bytes(c: &ModelConfig, n: usize, w: u64) -> u64 {
    let (h, qd, kvd, i) = (
        c.hidden_size as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.intermediate_size as u64,
    );
    n as u64 * (2 * h + 2 * qd + 2 * kvd + 3 * i) * w
}

/// Bytes of the lm_head chunk buffers for n rows (`lm_head::Chunks`).
pub fn chunk_bytes(c: &ModelConfig, n: usize, w: u64) -> u64 {
    let rows = chunk_rows(n, c.vocab_size) as u64;
    rows * (2 * c.hidden_size as u64 + c.vocab_size as u64) * w + 3 * rows * 4
}

/// Bytes of `Qwen2::alloc_cache(batch, cap)`.
pub fn cache_bytes(c: &ModelConfig, batch: usize, cap: usize, w: u64) -> u64 {
    2 * c.num_layers as u64 * (batch * cap * c.kv_dim()) as u64 * w
}

/// Bytes `generate_batch` holds with `rows` sequences decoding: their cache, one decode step's
/// activations and logits, and one prompt's prefill (its cache and activations).
pub fn generation_bytes(c: &ModelConfig, s: &RunShape, rows: usize) -> u64 {
    if s.max_new == 0 {
        return 0;
    }
    let w = s.storage as u64;
    cache_bytes(c, rows, s.prompt + s.max_new, w)
        + activations_bytes(c, rows, 1, false, false, w)
        + cache_bytes(c, 1, s.prompt, w)
        + activations_bytes(c, 1, s.prompt, false, false, w)
}

impl MemoryPlan {
    pub fn new(c: &ModelConfig, s: RunShape) -> MemoryPlan {
        let p = param_count(c);
        let w = s.storage as u64;
        let moment_width = if s.bf16_moments() { 2 } else { 4 };
        let all_moments = match s.optim.kind {
            OptimizerKind::Adamw => 2 * p * moment_width,
            OptimizerKind::Sgd => 0,
        };
        let offload = s.offload && all_moments > 0;
        let sizes = tensor_sizes(c);
        let n = s.train_seq;
        let attention_bwd = if s.unfused_attention {
            attention_scores_bytes(c, n)
        } else {
            // The flash backward's f32 accumulators for dq and, under GQA, dk and dv (CUDA).
            (n * (c.q_dim() + 2 * c.kv_dim())) as u64 * 4
        };
        let activations = activations_bytes(c, 1, n, true, s.recompute, w)
            + scratch_bytes(c, n, w)
            + chunk_bytes(c, n, w)
            + attention_bwd;
        let generation = generation_bytes(c, &s, s.rollout_rows);
        MemoryPlan {
            weights: p * w,
            reference: if s.reference { p * w } else { 0 },
            moments: if offload { 0 } else { all_moments },
            host_moments: if offload { all_moments } else { 0 },
            staging: if offload {
                2 * 4 * largest_group(&sizes) as u64
            } else {
                0
            },
            gradients: p * 4,
            activations,
            generation,
            shape: s,
        }
    }

    /// The most held at once: the resident state plus the larger phase.
    pub fn peak(&self) -> u64 {
        self.weights
            + self.reference
            + self.moments
            + self
                .generation
                .max(self.gradients + self.activations.max(self.staging))
    }

    /// The most sequences that can decode together in `usable` bytes beside the resident state
    /// (the update's gradients and activations are not allocated while sampling), between this
    /// plan's `rollout_rows` and `want`.
    pub fn widest_rollout(&self, c: &ModelConfig, usable: u64, want: usize) -> usize {
        let s = &self.shape;
        let floor = s.rollout_rows.min(want).max(1);
        if s.max_new == 0 {
            return floor;
        }
        let resident = self.weights + self.reference + self.moments;
        let fixed = generation_bytes(c, s, 0);
        let per_row = generation_bytes(c, s, 1) - fixed;
        let room = usable.saturating_sub(resident + fixed) / per_row.max(1);
        (room.min(want as u64) as usize).max(floor)
    }

    /// One line: what each part takes, and the peak (against `free` where known).
    pub fn summary(&self, free: Option<u64>) -> String {
        let s = &self.shape;
        let moments = match s.optim.kind {
            OptimizerKind::Sgd => String::new(),
            OptimizerKind::Adamw if self.host_moments > 0 => format!(
                ", AdamW moments {} (f32) in host memory, {} on the GPU during the update",
                gb(self.host_moments),
                gb(self.staging)
            ),
            OptimizerKind::Adamw => format!(
                ", AdamW moments {} ({})",
                gb(self.moments),
                if s.bf16_moments() { "bf16" } else { "f32" }
            ),
        };
        let reference = if self.reference > 0 {
            format!(", KL reference {}", gb(self.reference))
        } else {
            String::new()
        };
        let generation = if self.generation > 0 {
            format!(
                "; generation {} ({} sequences × {} tokens)",
                gb(self.generation),
                s.rollout_rows,
                s.prompt + s.max_new
            )
        } else {
            String::new()
        };
        let against = free.map_or(String::new(), |f| format!(" of {} free", gb(f)));
        format!(
            "memory plan: weights {}{moments}{reference}; update: gradients (f32) {} + activations {} \
             ({} tokens, recompute {}){generation}; peak {}{against}",
            gb(self.weights),
            gb(self.gradients),
            gb(self.activations),
            s.train_seq,
            if s.recompute { "on" } else { "off" },
            gb(self.peak()),
        )
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// What a run may use of `free` bytes: cuBLAS workspaces, the CUDA context's growth and
/// fragmentation of the stream-ordered pool need the rest.
pub fn usable(free: u64) -> u64 {
    free.saturating_sub((free / 20).max(1 << 30))
}

/// What offloaded moments may use of `available` host bytes: the rest is for the process
/// itself, the checkpoint writer's one tensor at a time and everything else on the machine.
pub fn host_usable(available: u64) -> u64 {
    available.saturating_sub((available / 10).max(4 << 30))
}

/// Free memory a run is planned against, where known.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    /// Free device memory (None on the CPU reference, which is not planned against memory).
    pub device: Option<u64>,
    /// Available host memory (`MemAvailable`), for offloaded moments.
    pub host: Option<u64>,
}

impl Budget {
    /// The device's free memory, and the host's available memory from /proc/meminfo (Linux).
    pub fn measure(device_free: Option<u64>) -> Budget {
        let host = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
        Budget {
            device: device_free,
            host,
        }
    }

    fn fits(&self, p: &MemoryPlan) -> bool {
        self.device.is_none_or(|f| p.peak() <= usable(f))
            && self.host.is_none_or(|h| p.host_moments <= host_usable(h))
    }
}

/// Settles `recompute` and `offload` for a run and checks that it fits (where the budget is
/// known). Under `Auto` a setting is turned on only where the run does not fit without it:
/// recompute first (it costs a forward per layer, on the GPU), then offloading the moments (it
/// costs two crossings of the bus a step, and host memory). A run that fits no way it may take
/// is an error that gives the plan and what would make it fit.
pub fn resolve(
    c: &ModelConfig,
    shape: RunShape,
    recompute: Switch,
    offload: Switch,
    budget: Budget,
) -> Result<MemoryPlan> {
    let adamw_f32 =
        shape.optim.kind == OptimizerKind::Adamw && shape.optim.moments == MomentDtype::F32;
    if offload == Switch::On && shape.optim.kind == OptimizerKind::Adamw && !adamw_f32 {
        bail!(OFFLOAD_IS_F32);
    }
    let planned = budget.device.is_some();
    let choices = |s: Switch, possible: bool| match s {
        Switch::On => vec![possible],
        Switch::Off => vec![false],
        Switch::Auto if planned && possible => vec![false, true],
        Switch::Auto => vec![false],
    };
    let mut tried = Vec::new();
    for off in choices(offload, shape.optim.kind == OptimizerKind::Adamw) {
        for rc in choices(recompute, true) {
            let plan = MemoryPlan::new(
                c,
                RunShape {
                    recompute: rc,
                    offload: off,
                    ..shape
                },
            );
            if budget.fits(&plan) {
                return Ok(plan);
            }
            tried.push(plan);
        }
    }
    let plan = tried.pop().expect("at least one setting is tried");
    let last = plan.shape;
    let mut hints = Vec::new();
    let mut try_hint = |what: &str, alt: RunShape| {
        let p = MemoryPlan::new(c, alt);
        hints.push(format!(
            "{what}: peak {}{}",
            gb(p.peak()),
            if budget.fits(&p) { " (fits)" } else { "" }
        ));
    };
    let full = RunShape {
        recompute: true,
        ..last
    };
    if !last.recompute {
        try_hint("--recompute on", full);
    }
    if adamw_f32 && !last.offload {
        try_hint(
            "--offload-optimizer on --recompute on",
            RunShape {
                offload: true,
                ..full
            },
        );
    }
    if adamw_f32 {
        let mut o = last.optim;
        o.moments = MomentDtype::Bf16;
        try_hint(
            "--moments bf16 --offload-optimizer off --recompute on",
            RunShape {
                optim: o,
                offload: false,
                ..full
            },
        );
    }
    if last.unfused_attention {
        try_hint(
            "EMPO_ATTENTION=mma --recompute on",
            RunShape {
                unfused_attention: false,
                ..full
            },
        );
    }
    if last.reference {
        try_hint(
            "--kl-coef 0 --recompute on",
            RunShape {
                reference: false,
                ..full
            },
        );
    }
    let host_short = budget
        .host
        .filter(|&h| plan.host_moments > host_usable(h))
        .map_or(String::new(), |h| {
            format!(
                "; the offloaded moments need {} of host memory, {} of {} available may be used",
                gb(plan.host_moments),
                gb(host_usable(h)),
                gb(h)
            )
        });
    let device_limit = budget.device.map_or(String::new(), |f| {
        format!("; at most {} of the GPU may be used", gb(usable(f)))
    });
    bail!(
        "this run does not fit: {}{device_limit}{host_short}.\n  {}",
        plan.summary(budget.device),
        if hints.is_empty() {
            "a smaller model, fewer --max-new-tokens or a GPU with more memory".to_string()
        } else {
            format!(
                "with {}; else a smaller model, fewer --max-new-tokens or a GPU with more memory",
                hints.join("; with ")
            )
        }
    )
}
