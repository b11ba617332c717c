//! Launchers for the RL kernels: token sampling (cuda/sampling.cu), the multi-tensor optimizer
//! (cuda/optimizer.cu) and the clipped policy loss (cuda/policy_loss.cu).

use super::cuda::{Arg, CudaBackend, CudaBuf, Dtype};
use super::{MomentLists, OptimizerStep};
use crate::rl::{ClipConfig, LossAgg, PolicyLoss, PolicyLossStats, SeqSpan};
use crate::sampling::{DrawKey, SamplingParams};
use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};

/// Host values copied into a fresh device buffer; the slice keeps it alive, the u64 is its
/// address for kernel arguments.
fn dev<T: DeviceRepr + ValidAsZeroBits>(
    be: &CudaBackend,
    host: &[T],
) -> Result<(CudaSlice<T>, u64)> {
    be.count(|t| {
        t.allocs += 1;
        t.to_device += 1;
    });
    let s = be
        .stream()
        .clone_htod(host)
        .map_err(|e| anyhow!("copying {} values to the GPU: {e:?}", host.len()))?;
    let p = s.device_ptr(be.stream()).0;
    Ok((s, p))
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    be: &CudaBackend,
    n: usize,
) -> Result<(CudaSlice<T>, u64)> {
    be.count(|t| t.allocs += 1);
    let s = be
        .stream()
        .alloc_zeros::<T>(n.max(1))
        .map_err(|e| anyhow!("allocating {n} values on the GPU: {e:?}"))?;
    let p = s.device_ptr(be.stream()).0;
    Ok((s, p))
}

fn read<T: DeviceRepr>(be: &CudaBackend, s: &CudaSlice<T>) -> Result<Vec<T>> {
    be.count(|t| t.to_host += 1);
    let v = be
        .stream()
        .clone_dtoh(s)
        .map_err(|e| anyhow!("copying from the GPU: {e:?}"))?;
    be.sync()?;
    Ok(v)
}

/// The bytes of each warp's private histogram (SAMPLE_HIST_BYTES in cuda/sampling.cu), and a
/// bound on the kernel's static shared memory (ptxas: 7–8 KB).
const SAMPLE_HIST_BYTES: u32 = 3072;
const SAMPLE_STATIC_SMEM: u32 = 8 * 1024;

/// Threads per sampling block: 1024 where a block may hold 32 warps' histograms (96 KB) and the
/// static part (sm_80, sm_90), else 512 (sm_86/89 allow 99 KB). Any multiple of 32 is correct.
fn sample_block(be: &CudaBackend) -> u32 {
    if 1024 / 32 * SAMPLE_HIST_BYTES + SAMPLE_STATIC_SMEM <= be.max_smem_optin() {
        1024
    } else {
        512
    }
}

/// `Backend::sample` on the device: one block per row, the same Philox stream as the CPU.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    be: &CudaBackend,
    logits: &CudaBuf,
    rows: usize,
    vocab: usize,
    p: &SamplingParams,
    keys: &[DrawKey],
) -> Result<Vec<u32>> {
    if !be.want("sample", "logits", logits, Dtype::Bf16, rows * vocab) || keys.len() != rows {
        be.sync()?;
        bail!("sample: {} draw keys for {rows} rows", keys.len());
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    // One upload for the whole launch, every field 4 bytes: next (zeros), done (zeros), then
    // per row the temperature, top-k, top-p and the six words of its key. Six allocations and
    // four pageable copies (each of which waits for the stream) were a decode step's overhead.
    let n = rows as u64;
    let mut words = vec![0u32; 2 * rows];
    words.extend(std::iter::repeat_n(p.temperature.to_bits(), rows));
    words.extend(std::iter::repeat_n(
        p.top_k.min(i32::MAX as usize) as u32,
        rows,
    ));
    words.extend(std::iter::repeat_n(p.top_p.to_bits(), rows));
    words.extend(
        keys.iter()
            .flat_map(|k| [k.seed, k.sequence, k.step])
            .flat_map(|x| [x as u32, (x >> 32) as u32]),
    );
    let (buf, next_p) = dev(be, &words)?;
    let at = |field: u64| next_p + 4 * n * field;
    let (done_p, t_p, k_p, tp_p, keys_p) = (at(1), at(2), at(3), at(4), at(5));
    let block = sample_block(be);
    be.launch(
        "sample_tokens",
        (rows as u32, 1, 1),
        (block, 1, 1),
        block / 32 * SAMPLE_HIST_BYTES,
        &[
            Arg::P(next_p),
            Arg::P(done_p),
            Arg::P(logits.ptr()),
            Arg::I(vocab as i32),
            Arg::P(t_p),
            Arg::P(k_p),
            Arg::P(tp_p),
            Arg::P(keys_p),
            Arg::P(0),
            Arg::I(0),
            Arg::I(0),
        ],
    );
    // The whole buffer comes back (44 bytes a row); the tokens are its first field.
    let mut next = read(be, &buf)?;
    next.truncate(rows);
    Ok(next)
}

/// Mirrors optim::Tensor in cuda/optimizer.cu (48 bytes, no padding).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct OptimTensor {
    param: u64,
    grad: u64,
    m: u64,
    v: u64,
    n: i64,
    first_block: i64,
}
// SAFETY: plain-old-data of 8-byte fields, laid out as the kernel's struct.
unsafe impl DeviceRepr for OptimTensor {}
unsafe impl ValidAsZeroBits for OptimTensor {}

