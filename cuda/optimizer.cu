// Multi-tensor optimizer kernels: one launch covers every parameter tensor. Global gradient-norm
// clipping stays on the device: multi_grad_sumsq leaves Σg² in a double that the update kernels
// read themselves, so no host round-trip sits between the two launches. Params are bf16 and are
// written with stochastic rounding (unbiased, so an update below bf16 resolution still moves the
// weight on average); the random bits are a hash of (seed, step, element), so a run is
// reproducible. CPU oracles: optim::Optimizer::step with cpu::adamw (AdamW) or Backend::axpy
// (SGD), which round to nearest in f32 instead.
//
// Launcher reference (each kernel is extern "C"):
//   __global__ void multi_grad_sumsq(double *sumsq, double *partials, unsigned int *counter,
//                                    const optim::Tensor *ts, int n_tensors);
//   __global__ void multi_adamw_m32(const optim::Tensor *ts, int n_tensors, const double *sumsq,
//                                   float max_norm, float decay, float beta1, float beta2, float eps,
//                                   float step_size, float bc2_sqrt, uint64_t seed, uint64_t step);
//   __global__ void multi_adamw_m16(same arguments as multi_adamw_m32);
//   __global__ void multi_sgd(const optim::Tensor *ts, int n_tensors, const double *sumsq,
//                             float max_norm, float lr, uint64_t seed, uint64_t step);
//
// Descriptor array (device memory, n_tensors entries, sorted by first_block), 48 bytes each:
//   offset  0  param        bf16*  [n]
//   offset  8  grad         float* [n] (fp32 gradients)
//   offset 16  m            float* [n] (multi_adamw_m32) or bf16* [n] (multi_adamw_m16); unused
//   offset 24  v            same as m                                    by sumsq and SGD (0)
//   offset 32  n            int64  elements
//   offset 40  first_block  int64  Σ over earlier tensors of ceil(n / OPTIM_CHUNK)
// Rust mirror: #[repr(C)] struct OptimTensor { param: u64, grad: u64, m: u64, v: u64, n: i64,
// first_block: i64 } (no padding: every field is 8 bytes).
// Block b works on chunk b − first_block[t] (OPTIM_CHUNK = 16384 elements) of the tensor t with
// the largest first_block <= b, found by binary search; grid = Σ ceil(n / OPTIM_CHUNK) blocks
// (an empty tensor has no blocks and is skipped), block 256. The same descriptor array serves
// all four kernels.
//
// Clipping, as optim.rs: norm = sqrt(*sumsq); scale = max_norm / (norm + 1e-6) when max_norm > 0
// and norm > max_norm, else 1; the gradient is multiplied by scale. A null sumsq means no
// clipping. A non-finite *sumsq makes the update kernels return without writing anything: the
// host reads *sumsq afterwards and stops training as optim.rs does, with the weights intact.
#include "common.cuh"

#define OPTIM_CHUNK 16384

