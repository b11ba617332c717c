// RMSNorm forward and backward, one block per row. CPU oracles: cpu::rmsnorm, cpu::rmsnorm_bwd.
#include "common.cuh"

extern "C" __global__ void rmsnorm_fwd(bf16 *out, float *rstd, const bf16 *x, const bf16 *w, int dim,
                                       float eps) {
    const int64_t row = blockIdx.x;
    const bf16 *xr = x + row * dim;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = ld(xr + j);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / dim + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[row * dim + j] = to_bf16(ld(xr + j) * r * ld(w + j));
}

// dx += r * (g - x̂ * mean(g * x̂)) with g = dout * w; dw += dout * x̂ (fp32 atomics across rows).
extern "C" __global__ void rmsnorm_bwd(bf16 *dx, float *dw, const bf16 *dout, const bf16 *x, const bf16 *w,
                                       const float *rstd, int dim) {
    const int64_t row = blockIdx.x;
    const bf16 *xr = x + row * dim, *dr = dout + row * dim;
    const float r = rstd[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) dot += ld(dr + j) * ld(w + j) * ld(xr + j) * r;
    const float mean = block_sum(dot) / dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float xhat = ld(xr + j) * r, g = ld(dr + j);
        dx[row * dim + j] = to_bf16(ld(dx + row * dim + j) + r * (g * ld(w + j) - xhat * mean));
        atomicAdd(dw + j, g * xhat);
    }
}
