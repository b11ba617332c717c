// Elementwise ops: residual add, axpy, dtype conversion, bias broadcast and its column sum,
// SwiGLU, embedding gather/scatter, sum of squares and a per-tensor AdamW. CPU oracles: the
// functions of the same names in src/backend/cpu.rs (Backend::add/axpy/copy for the first ones).
//
// Storage: activations and weights are bf16, gradients of parameters and optimizer moments are
// f32 (see src/backend/cuda.rs); kernels whose operands may be either are templates with one
// extern "C" instance per (output, input) dtype pair, named op_<out>_<in>.
#include "common.cuh"

// Grid-stride loops keep the launch geometry independent of n: grid = min(ceil(n/256), 4·SMs).
#define EW_LOOP(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                           i += (int64_t)gridDim.x * blockDim.x)

namespace ew {
template <typename Y, typename X> __device__ void add(Y *y, const X *x, int64_t n) {
    EW_LOOP(i, n) st(y + i, ld(y + i) + ld(x + i));
}
template <typename Y, typename X> __device__ void axpy(Y *y, float a, const X *x, int64_t n) {
    EW_LOOP(i, n) st(y + i, ld(y + i) + a * ld(x + i));
}
template <typename Y, typename X> __device__ void convert(Y *y, const X *x, int64_t n) {
    EW_LOOP(i, n) st(y + i, ld(x + i));
}
}  // namespace ew

// grid: grid-stride, block 256, no shared memory (all of the add/axpy/convert family).
extern "C" __global__ void add_bf16_bf16(bf16 *y, const bf16 *x, int64_t n) { ew::add(y, x, n); }
extern "C" __global__ void add_f32_f32(float *y, const float *x, int64_t n) { ew::add(y, x, n); }
extern "C" __global__ void add_f32_bf16(float *y, const bf16 *x, int64_t n) { ew::add(y, x, n); }
extern "C" __global__ void axpy_bf16_bf16(bf16 *y, float a, const bf16 *x, int64_t n) { ew::axpy(y, a, x, n); }
extern "C" __global__ void axpy_bf16_f32(bf16 *y, float a, const float *x, int64_t n) { ew::axpy(y, a, x, n); }
extern "C" __global__ void axpy_f32_f32(float *y, float a, const float *x, int64_t n) { ew::axpy(y, a, x, n); }
extern "C" __global__ void axpy_f32_bf16(float *y, float a, const bf16 *x, int64_t n) { ew::axpy(y, a, x, n); }
extern "C" __global__ void convert_bf16_f32(bf16 *y, const float *x, int64_t n) { ew::convert(y, x, n); }
extern "C" __global__ void convert_f32_bf16(float *y, const bf16 *x, int64_t n) { ew::convert(y, x, n); }

// out[r, j] = bias[j]: the GEMM then accumulates onto it (beta = 1), saving a pass over out.
// grid-stride, block 256.
extern "C" __global__ void bias_broadcast(bf16 *out, const bf16 *bias, int64_t rows, int n) {
    EW_LOOP(i, rows * n) out[i] = bias[i % n];
}

// dbias[j] += Σ_r dout[r, j]. grid (ceil(n/32), 1), block (32, 8): each block owns 32 columns,
// its 8 row-groups stride over the rows, then fold through shared memory (coalesced reads).
extern "C" __global__ void bias_bwd(float *dbias, const bf16 *dout, int64_t rows, int n) {
    __shared__ float part[8][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (j < n)
        for (int64_t r = threadIdx.y; r < rows; r += 8) acc += ld(dout + r * n + j);
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        for (int k = 1; k < 8; k++) acc += part[k][threadIdx.x];
        dbias[j] += acc;
    }
}

// out = silu(gate) * up. grid-stride, block 256.
extern "C" __global__ void swiglu_fwd(bf16 *out, const bf16 *gate, const bf16 *up, int64_t n) {
    EW_LOOP(i, n) {
        const float g = ld(gate + i), s = 1.0f / (1.0f + __expf(-g));
        out[i] = to_bf16(g * s * ld(up + i));
    }
}

// dgate = dout * up * silu'(gate), dup = dout * silu(gate). grid-stride, block 256.
extern "C" __global__ void swiglu_bwd(bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate,
                                      const bf16 *up, int64_t n) {
    EW_LOOP(i, n) {
        const float g = ld(gate + i), d = ld(dout + i), s = 1.0f / (1.0f + __expf(-g));
        dup[i] = to_bf16(d * g * s);
        dgate[i] = to_bf16(d * ld(up + i) * s * (1.0f + g * (1.0f - s)));
    }
}

// out[t] = table[ids[t]]. grid (rows), block 256.
extern "C" __global__ void embedding_fwd(bf16 *out, const bf16 *table, const uint32_t *ids, int dim) {
    const int64_t row = blockIdx.x;
    const bf16 *src = table + (int64_t)ids[row] * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[row * dim + j] = src[j];
}

// dtable[ids[t]] += dout[t] in fp32; atomics because an id may repeat within a batch.
// grid (rows), block 256.
extern "C" __global__ void embedding_bwd(float *dtable, const bf16 *dout, const uint32_t *ids, int dim) {
    const int64_t row = blockIdx.x;
    float *dst = dtable + (int64_t)ids[row] * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) atomicAdd(dst + j, ld(dout + row * dim + j));
}

// *acc += Σ x² (double, zeroed by the caller): per-thread fp32 partials over a strided slice
// are small sums, the cross-block total is where fp32 would lose digits. grid-stride, block 256.
namespace ew {
template <typename X> __device__ void sum_squares(double *acc, const X *x, int64_t n) {
    float s = 0.0f;
    EW_LOOP(i, n) {
        const float v = ld(x + i);
        s += v * v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(acc, (double)s);
}
}  // namespace ew
extern "C" __global__ void sum_squares_f32(double *acc, const float *x, int64_t n) { ew::sum_squares(acc, x, n); }
extern "C" __global__ void sum_squares_bf16(double *acc, const bf16 *x, int64_t n) { ew::sum_squares(acc, x, n); }

// One tensor's AdamW (PyTorch semantics, the same arithmetic as cpu::adamw): decay, then the
// bias-corrected moment step, with step_size = lr / (1 − β1^t) and bc2_sqrt = sqrt(1 − β2^t)
// from the host. The grad is scaled first (global-norm clipping). grid-stride, block 256.
namespace ew {
template <typename P>
__device__ void adamw(P *p, const float *g, float *m, float *v, int64_t n, float decay, float b1, float b2,
                      float eps, float step_size, float bc2_sqrt, float gscale) {
    EW_LOOP(i, n) {
        const float gi = g[i] * gscale;
        float w = ld(p + i) * decay;
        const float mi = b1 * m[i] + (1.0f - b1) * gi, vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        st(p + i, w);
    }
}
}  // namespace ew
extern "C" __global__ void adamw_bf16(bf16 *p, const float *g, float *m, float *v, int64_t n, float decay,
                                      float b1, float b2, float eps, float step_size, float bc2_sqrt, float gscale) {
    ew::adamw(p, g, m, v, n, decay, b1, b2, eps, step_size, bc2_sqrt, gscale);
}
extern "C" __global__ void adamw_f32(float *p, const float *g, float *m, float *v, int64_t n, float decay,
                                     float b1, float b2, float eps, float step_size, float bc2_sqrt, float gscale) {
    ew::adamw(p, g, m, v, n, decay, b1, b2, eps, step_size, bc2_sqrt, gscale);
}
