// Fused softmax statistics at a temperature, one pass over each row of logits with an online
// max: logsumexp, entropy and the target's log-prob; probabilities are never stored; and their
// gradient. CPU oracles: cpu::softmax_stats and cpu::softmax_stats_bwd.
//
// Two implementations, picked by the launcher (src/backend/cuda.rs, softmax_plan):
//  * sm_90 (the H100), vocab % 8 == 0, aligned buffers: a thread block cluster of SME_CL CTAs per
//    row. Each CTA loads its 1/SME_CL of the row into registers with 16-byte loads, all issued
//    before any is used (SME_VPT per thread, 38 KB per CTA at vocab 152064), reduces it to a
//    partial (max, Σe^(z−max), Σe^(z−max)·z), and the partials are merged through distributed
//    shared memory. The backward then computes its gradient from the same registers: the logits
//    are read once and the gradient written once, where a block per row must read the row twice
//    (its statistics, then its gradient), and 8 CTAs a row keep the whole GPU busy with 1K rows.
//  * elsewhere (A100, other vocabularies): one block per row, 16-byte loads SME_U at a time where
//    aligned, scalar otherwise; the backward reads the row twice.
#include "common.cuh"

#define NO_TARGET 0xffffffffu
#define SME_CL 8
#define SME_VPT 8
#define SME_MAX_THREADS 512
#define SME_U 4

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

__device__ __forceinline__ Online warp_merge(Online v) {
    for (int o = 16; o > 0; o >>= 1) {
        Online other = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o),
                        __shfl_xor_sync(0xffffffffu, v.t, o)};
        v = merge(v, other);
    }
    return v;
}

__device__ Online block_merge(Online v) {
    __shared__ Online shared[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_merge(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? shared[lane] : Online{-INFINITY, 0.0f, 0.0f};
    return warp_merge(v);
}

namespace sme {
__device__ __forceinline__ void unpack(uint4 raw, float (&f)[8]) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const float2 v = __bfloat1622float2(h[e]);
        f[2 * e] = v.x;
        f[2 * e + 1] = v.y;
    }
}

__device__ __forceinline__ uint4 pack(const float (&f)[8]) {
    uint4 raw;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&raw);
#pragma unroll
    for (int e = 0; e < 4; e++) h[e] = __floats2bfloat162_rn(f[2 * e], f[2 * e + 1]);
    return raw;
}

// Folds 8 values into acc with one rescale for the pack, not one per value.
__device__ __forceinline__ void add8(Online &acc, const float (&z)[8]) {
    float mx = z[0];
#pragma unroll
    for (int e = 1; e < 8; e++) mx = fmaxf(mx, z[e]);
    if (mx > acc.m) {
        const float r = __expf(acc.m - mx);
        acc = {mx, acc.s * r, acc.t * r};
    }
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const float p = __expf(z[e] - acc.m);
        acc.s += p;
        acc.t += p * z[e];
    }
}

__device__ __forceinline__ void add1(Online &acc, float z) {
    if (z > acc.m) {
        const float e = __expf(acc.m - z);
        acc = {z, acc.s * e + 1.0f, acc.t * e + z};
    } else {
        const float e = __expf(z - acc.m);
        acc.s += e;
        acc.t += e * z;
    }
}

// The row's statistics, one block per row (the fallback path).
__device__ Online row_online(const bf16 *row, int vocab, float inv_t) {
    Online acc = {-INFINITY, 0.0f, 0.0f};
    if ((vocab & 7) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
        const uint4 *src = reinterpret_cast<const uint4 *>(row);
        const int nv = vocab / 8, b = blockDim.x;
        for (int q = threadIdx.x; q < nv; q += SME_U * b) {
            uint4 raw[SME_U];
#pragma unroll
            for (int k = 0; k < SME_U; k++)
                if (q + k * b < nv) raw[k] = src[q + k * b];
#pragma unroll
            for (int k = 0; k < SME_U; k++)
                if (q + k * b < nv) {
                    float z[8];
                    unpack(raw[k], z);
#pragma unroll
                    for (int e = 0; e < 8; e++) z[e] *= inv_t;
                    add8(acc, z);
                }
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) add1(acc, ld(row + j) * inv_t);
    }
    return block_merge(acc);
}

__device__ __forceinline__ float dlogit(float z, float lse, float mean_z, float ca, float cb) {
    const float p = __expf(z - lse);
    return ca * (-p * (z - mean_z)) - cb * p;
}

// One CTA's share of a row in the cluster kernels: packs [begin, end) of the row, thread t
// holding packs begin + t + k·blockDim for k < SME_VPT.
struct Slice {
    int begin, count;
};

