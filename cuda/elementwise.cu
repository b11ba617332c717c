// Residual add, SwiGLU and embedding gather/scatter. CPU oracles: cpu::swiglu, cpu::swiglu_bwd,
// cpu::embedding, cpu::embedding_bwd and Backend::add in src/backend/cpu.rs.
#include "common.cuh"

// y += x
extern "C" __global__ void add_bf16(bf16 *y, const bf16 *x, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = to_bf16(ld(y + i) + ld(x + i));
}

// out = silu(gate) * up
extern "C" __global__ void swiglu_fwd(bf16 *out, const bf16 *gate, const bf16 *up, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = ld(gate + i), s = 1.0f / (1.0f + __expf(-g));
    out[i] = to_bf16(g * s * ld(up + i));
}

// dgate = dout * up * silu'(gate), dup = dout * silu(gate)
extern "C" __global__ void swiglu_bwd(bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate,
                                      const bf16 *up, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = ld(gate + i), d = ld(dout + i), s = 1.0f / (1.0f + __expf(-g));
    dup[i] = to_bf16(d * g * s);
    dgate[i] = to_bf16(d * ld(up + i) * s * (1.0f + g * (1.0f - s)));
}

// out[t] = table[ids[t]]; one block per row.
extern "C" __global__ void embedding_fwd(bf16 *out, const bf16 *table, const uint32_t *ids, int dim) {
    const int64_t row = blockIdx.x;
    const bf16 *src = table + (int64_t)ids[row] * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[row * dim + j] = src[j];
}

// dtable[ids[t]] += dout[t] in fp32; atomics because an id may repeat within a batch.
extern "C" __global__ void embedding_bwd(float *dtable, const bf16 *dout, const uint32_t *ids, int dim) {
    const int64_t row = blockIdx.x;
    float *dst = dtable + (int64_t)ids[row] * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) atomicAdd(dst + j, ld(dout + row * dim + j));
}
