//! Optimizers over the model's parameters: AdamW (PyTorch semantics) and plain SGD, with global
//! gradient-norm clipping folded into the update.

use crate::backend::{AdamWStep, Backend, OptimizerStep};
use crate::model::{Params, Qwen2};
use anyhow::{bail, Result};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global L2 norm the gradient is clipped to; 0 disables clipping.
    pub grad_clip: f32,
    /// How AdamW's moments are stored.
    #[serde(default)]
    pub moments: MomentDtype,
}

/// Storage of AdamW's moments. f32 is the default; bf16 halves their memory (8 to 4 bytes a
/// parameter: 61 GB to 30 GB for Qwen2.5-7B's 7.6B) and the GPU kernel writes them with stochastic
/// rounding, so updates far below a bf16 step still move them on average. The CPU reference
/// keeps every buffer in f32, so there the choice changes nothing.
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
pub enum MomentDtype {
    #[default]
    F32,
    Bf16,
}

/// AdamW's first and second moments.
pub type Moments<T> = (Params<T>, Params<T>);

pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    /// Updates taken so far.
    pub step: u64,
    /// AdamW's first and second moments (None for SGD).
    pub moments: Option<Moments<B::Buf>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f32,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(be: &B, model: &Qwen2<B>, cfg: OptimConfig) -> Result<Self> {
        let moments = match cfg.kind {
            OptimizerKind::Adamw => Some((
                zeros_moments(be, model, cfg.moments)?,
                zeros_moments(be, model, cfg.moments)?,
            )),
            OptimizerKind::Sgd => None,
        };
        Ok(Optimizer {
            cfg,
            step: 0,
            moments,
        })
    }

    /// A moment tensor's values from the host (resume), stored as `cfg.moments` says.
    pub fn upload_moment(&self, be: &B, host: &[f32]) -> Result<B::Buf> {
        match self.cfg.moments {
            MomentDtype::F32 => be.upload_f32(host),
            MomentDtype::Bf16 => be.upload(host),
        }
    }

    pub fn grad_norm(be: &B, grads: &Params<B::Buf>) -> Result<f64> {
        let mut sum = 0.0;
        for g in grads.list() {
            sum += be.sum_squares(g)?;
        }
        Ok(sum.sqrt())
    }

    /// One update of `params` from `grads`. A non-finite gradient stops training with an
    /// error rather than writing NaN into the weights.
    pub fn step(
        &mut self,
        be: &B,
        params: &mut Params<B::Buf>,
        grads: &Params<B::Buf>,
    ) -> Result<StepInfo> {
        let c = self.cfg;
        let h = OptimizerStep {
            adamw: self.moments.as_ref().map(|_| AdamWStep {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
                step: self.step + 1,
                grad_scale: 1.0,
            }),
            lr: c.lr,
            max_norm: c.grad_clip,
        };
        let mut plist = params.list_mut();
        let glist = grads.list();
        let norm = match &mut self.moments {
            Some((m, v)) => {
                let (mut ml, mut vl) = (m.list_mut(), v.list_mut());
                be.optimizer_step(&mut plist, &glist, Some((&mut ml, &mut vl)), &h)?
            }
            None => be.optimizer_step(&mut plist, &glist, None, &h)?,
        };
        if !norm.is_finite() {
            bail!(
                "the gradient is not finite (norm {norm}) at optimizer step {}: NaN or inf in training; lower the learning rate or check the data",
                self.step + 1
            );
        }
        self.step += 1;
        Ok(StepInfo {
            grad_norm: norm,
            lr: c.lr,
        })
    }
}

/// Zero moments for every parameter tensor, in f32 or in the backend's storage type (bf16 on
/// the GPU).
fn zeros_moments<B: Backend>(
    be: &B,
    model: &Qwen2<B>,
    dtype: MomentDtype,
) -> Result<Params<B::Buf>> {
    let list = crate::model::tensor_specs(&model.cfg)
        .iter()
        .map(|(_, s)| {
            let n = s.iter().product();
            match dtype {
                MomentDtype::F32 => be.alloc_f32(n),
                MomentDtype::Bf16 => be.alloc(n),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Params::from_list(&model.cfg, list))
}
