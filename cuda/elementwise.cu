// Elementwise ops: residual add, axpy, dtype conversion, bias broadcast and its column sum,
// SwiGLU, embedding gather/scatter, sum of squares and a per-tensor AdamW. CPU oracles: the
// functions of the same names in src/backend/cpu.rs (Backend::add/axpy/copy for the first ones).
//
// Storage: activations and weights are bf16, gradients of parameters and optimizer moments are
// f32 (see src/backend/cuda.rs); kernels whose operands may be either are templates with one
// extern "C" instance per (output, input) dtype pair, named op_<out>_<in>.
#include "common.cuh"

// Grid-stride loops keep the launch geometry independent of n: grid = min(ceil(n/256), 8·SMs).
#define EW_LOOP(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                           i += (int64_t)gridDim.x * blockDim.x)

// The memory-bound ops (add, axpy, convert, SwiGLU, embedding) move 16-byte packs of 8 values:
// with 2-byte loads the residual add reached 49% of the H100's copy bandwidth. Each thread loads
// EW_U packs of every operand before it stores any, so EW_U 16-byte requests per operand are in
// flight per thread; the compiler would not hoist the next load above a store by itself (as far
// as it knows, y may alias x). Packs need 16-byte aligned pointers (buffers are, but copy_range
// hands in offsets): anything else, and the n % 8 tail, takes the scalar loop. Both loops wait for
// the previous grid first, so the host may launch them with programmatic stream serialization
// (common.cuh); the embedding gather does not, as the copy of its ids comes right before it.
namespace ew {
constexpr int EW_U = 2;

__device__ __forceinline__ int64_t first() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t stride() { return (int64_t)gridDim.x * blockDim.x; }

template <typename... T> __device__ __forceinline__ bool aligned16(const T *...p) {
    return ((reinterpret_cast<uintptr_t>(p) | ...) & 15) == 0;
}

// 8 consecutive values widened to fp32: one 16-byte access for bf16, two for f32.
struct Pack {
    float v[8];
};
__device__ __forceinline__ Pack unpack(uint4 raw) {
    Pack r;
    unpack8(raw, r.v);
    return r;
}
__device__ __forceinline__ uint4 pack_bf16(const Pack &x) { return pack8(x.v); }
__device__ __forceinline__ Pack load8(const bf16 *p) { return unpack(*reinterpret_cast<const uint4 *>(p)); }
__device__ __forceinline__ Pack load8(const float *p) {
    const float4 a = reinterpret_cast<const float4 *>(p)[0], b = reinterpret_cast<const float4 *>(p)[1];
    return {{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w}};
}
__device__ __forceinline__ void store8(bf16 *p, const Pack &x) { *reinterpret_cast<uint4 *>(p) = pack_bf16(x); }
__device__ __forceinline__ void store8(float *p, const Pack &x) {
    reinterpret_cast<float4 *>(p)[0] = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
    reinterpret_cast<float4 *>(p)[1] = make_float4(x.v[4], x.v[5], x.v[6], x.v[7]);
}

// y[i] = f(y[i], x[i]) for i < n (f(0, x[i]) when !ReadY: y is only written).
template <bool ReadY, typename Y, typename X, typename F> __device__ void update(Y *y, const X *x, int64_t n, F f) {
    wait_for_prior_grids();
    let_next_grid_launch();
    int64_t done = 0;
    if (aligned16(y, x)) {
        const int64_t nv = n / 8, s = stride();
        for (int64_t v = first(); v < nv; v += EW_U * s) {
            Pack a[EW_U], b[EW_U];
#pragma unroll
            for (int k = 0; k < EW_U; k++)
                if (v + k * s < nv) {
                    b[k] = load8(x + 8 * (v + k * s));
                    if (ReadY) a[k] = load8(y + 8 * (v + k * s));
                }
#pragma unroll
            for (int k = 0; k < EW_U; k++)
                if (v + k * s < nv) {
#pragma unroll
                    for (int e = 0; e < 8; e++) a[k].v[e] = f(ReadY ? a[k].v[e] : 0.0f, b[k].v[e]);
                    store8(y + 8 * (v + k * s), a[k]);
                }
        }
        done = nv * 8;
    }
    for (int64_t i = done + first(); i < n; i += stride()) st(y + i, f(ReadY ? ld(y + i) : 0.0f, ld(x + i)));
}

// out[o][i] = f(in[0][i], …)[o] over bf16 operands: NI inputs, NO outputs, n values each.
template <int NO, int NI, typename F>
__device__ void map_bf16(bf16 *const (&out)[NO], const bf16 *const (&in)[NI], int64_t n, F f) {
    wait_for_prior_grids();
    let_next_grid_launch();
    bool vec = true;
    for (int o = 0; o < NO; o++) vec &= aligned16(out[o]);
    for (int j = 0; j < NI; j++) vec &= aligned16(in[j]);
    int64_t done = 0;
    if (vec) {
        const int64_t nv = n / 8, s = stride();
        for (int64_t v = first(); v < nv; v += EW_U * s) {
            uint4 raw[EW_U][NI];
#pragma unroll
            for (int k = 0; k < EW_U; k++)
                if (v + k * s < nv)
#pragma unroll
                    for (int j = 0; j < NI; j++) raw[k][j] = reinterpret_cast<const uint4 *>(in[j])[v + k * s];
#pragma unroll
            for (int k = 0; k < EW_U; k++)
                if (v + k * s < nv) {
                    Pack x[NI], y[NO];
#pragma unroll
                    for (int j = 0; j < NI; j++) x[j] = unpack(raw[k][j]);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        float xi[NI], yo[NO];
#pragma unroll
                        for (int j = 0; j < NI; j++) xi[j] = x[j].v[e];
                        f(yo, xi);
#pragma unroll
                        for (int o = 0; o < NO; o++) y[o].v[e] = yo[o];
                    }
#pragma unroll
                    for (int o = 0; o < NO; o++) reinterpret_cast<uint4 *>(out[o])[v + k * s] = pack_bf16(y[o]);
                }
        }
        done = nv * 8;
    }
    for (int64_t i = done + first(); i < n; i += stride()) {
        float xi[NI], yo[NO];
        for (int j = 0; j < NI; j++) xi[j] = ld(in[j] + i);
        f(yo, xi);
        for (int o = 0; o < NO; o++) out[o][i] = to_bf16(yo[o]);
    }
}

