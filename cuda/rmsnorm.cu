// RMSNorm forward and backward. CPU oracles: cpu::rmsnorm, cpu::rmsnorm_bwd.
//
// A row (dim = 3584 for Qwen2.5-7B: 7 KB of bf16) is read from HBM once and kept in registers
// between the reduction and the output pass: each thread holds up to RMS_VPT 16-byte packs of it
// (pack q of the row belongs to thread q % blockDim, in order, so every load is coalesced), and
// the launcher sizes the block to ⌈dim / (8·RMS_VPT)⌉ threads rounded up to a warp. Rows with
// dim % 8 ≠ 0, unaligned buffers or too few threads for the row take the scalar path, which
// reads the row twice.
#include "common.cuh"

#define RMS_VPT 2

namespace rms {
template <typename... T> __device__ __forceinline__ bool aligned16(const T *...p) {
    return ((reinterpret_cast<uintptr_t>(p) | ...) & 15) == 0;
}

// The pack path's precondition, the same in every thread of the block.
__device__ __forceinline__ bool packed_rows(int dim, const void *a, const void *b, const void *c,
                                            const void *d = nullptr) {
    return (dim & 7) == 0 && dim / 8 <= RMS_VPT * (int)blockDim.x && aligned16(a, b, c, d);
}

// dw[j..j+8) += a: one 16-byte vector atomic per half on sm_90 (the f32 dw is aligned when its
// base is, since j is a multiple of 8), eight scalar ones elsewhere.
__device__ __forceinline__ void add8(float *p, const float (&a)[8]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (aligned16(p)) {
        atomicAdd(reinterpret_cast<float4 *>(p), make_float4(a[0], a[1], a[2], a[3]));
        atomicAdd(reinterpret_cast<float4 *>(p + 4), make_float4(a[4], a[5], a[6], a[7]));
        return;
    }
#endif
    for (int e = 0; e < 8; e++) atomicAdd(p + e, a[e]);
}

// The packs of a row of dout, x and dx that this thread owns on the pack path.
__device__ __forceinline__ void load_row(uint4 (&dv)[RMS_VPT], uint4 (&xv)[RMS_VPT], uint4 (&gv)[RMS_VPT],
                                         const bf16 *dout, const bf16 *x, const bf16 *dx, int64_t row, int dim) {
    const uint4 *dp = reinterpret_cast<const uint4 *>(dout + row * dim);
    const uint4 *xp = reinterpret_cast<const uint4 *>(x + row * dim);
    const uint4 *gp = reinterpret_cast<const uint4 *>(dx + row * dim);
    const int nv = dim / 8, b = blockDim.x, t = threadIdx.x;
#pragma unroll
    for (int k = 0; k < RMS_VPT; k++)
        if (t + k * b < nv) {
            dv[k] = dp[t + k * b];
            xv[k] = xp[t + k * b];
            gv[k] = gp[t + k * b];
        }
}
}  // namespace rms

// out = x · rstd · w, rstd[row] = 1/sqrt(mean(x²) + eps). grid (rows), block as above.
extern "C" __global__ void rmsnorm_fwd(bf16 *out, float *rstd, const bf16 *x, const bf16 *w, int dim,
                                       float eps) {
    wait_for_prior_grids();  // both kernels here may be launched programmatically (common.cuh)
    let_next_grid_launch();
    const int64_t row = blockIdx.x;
    const bf16 *xr = x + row * dim;
    if (rms::packed_rows(dim, out, x, w)) {
        const int nv = dim / 8, b = blockDim.x, t = threadIdx.x;
        const uint4 *xp = reinterpret_cast<const uint4 *>(xr), *wp = reinterpret_cast<const uint4 *>(w);
        uint4 xv[RMS_VPT], wv[RMS_VPT];
        // Both loads before any use: w comes from L1/L2 (every row reads it) behind x's HBM latency.
#pragma unroll
        for (int k = 0; k < RMS_VPT; k++)
            if (t + k * b < nv) {
                xv[k] = xp[t + k * b];
                wv[k] = wp[t + k * b];
            }
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < RMS_VPT; k++)
            if (t + k * b < nv) {
                float f[8];
                unpack8(xv[k], f);
#pragma unroll
                for (int e = 0; e < 8; e++) ss += f[e] * f[e];
            }
        const float r = rsqrtf(block_sum(ss) / dim + eps);
        if (t == 0) rstd[row] = r;
        uint4 *op = reinterpret_cast<uint4 *>(out + row * dim);
#pragma unroll
        for (int k = 0; k < RMS_VPT; k++)
            if (t + k * b < nv) {
                float f[8], g[8];
                unpack8(xv[k], f);
                unpack8(wv[k], g);
#pragma unroll
                for (int e = 0; e < 8; e++) f[e] = f[e] * r * g[e];
                op[t + k * b] = pack8(f);
            }
        return;
    }
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = ld(xr + j);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / dim + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[row * dim + j] = to_bf16(ld(xr + j) * r * ld(w + j));
}

