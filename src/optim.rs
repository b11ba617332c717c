//! Optimizers over the model's parameters: AdamW (PyTorch semantics) and plain SGD, with global
//! gradient-norm clipping folded into the update.

use crate::backend::{AdamWStep, Backend, OptimizerStep};
use crate::model::{Params, Qwen2};
use anyhow::{bail, Result};
use std::ops::Range;
use std::path::Path;

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

/// Why offloaded moments and `--moments bf16` do not go together.
pub const OFFLOAD_IS_F32: &str = "offloaded AdamW moments are kept in f32 in host memory; \
     --moments bf16 is for keeping them on the GPU: choose one";

/// Where AdamW's moments stay between updates.
pub enum MomentStore<B: Backend> {
    /// On the device, as `cfg.moments` says.
    Device(Moments<B::Buf>),
    /// In host memory, in f32 (`--offload-optimizer`, as DeepSpeed's and verl's optimizer
    /// offload): each update copies them to the device a group of tensors at a time, updates
    /// the group and copies it back. The device then holds one group's moments instead of all
    /// of them (4.4 GB instead of 61 GB for a 7B model), for two crossings of the bus a step.
    Host {
        m: Vec<B::Host>,
        v: Vec<B::Host>,
        /// Tensors updated together (`update_groups`).
        groups: Vec<Range<usize>>,
    },
}

pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    /// Updates taken so far.
    pub step: u64,
    /// AdamW's first and second moments (None for SGD).
    pub moments: Option<MomentStore<B>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f32,
}

/// Consecutive tensors packed into groups of at most the largest tensor's size: what offloaded
/// moments are updated by. The device holds one group's moments at a time, and a group no
/// larger than the largest tensor costs no more than that tensor alone would.
pub fn update_groups(sizes: &[usize]) -> Vec<Range<usize>> {
    let cap = sizes.iter().copied().max().unwrap_or(0);
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut size = 0;
    for (i, &n) in sizes.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if size + n <= cap => {
                g.end = i + 1;
                size += n;
            }
            _ => {
                groups.push(i..i + 1);
                size = n;
            }
        }
    }
    groups
}

/// Values in the largest group of `update_groups(sizes)`.
pub fn largest_group(sizes: &[usize]) -> usize {
    update_groups(sizes)
        .into_iter()
        .map(|g| sizes[g].iter().sum::<usize>())
        .max()
        .unwrap_or(0)
}

impl<B: Backend> Optimizer<B> {
    /// AdamW's moments start at zero: on the device, or in host memory when `offload`.
    pub fn new(be: &B, model: &Qwen2<B>, cfg: OptimConfig, offload: bool) -> Result<Self> {
        let moments = match (cfg.kind, offload) {
            (OptimizerKind::Sgd, _) => None,
            (OptimizerKind::Adamw, false) => Some(MomentStore::Device((
                zeros_moments(be, model, cfg.moments)?,
                zeros_moments(be, model, cfg.moments)?,
            ))),
            (OptimizerKind::Adamw, true) => {
                if cfg.moments == MomentDtype::Bf16 {
                    bail!(OFFLOAD_IS_F32);
                }
                let sizes = tensor_sizes(&model.cfg);
                let host = || -> Result<Vec<B::Host>> {
                    sizes.iter().map(|&n| be.alloc_host(n)).collect()
                };
                Some(MomentStore::Host {
                    m: host()?,
                    v: host()?,
                    groups: update_groups(&sizes),
                })
            }
        };
        Ok(Optimizer {
            cfg,
            step: 0,
            moments,
        })
    }

