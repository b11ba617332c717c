// Rotary embedding, half-split (rotate_half) layout, in place; `inverse` rotates back, which is
// also the backward pass. CPU oracle: cpu::rope.
//
// The angle of pair i depends on (position, i) only, not on the head, so a thread computes the
// sines and cosines of 8 consecutive pairs once and applies them to ROPE_HG heads: one 16-byte
// load of x1 = p[i..i+8) and one of x2 = p[half+i..half+i+8) per head, all issued before the
// trigonometry. Unit index = ((row · groups + head group) · half/8 + pack), so a warp reads
// whole 128-byte runs of each head. Needs half % 8 == 0 (head_dim 16, 64, 128, …) and a 16-byte
// aligned x; otherwise one thread per (row, head, pair) as before. Both paths are grid-stride
// loops, so the result never depends on the grid the launcher picked.
//
// The launcher gives the packed path only the blocks that fit on the GPU at once, and each thread
// loads its next unit before it rotates the current one, so its 128 bytes of the next unit are in
// flight through the trigonometry and the stores (the residual add, which keeps its loads in
// flight the same way, reached 81% of copy bandwidth on the H100; one-shot threads leave the
// memory idle while they compute). The first unit's loads are issued before the block computes its
// frequency table, whose fp64 pow would otherwise delay every block's first request.
#include "common.cuh"

#define ROPE_HG 4

namespace rope_k {
// 1 / theta^(2i/d) as cpu::rope_inv_freq computes it in f32, every step rounded once: the build's
// --use_fast_math would make powf an ex2(y·lg2 x) whose relative error, times the position, moves
// an angle by up to 2e-4 rad at position 4K and 1.4e-3 rad at 32K. The block computes these once,
// into head_dim / 2 floats of dynamic shared memory, which the launcher gives.
__device__ __forceinline__ float inv_freq(int i, int head_dim, float theta) {
    const float e = __fdiv_rn((float)(2 * i), (float)head_dim);
    return __fdiv_rn(1.0f, (float)pow((double)theta, (double)e));
}

// sin and cos of the f32 angle a = pos · inv (the oracle's angle, up to the last bit of its f32
// powf, which glibc rounds correctly nearly always). The fast __sincosf is accurate near 0 only
// (it scales by 1/2π in f32, which at a = 32768 rad is off by ~2e-3 rad), so a is first reduced
// to [−π, π] with 2π split in two floats (each fma rounds once, on the small remainder): the
// reduced angle errs by under 1e-6 rad at any position below 2^20, and __sincosf adds ~4e-7 there.
__device__ __forceinline__ void sincos_of(float a, int inverse, float *s, float *c) {
    const float k = rintf(a * 0.159154943f);
    float r = fmaf(-k, 6.28318548f, a);
    r = fmaf(-k, -1.7484556e-7f, r);
    __sincosf(r, s, c);
    if (inverse) *s = -*s;
}

// The position of row `row` (of `seq` per sequence): its sequence's start plus its place in it.
__device__ __forceinline__ float position(int64_t row, int seq, int pos0, const uint32_t *starts) {
    const int64_t at = starts ? (int64_t)starts[row / seq] : pos0;
    return (float)(at + row % seq);
}

// The two 16-byte packs (x1 and x2 halves) of each of the up to ROPE_HG heads of unit idx.
struct Unit {
    uint4 lo[ROPE_HG], hi[ROPE_HG];
};
__device__ __forceinline__ bf16 *unit_ptr(bf16 *x, int64_t idx, int heads, int head_dim, int groups, int &nh,
                                          int64_t &row, int &v) {
    const int hv = head_dim / 16;
    v = idx % hv;
    const int64_t rg = idx / hv;  // row * groups + group
    const int g = rg % groups;
    row = rg / groups;
    nh = min(ROPE_HG, heads - g * ROPE_HG);
    return x + (row * heads + g * ROPE_HG) * head_dim + 8 * v;
}
__device__ __forceinline__ void load_unit(Unit &u, const bf16 *p, int nh, int head_dim) {
#pragma unroll
    for (int h = 0; h < ROPE_HG; h++)
        if (h < nh) {
            u.lo[h] = *reinterpret_cast<const uint4 *>(p + h * head_dim);
            u.hi[h] = *reinterpret_cast<const uint4 *>(p + h * head_dim + head_dim / 2);
        }
}
}  // namespace rope_k

