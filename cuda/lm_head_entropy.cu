// The backward half of a chunked lm_head + entropy/log-prob (the fused-linear idea: full
// [tokens, vocab] logits never exist, only [chunk, vocab] at a time). Per chunk of rows the Rust
// side runs:
//   forward (all chunks, before the loss):
//     cuBLAS  logits[chunk, V] = hidden[chunk, H] · W[V, H]ᵀ            (bf16 out)
//     softmax_stats_fwd(stats + 3·row0, logits, targets + row0, V, T)   (softmax_entropy.cu)
//   then the policy loss, which yields a (d loss / d entropy) and b (d loss / d logprob) per row,
//   backward (all chunks):
//     cuBLAS  logits = hidden · Wᵀ again
//     softmax_stats_bwd_saved(logits, logits, stats + 3·row0, ...)      (in place: logits → dlogits)
//     cuBLAS  dhidden[chunk, H]  = dlogits · W                          (bf16 or f32 out)
//     cuBLAS  dW[V, H]          += dlogitsᵀ · hidden[chunk, H]           (f32, beta = 1)
// softmax_stats_bwd must find lse and E[z] with a full pass over the row before its gradient
// pass; the forward already saved them (stats = lse, entropy, logprob; E[z] = lse − entropy), so
// this kernel reads each logit once and writes it once: 2 of softmax_stats_bwd's 3 passes over a
// [chunk, V] matrix, the memory-bound part of the loop. (On sm_90 softmax_stats_bwd_cluster in
// softmax_entropy.cu already makes those 2 passes without the saved stats: its row stays in
// registers between the statistics and the gradient; this kernel is not launched yet.)
//
// Chunk size: the only extra memory is the [chunk, V] bf16 logits (reused as dlogits), chunk ·
// V · 2 bytes. For 16K tokens × V = 152064 under 2 GB: chunk = 4096 rows → 1.16 GiB (4 chunks;
// the rest leaves room for cuBLAS workspace). 2048 rows (0.58 GiB, 8 chunks) costs little: GEMMs
// of 2048 × 152064 × H are far past the size where cuBLAS reaches peak. Do not exceed ~6000.
//
// Launcher reference (each kernel is extern "C"):
//   __global__ void softmax_stats_bwd_saved(bf16 *dlogits, const bf16 *logits, const float *stats,
//                                           const uint32_t *targets, const float *a, const float *b,
//                                           int vocab, float temperature);
#include "common.cuh"

#define LMHE_NO_TARGET 0xffffffffu

namespace lmhe {
// softmax_stats_bwd's per-logit arithmetic, with the target's +b added by the caller.
__device__ __forceinline__ float dlogit(float x, float inv_t, float lse, float mean_z, float ca, float cb) {
    const float z = x * inv_t, p = __expf(z - lse);
    return ca * (-p * (z - mean_z)) - cb * p;
}
}  // namespace lmhe

// dlogits of Σ a·entropy + b·logprob from the forward's stats: (a·(−p(z − E[z])) − b·p +
// b·[j = y]) / T, with p = exp(z − lse). stats[3·row..] = (lse, entropy, logprob) as written by
// softmax_stats_fwd at the same temperature; targets[row] = 0xffffffff means no target (b
// ignored). dlogits may alias logits.
// grid (rows), block 512 (as softmax_stats_bwd), no shared memory, nothing to zero. Rows with
// vocab % 8 == 0 and 16-byte aligned pointers use 16-byte loads and stores.
// CPU oracle: cpu::softmax_stats_bwd (the same output as the softmax_stats_bwd kernel).
extern "C" __global__ void softmax_stats_bwd_saved(bf16 *dlogits, const bf16 *logits, const float *stats,
                                                   const uint32_t *targets, const float *a, const float *b,
                                                   int vocab, float temperature) {
    const int64_t row = blockIdx.x;
    const bf16 *r = logits + row * vocab;
    bf16 *d = dlogits + row * vocab;
    const float inv_t = 1.0f / temperature;
    const float lse = stats[3 * row], mean_z = lse - stats[3 * row + 1];
    const uint32_t y = targets[row];
    const float ca = a[row], cb = y == LMHE_NO_TARGET ? 0.0f : b[row];
    if ((vocab & 7) == 0 && (((uintptr_t)r | (uintptr_t)d) & 15) == 0) {
        const uint4 *src = (const uint4 *)r;
        uint4 *dst = (uint4 *)d;
        for (int q = threadIdx.x; q < vocab / 8; q += blockDim.x) {
            uint4 raw = src[q];
            __nv_bfloat162 *h = (__nv_bfloat162 *)&raw;
            for (int e = 0; e < 4; e++) {
                const float2 x = __bfloat1622float2(h[e]);
                const int j = 8 * q + 2 * e;
                float d0 = lmhe::dlogit(x.x, inv_t, lse, mean_z, ca, cb);
                float d1 = lmhe::dlogit(x.y, inv_t, lse, mean_z, ca, cb);
                if ((uint32_t)j == y) d0 += cb;
                if ((uint32_t)j + 1 == y) d1 += cb;
                h[e] = __floats2bfloat162_rn(d0 * inv_t, d1 * inv_t);
            }
            dst[q] = raw;
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float g = lmhe::dlogit(ld(r + j), inv_t, lse, mean_z, ca, cb);
            if ((uint32_t)j == y) g += cb;
            d[j] = to_bf16(g * inv_t);
        }
    }
}
