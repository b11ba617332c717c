// Causal grouped-query attention for Hopper, head_dim 128, on wgmma: the contracts of
// attention_fwd_d128 and attention_bwd_d128 in attention.cu (layouts, lse, the causal offset
// tk - tq, GQA, the backward's preprocess and convert passes), with the warpgroup tensor-core
// instructions that mma.sync cannot reach (docs/attention-perf.md, stage 3).
// CPU oracles: cpu::attention, cpu::attention_bwd (src/backend/cpu.rs).
//
//   void attention_fwd_d128_wgmma(bf16 *out, float *lse, const bf16 *q, const bf16 *k,
//                                 const bf16 *v, int tq, int tk, int cap, int heads, int kv_heads)
//     grid (batch * heads, ceil(tq / 128)), block 256, dynamic smem 164864 bytes (opt-in)
//   void attention_bwd_d128_wgmma(same arguments as attention_bwd_d128)
//     the grid and block of attention_bwd_d128, dynamic smem 149504 bytes (opt-in)
//   void wgmma_probe(float *d, const bf16 *a, const bf16 *b, int form)
//     the layout probe (attn90::probe): grid 1, block 256, dynamic smem 82944 bytes (opt-in)
//
// wgmma exists only in sm_90a, so every other target gets empty bodies; the launchers
// (src/backend/cuda_attention.rs) pick these kernels only on compute capability 9.0 with sm_90a
// in the fatbin.
//
// Forward: a block owns 128 query rows of one head, two warpgroups of 64 rows. Per 128-key
// tile j, each warpgroup issues S_{j+1} = Q K_{j+1}^T (Q and K read by the tensor cores straight from shared
// memory) and then O += P_j V_j (P the register operand), and runs the online softmax of S_{j+1}
// while P_j V_j is still on the tensor cores (FlashAttention-3's intra-warpgroup overlap). One
// barrier per tile; V_{j+1} and K_{j+2} are copied in during tile j. Within a tile warpgroup 1
// issues after warpgroup 0 (named barrier 1): left to issue together, both waited for their S
// behind each other's products and then ran their softmaxes at once; ordered, the forward ran
// 8-10% faster on the H100 (docs/gpu/h100-fwd-variants.txt). Grid y = 0 is the tile with the
// longest causal rows, dispatched first.
#include "common.cuh"

namespace attn90 {

constexpr int BM = 128, BN = 128, D = 128;  // block: 256 threads, two warpgroups
constexpr int TILE = 128 * D * 2;  // bytes of one 128-row tile: Q, K_j or V_j
constexpr int HALF = TILE / 2;     // one 64-column half of a tile: 128 rows of 128 bytes
constexpr float LOG2E = 1.4426950408889634f;

// Shared tiles use the layout wgmma's 128-byte swizzle mode reads: each 64-column half of a
// tile is its own region of 128-byte rows, and the 16-byte chunk c of row r sits at chunk
// position c ^ (r % 8). The hardware applies that XOR to address bits 4-6 from bits 7-9, so
// regions start on 1 KB boundaries. Element (r, col) of a tile, in bf16 units:
__device__ __forceinline__ int sw128(int r, int col) {
    return (col >> 6) * (HALF / 2) + r * 64 + ((((col >> 3) & 7) ^ (r & 7)) << 3) + (col & 7);
}

// Shared-matrix descriptor, 128-byte swizzle: start address, leading and stride byte offsets,
// each stored >> 4. K-major operands ignore the leading offset (1 by convention); for them the
// stride offset steps 8 rows. For N-major ones the leading offset steps 64 columns and the stride
// offset 8 rows of K.
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)((lbo & 0x3FFFF) >> 4) << 16 |
           (uint64_t)((sbo & 0x3FFFF) >> 4) << 32 | 1ull << 62;
}