namespace optim {

struct Tensor {
    void *param;
    const float *grad;
    void *m;
    void *v;
    int64_t n;
    int64_t first_block;
};
static_assert(sizeof(Tensor) == 48, "the Rust side mirrors this layout");

// The tensor whose chunks include this block: the last descriptor with first_block <= blockIdx.x.
__device__ __forceinline__ int find_tensor(const Tensor *ts, int n_tensors) {
    const int64_t b = blockIdx.x;
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (ts[mid].first_block <= b) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Fixed-order block sum (every thread gets it): the norm, and so the clip scale, must not
// depend on timing, or the same seed would not give the same run.
__device__ double block_sum_d(double v) {
    __shared__ double part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? part[lane] : 0.0;
    return warp_sum_d(v);
}

// splitmix64's finalizer: a bijection that scatters nearby inputs.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// 64 random bits for element `i` of this block's chunk: distinct elements of one launch hash
// distinct inputs (block · OPTIM_CHUNK + i is unique over all tensors).
__device__ __forceinline__ uint64_t element_bits(uint64_t key, int64_t i) {
    return mix64(key ^ ((uint64_t)blockIdx.x * OPTIM_CHUNK + (uint64_t)i));
}

__device__ __forceinline__ uint64_t launch_key(uint64_t seed, uint64_t step) {
    return mix64(seed ^ mix64(step + 0x9E3779B97F4A7C15ull));
}

// bf16 bits of the f32 with bits u, rounded up or down with probability proportional to
// closeness: adding 16 random bits below the kept 16 carries into them with probability
// (dropped bits) / 2^16. Sign-magnitude makes this work for negative values too. Inf stays inf,
// NaN stays NaN (truncating a NaN's low payload could turn it into inf). __host__ for
// tools/cuda_host_checks.
__host__ __device__ inline uint16_t round_stochastic_bits(uint32_t u, uint32_t bits) {
    if ((u & 0x7f800000u) == 0x7f800000u) return (uint16_t)((u >> 16) | ((u & 0x007fffffu) ? 0x40u : 0u));
    return (uint16_t)((u + (bits & 0xffffu)) >> 16);
}

__device__ __forceinline__ bf16 round_stochastic(float x, uint32_t bits) {
    return __ushort_as_bfloat16(round_stochastic_bits(__float_as_uint(x), bits));
}

__device__ __forceinline__ void store_moment(float *p, float x, uint32_t) { *p = x; }
__device__ __forceinline__ void store_moment(bf16 *p, float x, uint32_t bits) { *p = round_stochastic(x, bits); }

// The gradient's multiplier, or −1 when the gradient is not finite (then nothing may be written).
__device__ __forceinline__ float clip_scale(const double *sumsq, float max_norm) {
    if (sumsq == nullptr) return 1.0f;
    const double ss = *sumsq;
    if (!isfinite(ss)) return -1.0f;
    const double norm = sqrt(ss);
    return max_norm > 0.0f && norm > (double)max_norm ? (float)((double)max_norm / (norm + 1e-6)) : 1.0f;
}

// This block's element range [beg, end) of tensor t.
__device__ __forceinline__ void chunk_range(const Tensor &t, int64_t *beg, int64_t *end) {
    *beg = ((int64_t)blockIdx.x - t.first_block) * OPTIM_CHUNK;
    *end = min(t.n, *beg + (int64_t)OPTIM_CHUNK);
}

// cpu::adamw per element, in the same order: scale the gradient, decay the weight, update the
// moments, then the bias-corrected step.
template <typename M>
__device__ void adamw(const Tensor *ts, int n_tensors, const double *sumsq, float max_norm, float decay, float b1,
                      float b2, float eps, float step_size, float bc2_sqrt, uint64_t seed, uint64_t step) {
    const float scale = clip_scale(sumsq, max_norm);
    if (scale < 0.0f) return;
    const Tensor t = ts[find_tensor(ts, n_tensors)];
    int64_t beg, end;
    chunk_range(t, &beg, &end);
    bf16 *p = (bf16 *)t.param;
    M *m = (M *)t.m, *v = (M *)t.v;
    const uint64_t key = launch_key(seed, step);
    for (int64_t i = beg + threadIdx.x; i < end; i += blockDim.x) {
        const float g = t.grad[i] * scale;
        float w = ld(p + i) * decay;
        const float mi = b1 * ld(m + i) + (1.0f - b1) * g;
        const float vi = b2 * ld(v + i) + (1.0f - b2) * g * g;
        w -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        const uint64_t bits = element_bits(key, i - beg);
        store_moment(m + i, mi, (uint32_t)(bits >> 16));
        store_moment(v + i, vi, (uint32_t)(bits >> 32));
        p[i] = round_stochastic(w, (uint32_t)bits);
    }
}

}  // namespace optim

// *sumsq = Σ over every tensor of Σ grad², deterministic: each block writes its chunk's sum to
// partials[block], and the last block to finish adds the partials in index order.
// grid Σ ceil(n / OPTIM_CHUNK), block 256, no dynamic shared memory.
// Scratch: partials = double[grid] (no zeroing); counter = one uint32 that must be 0 before the
// first launch (memset once at allocation): the last block resets it, so it stays 0 between
// launches. *sumsq is overwritten, not accumulated (no zeroing).
// CPU oracle: Optimizer::grad_norm(...)² (cpu sum_squares: per-element f64).
extern "C" __global__ void multi_grad_sumsq(double *sumsq, double *partials, unsigned int *counter,
                                            const optim::Tensor *ts, int n_tensors) {
    __shared__ bool last;
    const optim::Tensor t = ts[optim::find_tensor(ts, n_tensors)];
    int64_t beg, end;
    optim::chunk_range(t, &beg, &end);
    double s = 0.0;
    for (int64_t i = beg + threadIdx.x; i < end; i += blockDim.x) {
        const double g = t.grad[i];
        s += g * g;
    }
    s = optim::block_sum_d(s);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = s;
        __threadfence();  // the partial is visible device-wide before the ticket is taken
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    double acc = 0.0;
    // __ldcg reads L2, where the other blocks' partials are, never a stale L1 line.
    for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) acc += __ldcg(partials + i);
    acc = optim::block_sum_d(acc);
    if (threadIdx.x == 0) {
        *sumsq = acc;
        *counter = 0;
    }
}

