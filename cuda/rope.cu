// Rotary embedding, half-split (rotate_half) layout, in place; `inverse` rotates back, which is
// also the backward pass. CPU oracle: cpu::rope.
//
// The angle of pair i depends on (position, i) only, not on the head, so a thread computes the
// sines and cosines of 8 consecutive pairs once and applies them to ROPE_HG heads: one 16-byte
// load of x1 = p[i..i+8) and one of x2 = p[half+i..half+i+8) per head, all issued before the
// trigonometry. Thread index = ((row · groups + head group) · half/8 + pack), so a warp reads
// whole 128-byte runs of each head. Needs half % 8 == 0 (head_dim 16, 64, 128, …) and a 16-byte
// aligned x; otherwise one thread per (row, head, pair) as before. Both paths are grid-stride
// loops, so the result never depends on the grid the launcher picked.
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
}  // namespace rope_k

// grid-stride; launcher: block 256, dynamic shared memory head_dim / 2 floats, grid
// ⌈rows · ⌈heads/ROPE_HG⌉ · head_dim/16 / 256⌉ for the packed path, ⌈rows · heads · head_dim/2 /
// 256⌉ otherwise.
extern "C" __global__ void rope(bf16 *x, int64_t rows, int seq, int heads, int head_dim, int pos0, float theta,
                                int inverse) {
    const int half = head_dim / 2;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    extern __shared__ __align__(16) unsigned char rope_smem[];
    float *inv_s = reinterpret_cast<float *>(rope_smem);
    for (int i = threadIdx.x; i < half; i += blockDim.x) inv_s[i] = rope_k::inv_freq(i, head_dim, theta);
    __syncthreads();
    if ((half & 7) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {
        const int hv = half / 8, groups = (heads + ROPE_HG - 1) / ROPE_HG;
        for (int64_t idx = first; idx < rows * groups * hv; idx += stride) {
            const int v = idx % hv;
            const int64_t rg = idx / hv;  // row * groups + group
            const int g = rg % groups;
            const int64_t row = rg / groups;
            const int nh = min(ROPE_HG, heads - g * ROPE_HG);
            bf16 *p = x + (row * heads + g * ROPE_HG) * head_dim + 8 * v;
            uint4 lo[ROPE_HG], hi[ROPE_HG];
#pragma unroll
            for (int h = 0; h < ROPE_HG; h++)
                if (h < nh) {
                    lo[h] = *reinterpret_cast<const uint4 *>(p + h * head_dim);
                    hi[h] = *reinterpret_cast<const uint4 *>(p + h * head_dim + half);
                }
            const float pos = (float)(pos0 + row % seq);
            float s[8], c[8];
#pragma unroll
            for (int e = 0; e < 8; e++) rope_k::sincos_of(pos * inv_s[8 * v + e], inverse, &s[e], &c[e]);
#pragma unroll
            for (int h = 0; h < ROPE_HG; h++)
                if (h < nh) {
                    float x1[8], x2[8], y1[8], y2[8];
                    unpack8(lo[h], x1);
                    unpack8(hi[h], x2);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        y1[e] = x1[e] * c[e] - x2[e] * s[e];
                        y2[e] = x2[e] * c[e] + x1[e] * s[e];
                    }
                    *reinterpret_cast<uint4 *>(p + h * head_dim) = pack8(y1);
                    *reinterpret_cast<uint4 *>(p + h * head_dim + half) = pack8(y2);
                }
        }
        return;
    }
    for (int64_t idx = first; idx < rows * heads * half; idx += stride) {
        const int i = idx % half;
        const int64_t rh = idx / half;  // row * heads + head
        const int64_t row = rh / heads;
        float s, c;
        rope_k::sincos_of((float)(pos0 + row % seq) * inv_s[i], inverse, &s, &c);
        bf16 *p = x + rh * head_dim;
        const float x1 = ld(p + i), x2 = ld(p + i + half);
        p[i] = to_bf16(x1 * c - x2 * s);
        p[i + half] = to_bf16(x2 * c + x1 * s);
    }
}