// ---- plumbing (tools/kernel_emulator/gen.py swaps this block for emu_wgmma.h) ----
__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 16 bytes global -> shared; an invalid chunk is zero-filled (0 bytes read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// cp.async writes through the generic proxy and wgmma reads through the async one: each
// writing thread fences before the barrier that publishes the tile.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
// Named barrier 1 orders the two warpgroups' wgmma issues within a tile: warpgroup 1 waits
// (bar.sync) until warpgroup 0 has issued (bar.arrive), so that the tensor cores finish warpgroup
// 0's S first and its softmax runs while warpgroup 1's products do. Predicated rather than
// branched: ptxas serializes wgmma across a branch between issue and wait.
__device__ __forceinline__ void order_wait(int wg) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.s32 p, %0, 0;\n@p bar.sync 1, 256;\n}\n" ::"r"(wg) : "memory");
}
__device__ __forceinline__ void order_signal(int wg) {
    asm volatile("{\n.reg .pred p;\nsetp.eq.s32 p, %0, 0;\n@p bar.arrive 1, 256;\n}\n" ::"r"(wg) : "memory");
}
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// Accumulator fragments of m64n128 (per warp of the warpgroup, rows 16 w ..): d[n][e] holds row
// g + 8 (e / 2), column 8 n + 2 t + e % 2, with g = lane / 4, t = lane % 4, the mma.sync C layout
// repeated over 16 column blocks. The register A operand of m64nNk16 is the mma.sync A layout of
// the warp's 16 rows, so two adjacent column blocks of S are one k-step of P.
#define WG_D4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define WG_D64                                                                                                \
    WG_D4(0), WG_D4(1), WG_D4(2), WG_D4(3), WG_D4(4), WG_D4(5), WG_D4(6), WG_D4(7), WG_D4(8), WG_D4(9),      \
        WG_D4(10), WG_D4(11), WG_D4(12), WG_D4(13), WG_D4(14), WG_D4(15)
#define WG_REGS64                                                                                             \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "    \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "     \
    "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "     \
    "%62, %63}"

// d (64 x 128) = [d +] A (64 x 16, K-major in shared) B^T (B: 128 x 16, K-major in shared).
__device__ __forceinline__ void wgmma_ss(float (&d)[16][4], uint64_t da, uint64_t db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_REGS64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : WG_D64
                 : "l"(da), "l"(db), "r"(accumulate));
}
#define WG_D32 WG_D4(0), WG_D4(1), WG_D4(2), WG_D4(3), WG_D4(4), WG_D4(5), WG_D4(6), WG_D4(7)
#define WG_REGS32                                                                                             \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "    \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
// d (64 x 64) = [d +] A B, both in shared: A (64 x 16) K-major (TA 0) or M-major (TA 1), B (16 x 64)
// K-major (TB 0, stored as 64 x 16) or N-major (TB 1).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss64(float (&d)[8][4], uint64_t da, uint64_t db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_REGS32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : WG_D32
                 : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB));
}
// d (64 x 128) += A (64 x 16 in registers) B (16 x 128, N-major in shared).
__device__ __forceinline__ void wgmma_rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_REGS64
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : WG_D64
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
// The compiler sees a wgmma's registers as read or written at issue, but the tensor cores use
// them until the wait: an empty asm that redefines each register after the wait (and before the
// issue) keeps every other access on its side of the asynchronous window.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[i][e])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+r"(a[i][e])::"memory");
}
// ---- end plumbing ----

// Rows row0..row0+ROWS-1 of a strided global matrix into the tile at shared address `tile`
// (two 64-column halves of ROWS 128-byte rows); rows >= nvalid become zeros. 16 threads move one
// 256-byte row, 16 rows per pass of the block's 256 threads; a row's swizzle phase r % 8 is the
// same in every pass.
template <int ROWS>
__device__ __forceinline__ void load_tile(uint32_t tile, const bf16 *g, int64_t stride, int row0, int nvalid) {
    const int c = threadIdx.x & 15, r = threadIdx.x >> 4;
    uint32_t dst = tile + (c >> 3) * (ROWS * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);
    const bf16 *src = g + (int64_t)(row0 + r) * stride + c * 8;
#pragma unroll 1
    for (int rr = row0 + r; rr < row0 + ROWS; rr += 16, dst += 16 * 128, src += 16 * stride)
        cp_async16(dst, rr < nvalid ? src : g, rr < nvalid);  // g: a valid address that is never read
}

// Where one (batch b, q head h) lives: rows i of q, out, dout at qoff + i * qstride, rows j of
// its kv head's k, v at kvoff + j * kvstride (the layouts at the top of attention.cu).
struct Head {
    int64_t qstride, kvstride, qoff, kvoff;
};
__device__ __forceinline__ Head head_of(int b, int h, int tq, int cap, int heads, int kv_heads) {
    const int64_t qs = (int64_t)heads * D, kvs = (int64_t)kv_heads * D;
    return {qs, kvs, (int64_t)b * tq * qs + h * D, (int64_t)b * cap * kvs + h / (heads / kv_heads) * D};
}

