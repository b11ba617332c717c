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
