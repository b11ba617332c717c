// Fused softmax statistics at a temperature, in one pass over each row of logits with an online
// max: logsumexp, entropy and the target's log-prob, probabilities never stored; and their
// gradient from the saved statistics. CPU oracles: cpu::softmax_stats, cpu::softmax_stats_bwd.
//
// Both kernels stream: a row of Qwen2.5's vocabulary is 297 KB, so a row is split over
// gridDim.x CTAs (the launcher, softmax_splits in src/backend/cuda.rs, picks about 12 packs of
// 8 logits per thread), and every thread has the next SME_U packs in flight while it works on
// the current ones. An exp per logit costs about 40% of the time the HBM needs to deliver it, so
// the math must overlap the loads; the first version, which loaded a CTA's whole share into
// registers and only then did the math, stopped at 56% of the copy bandwidth on the H100.
//
// The forward's CTAs each leave a partial (max, Σe, Σe·z) in global scratch; the last CTA of a
// row to finish (an arrival counter per row, reset by that CTA for the next launch) merges them.
// The backward needs no merge: the forward's logsumexp and entropy give p and E[z] directly, so
// it reads each logit once and writes its gradient once.
#include "common.cuh"

#define NO_TARGET 0xffffffffu
#define SME_THREADS 256
#define SME_U 2

namespace sme {
constexpr float LOWEST = -3.40282347e38f;  // the most negative finite float

// Running (max, Σe^(z−max), Σe^(z−max)·z) over z = logit / T.
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

// Every thread gets the block's merge.
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

// 2^x on the special-function unit: the statistics are fp32 sums of values in (0, 1], whose
// relative error (2^-22) is far below the bf16 rounding of the logits themselves.
__device__ __forceinline__ float exp2_fast(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);
#endif
}

// The running sums, kept over raw logits x (max, Σ2^(x·c − max·c), Σ2^(…)·x) with
// c = log2(e)/T, so a logit costs one FFMA and one ex2; `finish` turns them into an Online of z.
struct Raw {
    float m, mc, s, t;
};

// A new running max mx > a.m: rescale the sums to it. A thread's first value lands here with
// a.m = −inf and a.s = a.t = 0.
// Masked logits (−inf) must add nothing. They never raise the max, and until a finite value
// has, mc stays 0 (not −inf, whose fmaf with an −inf logit is NaN), so their p is 2^−inf = 0;
// the clamp in fold keeps p·x at 0 where 0·(−inf) would be NaN. A NaN logit still poisons s.
__device__ __forceinline__ void raise(Raw &a, float mx, float c) {
    const float r = a.m == -INFINITY ? 0.0f : exp2_fast(a.mc - mx * c);
    a.m = mx;
    a.mc = mx * c;
    a.s *= r;
    a.t *= r;
}

__device__ __forceinline__ void fold(Raw &a, float x, float c) {
    const float p = exp2_fast(fmaf(x, c, -a.mc));
    a.s += p;
    a.t = fmaf(p, fmaxf(x, LOWEST), a.t);
}

// Eight values with one max test for the pack, not one per value.
__device__ __forceinline__ void add8(Raw &a, const float (&x)[8], float c) {
    float mx = x[0];
#pragma unroll
    for (int e = 1; e < 8; e++) mx = fmaxf(mx, x[e]);
    if (mx > a.m) raise(a, mx, c);
#pragma unroll
    for (int e = 0; e < 8; e++) fold(a, x[e], c);
}

__device__ __forceinline__ void add1(Raw &a, float x, float c) {
    if (x > a.m) raise(a, x, c);
    fold(a, x, c);
}

__device__ __forceinline__ Online finish(Raw a, float inv_t) { return {a.m * inv_t, a.s, a.t * inv_t}; }

// [begin, end) of n items that CTA `split` of `splits` owns.
__device__ __forceinline__ void span(int n, int split, int splits, int &begin, int &end) {
    const int per = (n + splits - 1) / splits;
    begin = min(n, split * per);
    end = min(n, begin + per);
}

__device__ __forceinline__ bool packed(int vocab, const void *a, const void *b) {
    return (vocab & 7) == 0 && ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

// Calls f(q, pack q) for this CTA's packs [begin, end) of a row, thread t taking begin + t,
// + blockDim, …, with the next SME_U packs already loading while f works on the current ones.
// f may overwrite pack q in place: each pack is read and written by one thread only, and the
// packs in flight are other packs.
template <class F> __device__ __forceinline__ void for_packs(const uint4 *src, int begin, int end, F f) {
    const int b = blockDim.x, step = SME_U * b;
    uint4 cur[SME_U];
    int q = begin + threadIdx.x;
#pragma unroll
    for (int k = 0; k < SME_U; k++)
        if (q + k * b < end) cur[k] = src[q + k * b];
    for (; q < end; q += step) {
        uint4 next[SME_U];
#pragma unroll
        for (int k = 0; k < SME_U; k++)
            if (q + step + k * b < end) next[k] = src[q + step + k * b];
#pragma unroll
        for (int k = 0; k < SME_U; k++)
            if (q + k * b < end) f(q + k * b, cur[k]);
#pragma unroll
        for (int k = 0; k < SME_U; k++) cur[k] = next[k];
    }
}

// dlogit of a·entropy + b·logprob, already divided by T: −p·(a·(z − E[z]) + b)/T, with
// p = 2^(x·c − lse·log2 e); the target's +b/T is added by the caller. A masked logit (−inf)
// has p = 0: the clamp of z − E[z] (as in cpu::stats_grad_in_place) keeps its gradient 0.
struct Grad {
    float c, lse2, inv_t, mean_z, ca, cb;
    __device__ __forceinline__ float operator()(float x) const {
        const float p = exp2_fast(fmaf(x, c, -lse2));
        return -p * inv_t * fmaf(ca, fmaxf(fmaf(x, inv_t, -mean_z), -1e30f), cb);
    }
};
}  // namespace sme