// Online softmax of one tile of scores, in place: S becomes 2^(S sl2 - m) under the updated
// row maxima m (raw score units in mx), l gains the tile's row sums (per thread; the 4 threads of
// a quad share a row and are reduced at the end), and corr is what O must be scaled by. pos is
// the position of the thread's first row (the second is 8 further); keys past a row's position
// are masked when the tile reaches past the diagonal. True when some row maximum moved.
__device__ __forceinline__ bool softmax_tile(float (&s)[16][4], float (&mx)[2], float (&l)[2], float (&corr)[2],
                                             int n0, int pos, bool diag, float sl2) {
    const int t = threadIdx.x & 3;
    if (diag) {
#pragma unroll
        for (int n = 0; n < 16; n++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (n0 + 8 * n + 2 * t + (e & 1) > pos + 8 * (e >> 1)) s[n][e] = -INFINITY;
    }
    bool moved = false;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float tmax = -INFINITY;
#pragma unroll
        for (int n = 0; n < 16; n++) tmax = fmaxf(tmax, fmaxf(s[n][2 * hr], s[n][2 * hr + 1]));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float mnew = fmaxf(mx[hr], tmax);
        const float mb = mnew == -INFINITY ? 0.0f : mnew * sl2;  // a row with nothing visible yet
        corr[hr] = mnew == mx[hr] ? 1.0f : ex2(mx[hr] * sl2 - mb);
        moved |= mnew != mx[hr];
        mx[hr] = mnew;
        float rs = 0.0f;
#pragma unroll
        for (int n = 0; n < 16; n++)
#pragma unroll
            for (int e = 2 * hr; e < 2 * hr + 2; e++) {
                s[n][e] = ex2(fmaf(s[n][e], sl2, -mb));
                rs += s[n][e];
            }
        l[hr] = l[hr] * corr[hr] + rs;
    }
    return moved;
}

// An m64nN accumulator as the A operand of N/16 k-steps: two adjacent column blocks each.
template <int NB>
__device__ __forceinline__ void pack_a(uint32_t (&p)[NB / 2][4], const float (&s)[NB][4]) {
#pragma unroll
    for (int kk = 0; kk < NB / 2; kk++) {
        p[kk][0] = pack(s[2 * kk][0], s[2 * kk][1]);
        p[kk][1] = pack(s[2 * kk][2], s[2 * kk][3]);
        p[kk][2] = pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        p[kk][3] = pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

// S = Q K^T over the 8 k-steps of head_dim: q, kt the shared addresses of the warpgroup's 64
// rows of Q and of the key tile; one step is 16 columns, a 32-byte step inside a 64-column half.
__device__ __forceinline__ void issue_s(float (&s)[16][4], uint32_t q, uint32_t kt) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const uint32_t koff = (kk >> 2) * HALF + (kk & 3) * 32;
        wgmma_ss(s, desc(q + koff, 16, 1024), desc(kt + koff, 16, 1024), kk > 0);
    }
    wg_commit();
}

// O += P V over the 8 k-steps of the key tile: 16 keys (two 8-row groups of V) each.
__device__ __forceinline__ void issue_pv(float (&o)[16][4], uint32_t (&p)[8][4], uint32_t vt) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) wgmma_rs(o, p[kk], desc(vt + kk * 16 * 128, HALF, 1024));
    wg_commit();
}

