// Rotary embedding, half-split (rotate_half) layout, in place; `inverse` rotates back, which is
// also the backward pass. CPU oracle: cpu::rope. One thread per (row, head, pair).
#include "common.cuh"

extern "C" __global__ void rope(bf16 *x, int64_t rows, int seq, int heads, int head_dim, int pos0, float theta,
                                int inverse) {
    const int half = head_dim / 2;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * heads * half) return;
    const int i = idx % half;
    const int64_t rh = idx / half;  // row * heads + head
    const int64_t row = rh / heads;
    const float pos = (float)(pos0 + row % seq);
    // Same f32 formula as transformers and the CPU oracle: theta^(-2i/d).
    const float inv = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
    float s, c;
    sincosf(pos * inv, &s, &c);
    if (inverse) s = -s;
    bf16 *p = x + rh * head_dim;
    const float x1 = ld(p + i), x2 = ld(p + i + half);
    p[i] = to_bf16(x1 * c - x2 * s);
    p[i + half] = to_bf16(x2 * c + x1 * s);
}
