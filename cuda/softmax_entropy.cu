// Fused softmax statistics at a temperature, one block per row of logits, one pass over the
// row with an online max: logsumexp, entropy and the target's log-prob; probabilities are
// never stored. CPU oracles: cpu::softmax_stats and cpu::softmax_stats_bwd.
#include "common.cuh"

#define NO_TARGET 0xffffffffu

// Running (max, Σe^(z−max), Σe^(z−max)·z) merged so the max can grow as the row streams by.
struct Online {
    float m, s, t;
};

__device__ __forceinline__ Online merge(Online a, Online b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return a;
    const float ea = __expf(a.m - m), eb = __expf(b.m - m);
    return {m, a.s * ea + b.s * eb, a.t * ea + b.t * eb};
}

__device__ Online block_merge(Online v) {
    __shared__ Online shared[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        Online other = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o),
                        __shfl_xor_sync(0xffffffffu, v.t, o)};
        v = merge(v, other);
    }
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? shared[lane] : Online{-INFINITY, 0.0f, 0.0f};
    for (int o = 16; o > 0; o >>= 1) {
        Online other = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o),
                        __shfl_xor_sync(0xffffffffu, v.t, o)};
        v = merge(v, other);
    }
    return v;
}

__device__ Online row_online(const bf16 *row, int vocab, float inv_t) {
    Online acc = {-INFINITY, 0.0f, 0.0f};
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float z = ld(row + j) * inv_t;
        if (z > acc.m) {
            const float e = __expf(acc.m - z);
            acc = {z, acc.s * e + 1.0f, acc.t * e + z};
        } else {
            const float e = __expf(z - acc.m);
            acc.s += e;
            acc.t += e * z;
        }
    }
    return block_merge(acc);
}

// stats[row] = (logsumexp, entropy, logprob of targets[row] or 0)
extern "C" __global__ void softmax_stats_fwd(float *stats, const bf16 *logits, const uint32_t *targets, int vocab,
                                             float temperature) {
    const int64_t row = blockIdx.x;
    const bf16 *r = logits + row * vocab;
    const float inv_t = 1.0f / temperature;
    const Online o = row_online(r, vocab, inv_t);
    if (threadIdx.x == 0) {
        const float lse = o.m + __logf(o.s);
        const uint32_t y = targets[row];
        stats[3 * row + 0] = lse;
        stats[3 * row + 1] = lse - o.t / o.s;
        stats[3 * row + 2] = y == NO_TARGET ? 0.0f : ld(r + y) * inv_t - lse;
    }
}

// dlogits of Σ a·entropy + b·logprob: (a·(−p(z − E[z])) − b·p + b·[j = y]) / T, in one pass
// over the row after its statistics; dlogits may alias logits.
extern "C" __global__ void softmax_stats_bwd(bf16 *dlogits, const bf16 *logits, const uint32_t *targets,
                                             const float *a, const float *b, int vocab, float temperature) {
    const int64_t row = blockIdx.x;
    const bf16 *r = logits + row * vocab;
    const float inv_t = 1.0f / temperature;
    const Online o = row_online(r, vocab, inv_t);
    const float lse = o.m + __logf(o.s), mean_z = o.t / o.s;
    const uint32_t y = targets[row];
    const float ca = a[row], cb = y == NO_TARGET ? 0.0f : b[row];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float z = ld(r + j) * inv_t, p = __expf(z - lse);
        float d = ca * (-p * (z - mean_z)) - cb * p;
        if ((uint32_t)j == y) d += cb;
        dlogits[row * vocab + j] = to_bf16(d * inv_t);
    }
}