__device__ __forceinline__ void fwd(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int tq,
                                    int tk, int cap, int heads, int kv_heads) {
    extern __shared__ __align__(1024) unsigned char attn90_smem[];
    const uint32_t base = (smem_addr(attn90_smem) + 1023) & ~1023u;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int wg = warp >> 2, wr = 64 * wg + 16 * (warp & 3);  // rows wr + g and wr + g + 8 of the tile
    const int b = blockIdx.x / heads, h = blockIdx.x % heads, off = tk - tq;
    const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;  // y = 0: the longest causal rows
    const Head hd = head_of(b, h, tq, cap, heads, kv_heads);
    const int64_t qstride = hd.qstride, kvstride = hd.kvstride;
    const bf16 *qh = q + hd.qoff, *kh = k + hd.kvoff, *vh = v + hd.kvoff;
    const float scale = rsqrtf((float)D), sl2 = scale * LOG2E;
    const bool live = m0 + 64 * wg < tq;                    // the warpgroup has a row to write
    const int gfirst = off + m0 + 64 * wg;                  // position of its first row
    const int glast = off + min(m0 + 64 * wg + 64, tq) - 1;  // and of its last live one
    const int pos = off + m0 + wr + g;                      // of this thread's first row
    const int ntiles = (off + min(m0 + BM, tq) + BN - 1) / BN;
    // Q at base, K_j at base + TILE (1 + j % 2), V_j at base + TILE (3 + j % 2).
    const uint32_t qa = base + 64 * wg * 128;  // this warpgroup's 64 rows of Q

    load_tile<128>(base, qh, qstride, m0, tq);
    load_tile<128>(base + TILE, kh, kvstride, 0, tk);
    cp_async_commit();
    load_tile<128>(base + 3 * TILE, vh, kvstride, 0, tk);
    cp_async_commit();
    if (ntiles > 1) load_tile<128>(base + 2 * TILE, kh, kvstride, BN, tk);
    cp_async_commit();
    cp_async_wait<2>();  // Q and K_0
    fence_async_smem();
    __syncthreads();

    float o[16][4], s[16][4], mx[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, corr[2];
    uint32_t p[8][4];
#pragma unroll
    for (int n = 0; n < 16; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[n][e] = 0.0f;
    if (live) {  // tile 0: every live row sees key 0
        wg_fence();
        issue_s(s, qa, base + TILE);
        wg_wait<0>();
        fence_regs(s);
        softmax_tile(s, mx, l, corr, 0, pos, BN - 1 > gfirst, sl2);
        pack_a<16>(p, s);
    }

    // Tile j: O += P_j V_j runs on the tensor cores while the softmax of S_{j+1} runs on the
    // other units; S_{j+1} is issued first, so it completes first (wgmma groups retire in order).
    for (int j = 0; j < ntiles; j++) {
        const int n1 = (j + 1) * BN;
        cp_async_wait<0>();  // V_j and K_{j+1}
        fence_async_smem();
        __syncthreads();  // ... for every thread; and both warpgroups are done with K_j and V_{j-1}
        if (j + 1 < ntiles) load_tile<128>(base + TILE * (3 + ((j + 1) & 1)), vh, kvstride, n1, tk);
        if (j + 2 < ntiles) load_tile<128>(base + TILE * (1 + (j & 1)), kh, kvstride, n1 + BN, tk);
        cp_async_commit();
        // Both warpgroups pass the ordering barrier every tile, with work or without.
        order_wait(wg);
        if (!live || j * BN > glast) {  // no row of the warpgroup sees this tile
            order_signal(wg);
            continue;
        }
        fence_regs(o);
        fence_regs(p);
        // Each branch is a whole fence-issue-wait sequence: ptxas serializes wgmma whose issue
        // and wait sit on different sides of a branch.
        if (j + 1 < ntiles && n1 <= glast) {
            wg_fence();
            issue_s(s, qa, base + TILE * (1 + ((j + 1) & 1)));
            issue_pv(o, p, base + TILE * (3 + (j & 1)));
            order_signal(wg);
            wg_wait<1>();  // S_{j+1}
            fence_regs(s);
            const bool moved = softmax_tile(s, mx, l, corr, n1, pos, n1 + BN - 1 > gfirst, sl2);
            wg_wait<0>();  // P_j V_j
            fence_regs(o);
            fence_regs(p);
            if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
                for (int n = 0; n < 16; n++) {
                    o[n][0] *= corr[0];
                    o[n][1] *= corr[0];
                    o[n][2] *= corr[1];
                    o[n][3] *= corr[1];
                }
            }
            pack_a<16>(p, s);
        } else {  // the warpgroup's last tile
            wg_fence();
            issue_pv(o, p, base + TILE * (3 + (j & 1)));
            order_signal(wg);
            wg_wait<0>();
            fence_regs(o);
        }
    }

    // Epilogue: each warp stages its 16 rows of O in bf16 over its own rows of the Q tile (only
    // its warpgroup's finished wgmma read them), then writes them out in 16-byte chunks.
    if (!live) return;
    const int t = lane & 3;
    bf16 *qs = reinterpret_cast<bf16 *>(attn90_smem + (base - smem_addr(attn90_smem)));
    bf16 *oh = out + ((int64_t)b * tq + m0) * qstride + h * D;
    float *lh = lse + ((int64_t)b * tq + m0) * heads + h;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float lsum = l[hr];
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
        const float inv = 1.0f / lsum;
        const int r = wr + g + 8 * hr;
#pragma unroll
        for (int n = 0; n < 16; n++)
            *reinterpret_cast<uint32_t *>(qs + sw128(r, 8 * n + 2 * t)) = pack(o[n][2 * hr] * inv, o[n][2 * hr + 1] * inv);
        if (t == 0 && m0 + r < tq) lh[(int64_t)r * heads] = mx[hr] * scale + __logf(lsum);
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 8; it++) {
        const int idx = lane + 32 * it, r = wr + idx / 16, c = idx % 16;
        if (m0 + r < tq)
            *reinterpret_cast<uint4 *>(oh + (int64_t)r * qstride + c * 8) =
                *reinterpret_cast<const uint4 *>(qs + sw128(r, c * 8));
    }
}