    pub fn grad_norm(be: &B, grads: &Params<B::Buf>) -> Result<f64> {
        Ok(be.grad_sumsq(&grads.list())?.sqrt())
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
            sumsq: None,
            first_tensor: 0,
        };
        let mut plist = params.list_mut();
        let glist = grads.list();
        let norm = match &mut self.moments {
            Some(MomentStore::Device((m, v))) => {
                let (mut ml, mut vl) = (m.list_mut(), v.list_mut());
                be.optimizer_step(&mut plist, &glist, Some((&mut ml, &mut vl)), &h)?
            }
            Some(MomentStore::Host { m, v, groups }) => {
                offloaded_step(be, &mut plist, &glist, (m, v), groups, &h)?
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

    /// Writes the moments (f32, under the model's tensor names) to two safetensors files;
    /// nothing for SGD.
    pub fn save_moments(
        &self,
        be: &B,
        model: &Qwen2<B>,
        m_path: &Path,
        v_path: &Path,
    ) -> Result<()> {
        let f32 = crate::config::DType::F32;
        match &self.moments {
            None => Ok(()),
            Some(MomentStore::Device((m, v))) => {
                crate::checkpoint::save_params(be, model, m, f32, None, m_path)?;
                crate::checkpoint::save_params(be, model, v, f32, None, v_path)
            }
            Some(MomentStore::Host { m, v, .. }) => {
                let specs = crate::model::tensor_specs(&model.cfg);
                for (host, path) in [(m, m_path), (v, v_path)] {
                    crate::checkpoint::write_safetensors(path, &specs, f32, None, |i| {
                        be.host_values(&host[i])
                    })?;
                }
                Ok(())
            }
        }
    }

    /// Sets the moments from `load(file, tensor name, shape)` (resuming), stored as they are
    /// kept.
    pub fn load_moments(
        &mut self,
        be: &B,
        model: &Qwen2<B>,
        load: impl Fn(usize, &str, &[usize]) -> Result<Vec<f32>>,
    ) -> Result<()> {
        let specs = crate::model::tensor_specs(&model.cfg);
        let dtype = self.cfg.moments;
        match &mut self.moments {
            None => {}
            Some(MomentStore::Device((m, v))) => {
                for (file, set) in [m, v].into_iter().enumerate() {
                    for ((name, shape), buf) in specs.iter().zip(set.list_mut()) {
                        let host = load(file, name, shape)?;
                        *buf = match dtype {
                            MomentDtype::F32 => be.upload_f32(&host)?,
                            MomentDtype::Bf16 => be.upload(&host)?,
                        };
                    }
                }
            }
            Some(MomentStore::Host { m, v, .. }) => {
                for (file, set) in [m, v].into_iter().enumerate() {
                    for ((name, shape), host) in specs.iter().zip(set.iter_mut()) {
                        be.set_host_values(host, &load(file, name, shape)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// `Backend::optimizer_step` with the moments in host memory: the whole gradient's norm first,
/// then each group's moments up, its update, and its moments back. The device buffers are
/// freed when a group is done, so the next group reuses the memory. Returns the norm; when it
/// is not finite nothing is updated.
pub fn offloaded_step<B: Backend>(
    be: &B,
    params: &mut [&mut B::Buf],
    grads: &[&B::Buf],
    (m, v): (&mut [B::Host], &mut [B::Host]),
    groups: &[Range<usize>],
    h: &OptimizerStep,
) -> Result<f64> {
    let sumsq = be.grad_sumsq(grads)?;
    if !sumsq.is_finite() {
        return Ok(sumsq.sqrt());
    }
    let h = OptimizerStep {
        sumsq: Some(sumsq),
        ..*h
    };
    for g in groups {
        let up = |host: &[B::Host]| -> Result<Vec<B::Buf>> {
            host.iter()
                .zip(&grads[g.clone()])
                .map(|(x, grad)| {
                    let mut buf = be.alloc_f32(be.len(grad))?;
                    be.copy_to_device(&mut buf, x);
                    Ok(buf)
                })
                .collect()
        };
        let (mut md, mut vd) = (up(&m[g.clone()])?, up(&v[g.clone()])?);
        {
            let mut ml: Vec<&mut B::Buf> = md.iter_mut().collect();
            let mut vl: Vec<&mut B::Buf> = vd.iter_mut().collect();
            let h = OptimizerStep {
                first_tensor: h.first_tensor + g.start,
                ..h
            };
            be.optimizer_step(
                &mut params[g.clone()],
                &grads[g.clone()],
                Some((&mut ml, &mut vl)),
                &h,
            )?;
        }
        for (host, dev) in m[g.clone()].iter_mut().zip(&md) {
            be.copy_to_host(host, dev);
        }
        for (host, dev) in v[g.clone()].iter_mut().zip(&vd) {
            be.copy_to_host(host, dev);
        }
    }
    Ok(sumsq.sqrt())
}

/// Values in each of the model's tensors, in `Params::list` order.
pub fn tensor_sizes(cfg: &crate::config::ModelConfig) -> Vec<usize> {
    crate::model::tensor_specs(cfg)
        .iter()
        .map(|(_, s)| s.iter().product())
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups cover every tensor once, in order, none over the largest tensor's size, and
    /// tensors are packed while they fit.
    #[test]
    fn update_groups_pack_consecutive_tensors_up_to_the_largest() {
        let sizes = [5, 1, 2, 3, 4, 1, 1, 2, 5, 1];
        let groups = update_groups(&sizes);
        assert_eq!(groups, vec![0..1, 1..3, 3..4, 4..6, 6..8, 8..9, 9..10]);
        assert_eq!(largest_group(&sizes), 5);
        assert!(update_groups(&[]).is_empty());
        let mut seven_b = vec![152064 * 3584];
        for _ in 0..28 {
            seven_b.extend([3584, 3584 * 3584, 3584, 512 * 3584, 512, 512 * 3584, 512]);
            seven_b.extend([3584 * 3584, 3584, 18944 * 3584, 18944 * 3584, 18944 * 3584]);
        }
        seven_b.extend([3584, 152064 * 3584]);
        let groups = update_groups(&seven_b);
        assert_eq!(groups.first(), Some(&(0..1)));
        assert_eq!(groups.last(), Some(&(seven_b.len() - 1..seven_b.len())));
        assert!(groups.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(largest_group(&seven_b), 152064 * 3584);
        // Two layers and part of a third fit beside each other in the embedding's size.
        assert_eq!(groups.len(), 15);
    }
}
