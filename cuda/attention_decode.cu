// Decode attention: one new query per sequence over a ragged KV cache (flash-decoding), split
// over the key axis, and the pass that merges the splits. The KV-cache write is in attention.cu.
// CPU oracle: cpu::attention with tq = 1 (src/backend/cpu.rs).
//
// Layouts: q, out [batch, heads, D]; k, v [batch, cap, kv_heads, D]; lse [batch, heads] float.
// Every pointer must be 16-byte aligned; D is a multiple of 8, at most 256.
//
// Kernel signatures (all extern "C" __global__, bf16 = __nv_bfloat16):
//   void attention_decode_d64(bf16 *out, float *lse, float *part_o, float *part_ml, const bf16 *q,
//                             const bf16 *k, const bf16 *v, const int *kv_len, int cap, int heads,
//                             int kv_heads, int head_dim, int chunk)       head_dim <= 64
//   void attention_decode_d128(same)                                       head_dim <= 128
//   void attention_decode_d256(same)                                       head_dim <= 256
//   void attention_decode_combine(bf16 *out, float *lse, const float *part_o, const float *part_ml,
//                                 int splits, int heads, int head_dim)
//
// Both products run on tensor cores (mma.m16n8k16, bf16 in, fp32 accumulate; P rounded to bf16
// as in the flash kernels), fed straight from global memory by 16-byte loads into registers: no
// shared-memory staging, each K/V row read once per block. For D <= 128 a warp holds two steps'
// fragments, so the next step's 16 loads per lane are in flight while this one computes. A warp
// takes 16 keys per step, g = lane / 4, t = lane % 4:
//   S = Q K^T      M = q heads (rows 8..15 zero), N = 8 keys, K = dims. Lane (g, t) loads key g of
//                  each 8-key half, 16-byte chunks t + 4j, and uses chunk t + 4j as the k-values of
//                  k-steps 2j, 2j+1; q is loaded in the same permuted order, so the dot products
//                  are unchanged. C: lane (g, t) holds head g at keys 2t, 2t+1, 8 + 2t, 9 + 2t.
//   O^T += V^T P^T M = 16 dims, N = 8 q heads, K = the 16 keys. B (keys 2t.., head g) is exactly
//                  the score C fragment above. A (dim rows g, g + 8; keys 2t, 2t+1, 2t+8, 2t+9)
//                  comes from lane (g, t) loading those 4 V rows at chunks g + 8h and pairing the
//                  two keys' halves of each 32-bit word: m-tile 4h + w, row g = dim 8(g+8h) + 2w,
//                  row g + 8 the dim after it. C: lane (g, t) holds heads 2t, 2t+1 over chunks g + 8h.
// The 4 warps of a block take every 4th 16-key step of the block's split and merge in shared
// memory at the end.
#include "common.cuh"

namespace decode {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr int WARPS = 4;  // per block
constexpr int TILE = 16;  // keys per warp step
constexpr int NH = 8;     // q heads per block: the N of O^T (a larger GQA group takes several blocks)
constexpr unsigned FULL = 0xffffffffu;

#ifdef __CUDACC__
// K and V are read once: streamed past L1.
__device__ __forceinline__ uint4 ldg_stream(const bf16 *p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}
// mma.m16n8k16, g = lane / 4, t = lane % 4:
//   A (16x16, row-major) a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 8+2t..)  a3: (g+8, 8+2t..)
//   B (16x8, "col")      b0: (k 2t..2t+1, n g)  b1: (k 8+2t.., n g)
//   C (16x8)             c0,c1: (g, 2t..2t+1)   c2,c3: (g+8, 2t..2t+1)
// The low 16 bits of a register hold the lower index.
__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#else
// Host build of tools/kernel_emulator: plain loads and its emulated mma.
inline uint4 ldg_stream(const bf16 *p) { return *reinterpret_cast<const uint4 *>(p); }
#include "emu_tc.h"
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#endif

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}
__device__ __forceinline__ uint32_t lo_halves(uint32_t a, uint32_t b) { return (a & 0xffffu) | (b << 16); }
__device__ __forceinline__ uint32_t hi_halves(uint32_t a, uint32_t b) { return (a >> 16) | (b & 0xffff0000u); }
__device__ __forceinline__ uint32_t word(const uint4 &u, int w) {
    return w == 0 ? u.x : w == 1 ? u.y : w == 2 ? u.z : u.w;
}