// ---- backward ----
// The contract and grid of attention_bwd_d128 (attention.cu), after the same
// attention_bwd_preprocess and before the same attention_bwd_convert: a block owns 128 keys of
// one q head, warpgroup w the keys 64 w .. 64 w + 63, and walks every 64-query tile that can see
// them. Per query tile, warpgroup w issues S^T = K_w Q^T and dP^T = V_w dO^T (its keys as the M
// side, both operands in shared memory), turns S^T into P^T while dP^T is still running, then
// dS^T = P^T (dP^T - delta) scale; P^T and dS^T stay in registers as the A operands of
// dV_w += P^T dO and dK_w += dS^T Q (fp32 accumulators for the whole walk), and dS^T also goes to
// shared memory in bf16, where dQ = dS K reads it transposed (warpgroup w: columns 64 w ..),
// added into dq_accum with atomics while dV, dK are still on the tensor cores.
constexpr int QT = 64 * D * 2;  // bytes of a 64-row tile: Q_i, dO_i
constexpr int QHALF = QT / 2;   // one 64-column half of it
// Shared layout: K, V (128 rows each), Q and dO (64 rows, double-buffered), dS^T ([128 keys][64
// queries], one region of 128-byte rows), then lse2 [2][64] and delta [2][64] as floats.
constexpr int B_K = 0, B_V = TILE, B_Q = 2 * TILE, B_O = B_Q + 2 * QT, B_S = B_O + 2 * QT, B_L = B_S + 128 * 128;
constexpr int BWD_SMEM = B_L + 4 * 64 * 4 + 1024;  // + 1 KB to align the tiles
static_assert(BWD_SMEM == 149504, "header comment");

// d (64 keys x 64 queries) = A B^T over head_dim: A the warpgroup's 64 rows of a 128-row tile (K
// or V), B a 64-row tile (Q or dO), both K-major. S^T and dP^T.
__device__ __forceinline__ void issue_t64(float (&d)[8][4], uint32_t a, uint32_t bt) {
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
        wgmma_ss64<0, 0>(d, desc(a + (kk >> 2) * HALF + (kk & 3) * 32, 16, 1024),
                         desc(bt + (kk >> 2) * QHALF + (kk & 3) * 32, 16, 1024), kk > 0);
    wg_commit();
}

// acc (64 keys x 128 columns) += A B over 64 queries: A (P^T or dS^T) in registers, B a 64-row
// tile (dO or Q) read N-major. No commit: dV and dK go out as one group.
__device__ __forceinline__ void issue_kv(float (&acc)[16][4], const uint32_t (&a)[4][4], uint32_t bt) {
#pragma unroll
    for (int kq = 0; kq < 4; kq++) wgmma_rs(acc, a[kq], desc(bt + kq * 2048, QHALF, 1024));
}

// dS^T from A-operand registers to shared memory: row key, 64 query columns, chunk c of row r at
// c ^ r % 8. sa[kq] holds (row kr, cols 16 kq + 2t..), (kr + 8, same), (kr, 16 kq + 8 + 2t..),
// (kr + 8, ...).
__device__ __forceinline__ void store_dst(bf16 *sts, const uint32_t (&sa)[4][4], int kr, int t) {
#pragma unroll
    for (int kq = 0; kq < 4; kq++)
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const int r = kr + 8 * (x & 1), c = 2 * kq + (x >> 1);
            *reinterpret_cast<uint32_t *>(sts + r * 64 + ((c ^ (r & 7)) << 3) + 2 * t) = sa[kq][x];
        }
}

// dQ (64 queries x the warpgroup's 64 columns) = dS K over the 128 keys: dS^T read M-major from
// shared memory, K N-major.
__device__ __forceinline__ void issue_dq(float (&dq)[8][4], uint32_t st, uint32_t kt) {
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
        wgmma_ss64<1, 1>(dq, desc(st + kk * 2048, 8192, 1024), desc(kt + kk * 2048, HALF, 1024), kk > 0);
    wg_commit();
}

