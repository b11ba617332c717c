// Helpers shared by every op file. Storage is bf16, arithmetic is fp32, as in the CPU
// reference (src/backend/cpu.rs) that each kernel is checked against.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float ld(const bf16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ float ld(const float *p) { return *p; }
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }
// Stores an fp32 result into either storage type, so one template serves bf16 and f32 buffers.
__device__ __forceinline__ void st(bf16 *p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void st(float *p, float x) { *p = x; }

// Eight consecutive bf16 values, moved as one 16-byte pack: widened to fp32, and rounded back
// to nearest. The memory-bound kernels read and write their operands this way.
__device__ __forceinline__ void unpack8(uint4 raw, float (&f)[8]) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const float2 v = __bfloat1622float2(h[e]);
        f[2 * e] = v.x;
        f[2 * e + 1] = v.y;
    }
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 raw;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&raw);
#pragma unroll
    for (int e = 0; e < 4; e++) h[e] = __floats2bfloat162_rn(f[2 * e], f[2 * e + 1]);
    return raw;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float shared[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // shared[] may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? shared[lane] : 0.0f;
    return warp_sum(v);
}

// p[0] += a, p[1] += b (p 8-byte aligned): one vector reduction on sm_90, two before.
__device__ __forceinline__ void atomic_add2(float *p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2 *>(p), float2{a, b});
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Programmatic dependent launch (sm_90): a kernel the host launches with programmatic stream
// serialization may start while the kernel before it in the stream is still finishing, so that
// its launch and prologue overlap that kernel's tail. It must not touch global memory the earlier
// kernel reads or writes before wait_for_prior_grids(), which returns once that kernel has
// completed and its writes are visible. let_next_grid_launch() allows the next such kernel to be
// scheduled as soon as every block of this one has called it. Both do nothing where the launch
// was an ordinary one, and on GPUs before sm_90.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_grid_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