// One block: split blockIdx.x (keys [split * chunk, min(.. + chunk, kv_len[b]))) of sequence
// blockIdx.z, up to NH q heads of one kv head. DMAX >= D is the compile-time row width.
template <int DMAX>
__device__ __forceinline__ void split_attention(bf16 *out, float *lse, float *part_o, float *part_ml, const bf16 *q,
                                                const bf16 *k, const bf16 *v, const int *kv_len, int cap, int heads,
                                                int kv_heads, int D, int chunk) {
    constexpr int KJ = DMAX / 32;  // K chunks per lane and key: t + 4j
    constexpr int VH = DMAX / 64;  // V chunks per lane and key: g + 8h
    constexpr int MT = DMAX / 16;  // m-tiles of O^T
    __shared__ __align__(16) float os[WARPS][NH][DMAX];  // each warp's output, rescaled to the block max
    __shared__ float mls[WARPS][NH][2];                  // each warp's max (log2 units) and sum
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int nch = D >> 3;
    const int group = heads / kv_heads, hchunks = (group + NH - 1) / NH;
    const int kvh = blockIdx.y / hchunks, hc = blockIdx.y % hchunks;
    const int h0 = kvh * group + hc * NH, ng = min(NH, group - hc * NH);
    const int b = blockIdx.z, batch = gridDim.z, split = blockIdx.x, splits = gridDim.x;
    const int start = split * chunk, end = min(start + chunk, kv_len[b]);
    const float sl2 = rsqrtf((float)D) * LOG2E;
    const int64_t kvstride = (int64_t)kv_heads * D;
    const bf16 *kh = k + (int64_t)b * cap * kvstride + (int64_t)kvh * D;
    const bf16 *vh = v + (int64_t)b * cap * kvstride + (int64_t)kvh * D;
    const uint4 zero = {0u, 0u, 0u, 0u};

    // The A operand of S = Q K^T: head g (rows 8..15 zero), k-steps 2j, 2j+1 from chunk t + 4j.
    uint4 qf[KJ];
#pragma unroll
    for (int j = 0; j < KJ; j++) {
        const int c = t + 4 * j;
        qf[j] = g < ng && c < nch ? *reinterpret_cast<const uint4 *>(q + ((int64_t)b * heads + h0 + g) * D + 8 * c)
                                  : zero;
    }

    float acc[MT][4];  // O^T, unnormalized, relative to the running max of each head
#pragma unroll
    for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    float m = -INFINITY, l = 0.0f;  // head g: running max (log2 units of the scaled scores), this lane's sum

    // One 16-key step's K and V fragments. Keys past end read row end - 1 and chunks past D read
    // chunk D/8 - 1 instead: finite data (rows past end may hold NaN garbage) that the masked
    // scores (p = 0) and the zero q chunks cancel, so no load needs a predicate.
    struct Frag {
        uint4 k[2][KJ], v[4][VH];
    };
    const auto load_k = [&](Frag &f, int j0) {
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            const bf16 *row = kh + min(j0 + 8 * nt + g, end - 1) * kvstride;
#pragma unroll
            for (int j = 0; j < KJ; j++) f.k[nt][j] = ldg_stream(row + 8 * min(t + 4 * j, nch - 1));
        }
    };
    const auto load_v = [&](Frag &f, int j0) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const bf16 *row = vh + min(j0 + 2 * t + (r & 1) + 8 * (r >> 1), end - 1) * kvstride;
#pragma unroll
            for (int h = 0; h < VH; h++) f.v[r][h] = ldg_stream(row + 8 * min(g + 8 * h, nch - 1));
        }
    };
    // S for the step, then the online softmax; returns P as the B operand of O^T += V^T P^T.
    const auto scores = [&](const Frag &f, int j0, uint32_t &b0, uint32_t &b1) {
        // S: two accumulators per 8-key half (even and odd k-steps) to halve the mma chain.
        float s[2][2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) s[nt][e][0] = s[nt][e][1] = s[nt][e][2] = s[nt][e][3] = 0.0f;
#pragma unroll
            for (int j = 0; j < KJ; j++) {
                const uint32_t a0[4] = {qf[j].x, 0u, qf[j].y, 0u}, a1[4] = {qf[j].z, 0u, qf[j].w, 0u};
                mma(s[nt][0], a0, f.k[nt][j].x, f.k[nt][j].y);
                mma(s[nt][1], a1, f.k[nt][j].z, f.k[nt][j].w);
            }
        }
        // Online softmax of head g over the step's keys 2t, 2t+1, 8+2t, 9+2t (the quad holds all 16).
        float x[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int key = j0 + 2 * t + (i & 1) + 8 * (i >> 1);
            const float sc = s[i >> 1][0][i & 1] + s[i >> 1][1][i & 1];
            x[i] = key < end ? sc * sl2 : -INFINITY;
        }
        float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
        mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 2));
        const float mn = fmaxf(m, mx);  // finite: key j0 < end is always valid
        const float corr = exp2f(m - mn);
        float p[4];