__device__ __forceinline__ void bwd(float *dq_accum, float *dkv_accum, bf16 *dk, bf16 *dv, const bf16 *dout,
                                    const float *lse2, const float *delta, const bf16 *q, const bf16 *k, const bf16 *v,
                                    int tq, int tk, int cap, int heads, int kv_heads) {
    extern __shared__ __align__(1024) unsigned char attn90_smem[];
    const uint32_t base = (smem_addr(attn90_smem) + 1023) & ~1023u;
    const float *fl = reinterpret_cast<const float *>(attn90_smem + (base - smem_addr(attn90_smem)) + B_L);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wg = warp >> 2;
    const int kr = 64 * wg + 16 * (warp & 3) + g;  // this thread's key rows in the tile: kr, kr + 8
    const int qr = 16 * (warp & 3) + g;            // and its query rows of dQ: qr, qr + 8
    const int bh = blockIdx.x, b = bh / heads, h = bh % heads, n0 = blockIdx.y * BN;
    const int off = tk - tq, tqp = (tq + 63) / 64 * 64;
    const Head hd = head_of(b, h, tq, cap, heads, kv_heads);
    const int64_t qstride = hd.qstride, kvstride = hd.kvstride, qbase = hd.qoff, kvbase = hd.kvoff;
    const float *lse2h = lse2 + (int64_t)bh * tqp, *deltah = delta + (int64_t)bh * tqp;
    const float scale = rsqrtf((float)D), sl2 = scale * LOG2E;
    const int wkey0 = n0 + 64 * wg;  // the warpgroup's first key
    const uint32_t kw = base + B_K + 64 * wg * 128, vw = base + B_V + 64 * wg * 128, st = base + B_S;

    load_tile<128>(base + B_K, k + kvbase, kvstride, n0, tk);
    load_tile<128>(base + B_V, v + kvbase, kvstride, n0, tk);
    // lse2, delta rows up to tqp exist (the preprocess pads them with zeros); query rows past tq
    // load as zeros, so their S is 0, P finite, and their dV, dK, dS contributions exactly 0.
    auto load_q = [&](int i0, int bf) {
        load_tile<64>(base + B_Q + bf * QT, q + qbase, qstride, i0, tq);
        load_tile<64>(base + B_O + bf * QT, dout + qbase, qstride, i0, tq);
        const int c = threadIdx.x;
        if (c < 16)
            cp_async16(base + B_L + bf * 256 + 16 * c, lse2h + i0 + 4 * c, true);
        else if (c < 32)
            cp_async16(base + B_L + 512 + bf * 256 + 16 * (c - 16), deltah + i0 + 4 * (c - 16), true);
    };
    // Query i sees key n0 from i = n0 - off on; a tile past tk sees no query.
    const int i_first = n0 >= tk ? tq : max(0, n0 - off) / 64 * 64;
    if (i_first < tq) load_q(i_first, 0);
    cp_async_commit();

    float dka[16][4], dva[16][4];
#pragma unroll
    for (int n = 0; n < 16; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.0f;
    int buf = 0;
    for (int i0 = i_first; i0 < tq; i0 += 64, buf ^= 1) {
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();  // tile i0 visible; both warpgroups are done with the previous tile and dS^T
        if (i0 + 64 < tq) load_q(i0 + 64, buf ^ 1);  // lands while this tile computes
        cp_async_commit();
        const uint32_t qt = base + B_Q + buf * QT, ot = base + B_O + buf * QT;
        const float *l2 = fl + buf * 64, *dl = fl + 128 + buf * 64;
        const bool vis = wkey0 <= off + i0 + 63;  // some key of the warpgroup is visible to some query
        uint32_t pa[4][4], sa[4][4];              // P^T, dS^T: A operands of 4 k-steps of 16 queries
        if (vis) {
            float s[8][4], dp[8][4];
            wg_fence();
            issue_t64(s, kw, qt);
            issue_t64(dp, vw, ot);
            wg_wait<1>();  // S^T; dP^T may still be running
            fence_regs(s);
            const bool diag = wkey0 + 63 > off + i0;  // some key lies past some query's position
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qc = 8 * n + 2 * t + (e & 1), key = n0 + kr + 8 * (e >> 1);
                    float pv = ex2(fmaf(s[n][e], sl2, -l2[qc]));
                    if (diag && key > off + i0 + qc) pv = 0.0f;
                    s[n][e] = pv;
                }
            wg_wait<0>();
            fence_regs(dp);
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) dp[n][e] = s[n][e] * (dp[n][e] - dl[8 * n + 2 * t + (e & 1)]) * scale;
            pack_a<8>(pa, s);
            pack_a<8>(sa, dp);
        } else {
#pragma unroll
            for (int kq = 0; kq < 4; kq++)
#pragma unroll
                for (int x = 0; x < 4; x++) sa[kq][x] = 0u;  // these keys add nothing to dQ
        }
        store_dst(reinterpret_cast<bf16 *>(attn90_smem + (st - smem_addr(attn90_smem))), sa, kr, t);
        fence_async_smem();
        __syncthreads();  // dS^T of both warpgroups
        float dq[8][4];
        // Each branch is a whole fence-issue-wait sequence (see fwd).
        if (vis) {
            fence_regs(dva);
            fence_regs(dka);
            wg_fence();
            issue_kv(dva, pa, ot);
            issue_kv(dka, sa, qt);
            wg_commit();
            issue_dq(dq, st, base + B_K + wg * HALF);
            wg_wait<0>();
            fence_regs(dva);
            fence_regs(dka);
            fence_regs(pa);
            fence_regs(sa);
        } else {
            wg_fence();
            issue_dq(dq, st, base + B_K + wg * HALF);
            wg_wait<0>();
        }
        fence_regs(dq);
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const int i = i0 + qr + 8 * hr;
            if (i >= tq) continue;
            float *dst = dq_accum + (((int64_t)b * tq + i) * heads + h) * D + 64 * wg + 2 * t;
#pragma unroll
            for (int n = 0; n < 8; n++) atomic_add2(dst + 8 * n, dq[n][2 * hr], dq[n][2 * hr + 1]);
        }
    }
    cp_async_wait<0>();  // a tile past tk ran no query tile: its K, V copies must land before exit

    const int64_t nkv = (int64_t)(gridDim.x / heads) * cap * kvstride;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int key = n0 + kr + 8 * hr;
        const int64_t o = kvbase + (int64_t)key * kvstride + 2 * t;
        if (dkv_accum) {
            if (key >= tk) continue;  // the accumulator rows stay zero
#pragma unroll
            for (int n = 0; n < 16; n++) {
                atomic_add2(dkv_accum + o + 8 * n, dka[n][2 * hr], dka[n][2 * hr + 1]);
                atomic_add2(dkv_accum + nkv + o + 8 * n, dva[n][2 * hr], dva[n][2 * hr + 1]);
            }
        } else {
            if (key >= cap) continue;  // rows tk..cap accumulated exact zeros (masked for every query)
#pragma unroll
            for (int n = 0; n < 16; n++) {
                *reinterpret_cast<__nv_bfloat162 *>(dk + o + 8 * n) =
                    __floats2bfloat162_rn(dka[n][2 * hr], dka[n][2 * hr + 1]);
                *reinterpret_cast<__nv_bfloat162 *>(dv + o + 8 * n) =
                    __floats2bfloat162_rn(dva[n][2 * hr], dva[n][2 * hr + 1]);
            }
        }
    }
}

