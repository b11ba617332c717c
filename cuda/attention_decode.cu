// Decode attention: one new query per sequence over a ragged KV cache (flash-decoding), split
// over the key axis, and the pass that merges the splits. The KV-cache write is in attention.cu.
// CPU oracle: cpu::attention with tq = 1 (src/backend/cpu.rs).
//
// Layouts: q, out [batch, heads, D]; k, v [batch, cap, kv_heads, D]; lse [batch, heads] float.
// Every pointer must be 16-byte aligned; D is a multiple of 8, at most 256.
#include "common.cuh"

namespace decode {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr int PAIRS = 4;  // lane-owned dims of a D <= 256 row: pairs 2*lane + 64*r, r < 4
constexpr int DEC_G = 8;  // q heads per decode block (a larger GQA group takes several blocks)

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ void ld8(const bf16 *p, float f[8]) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 x = __bfloat1622float2(h[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
}

}  // namespace decode

// Decode: one new query per sequence over a ragged KV cache (flash-decoding). Sequence b has
// kv_len[b] valid keys (<= cap) and its query sees all of them. The key axis is cut into
// gridDim.x splits of `chunk` keys (splits * chunk >= max kv_len); a block takes one split of up
// to 8 q heads sharing one kv head, so each K/V row is read once per block. Lanes score one key
// each, then each lane accumulates dim pairs of P V; the 4 warps merge through shared memory.
// With one split the block writes out [batch, heads, D] and lse [batch, heads] directly (part_o,
// part_ml unused, may be NULL). With more, it writes float part_o[splits * batch * heads * D]
// (unnormalized) and part_ml[splits * batch * heads * 2] (max in natural-log units, sum), every
// entry written (empty splits too, so no zeroing), and attention_decode_combine finishes.
// grid (splits, kv_heads * ceil(group / 8), batch), block 128, no dynamic smem (~12.4 KB static).
// Matches cpu::attention with tq = 1, tk = kv_len[b].
extern "C" __global__ void attention_decode(bf16 *out, float *lse, float *part_o, float *part_ml, const bf16 *q,
                                            const bf16 *k, const bf16 *v, const int *kv_len, int cap, int heads,
                                            int kv_heads, int head_dim, int chunk) {
    using namespace decode;
    __shared__ __align__(16) float qs[DEC_G * 256];  // the scaled queries, later the merged output
    __shared__ float ps[4][DEC_G][32], mls[4][DEC_G][2], fin[DEC_G][2];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, D = head_dim;
    const int group = heads / kv_heads, hchunks = (group + DEC_G - 1) / DEC_G;
    const int kvh = blockIdx.y / hchunks, hc = blockIdx.y % hchunks;
    const int h0 = kvh * group + hc * DEC_G, ng = min(DEC_G, group - hc * DEC_G);
    const int b = blockIdx.z, batch = gridDim.z, split = blockIdx.x, splits = gridDim.x;
    const int start = split * chunk, end = min(start + chunk, kv_len[b]);
    const float sl2 = rsqrtf((float)D) * LOG2E;
    const int64_t kvstride = (int64_t)kv_heads * D, qoff = ((int64_t)b * heads + h0) * D;
    const bf16 *kh = k + (int64_t)b * cap * kvstride + kvh * D, *vh = v + (int64_t)b * cap * kvstride + kvh * D;
    for (int idx = threadIdx.x; idx < ng * D; idx += blockDim.x) qs[idx] = ld(q + qoff + idx) * sl2;
    __syncthreads();

    // m, l in log2 units of the scaled scores; l per lane until the end
    float m[DEC_G], l[DEC_G], acc[DEC_G][PAIRS][2];
#pragma unroll
    for (int gi = 0; gi < DEC_G; gi++) {
        m[gi] = -INFINITY;
        l[gi] = 0.0f;
#pragma unroll
        for (int r = 0; r < PAIRS; r++) acc[gi][r][0] = acc[gi][r][1] = 0.0f;
    }
    for (int j0 = start + warp * 32; j0 < end; j0 += 128) {
        const int j = j0 + lane;
        const bool ok = j < end;
        float s[DEC_G] = {};
        if (ok) {
            const bf16 *kr = kh + j * kvstride;
            for (int d = 0; d < D; d += 8) {
                float f[8];
                ld8(kr + d, f);
#pragma unroll
                for (int gi = 0; gi < DEC_G; gi++) {
                    if (gi >= ng) break;
                    const float4 a0 = *reinterpret_cast<const float4 *>(qs + gi * D + d);
                    const float4 a1 = *reinterpret_cast<const float4 *>(qs + gi * D + d + 4);
                    s[gi] += a0.x * f[0] + a0.y * f[1] + a0.z * f[2] + a0.w * f[3] + a1.x * f[4] + a1.y * f[5] +
                             a1.z * f[6] + a1.w * f[7];
                }
            }
        }
#pragma unroll
        for (int gi = 0; gi < DEC_G; gi++) {
            if (gi >= ng) break;
            const float si = ok ? s[gi] : -INFINITY;
            const float mn = fmaxf(m[gi], warp_max(si));  // finite: lane 0's key is always valid
            const float corr = exp2f(m[gi] - mn), p = exp2f(si - mn);
            l[gi] = l[gi] * corr + p;
            m[gi] = mn;
            ps[warp][gi][lane] = p;
#pragma unroll
            for (int r = 0; r < PAIRS; r++) acc[gi][r][0] *= corr, acc[gi][r][1] *= corr;
        }
        __syncwarp();
        const int nj = min(32, end - j0);
        for (int jj = 0; jj < nj; jj++) {
            const bf16 *vr = vh + (j0 + jj) * kvstride;
#pragma unroll
            for (int r = 0; r < PAIRS; r++) {
                const int d = 2 * lane + 64 * r;
                if (d >= D) break;
                const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(vr + d));
#pragma unroll
                for (int gi = 0; gi < DEC_G; gi++) {
                    if (gi >= ng) break;
                    const float p = ps[warp][gi][jj];
                    acc[gi][r][0] = fmaf(p, x.x, acc[gi][r][0]);
                    acc[gi][r][1] = fmaf(p, x.y, acc[gi][r][1]);
                }
            }
        }
        __syncwarp();  // ps is rewritten by the next round
    }