// AdamW with fp32 moments (descriptor m, v: float*). decay = 1 − lr·weight_decay, step_size =
// lr / (1 − β1^t) and bc2_sqrt = sqrt(1 − β2^t) computed on the host in f64 exactly as
// cpu::adamw; seed/step pick the stochastic-rounding bits (step = the optimizer step is fine).
// grid Σ ceil(n / OPTIM_CHUNK), block 256, no shared memory, nothing to zero. sumsq: the output
// of multi_grad_sumsq earlier on the same stream (null: no clipping). max_norm = grad_clip
// (<= 0: off). CPU oracle: Optimizer::step with cpu::adamw, up to the stochastic rounding of p.
extern "C" __global__ void multi_adamw_m32(const optim::Tensor *ts, int n_tensors, const double *sumsq, float max_norm,
                                           float decay, float beta1, float beta2, float eps, float step_size,
                                           float bc2_sqrt, uint64_t seed, uint64_t step) {
    optim::adamw<float>(ts, n_tensors, sumsq, max_norm, decay, beta1, beta2, eps, step_size, bc2_sqrt, seed, step);
}

// As multi_adamw_m32 with bf16 moments (descriptor m, v: bf16*), stored with stochastic rounding
// from independent bits (for when fp32 moments do not fit). Same geometry and arguments.
extern "C" __global__ void multi_adamw_m16(const optim::Tensor *ts, int n_tensors, const double *sumsq, float max_norm,
                                           float decay, float beta1, float beta2, float eps, float step_size,
                                           float bc2_sqrt, uint64_t seed, uint64_t step) {
    optim::adamw<bf16>(ts, n_tensors, sumsq, max_norm, decay, beta1, beta2, eps, step_size, bc2_sqrt, seed, step);
}

// SGD: p += (−lr · scale) · g with the clip scale above, the alpha optim.rs hands to axpy, then
// stochastic rounding to bf16. Descriptor m and v are unused. grid Σ ceil(n / OPTIM_CHUNK), block
// 256, no shared memory, nothing to zero. CPU oracle: Optimizer::step for OptimizerKind::Sgd.
extern "C" __global__ void multi_sgd(const optim::Tensor *ts, int n_tensors, const double *sumsq, float max_norm,
                                     float lr, uint64_t seed, uint64_t step) {
    const float scale = optim::clip_scale(sumsq, max_norm);
    if (scale < 0.0f) return;
    const float alpha = -lr * scale;
    const optim::Tensor t = ts[optim::find_tensor(ts, n_tensors)];
    int64_t beg, end;
    optim::chunk_range(t, &beg, &end);
    bf16 *p = (bf16 *)t.param;
    const uint64_t key = optim::launch_key(seed, step);
    for (int64_t i = beg + threadIdx.x; i < end; i += blockDim.x)
        p[i] = optim::round_stochastic(ld(p + i) + alpha * t.grad[i], (uint32_t)optim::element_bits(key, i - beg));
}