// ---- layout probe ----
// Each wgmma form the two kernels use, alone, through the kernels' own helpers: operands from
// global matrices into the tiles and registers the kernels fill, the product back out of the
// accumulator layout. With small integers every product is exact, so the host can ask for the
// plain matrix product bit for bit, and a form that disagrees shows which PTX layout the
// hardware reads differently from these kernels (and from tools/kernel_emulator).
//   form 0: D (128 x 128) = A B^T, A [128][128], B [128][128]  S = Q K^T (fwd, issue_s)
//   form 1: D (128 x 128) = A B,   A [128][128], B [128][128]  O += P V (fwd, issue_pv)
//   form 2: D (128 x 64)  = A B^T, A [128][128], B [64][128]   S^T = K Q^T (bwd, issue_t64)
//   form 3: D (128 x 128) = A B,   A [128][64],  B [64][128]   dV += P^T dO (bwd, issue_kv)
//   form 4: D (64 x 128)  = A^T B, A [128][64],  B [128][128]  dQ = dS K (bwd, store_dst, issue_dq)
constexpr int PROBE_SMEM = 2 * TILE + 128 * 128 + 1024;
static_assert(PROBE_SMEM == 82944, "the comment at wgmma_probe");

// Element (r, c) of the thread's m64nN accumulator fragment d[n][e], in its warpgroup's 64 rows.
__device__ __forceinline__ int acc_row(int e) { return 16 * ((threadIdx.x >> 5) & 3) + (threadIdx.x & 31) / 4 + 8 * (e >> 1); }
__device__ __forceinline__ int acc_col(int n, int e) { return 8 * n + 2 * (threadIdx.x & 3) + (e & 1); }

