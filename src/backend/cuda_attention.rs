//! Launchers for cuda/attention.cu: flash-style training attention (forward and backward),
//! decode attention over the KV cache, and the cache write.

use super::cuda::{CudaBackend, CudaBuf};
use super::AttnShape;

pub fn forward(
    be: &CudaBackend,
    _out: &mut CudaBuf,
    _lse: &mut CudaBuf,
    _q: &CudaBuf,
    _k: &CudaBuf,
    _v: &CudaBuf,
    _s: AttnShape,
) {
    be.fail_op("attention: not wired yet");
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    be: &CudaBackend,
    _dq: &mut CudaBuf,
    _dk: &mut CudaBuf,
    _dv: &mut CudaBuf,
    _dout: &CudaBuf,
    _out: &CudaBuf,
    _lse: &CudaBuf,
    _q: &CudaBuf,
    _k: &CudaBuf,
    _v: &CudaBuf,
    _s: AttnShape,
) {
    be.fail_op("attention_bwd: not wired yet");
}

#[allow(clippy::too_many_arguments)]
pub fn kv_write(
    be: &CudaBackend,
    _cache: &mut CudaBuf,
    _new: &CudaBuf,
    _batch: usize,
    _cap: usize,
    _pos0: usize,
    _tq: usize,
    _row: usize,
) {
    be.fail_op("kv_write: not wired yet");
}