/// Elements per block, as OPTIM_CHUNK in cuda/optimizer.cu. Besides the grid it fixes the
/// stochastic-rounding hash input (chunk · OPTIM_CHUNK + i), so changing it changes every run.
const OPTIM_CHUNK: usize = 16384;

/// Numbers the descriptors' chunks in order (each tensor's `first_block`) and returns how many
/// there are: the grid of every optimizer launch. `grad_sumsq` and `optimizer_step` both number
/// through here, so their Σg² runs over the same chunks in the same order.
fn number_chunks(ts: &mut [OptimTensor]) -> usize {
    let mut blocks = 0usize;
    for t in ts {
        t.first_block = blocks as i64;
        blocks += (t.n as usize).div_ceil(OPTIM_CHUNK);
    }
    blocks
}

/// multi_grad_sumsq over `blocks` chunks of the descriptors at `ts_p`: Σg² left in a device
/// double (and its pointer) that an update launch can read without a trip to the host.
fn launch_sumsq(
    be: &CudaBackend,
    ts_p: u64,
    blocks: usize,
    nt: i32,
) -> Result<(CudaSlice<f64>, u64)> {
    let (sumsq, sumsq_p) = zeros::<f64>(be, 1)?;
    let (_partials, partials_p) = zeros::<f64>(be, blocks)?;
    let (_counter, counter_p) = zeros::<u32>(be, 1)?;
    be.launch(
        "multi_grad_sumsq",
        (blocks as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(sumsq_p),
            Arg::P(partials_p),
            Arg::P(counter_p),
            Arg::P(ts_p),
            Arg::I(nt),
        ],
    );
    Ok((sumsq, sumsq_p))
}

/// `Backend::grad_sumsq` on the device: the launch `optimizer_step` makes over the same tensors,
/// so the offloaded update, which reduces the norm first and updates group by group, clips by
/// the very double the in-place update computes. One read of the result.
pub fn grad_sumsq(be: &CudaBackend, grads: &[&CudaBuf]) -> Result<f64> {
    let mut ts = Vec::with_capacity(grads.len());
    for g in grads {
        let n = g.len();
        if !be.want("grad_sumsq", "grad", g, Dtype::F32, n) {
            be.sync()?;
        }
        ts.push(OptimTensor {
            grad: g.ptr(),
            n: n as i64,
            ..Default::default()
        });
    }
    let blocks = number_chunks(&mut ts);
    if blocks == 0 {
        return Ok(0.0);
    }
    let (_ts, ts_p) = dev(be, &ts)?;
    let (sumsq, _) = launch_sumsq(be, ts_p, blocks, ts.len() as i32)?;
    Ok(read(be, &sumsq)?[0])
}