#pragma unroll
        for (int i = 0; i < 4; i++) p[i] = exp2f(x[i] - mn);
        l = l * corr + ((p[0] + p[1]) + (p[2] + p[3]));
        m = mn;
        // acc columns are heads 2t, 2t+1: their corrections live in lanes 8t and 8t + 4.
        const float c0 = __shfl_sync(FULL, corr, 8 * t), c1 = __shfl_sync(FULL, corr, 8 * t + 4);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) acc[mt][0] *= c0, acc[mt][1] *= c1, acc[mt][2] *= c0, acc[mt][3] *= c1;
        b0 = pack(p[0], p[1]);
        b1 = pack(p[2], p[3]);
    };
    const auto pv = [&](const Frag &f, uint32_t b0, uint32_t b1) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            const int h = mt / 4, w = mt % 4;
            const uint32_t va = word(f.v[0][h], w), vb = word(f.v[1][h], w), vc = word(f.v[2][h], w),
                           vd = word(f.v[3][h], w);
            const uint32_t a[4] = {lo_halves(va, vb), hi_halves(va, vb), lo_halves(vc, vd), hi_halves(vc, vd)};
            mma(acc[mt], a, b0, b1);
        }
    };

    // The warp's steps: j0, j0 + STEP, ... below end.
    constexpr int STEP = WARPS * TILE;
    int j0 = start + warp * TILE;
    uint32_t b0, b1;
    if constexpr (DMAX <= 128) {
        // Software pipeline, two fragment sets in turn: the next step's loads are in flight while
        // this step computes.
        Frag fa, fb;
        if (j0 < end) load_k(fa, j0), load_v(fa, j0);
        for (; j0 < end; j0 += 2 * STEP) {
            if (j0 + STEP < end) load_k(fb, j0 + STEP), load_v(fb, j0 + STEP);
            scores(fa, j0, b0, b1);
            pv(fa, b0, b1);
            if (j0 + STEP >= end) break;
            if (j0 + 2 * STEP < end) load_k(fa, j0 + 2 * STEP), load_v(fa, j0 + 2 * STEP);
            scores(fb, j0 + STEP, b0, b1);
            pv(fb, b0, b1);
        }
    } else {  // D 256: one set, V loaded after S (registers)
        Frag f;
        for (; j0 < end; j0 += STEP) {
            load_k(f, j0);
            scores(f, j0, b0, b1);
            load_v(f, j0);
            pv(f, b0, b1);
        }
    }

    // Merge the warps: block max M per head, each warp's output rescaled to it into os.
    l += __shfl_xor_sync(FULL, l, 1);
    l += __shfl_xor_sync(FULL, l, 2);
    if (t == 0) mls[warp][g][0] = m, mls[warp][g][1] = l;
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int hd = 2 * t + e;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, mls[w][hd][0]);
        const float mw = mls[warp][hd][0], f = mw == -INFINITY ? 0.0f : exp2f(mw - M);  // no key: acc is 0
#pragma unroll
        for (int h = 0; h < VH; h++) {
            float *o = &os[warp][hd][8 * (g + 8 * h)];
            const int i = 4 * h;
            *reinterpret_cast<float4 *>(o) = {acc[i][e] * f, acc[i][e + 2] * f, acc[i + 1][e] * f, acc[i + 1][e + 2] * f};
            *reinterpret_cast<float4 *>(o + 4) = {acc[i + 2][e] * f, acc[i + 2][e + 2] * f, acc[i + 3][e] * f,
                                                  acc[i + 3][e + 2] * f};
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < ng * D; idx += blockDim.x) {
        const int gi = idx / D, d = idx % D;
        float M = -INFINITY, L = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, mls[w][gi][0]);
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            const float mw = mls[w][gi][0];
            if (mw != -INFINITY) L += mls[w][gi][1] * exp2f(mw - M);
            o += os[w][gi][d];
        }
        const int64_t bh = (int64_t)b * heads + h0 + gi;
        if (splits == 1) {
            out[bh * D + d] = to_bf16(L > 0.0f ? o / L : 0.0f);
            if (d == 0) lse[bh] = L > 0.0f ? M * LN2 + __logf(L) : -INFINITY;
        } else {
            const int64_t pi = (int64_t)split * batch * heads + bh;
            part_o[pi * D + d] = o;
            if (d == 0) {
                part_ml[pi * 2] = M == -INFINITY ? -INFINITY : M * LN2;
                part_ml[pi * 2 + 1] = L;
            }
        }
    }
}

}  // namespace decode

