// Host emulation of the CUDA subset attention.cu uses: one fiber per thread, warp collectives
// exchange through a per-warp buffer between two warp barriers.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <cassert>
#include <vector>
#include <functional>
#include <algorithm>
#include <ucontext.h>
using std::max;
using std::min;
using std::isfinite;

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3e { unsigned x = 1, y = 1, z = 1; };
struct PendingCopy { void *dst; const void *src; bool valid; int group; };
// A wgmma whose result has not been waited for: the accumulator it writes, the result, its group,
// and its register A operands with the values they had at issue.
struct PendingMma { float *d; std::vector<float> v; int group; std::vector<std::pair<const uint32_t *, std::vector<uint32_t>>> a; };
struct Bar { int count = 0, gen = 0; };
struct Fiber {
    ucontext_t ctx; dim3e tid; bool done = false; std::vector<char> stack; std::vector<PendingCopy> pend; int committed = 0;
    const Bar *wait = nullptr; int wait_gen = 0;  // the barrier this thread waits at, and its generation then
    std::vector<PendingMma> mma_pend; int mma_committed = 0; bool mma_fenced = false;  // emu_wgmma.h
    int proxy_gen = 0;  // emu_wgmma.h: the async-proxy generation this thread's last fence asks for
};
static ucontext_t g_sched;
static Fiber *g_cur;
static std::vector<Fiber> *g_fibers;  // the running block's threads
static dim3e g_block, g_grid, g_bdim;
#define threadIdx (g_cur->tid)
#define blockIdx g_block
#define gridDim g_grid
#define blockDim g_bdim
// Fiber stacks; the memory-bound kernels need far less than attention's tiles.
#ifndef EMU_STACK_BYTES
#define EMU_STACK_BYTES (256 * 1024)
#endif
alignas(1024) static unsigned char emu_dyn_smem[232448];  // 227 KB, the sm_90 opt-in maximum
// A kernel's dynamic shared memory starts g_dyn_off bytes into the buffer (its shared-window
// address; the GPU guarantees 16-byte alignment only) and, when g_dyn_bytes is set, holds that
// many bytes: a write outside them is reported when the block ends.
static uint32_t g_dyn_off = 0, g_dyn_bytes = 0;
// What the async proxy (wgmma's operand reads) sees of the buffer: emu_wgmma.h copies the generic
// view over it once every live thread of the block has passed a fence.proxy.async.
alignas(1024) static unsigned char emu_async_smem[sizeof emu_dyn_smem];
static int g_proxy_gen = 0;
// The shared bytes (address, value at issue) that the wgmma groups of each warpgroup read and
// have not been waited for: emu_wgmma.h checks them unchanged when the group is waited for.
struct OperandReads { int wg, group; std::vector<std::pair<uint32_t, uint16_t>> bytes; };
static std::vector<OperandReads> g_operand_reads;
static long g_conflicts = 0, g_ldsm = 0;