/// `Backend::optimizer_step` on the device: Σg² by one multi-tensor launch into a double the
/// update launch reads, so the clipping scale never visits the host; one download of the norm
/// at the end, for logging and the NaN check.
pub fn optimizer_step(
    be: &CudaBackend,
    params: &mut [&mut CudaBuf],
    grads: &[&CudaBuf],
    moments: Option<MomentLists<'_, '_, CudaBuf>>,
    h: &OptimizerStep,
) -> Result<f64> {
    let mut ts = Vec::with_capacity(params.len());
    let m_dtype = moments
        .as_ref()
        .and_then(|(m, _)| m.first().map(|b| b.dtype()));
    for (i, (p, g)) in params.iter().zip(grads).enumerate() {
        let n = p.len();
        if !(be.want("optimizer", "param", p, Dtype::Bf16, n)
            && be.want("optimizer", "grad", g, Dtype::F32, n))
        {
            be.sync()?;
        }
        let (m, v) = match &moments {
            Some((m, v)) => {
                let d = m_dtype.unwrap_or(Dtype::F32);
                if !(be.want("optimizer", "m", m[i], d, n) && be.want("optimizer", "v", v[i], d, n))
                {
                    be.sync()?;
                }
                (m[i].ptr(), v[i].ptr())
            }
            None => (0, 0),
        };
        ts.push(OptimTensor {
            param: p.ptr(),
            grad: g.ptr(),
            m,
            v,
            n: n as i64,
            first_block: 0,
        });
    }
    let blocks = number_chunks(&mut ts);
    if blocks == 0 {
        return Ok(0.0);
    }
    let (_ts, ts_p) = dev(be, &ts)?;
    let grid = (blocks as u32, 1, 1);
    let nt = ts.len() as i32;
    let (sumsq, sumsq_p) = match h.sumsq {
        // The whole gradient's Σg², reduced by the caller (offloaded moments, group by group).
        Some(s) => dev(be, &[s])?,
        None => launch_sumsq(be, ts_p, blocks, nt)?,
    };
    // Stochastic rounding draws from (seed, step, tensor, element): a fixed seed keeps runs
    // repeatable.
    let seed = 0x5eed_0fad_a3a3_u64;
    let first_tensor = i32::try_from(h.first_tensor)
        .map_err(|_| anyhow!("optimizer: tensor index {} past i32", h.first_tensor))?;
    match (&moments, h.adamw) {
        (Some(_), Some(a)) => {
            let bc1 = 1.0 - (a.beta1 as f64).powi(a.step as i32);
            let bc2 = 1.0 - (a.beta2 as f64).powi(a.step as i32);
            let name = if m_dtype == Some(Dtype::Bf16) {
                "multi_adamw_m16"
            } else {
                "multi_adamw_m32"
            };
            be.launch(
                name,
                grid,
                (256, 1, 1),
                0,
                &[
                    Arg::P(ts_p),
                    Arg::I(nt),
                    Arg::P(sumsq_p),
                    Arg::F(h.max_norm),
                    Arg::F(1.0 - a.lr * a.weight_decay),
                    Arg::F(a.beta1),
                    Arg::F(a.beta2),
                    Arg::F(a.eps),
                    Arg::F((a.lr as f64 / bc1) as f32),
                    Arg::F(bc2.sqrt() as f32),
                    Arg::U(seed),
                    Arg::U(a.step),
                    Arg::I(first_tensor),
                ],
            );
        }
        _ => be.launch(
            "multi_sgd",
            grid,
            (256, 1, 1),
            0,
            &[
                Arg::P(ts_p),
                Arg::I(nt),
                Arg::P(sumsq_p),
                Arg::F(h.max_norm),
                Arg::F(h.lr),
                Arg::U(seed),
                Arg::U(h.adamw.map_or(0, |a| a.step)),
                Arg::I(first_tensor),
            ],
        ),
    }
    Ok(read(be, &sumsq)?[0].sqrt())
}

/// The clipped policy loss on the device for sequences laid end to end (span s starts where
/// s − 1 ends): the statistics and d(loss)/d(logπ), as `rl::policy_loss` returns them.
pub fn policy_loss(
    be: &CudaBackend,
    logp: &[f32],
    logp_old: &[f32],
    spans: &[SeqSpan],
    c: &ClipConfig,
    total_tokens: usize,
    total_seqs: usize,
) -> Result<(PolicyLossStats, Vec<f32>)> {
    if logp_old.len() != logp.len() {
        bail!(
            "policy_loss: {} old log-probs for {} tokens",
            logp_old.len(),
            logp.len()
        );
    }
    let mut starts = vec![spans.first().map_or(0, |s| s.start) as i32];
    let mut adv = vec![0.0f32; logp.len()];
    for s in spans {
        if s.start + s.len > logp.len() {
            bail!(
                "policy_loss: a sequence of tokens {}..{} past the {} log-probs",
                s.start,
                s.start + s.len,
                logp.len()
            );
        }
        if s.start as i32 != *starts.last().expect("non-empty") {
            bail!("policy_loss on the GPU takes sequences laid end to end");
        }
        adv[s.start..s.start + s.len].fill(s.advantage);
        starts.push((s.start + s.len) as i32);
    }
    let (_lp, lp_p) = dev(be, logp)?;
    let (_old, old_p) = dev(be, logp_old)?;
    let (_adv, adv_p) = dev(be, &adv)?;
    let (_st, st_p) = dev(be, &starts)?;
    let (dlogp, dlogp_p) = zeros::<f32>(be, logp.len())?;
    let (stats, stats_p) = zeros::<f32>(be, 4)?;
    let mode = match c.kind {
        PolicyLoss::Grpo => 0,
        PolicyLoss::Gspo => 1,
    };
    let agg = match c.agg {
        LossAgg::TokenMean => 0,
        LossAgg::SeqMeanTokenMean => 1,
        LossAgg::SeqMeanTokenSum => 2,
    };
    be.launch(
        "policy_loss_fwd_bwd",
        (spans.len() as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::P(dlogp_p),
            Arg::P(stats_p),
            Arg::P(lp_p),
            Arg::P(old_p),
            Arg::P(adv_p),
            Arg::P(0),
            Arg::P(st_p),
            Arg::F(c.eps_low),
            Arg::F(c.eps_high),
            Arg::F(c.dual_clip.unwrap_or(0.0)),
            Arg::I(mode),
            Arg::I(agg),
            Arg::I(total_tokens as i32),
            Arg::I(total_seqs as i32),
        ],
    );
    let s = read(be, &stats)?;
    let d = read(be, &dlogp)?;
    let counted = s[3].max(1.0) as f64;
    Ok((
        PolicyLossStats {
            loss: s[0] as f64,
            clip_fraction: s[1] as f64 / counted,
            approx_kl: s[2] as f64 / counted,
        },
        d[..logp.len()].to_vec(),
    ))
}
