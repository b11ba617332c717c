// Unfused causal attention: the path eager PyTorch takes, with the [heads, tq, tk] score matrix
// of a sequence in memory. cuBLAS strided-batched GEMMs do the products (S = Q Kᵀ, O = P V, and
// backward dP = dO Vᵀ, dV += Pᵀ dO, dQ = dS K, dK += dSᵀ Q: see
// src/backend/cuda_attention_unfused.rs); the two row kernels here sit between them. It is the
// baseline the flash kernels of attention.cu are timed against in the same run, and a third,
// independent way through the same op. CPU oracles: cpu::attention, cpu::attention_bwd.
//
// One sequence per launch (`seq` of the batch). Layouts, row-major:
//   s, dp: float [heads, tq, tk], the raw scores Q Kᵀ (unscaled) and dO Vᵀ;
//   p, ds: bf16 [heads, tq, tk], the probabilities and the gradient of the raw scores;
//   lse:   float [batch, tq, heads], natural-log logsumexp of the scaled scores, as attention.cu;
//   delta: float [batch, heads, tqp] (tqp = tq rounded up to 64), rowsum(dO · O), from
//          attention_bwd_preprocess.
// Query i sits at position tk - tq + i and sees keys 0..=that; the rest of its row of p and ds
// is written as 0, since the GEMMs after these kernels read whole rows.
//
//   void attention_unfused_softmax(bf16 *p, float *lse, const float *s, int seq, int tq, int tk,
//                                  int heads, float scale)
//     grid (tq, heads), block 256, no smem
//   void attention_unfused_softmax_bwd(bf16 *p, bf16 *ds, const float *s, const float *dp,
//                                      const float *lse, const float *delta, int seq, int tq,
//                                      int tk, int heads, float scale)
//     grid (tq, heads), block 256, no smem
#include "common.cuh"

#define UNFUSED_THREADS 256

namespace unfused {

__device__ __forceinline__ float block_max(float v) {
    __shared__ float shared[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // shared[] may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? shared[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

}  // namespace unfused

// Three sweeps of one row, which stays in L1/L2 (16 KB at tk 4096): the max, the sum of
// exponentials, then the probabilities. A baseline need not be clever, only right.
extern "C" __global__ void __launch_bounds__(UNFUSED_THREADS)
    attention_unfused_softmax(bf16 *p, float *lse, const float *s, int seq, int tq, int tk, int heads, float scale) {
    const int i = blockIdx.x, h = blockIdx.y;
    const int64_t row = (int64_t)h * tq + i;
    const float *sr = s + row * tk;
    bf16 *pr = p + row * tk;
    const int n = tk - tq + i + 1;  // keys this query sees
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, sr[j] * scale);
    m = unfused::block_max(m);
    float l = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) l += __expf(sr[j] * scale - m);
    const float lse_row = m + __logf(block_sum(l));
    for (int j = threadIdx.x; j < tk; j += blockDim.x) st(pr + j, j < n ? __expf(sr[j] * scale - lse_row) : 0.0f);
    if (threadIdx.x == 0) lse[((int64_t)seq * tq + i) * heads + h] = lse_row;
}

// P again from the scores and the forward's lse (cheaper than keeping a bf16 copy, and exact to
// the forward's), then dS = P ∘ (dP − delta) · scale: the gradient of the raw, unscaled scores.
extern "C" __global__ void __launch_bounds__(UNFUSED_THREADS)
    attention_unfused_softmax_bwd(bf16 *p, bf16 *ds, const float *s, const float *dp, const float *lse,
                                  const float *delta, int seq, int tq, int tk, int heads, float scale) {
    const int i = blockIdx.x, h = blockIdx.y;
    const int64_t row = (int64_t)h * tq + i;
    const int n = tk - tq + i + 1;
    const int tqp = (tq + 63) / 64 * 64;
    const float lse_row = lse[((int64_t)seq * tq + i) * heads + h];
    const float delta_row = delta[((int64_t)seq * heads + h) * tqp + i];
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float pj = 0.0f, dsj = 0.0f;
        if (j < n) {
            pj = __expf(s[row * tk + j] * scale - lse_row);
            dsj = pj * (dp[row * tk + j] - delta_row) * scale;
        }
        st(p + row * tk + j, pj);
        st(ds + row * tk + j, dsj);
    }
}