inline void yield_() { swapcontext(&g_cur->ctx, &g_sched); }
static Bar g_bbar, g_wbar[32], g_wgbar[8], g_nbar[16];  // block, warps, warpgroups, bar.sync/arrive ids
inline void bar_wait(Bar &b, int n) {
    int gen = b.gen;
    if (++b.count == n) { b.count = 0; b.gen++; return; }
    g_cur->wait = &b;
    g_cur->wait_gen = gen;
    while (b.gen == gen) yield_();
    g_cur->wait = nullptr;
}
// bar.arrive: counts toward the barrier's next opening without waiting for it.
inline void bar_arrive(Bar &b, int n) {
    if (++b.count == n) { b.count = 0; b.gen++; }
}
inline int emu_nthreads() { return g_bdim.x * g_bdim.y * g_bdim.z; }
// Warps are cut from the linear thread index, x fastest, as on the GPU.
inline int emu_tid() { return threadIdx.x + g_bdim.x * (threadIdx.y + g_bdim.y * threadIdx.z); }
inline void __syncthreads() { bar_wait(g_bbar, emu_nthreads()); }
inline int emu_warp() { return emu_tid() >> 5; }
inline int emu_lane() { return emu_tid() & 31; }
inline void __syncwarp(unsigned = 0xffffffffu) { bar_wait(g_wbar[emu_warp()], 32); }
static unsigned char g_xbuf[32][32][64];
template <class T> inline void xput(const T &v) { static_assert(sizeof(T) <= 64, ""); memcpy(g_xbuf[emu_warp()][emu_lane()], &v, sizeof(T)); __syncwarp(); }
template <class T> inline T xget(int l) { T v; memcpy(&v, g_xbuf[emu_warp()][l], sizeof(T)); return v; }
inline void xdone() { __syncwarp(); }
// Every collective here needs the whole warp (the kernels only call them converged); masks are
// checked only where a kernel passes less than the full warp (__reduce_add_sync).
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { xput(v); T r = xget<T>(emu_lane() ^ o); xdone(); return r; }
template <class T> inline T __shfl_sync(unsigned, T v, int s) { xput(v); T r = xget<T>(s & 31); xdone(); return r; }
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned d) {
    xput(v);
    const int l = emu_lane();
    T r = l >= (int)d ? xget<T>(l - (int)d) : v;
    xdone();
    return r;
}
inline int __any_sync(unsigned, int p) { xput(p); int r = 0; for (int l = 0; l < 32; l++) r |= xget<int>(l); xdone(); return r != 0; }
inline unsigned __ballot_sync(unsigned, int p) {
    xput(p != 0);
    unsigned r = 0;
    for (int l = 0; l < 32; l++) r |= (unsigned)xget<bool>(l) << l;
    xdone();
    return r;
}
// The lanes whose value equals this lane's.
inline unsigned __match_any_sync(unsigned, unsigned v) {
    xput(v);
    unsigned r = 0;
    for (int l = 0; l < 32; l++) r |= (unsigned)(xget<unsigned>(l) == v) << l;
    xdone();
    return r;
}
// Sum over the lanes of `mask`, each of which must pass this same mask (the CUDA rule): lanes of
// other groups may pass other masks in the same call.
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    struct M { unsigned mask, v; };
    xput(M{mask, v});
    assert((mask >> emu_lane() & 1) && "__reduce_add_sync: the calling lane is not in its mask");
    unsigned r = 0;
    for (int l = 0; l < 32; l++)
        if (mask >> l & 1) {
            const M o = xget<M>(l);
            assert(o.mask == mask && "__reduce_add_sync: lanes of one mask passed different masks");
            r += o.v;
        }
    xdone();
    return r;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