__device__ void probe(float *d, const bf16 *a, const bf16 *b, int form) {
    extern __shared__ __align__(1024) unsigned char attn90_smem[];
    const uint32_t base = (smem_addr(attn90_smem) + 1023) & ~1023u, bt = base + TILE;
    const int wg = threadIdx.x >> 7, r0 = 64 * wg;
    const int acols = form == 3 || form == 4 ? 64 : 128;
    if (form == 0 || form == 2) load_tile<128>(base, a, 128, 0, 128);
    if (form == 2 || form == 3) load_tile<64>(bt, b, 128, 0, 64);
    else load_tile<128>(bt, b, 128, 0, 128);
    cp_async_commit();
    float s[16][4], o[16][4];
    uint32_t p[8][4], pq[4][4];
#pragma unroll
    for (int n = 0; n < 16; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {  // A in accumulator layout: the register operand's source
            const int c = acc_col(n, e);
            s[n][e] = c < acols ? __bfloat162float(a[(r0 + acc_row(e)) * acols + c]) : 0.0f;
            o[n][e] = 0.0f;
        }
    pack_a<16>(p, s);
    pack_a<8>(pq, reinterpret_cast<float (&)[8][4]>(s));
    if (form == 4)
        store_dst(reinterpret_cast<bf16 *>(attn90_smem + (base + 2 * TILE - smem_addr(attn90_smem))), pq,
                  r0 + acc_row(0), threadIdx.x & 3);
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    int rows = 64, cols = 128, ld = 128;  // this warpgroup's block of D, and D's row length
    if (form == 0) {
        wg_fence();
        issue_s(o, base + r0 * 128, bt);
        wg_wait<0>();
    } else if (form == 1) {
        wg_fence();
        issue_pv(o, p, bt);
        wg_wait<0>();
    } else if (form == 2) {
        wg_fence();
        issue_t64(reinterpret_cast<float (&)[8][4]>(o), base + r0 * 128, bt);
        wg_wait<0>();
        cols = ld = 64;
    } else if (form == 3) {
        wg_fence();
        issue_kv(o, pq, bt);
        wg_commit();
        wg_wait<0>();
    } else {
        wg_fence();
        issue_dq(reinterpret_cast<float (&)[8][4]>(o), base + 2 * TILE, bt + wg * HALF);
        wg_wait<0>();
        cols = 64;
    }
    fence_regs(o);
    fence_regs(p);
    fence_regs(pq);
    // form 4: the warpgroups split D's columns, not its rows.
    const int dr = form == 4 ? 0 : r0, dc = form == 4 ? 64 * wg : 0;
#pragma unroll
    for (int n = 0; n < 16; n++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (acc_row(e) < rows && acc_col(n, e) < cols) d[(dr + acc_row(e)) * ld + dc + acc_col(n, e)] = o[n][e];
}
// ---- end layout probe ----

}  // namespace attn90

extern "C" __global__ void __launch_bounds__(256, 1)
    attention_fwd_d128_wgmma(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int tq, int tk,
                             int cap, int heads, int kv_heads) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    attn90::fwd(out, lse, q, k, v, tq, tk, cap, heads, kv_heads);
#endif
}

extern "C" __global__ void __launch_bounds__(256, 1)
    attention_bwd_d128_wgmma(float *dq_accum, float *dkv_accum, bf16 *dk, bf16 *dv, const bf16 *dout,
                             const float *lse2, const float *delta, const bf16 *q, const bf16 *k, const bf16 *v,
                             int tq, int tk, int cap, int heads, int kv_heads) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    attn90::bwd(dq_accum, dkv_accum, dk, dv, dout, lse2, delta, q, k, v, tq, tk, cap, heads, kv_heads);
#endif
}

// D = the product `form` names (attn90::probe), as f32. grid 1, block 256, dynamic smem 82944
// bytes (opt-in).
extern "C" __global__ void __launch_bounds__(256, 1) wgmma_probe(float *d, const bf16 *a, const bf16 *b, int form) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    attn90::probe(d, a, b, form);
#endif
}