// stats[3·row..] = (logsumexp, entropy, logprob of targets[row], or 0 for NO_TARGET) of
// softmax(logits[row] / T). grid (splits, rows), block SME_THREADS. partial: 3·splits·rows
// floats of scratch; arrived: rows counters, zero before the launch and zero after it.
extern "C" __global__ void __launch_bounds__(SME_THREADS) softmax_stats_fwd(float *stats, float *partial,
                                                                            unsigned *arrived, const bf16 *logits,
                                                                            const uint32_t *targets, int vocab,
                                                                            float temperature) {
    const int64_t row = blockIdx.y;
    const int split = blockIdx.x, splits = gridDim.x;
    const bf16 *r = logits + row * vocab;
    const float inv_t = 1.0f / temperature, c = 1.4426950408889634f * inv_t;
    sme::Raw acc = {-INFINITY, 0.0f, 0.0f, 0.0f};
    int begin, end;
    if (sme::packed(vocab, logits, logits)) {
        sme::span(vocab / 8, split, splits, begin, end);
        sme::for_packs(reinterpret_cast<const uint4 *>(r), begin, end, [&](int, uint4 raw) {
            float x[8];
            unpack8(raw, x);
            sme::add8(acc, x, c);
        });
    } else {
        sme::span(vocab, split, splits, begin, end);
        for (int j = begin + threadIdx.x; j < end; j += blockDim.x) sme::add1(acc, ld(r + j), c);
    }
    const sme::Online part = sme::block_merge(sme::finish(acc, inv_t));

    // Publish, then count in; the fences order the partial before the count (and, in the last
    // CTA, the count before the reads of the others' partials).
    __shared__ bool last;
    float *mine = partial + 3 * (row * splits + split);
    if (threadIdx.x == 0) {
        mine[0] = part.m;
        mine[1] = part.s;
        mine[2] = part.t;
        __threadfence();
        last = atomicAdd(arrived + row, 1u) == (unsigned)splits - 1;
    }
    __syncthreads();
    if (!last || threadIdx.x >= 32) return;
    __threadfence();
    sme::Online o = {-INFINITY, 0.0f, 0.0f};
    for (int k = threadIdx.x; k < splits; k += 32) {
        // L2 reads: another SM wrote these, and this SM's L1 is not coherent with it.
        const float *p = partial + 3 * (row * splits + k);
        o = sme::merge(o, {__ldcg(p), __ldcg(p + 1), __ldcg(p + 2)});
    }
    o = sme::warp_merge(o);
    if (threadIdx.x == 0) {
        arrived[row] = 0;
        const float lse = o.m + __logf(o.s);
        const uint32_t y = targets[row];
        stats[3 * row + 0] = lse;
        stats[3 * row + 1] = lse - o.t / o.s;
        stats[3 * row + 2] = y == NO_TARGET ? 0.0f : ld(r + y) * inv_t - lse;
    }
}

// dlogits (=) of Σ_row a·entropy + b·logprob: (a·(−p(z − E[z])) − b·p + b·[j = y]) / T, from
// stats as softmax_stats_fwd wrote them at the same temperature (E[z] = lse − entropy).
// dlogits may alias logits. grid (splits, rows), block SME_THREADS.
extern "C" __global__ void __launch_bounds__(SME_THREADS)
    softmax_stats_bwd_saved(bf16 *dlogits, const bf16 *logits, const float *stats, const uint32_t *targets,
                            const float *a, const float *b, int vocab, float temperature) {
    const int64_t row = blockIdx.y;
    const bf16 *r = logits + row * vocab;
    bf16 *d = dlogits + row * vocab;
    const float inv_t = 1.0f / temperature, lse = stats[3 * row];
    const uint32_t y = targets[row];
    const float cb = y == NO_TARGET ? 0.0f : b[row];
    const sme::Grad g = {1.4426950408889634f * inv_t, 1.4426950408889634f * lse, inv_t,
                         lse - stats[3 * row + 1], a[row], cb};
    int begin, end;
    if (sme::packed(vocab, logits, dlogits)) {
        sme::span(vocab / 8, blockIdx.x, gridDim.x, begin, end);
        uint4 *dst = reinterpret_cast<uint4 *>(d);
        sme::for_packs(reinterpret_cast<const uint4 *>(r), begin, end, [&](int q, uint4 raw) {
            float x[8];
            unpack8(raw, x);
#pragma unroll
            for (int e = 0; e < 8; e++) x[e] = g(x[e]);
            const uint32_t j0 = 8u * (uint32_t)q;
            if (y - j0 < 8u) {
#pragma unroll
                for (int e = 0; e < 8; e++)
                    if (j0 + e == y) x[e] += cb * inv_t;
            }
            dst[q] = pack8(x);
        });
        return;
    }
    sme::span(vocab, blockIdx.x, gridDim.x, begin, end);
    for (int j = begin + threadIdx.x; j < end; j += blockDim.x) {
        float v = g(ld(r + j));
        if ((uint32_t)j == y) v += cb * inv_t;
        d[j] = to_bf16(v);
    }
}