__device__ __forceinline__ Slice slice(int vocab, int rank) {
    const int nv = vocab / 8, per = (nv + SME_CL - 1) / SME_CL;
    const int begin = min(nv, rank * per);
    return {begin, min(nv, begin + per) - begin};
}

// The cluster kernels' preconditions, which the launcher checks before choosing them: a CTA's
// share must fit its registers and every row must start 16-byte aligned. Breaking them is a bug
// in the launcher, so it stops the kernel rather than return wrong numbers.
__device__ __forceinline__ void check_cluster_args(int vocab, const void *a, const void *b) {
    const int per = (vocab / 8 + SME_CL - 1) / SME_CL;
    if ((vocab & 7) != 0 || per > SME_VPT * (int)blockDim.x ||
        ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) != 0)
        __trap();
}

// Loads this thread's packs of the slice and returns the whole row's statistics, merged over the
// cluster. The slice stays in raw[] for the caller.
__device__ Online cluster_row(uint4 (&raw)[SME_VPT], const bf16 *row, Slice sl, float inv_t) {
    const uint4 *src = reinterpret_cast<const uint4 *>(row) + sl.begin;
    const int t = threadIdx.x, b = blockDim.x;
#pragma unroll
    for (int k = 0; k < SME_VPT; k++)
        if (t + k * b < sl.count) raw[k] = src[t + k * b];
    // Every value is in registers, so the thread's max comes first and each value costs one exp.
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < SME_VPT; k++)
        if (t + k * b < sl.count) {
            float z[8];
            unpack(raw[k], z);
#pragma unroll
            for (int e = 0; e < 8; e++) m = fmaxf(m, z[e] * inv_t);
        }
    Online acc = {m, 0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < SME_VPT; k++)
        if (t + k * b < sl.count) {
            float z[8];
            unpack(raw[k], z);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float zi = z[e] * inv_t, p = __expf(zi - m);
                acc.s += p;
                acc.t += p * zi;
            }
        }
    acc = block_merge(acc);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Each CTA publishes its partial; after the first cluster barrier (release/acquire) warp 0
    // reads all SME_CL of them from the peers' shared memory; the second one keeps every CTA's
    // shared memory alive until those reads are done and hands `total` to the rest of the CTA.
    __shared__ Online part, total;
    if (t == 0) part = acc;
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
    if (t < 32) {
        Online o = {-INFINITY, 0.0f, 0.0f};
        if (t < SME_CL) o = *static_cast<const Online *>(__cluster_map_shared_rank(&part, t));
        o = warp_merge(o);
        if (t == 0) total = o;
    }
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
    acc = total;
#endif
    return acc;
}
}  // namespace sme

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SME_CLUSTER_DIMS
#else
#define SME_CLUSTER_DIMS __cluster_dims__(SME_CL, 1, 1)
#endif

// stats[row] = (logsumexp, entropy, logprob of targets[row] or 0)
// grid (rows), block 512, static shared memory only.
extern "C" __global__ void softmax_stats_fwd(float *stats, const bf16 *logits, const uint32_t *targets, int vocab,
                                             float temperature) {
    const int64_t row = blockIdx.x;
    const bf16 *r = logits + row * vocab;
    const float inv_t = 1.0f / temperature;
    const Online o = sme::row_online(r, vocab, inv_t);
    if (threadIdx.x == 0) {
        const float lse = o.m + __logf(o.s);
        const uint32_t y = targets[row];
        stats[3 * row + 0] = lse;
        stats[3 * row + 1] = lse - o.t / o.s;
        stats[3 * row + 2] = y == NO_TARGET ? 0.0f : ld(r + y) * inv_t - lse;
    }
}

// dlogits of Σ a·entropy + b·logprob: (a·(−p(z − E[z])) − b·p + b·[j = y]) / T, in one pass
// over the row after its statistics; dlogits may alias logits. grid (rows), block 512.
extern "C" __global__ void softmax_stats_bwd(bf16 *dlogits, const bf16 *logits, const uint32_t *targets,
                                             const float *a, const float *b, int vocab, float temperature) {
    const int64_t row = blockIdx.x;
    const bf16 *r = logits + row * vocab;
    bf16 *d = dlogits + row * vocab;
    const float inv_t = 1.0f / temperature;
    const Online o = sme::row_online(r, vocab, inv_t);
    const float lse = o.m + __logf(o.s), mean_z = o.t / o.s;
    const uint32_t y = targets[row];
    const float ca = a[row], cb = y == NO_TARGET ? 0.0f : b[row];
    if ((vocab & 7) == 0 && ((reinterpret_cast<uintptr_t>(r) | reinterpret_cast<uintptr_t>(d)) & 15) == 0) {
        const uint4 *src = reinterpret_cast<const uint4 *>(r);
        uint4 *dst = reinterpret_cast<uint4 *>(d);
        const int nv = vocab / 8, bd = blockDim.x;
        for (int q = threadIdx.x; q < nv; q += SME_U * bd) {
            uint4 raw[SME_U];
#pragma unroll
            for (int k = 0; k < SME_U; k++)
                if (q + k * bd < nv) raw[k] = src[q + k * bd];
#pragma unroll
            for (int k = 0; k < SME_U; k++)
                if (q + k * bd < nv) {
                    float z[8];
                    sme::unpack(raw[k], z);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        const int j = 8 * (q + k * bd) + e;
                        z[e] *= inv_t;
                        float g = sme::dlogit(z[e], lse, mean_z, ca, cb);
                        if ((uint32_t)j == y) g += cb;
                        z[e] = g * inv_t;
                    }
                    dst[q + k * bd] = sme::pack(z);
                }
        }
        return;
    }
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float z = ld(r + j) * inv_t;
        float g = sme::dlogit(z, lse, mean_z, ca, cb);
        if ((uint32_t)j == y) g += cb;
        d[j] = to_bf16(g * inv_t);
    }
}