struct bf16 { uint16_t x; };
typedef bf16 __nv_bfloat16;
struct __nv_bfloat162 { bf16 x, y; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline uint2 make_uint2(uint32_t x, uint32_t y) { return {x, y}; }
inline unsigned short __bfloat16_as_ushort(bf16 h) { return h.x; }
inline float __bfloat162float(bf16 h) { uint32_t u = (uint32_t)h.x << 16; float f; memcpy(&f, &u, 4); return f; }
inline bf16 __float2bfloat16_rn(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline float __logf(float x) { return logf(x); }
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float atomicAdd(float *p, float v) { float o = *p; *p = o + v; return o; }
inline unsigned atomicAdd(unsigned *p, unsigned v) { unsigned o = *p; *p = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) { unsigned long long o = *p; *p = o + v; return o; }
// Blocks run one after another here, so every write is visible to the next block already.
inline void __threadfence() {}
inline float __ldcg(const float *p) { return *p; }
// common.cuh's pair of fp32 atomics (one vector reduction on sm_90).
inline void atomic_add2(float *p, float a, float b) { p[0] += a; p[1] += b; }
// common.cuh's programmatic-dependent-launch controls: one launch at a time runs here, so the
// previous grid has always completed.
inline void wait_for_prior_grids() {}
inline void let_next_grid_launch() {}

inline float ld(const bf16 *p) { return __bfloat162float(*p); }
inline bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }
inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// grid launch: every block runs its threads as fibers to completion
inline void emu_launch(dim3e grid, dim3e block, std::function<void()> fn) {
    g_grid = grid; g_bdim = block;
    int nt = block.x * block.y * block.z;
    static std::function<void()> *g_fn;
    g_fn = &fn;
    struct T { static void tramp() { (*g_fn)(); g_cur->done = true; } };
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                g_block = {x, y, z};
                memset(emu_dyn_smem, 0xff, sizeof emu_dyn_smem);  // NaN garbage
                memset(emu_async_smem, 0xff, sizeof emu_async_smem);
                g_proxy_gen = 0;
                g_operand_reads.clear();
                g_bbar = Bar{}; for (auto &w : g_wbar) w = Bar{}; for (auto &w : g_wgbar) w = Bar{}; for (auto &w : g_nbar) w = Bar{};
                std::vector<Fiber> fs(nt);
                g_fibers = &fs;
                for (int i = 0; i < nt; i++) {
                    fs[i].tid = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
                    fs[i].stack.resize(EMU_STACK_BYTES);
                    getcontext(&fs[i].ctx);
                    fs[i].ctx.uc_stack.ss_sp = fs[i].stack.data();
                    fs[i].ctx.uc_stack.ss_size = fs[i].stack.size();
                    fs[i].ctx.uc_link = &g_sched;
                    makecontext(&fs[i].ctx, (void (*)())T::tramp, 0);
                }
                static unsigned seed = getenv("EMU_SEED") ? atoi(getenv("EMU_SEED")) : 0;
                std::vector<int> order(nt); for (int i = 0; i < nt; i++) order[i] = i;
                for (bool alive = true; alive;) {
                    alive = false;
                    if (seed) for (int i = nt - 1; i > 0; i--) { seed = seed * 1103515245u + 12345u; std::swap(order[i], order[(seed >> 8) % (i + 1)]); }
                    // with a seed, each warp sits out a pass at random, so warps drift apart
                    static unsigned skip = 0, passes = 0;
                    if (seed && passes++ % 512 == 0) { seed = seed * 1103515245u + 12345u; skip = seed >> 16; }
                    // A thread still waiting at its barrier is not resumed (it would only yield
                    // again): with 1024 threads, spinning waiters were most of the run time.
                    bool ran = false;
                    for (int pass = 0; pass < 2 && !ran; pass++)
                        for (int i : order) {
                            auto &f = fs[i];
                            if (f.done) continue;
                            alive = true;
                            if (f.wait && f.wait->gen == f.wait_gen) continue;
                            if (pass == 0 && (skip >> ((i >> 5) & 15) & 1)) continue;
                            ran = true;
                            g_cur = &f; swapcontext(&g_sched, &f.ctx);
                        }
                    if (alive && !ran) {
                        fprintf(stderr, "deadlock: every live thread of block (%u, %u, %u) waits at a barrier\n", x, y, z);
                        abort();
                    }
                }
                for (auto &f : fs) assert(f.pend.empty() && f.mma_pend.empty());
                assert(g_operand_reads.empty());
                if (g_dyn_bytes)
                    for (uint32_t a = 0; a < sizeof emu_dyn_smem; a++)
                        if ((a < g_dyn_off || a >= g_dyn_off + g_dyn_bytes) && emu_dyn_smem[a] != 0xff) {
                            fprintf(stderr, "block (%u, %u, %u) wrote shared byte %u, outside its %u bytes at %u\n", x, y, z,
                                    a, g_dyn_bytes, g_dyn_off);
                            abort();
                        }
            }
}

// The rest of the CUDA API the memory-bound kernels use (ops_main.cpp).
inline float __fdiv_rn(float a, float b) { return a / b; }
inline void __sincosf(float x, float *s, float *c) { *s = sinf(x); *c = cosf(x); }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double atomicAdd(double *p, double v) { double o = *p; *p = o + v; return o; }
// sm_90's 16-byte vector atomic: four fp32 adds, one per component.
inline float4 atomicAdd(float4 *p, float4 v) {
    const float4 o = *p;
    *p = {o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w};
    return o;
}

// The rest of the CUDA API the optimizer kernels use (optimizer_main.cpp). Cache hints (.cs
// streaming, .cg L2-only) change nothing here.
inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline bf16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
template <class T> inline T __ldcs(const T *p) { return *p; }
template <class T> inline void __stcs(T *p, T v) { *p = v; }
inline float4 __ldcg(const float4 *p) { return *p; }
inline double __ldcg(const double *p) { return *p; }