// grid-stride; launcher: block 256, dynamic shared memory head_dim / 2 floats, grid
// min(⌈rows · ⌈heads/ROPE_HG⌉ · head_dim/16 / 256⌉, resident blocks) for the packed path,
// ⌈rows · heads · head_dim/2 / 256⌉ otherwise.
// Sequence b = row / seq starts at starts[b] (a ragged KV cache), or at pos0 where starts is null.
extern "C" __global__ void rope(bf16 *x, int64_t rows, int seq, int heads, int head_dim, int pos0,
                                const uint32_t *starts, float theta, int inverse) {
    const int half = head_dim / 2;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    extern __shared__ __align__(16) unsigned char rope_smem[];
    float *inv_s = reinterpret_cast<float *>(rope_smem);
    const bool packed = (half & 7) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
    wait_for_prior_grids();  // may be launched programmatically (common.cuh)
    let_next_grid_launch();
    const int groups = (heads + ROPE_HG - 1) / ROPE_HG;
    const int64_t units = packed ? rows * groups * (half / 8) : 0;
    rope_k::Unit cur;
    int nh = 0, v = 0;
    int64_t row = 0;
    bf16 *p = nullptr;
    if (first < units) {
        p = rope_k::unit_ptr(x, first, heads, head_dim, groups, nh, row, v);
        rope_k::load_unit(cur, p, nh, head_dim);
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) inv_s[i] = rope_k::inv_freq(i, head_dim, theta);
    __syncthreads();
    if (packed) {
        for (int64_t idx = first; idx < units; idx += stride) {
            rope_k::Unit next;
            int nh_n = 0, v_n = 0;
            int64_t row_n = 0;
            bf16 *p_n = nullptr;
            if (idx + stride < units) {
                p_n = rope_k::unit_ptr(x, idx + stride, heads, head_dim, groups, nh_n, row_n, v_n);
                rope_k::load_unit(next, p_n, nh_n, head_dim);
            }
            const float pos = rope_k::position(row, seq, pos0, starts);
            float s[8], c[8];
#pragma unroll
            for (int e = 0; e < 8; e++) rope_k::sincos_of(pos * inv_s[8 * v + e], inverse, &s[e], &c[e]);
#pragma unroll
            for (int h = 0; h < ROPE_HG; h++)
                if (h < nh) {
                    float x1[8], x2[8], y1[8], y2[8];
                    unpack8(cur.lo[h], x1);
                    unpack8(cur.hi[h], x2);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        y1[e] = x1[e] * c[e] - x2[e] * s[e];
                        y2[e] = x2[e] * c[e] + x1[e] * s[e];
                    }
                    *reinterpret_cast<uint4 *>(p + h * head_dim) = pack8(y1);
                    *reinterpret_cast<uint4 *>(p + h * head_dim + half) = pack8(y2);
                }
            cur = next;
            nh = nh_n;
            v = v_n;
            row = row_n;
            p = p_n;
        }
        return;
    }
    for (int64_t idx = first; idx < rows * heads * half; idx += stride) {
        const int i = idx % half;
        const int64_t rh = idx / half;  // row * heads + head
        const int64_t r = rh / heads;
        float s, c;
        rope_k::sincos_of(rope_k::position(r, seq, pos0, starts) * inv_s[i], inverse, &s, &c);
        bf16 *q = x + rh * head_dim;
        const float x1 = ld(q + i), x2 = ld(q + i + half);
        q[i] = to_bf16(x1 * c - x2 * s);
        q[i + half] = to_bf16(x2 * c + x1 * s);
    }
}