// dx += r · (g − x̂ · mean(g · x̂)) with g = dout · w; dw += dout · x̂ (fp32).
// grid (min(rows, resident blocks)), block as above: each block walks rows blockIdx.x,
// blockIdx.x + gridDim.x, … and a thread always owns the same columns, so it sums its share of
// dw over all its rows in registers and adds it once at the end. One atomic per column per row
// (what a block per row costs) piles 4096 adds onto each of dim addresses; this is one per
// column per block.
// Loads issued at the top of each row leave a block with nothing in flight from the last store of
// one row to the first data of the next: a full memory latency per row, likely why this kernel
// stopped at 74% of copy bandwidth on the H100. So the next row's dout, x and dx are loaded
// before this row's reduction, into a second set of registers; the arithmetic is still that of
// one row at a time. Reading dx ahead of this row's store is safe because the next row is another
// row: the load sees the caller's values, which the in-place += needs.
// The second set costs registers: ptxas takes 111 unbounded (2 blocks of 224 threads per SM at
// dim 3584); bounded to 640 threads, 96 without spills on sm_80 and sm_90, so 3 blocks fit (4
// with the 72 of one set). Tighter bounds spill. The launcher must not ask for more than 640
// threads: rows of up to 10240 values on the pack path.
extern "C" __global__ void __launch_bounds__(640)
    rmsnorm_bwd(bf16 *dx, float *dw, const bf16 *dout, const bf16 *x, const bf16 *w, const float *rstd, int64_t rows,
                int dim) {
    wait_for_prior_grids();
    let_next_grid_launch();
    if (rms::packed_rows(dim, dx, dout, x, w)) {
        const int nv = dim / 8, b = blockDim.x, t = threadIdx.x;
        const uint4 *wp = reinterpret_cast<const uint4 *>(w);
        float acc[RMS_VPT][8];
#pragma unroll
        for (int k = 0; k < RMS_VPT; k++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[k][e] = 0.0f;
        // This thread's packs of dout, x and dx's old value in the current row.
        uint4 dv[RMS_VPT], xv[RMS_VPT], gv[RMS_VPT];
        if (blockIdx.x < rows) rms::load_row(dv, xv, gv, dout, x, dx, blockIdx.x, dim);
        for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
            const int64_t next = row + gridDim.x;
            uint4 *gp = reinterpret_cast<uint4 *>(dx + row * dim);
            const float r = rstd[row];
            // w is re-read per row from L1 rather than held in registers (occupancy).
            uint4 wv[RMS_VPT], dn[RMS_VPT], xn[RMS_VPT], gn[RMS_VPT];
#pragma unroll
            for (int k = 0; k < RMS_VPT; k++)
                if (t + k * b < nv) wv[k] = wp[t + k * b];
            if (next < rows) rms::load_row(dn, xn, gn, dout, x, dx, next, dim);
            float dot = 0.0f;
#pragma unroll
            for (int k = 0; k < RMS_VPT; k++)
                if (t + k * b < nv) {
                    float d[8], xf[8], wf[8];
                    unpack8(dv[k], d);
                    unpack8(xv[k], xf);
                    unpack8(wv[k], wf);
#pragma unroll
                    for (int e = 0; e < 8; e++) dot += d[e] * wf[e] * xf[e] * r;
                }
            const float mean = block_sum(dot) / dim;
#pragma unroll
            for (int k = 0; k < RMS_VPT; k++)
                if (t + k * b < nv) {
                    float d[8], xf[8], wf[8], g[8];
                    unpack8(dv[k], d);
                    unpack8(xv[k], xf);
                    unpack8(wv[k], wf);
                    unpack8(gv[k], g);
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        const float xhat = xf[e] * r;
                        g[e] = g[e] + r * (d[e] * wf[e] - xhat * mean);
                        acc[k][e] += d[e] * xhat;
                    }
                    gp[t + k * b] = pack8(g);
                }
#pragma unroll
            for (int k = 0; k < RMS_VPT; k++) {
                dv[k] = dn[k];
                xv[k] = xn[k];
                gv[k] = gn[k];
            }
        }
#pragma unroll
        for (int k = 0; k < RMS_VPT; k++)
            if (t + k * b < nv) rms::add8(dw + 8 * (t + k * b), acc[k]);
        return;
    }
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
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
}