// softmax_stats_fwd on sm_90 with a cluster of SME_CL CTAs per row: CTA blockIdx.x handles row
// blockIdx.x / SME_CL, slice blockIdx.x % SME_CL. grid (SME_CL · rows), block ⌈⌈vocab/8/SME_CL⌉ /
// SME_VPT⌉ threads rounded up to a warp (≤ SME_MAX_THREADS), static shared memory only.
extern "C" __global__ void __launch_bounds__(SME_MAX_THREADS, 2) SME_CLUSTER_DIMS
    softmax_stats_fwd_cluster(float *stats, const bf16 *logits, const uint32_t *targets, int vocab,
                              float temperature) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int64_t row = blockIdx.x / SME_CL;
    const bf16 *r = logits + row * vocab;
    sme::check_cluster_args(vocab, logits, logits);
    const float inv_t = 1.0f / temperature;
    uint4 raw[SME_VPT];
    const Online o = sme::cluster_row(raw, r, sme::slice(vocab, blockIdx.x % SME_CL), inv_t);
    if (blockIdx.x % SME_CL == 0 && threadIdx.x == 0) {
        const float lse = o.m + __logf(o.s);
        const uint32_t y = targets[row];
        stats[3 * row + 0] = lse;
        stats[3 * row + 1] = lse - o.t / o.s;
        stats[3 * row + 2] = y == NO_TARGET ? 0.0f : ld(r + y) * inv_t - lse;
    }
#else
    __trap();  // the launcher only picks this kernel on sm_90 and later
#endif
}

// softmax_stats_bwd on sm_90, geometry as softmax_stats_fwd_cluster: each thread writes the
// gradient of the packs it loaded, so dlogits may alias logits.
extern "C" __global__ void __launch_bounds__(SME_MAX_THREADS, 2) SME_CLUSTER_DIMS
    softmax_stats_bwd_cluster(bf16 *dlogits, const bf16 *logits, const uint32_t *targets, const float *a,
                              const float *b, int vocab, float temperature) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int64_t row = blockIdx.x / SME_CL;
    sme::check_cluster_args(vocab, logits, dlogits);
    const float inv_t = 1.0f / temperature;
    const sme::Slice sl = sme::slice(vocab, blockIdx.x % SME_CL);
    uint4 raw[SME_VPT];
    const Online o = sme::cluster_row(raw, logits + row * vocab, sl, inv_t);
    // Without this the compiler keeps the 64 widened floats of the statistics pass alive across
    // the cluster barriers instead of the 32 registers of packed bf16, and spills.
#pragma unroll
    for (int k = 0; k < SME_VPT; k++)
        asm volatile("" : "+r"(raw[k].x), "+r"(raw[k].y), "+r"(raw[k].z), "+r"(raw[k].w));
    const float lse = o.m + __logf(o.s), mean_z = o.t / o.s;
    const uint32_t y = targets[row];
    const float ca = a[row], cb = y == NO_TARGET ? 0.0f : b[row];
    uint4 *dst = reinterpret_cast<uint4 *>(dlogits + row * vocab) + sl.begin;
    const int t = threadIdx.x, bd = blockDim.x;
#pragma unroll
    for (int k = 0; k < SME_VPT; k++)
        if (t + k * bd < sl.count) {
            float z[8];
            sme::unpack(raw[k], z);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const int j = 8 * (sl.begin + t + k * bd) + e;
                z[e] *= inv_t;
                float g = sme::dlogit(z[e], lse, mean_z, ca, cb);
                if ((uint32_t)j == y) g += cb;
                z[e] = g * inv_t;
            }
            dst[t + k * bd] = sme::pack(z);
        }
#else
    __trap();
#endif
}