template <typename Y, typename X> __device__ void add(Y *y, const X *x, int64_t n) {
    update<true>(y, x, n, [](float a, float b) { return a + b; });
}
template <typename Y, typename X> __device__ void axpy(Y *y, float a, const X *x, int64_t n) {
    update<true>(y, x, n, [a](float yi, float xi) { return yi + a * xi; });
}
template <typename Y, typename X> __device__ void convert(Y *y, const X *x, int64_t n) {
    update<false>(y, x, n, [](float, float xi) { return xi; });
}
}  // namespace ew

// grid: grid-stride over packs of 8, block 256, no shared memory (the add/axpy/convert family):
// min(⌈n / (8·EW_U·256)⌉, blocks resident on the GPU), see launch_ew_vec in src/backend/cuda.rs.
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

// out = silu(gate) * up. Grid-stride over packs of 8, geometry as add.
extern "C" __global__ void swiglu_fwd(bf16 *out, const bf16 *gate, const bf16 *up, int64_t n) {
    bf16 *const outs[1] = {out};
    const bf16 *const ins[2] = {gate, up};
    ew::map_bf16(outs, ins, n, [](float (&o)[1], const float (&x)[2]) {
        const float g = x[0], s = 1.0f / (1.0f + __expf(-g));
        o[0] = g * s * x[1];
    });
}

// dgate = dout * up * silu'(gate), dup = dout * silu(gate). Grid-stride over packs of 8, as add.
extern "C" __global__ void swiglu_bwd(bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate,
                                      const bf16 *up, int64_t n) {
    bf16 *const outs[2] = {dgate, dup};
    const bf16 *const ins[3] = {dout, gate, up};
    ew::map_bf16(outs, ins, n, [](float (&o)[2], const float (&x)[3]) {
        const float d = x[0], g = x[1], s = 1.0f / (1.0f + __expf(-g));
        o[1] = d * g * s;
        o[0] = d * x[2] * s * (1.0f + g * (1.0f - s));
    });
}

// out[t] = table[ids[t]]. block min(256, ⌈dim/16⌉ rounded up to a warp), so that rows of
// dim % 8 == 0 with aligned buffers are EW_U 16-byte packs per thread; grid min(rows, resident
// blocks), block b copying rows b, b + gridDim.x, … A block per row stopped at 73% of copy
// bandwidth on the H100: each block waited for its id, then for its row, then stored, and only
// then made room for the next block. Here a thread holds the next row's packs (and the id after
// that) in flight while it stores the current ones.
extern "C" __global__ void embedding_fwd(bf16 *out, const bf16 *table, const uint32_t *ids, int rows, int dim) {
    const int b = blockDim.x, t = threadIdx.x, step = gridDim.x;
    if ((dim & 7) == 0 && ew::aligned16(table, out) && dim / 8 <= ew::EW_U * b) {
        const int nv = dim / 8;
        uint4 cur[ew::EW_U], next[ew::EW_U];
        int row = blockIdx.x;
        uint32_t id_next = row + step < rows ? ids[row + step] : 0;
        if (row < rows) {
            const uint4 *src = reinterpret_cast<const uint4 *>(table + (int64_t)ids[row] * dim);
#pragma unroll
            for (int k = 0; k < ew::EW_U; k++)
                if (t + k * b < nv) cur[k] = src[t + k * b];
        }
        for (; row < rows; row += step) {
            if (row + step < rows) {
                const uint4 *src = reinterpret_cast<const uint4 *>(table + (int64_t)id_next * dim);
                id_next = row + 2 * step < rows ? ids[row + 2 * step] : 0;
#pragma unroll
                for (int k = 0; k < ew::EW_U; k++)
                    if (t + k * b < nv) next[k] = src[t + k * b];
            }
            uint4 *dst = reinterpret_cast<uint4 *>(out + (int64_t)row * dim);
#pragma unroll
            for (int k = 0; k < ew::EW_U; k++) {
                if (t + k * b < nv) dst[t + k * b] = cur[k];
                cur[k] = next[k];
            }
        }
        return;
    }
    for (int row = blockIdx.x; row < rows; row += step) {
        const bf16 *src = table + (int64_t)ids[row] * dim;
        bf16 *dst = out + (int64_t)row * dim;
        for (int j = t; j < dim; j += b) dst[j] = src[j];
    }
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