    // Merge the 4 warps: block max M, sum L, and the output rescaled to M, summed in qs.
#pragma unroll
    for (int gi = 0; gi < DEC_G; gi++) {
        if (gi >= ng) break;
        const float lw = warp_sum(l[gi]);
        if (lane == 0) mls[warp][gi][0] = m[gi], mls[warp][gi][1] = lw;
    }
    __syncthreads();  // also: every warp is done reading qs
    if (threadIdx.x < ng) {
        const int gi = threadIdx.x;
        float M = -INFINITY, L = 0.0f;
        for (int w = 0; w < 4; w++) M = fmaxf(M, mls[w][gi][0]);
        if (M != -INFINITY)
            for (int w = 0; w < 4; w++) L += mls[w][gi][1] * exp2f(mls[w][gi][0] - M);
        fin[gi][0] = M, fin[gi][1] = L;
    }
    for (int idx = threadIdx.x; idx < ng * D; idx += blockDim.x) qs[idx] = 0.0f;
    __syncthreads();
#pragma unroll
    for (int gi = 0; gi < DEC_G; gi++) {
        if (gi >= ng) break;
        const float M = fin[gi][0];
        if (M == -INFINITY || m[gi] == -INFINITY) continue;  // this warp saw no key
        const float f = exp2f(m[gi] - M);
#pragma unroll
        for (int r = 0; r < PAIRS; r++) {
            const int d = 2 * lane + 64 * r;
            if (d >= D) break;
            atomicAdd(&qs[gi * D + d], acc[gi][r][0] * f);
            atomicAdd(&qs[gi * D + d + 1], acc[gi][r][1] * f);
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < ng * D; idx += blockDim.x) {
        const int gi = idx / D, d = idx % D;
        const float M = fin[gi][0], L = fin[gi][1];
        const int64_t bh = (int64_t)b * heads + h0 + gi;
        if (splits == 1) {
            out[bh * D + d] = to_bf16(L > 0.0f ? qs[idx] / L : 0.0f);
            if (d == 0) lse[bh] = L > 0.0f ? M * LN2 + __logf(L) : -INFINITY;
        } else {
            const int64_t pi = (int64_t)split * batch * heads + bh;
            part_o[pi * D + d] = qs[idx];
            if (d == 0) {
                part_ml[pi * 2] = M == -INFINITY ? -INFINITY : M * LN2;
                part_ml[pi * 2 + 1] = L;
            }
        }
    }
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