// Decode: one new query per sequence over a ragged KV cache (flash-decoding). Sequence b has
// kv_len[b] valid keys (<= cap; 0 gives out 0, lse -inf) and its query sees all of them. The
// key axis is cut into gridDim.x splits of `chunk` keys (splits * chunk >= max kv_len); a block
// takes one split of up to 8 q heads sharing one kv head, so each K/V row is read once per block.
// With one split the block writes out [batch, heads, D] and lse [batch, heads] directly (part_o,
// part_ml unused, may be NULL). With more, it writes float part_o[splits * batch * heads * D]
// (unnormalized) and part_ml[splits * batch * heads * 2] (max in natural-log units, sum), every
// entry written (empty splits too, so no zeroing), and attention_decode_combine finishes.
// grid (splits, kv_heads * ceil(group / 8), batch), block 128, no dynamic smem (static:
// 16 * DMAX * 8 + 256 bytes). Matches cpu::attention with tq = 1, tk = kv_len[b].
extern "C" __launch_bounds__(128, 4) __global__ void attention_decode_d64(bf16 *out, float *lse, float *part_o,
                                                                          float *part_ml, const bf16 *q,
                                                                          const bf16 *k, const bf16 *v,
                                                                          const int *kv_len, int cap, int heads,
                                                                          int kv_heads, int head_dim, int chunk) {
    decode::split_attention<64>(out, lse, part_o, part_ml, q, k, v, kv_len, cap, heads, kv_heads, head_dim, chunk);
}
extern "C" __launch_bounds__(128, 2) __global__ void attention_decode_d128(bf16 *out, float *lse, float *part_o,
                                                                           float *part_ml, const bf16 *q,
                                                                           const bf16 *k, const bf16 *v,
                                                                           const int *kv_len, int cap, int heads,
                                                                           int kv_heads, int head_dim, int chunk) {
    decode::split_attention<128>(out, lse, part_o, part_ml, q, k, v, kv_len, cap, heads, kv_heads, head_dim, chunk);
}
extern "C" __launch_bounds__(128, 2) __global__ void attention_decode_d256(bf16 *out, float *lse, float *part_o,
                                                                           float *part_ml, const bf16 *q,
                                                                           const bf16 *k, const bf16 *v,
                                                                           const int *kv_len, int cap, int heads,
                                                                           int kv_heads, int head_dim, int chunk) {
    decode::split_attention<256>(out, lse, part_o, part_ml, q, k, v, kv_len, cap, heads, kv_heads, head_dim, chunk);
}

// Merges attention_decode's splits: out = Σ_s e^(m_s − M) o_s / Σ_s e^(m_s − M) l_s, lse = M + ln L.
// grid (heads, batch), block 128, no smem. Matches cpu::attention with tq = 1.
extern "C" __global__ void attention_decode_combine(bf16 *out, float *lse, const float *part_o, const float *part_ml,
                                                    int splits, int heads, int head_dim) {
    const int h = blockIdx.x, b = blockIdx.y, batch = gridDim.y;
    const int64_t bh = (int64_t)b * heads + h, sstride = (int64_t)batch * heads;
    float M = -INFINITY, L = 0.0f;
    for (int s = 0; s < splits; s++) M = fmaxf(M, part_ml[(s * sstride + bh) * 2]);
    if (M != -INFINITY)
        for (int s = 0; s < splits; s++) L += part_ml[(s * sstride + bh) * 2 + 1] * __expf(part_ml[(s * sstride + bh) * 2] - M);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        if (M != -INFINITY)
            for (int s = 0; s < splits; s++) {
                const float ms = part_ml[(s * sstride + bh) * 2];
                if (ms != -INFINITY) acc += part_o[(s * sstride + bh) * head_dim + d] * __expf(ms - M);
            }
        out[bh * head_dim + d] = to_bf16(L > 0.0f ? acc / L : 0.0f);
    }
    if (threadIdx.x == 0) lse[bh] = L > 0.0f ? M + __logf(L) : -INFINITY;
}
