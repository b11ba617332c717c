// Causal grouped-query attention: flash-style forward and backward on tensor cores, a scalar
// fallback for odd head sizes, and the KV-cache write. Decode is in attention_decode.cu.
// CPU oracles: cpu::attention, cpu::attention_bwd, cpu::kv_write (src/backend/cpu.rs).
//
// Layouts (row-major): q, out, dout, dq: [batch, tq, heads, D]; k, v, dk, dv: [batch, cap,
// kv_heads, D], rows 0..tk valid; lse: [batch, tq, heads] float. Query i sits at absolute
// position tk - tq + i and sees keys 0..=that position; head h reads kv head h / (heads /
// kv_heads); scale 1/sqrt(D). lse is the natural-log logsumexp of the scaled scores (cpu: m + ln l).
// Every pointer must be 16-byte aligned (the tiles move 16-byte chunks); D is a multiple of 8.
//
// head_dim dispatch (the Rust side picks):
//   D == 64 or D == 128        -> attention_fwd_d{64,128}, attention_bwd_d{64,128} (+ convert)
//   other D, D % 8 == 0, <= 256 -> attention_fwd_generic, attention_bwd_{dq,dkdv}_generic
//   kv_write takes any D % 8 == 0, D <= 256.
//
// Kernel signatures (all extern "C" __global__, bf16 = __nv_bfloat16) and launch geometry:
//   void attention_fwd_d64(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
//                          int tq, int tk, int cap, int heads, int kv_heads)
//     grid (batch * heads, ceil(tq / 128)), block 128, dynamic smem 512 * D = 32768 bytes
//   void attention_fwd_d128(same as attention_fwd_d64)
//     same grid and block, dynamic smem 65536 bytes (needs the > 48 KB opt-in)
//   void attention_fwd_generic(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
//                              int tq, int tk, int cap, int heads, int kv_heads, int head_dim)
//     grid (ceil(tq * heads / 4), batch), block 128, no dynamic smem
//   void attention_bwd_preprocess(float *delta, float *lse2, float *dq_accum, float *dkv_accum,
//                                 const bf16 *dout, const bf16 *out, const float *lse,
//                                 int batch, int tq, int heads, int head_dim, int64_t nkv2)
//     grid ceil(batch * heads * tqp / 4), block 128, no smem (tqp = tq rounded up to 64)
//   void attention_bwd_d64(float *dq_accum, float *dkv_accum, bf16 *dk, bf16 *dv, const bf16 *dout,
//                          const float *lse2, const float *delta, const bf16 *q, const bf16 *k,
//                          const bf16 *v, int tq, int tk, int cap, int heads, int kv_heads)
//     grid (batch * heads, ceil(n / 128)) with n = tk when dkv_accum != NULL, else cap;
//     block 256, dynamic smem 99328 bytes (opt-in)
//   void attention_bwd_d128(same as attention_bwd_d64)
//     same grid and block, dynamic smem 164864 bytes (opt-in; one block per SM)
//   void attention_bwd_convert(bf16 *dq, bf16 *dk, bf16 *dv, const float *dq_accum,
//                              const float *dkv_accum, int64_t nq, int64_t nkv)
//     grid ceil((nq + (dkv_accum ? 2 * nkv : 0)) / 1024), block 256, no smem
//   void attention_bwd_dq_generic(bf16 *dq, const bf16 *dout, const float *lse, const float *delta,
//                                 const bf16 *q, const bf16 *k, const bf16 *v,
//                                 int tq, int tk, int cap, int heads, int kv_heads, int head_dim)
//     grid (ceil(tq * heads / 4), batch), block 128, no dynamic smem
//   void attention_bwd_dkdv_generic(bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse,
//                                   const float *delta, const bf16 *q, const bf16 *k, const bf16 *v,
//                                   int tq, int tk, int cap, int heads, int kv_heads, int head_dim)
//     grid (ceil(cap * kv_heads / 4), batch), block 128, no dynamic smem
//   void kv_write(bf16 *cache, const bf16 *src, int batch, int cap, int pos0,
//                 const uint32_t *starts, int tq, int row)
//     sequence b's rows land at starts[b].. (a ragged cache), or at pos0.. where starts is null
//     grid ceil(batch * tq * row / 256), block 256, no smem
//
// Backward sequence, fast path: attention_bwd_preprocess (writes delta and lse2 = lse * log2(e),
// zeroes dq_accum and, with GQA, dkv_accum) -> attention_bwd_d{64,128} (adds dq into dq_accum
// with atomics; with GQA the q heads of a group add dk, dv into dkv_accum, without it the kernel
// writes dk, dv itself, rows tk..cap as zeros) -> attention_bwd_convert (dq, and dk, dv from
// dkv_accum when given). Fallback: attention_bwd_preprocess with lse2 = dq_accum = dkv_accum =
// NULL -> attention_bwd_dq_generic and attention_bwd_dkdv_generic (either order).
// Scratch (none needs zeroing by the caller): delta float[batch * heads * tqp] (both paths);
// fast path only: lse2 float[batch * heads * tqp], dq_accum float[batch * tq * heads * D],
// and with GQA (heads > kv_heads) dkv_accum float[2 * batch * cap * kv_heads * D] (dk then dv).
// delta and lse2 are laid out [batch, heads, tqp] so a query tile's values are contiguous; rows
// tq..tqp hold 0.
#include "common.cuh"

namespace attn {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- tensor-core plumbing (sm_80+): cp.async, ldmatrix, mma.m16n8k16 bf16 -> fp32 ----
//
// mma.m16n8k16 fragments, g = lane / 4, t = lane % 4:
//   A (16x16, row-major) a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 8+2t..)  a3: (g+8, 8+2t..)
//   B (16x8, "col")      b0: (k 2t..2t+1, n g)  b1: (k 8+2t.., n g)
//   C (16x8)             c0,c1: (g, 2t..2t+1)   c2,c3: (g+8, 2t..2t+1)
// The C layout of a 16x16 pair of tiles is exactly the A layout, so a score tile becomes the A
// operand of the next product without leaving registers.

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    const int n = valid ? 16 : 0;  // 0 bytes read: the chunk is zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 matrices; lane l gives the address of row l % 8 of matrix l / 8, and register j
// receives matrix j's (row g, cols 2t..2t+1), or with .trans its (rows 2t..2t+1, col g).
// a: a shared-window address (smem_u32).
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ldsm4(uint32_t r[4], uint32_t a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm4t(uint32_t r[4], uint32_t a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x on the MUFU unit, without exp2f's rescaling for denormal results (those flush to 0, which
// a softmax never misses); -inf gives 0.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) sits in the low half
    return *reinterpret_cast<uint32_t *>(&v);
}

// A operand from two adjacent 16x8 C tiles (the 16 columns of c0 then c1).
__device__ __forceinline__ void c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack(c0[0], c0[1]);
    a[1] = pack(c0[2], c0[3]);
    a[2] = pack(c1[0], c1[1]);
    a[3] = pack(c1[2], c1[3]);
}

// Shared tiles are W bf16 wide (W = 64 or 128), unpadded, with the 16-byte chunks of row r
// XOR-permuted by r % 8: the 8 rows one ldmatrix matrix reads then hit 8 different bank groups.
template <int W>
__device__ __forceinline__ int swz(int row, int col) {
    return row * W + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// ldmatrix addresses. Lane l gives row l % 8 of matrix l / 8; a fragment with origin (row0, col0)
// of a tile (row0 a multiple of 8, col0 of 16 and < W) sits at
//   swz(row0 + r, col0 + c) = row0 * W + (swz(r, c) ^ col0),
// so each thread keeps one shared address per (tile, pattern), the tile base plus the lane part
// below (in bytes), and every fragment address is one XOR with a constant plus a constant offset
// that folds into the instruction. The XOR acts on address bits 5..7, which the tile bases
// (multiples of 1 KB off a 1 KB-aligned window) leave clear.
// A operand from a row-major [m][k] tile (a 16x16 block): origin (m0, k0).
template <int W>
__device__ __forceinline__ uint32_t a_lane(int lane) {
    return 2 * swz<W>(lane & 15, (lane >> 4) * 8);
}
// B operands of two n-tiles (rows n0..n0+15) from a [n][k] tile: origin (n0, k0); regs {0,1} ->
// n0, {2,3} -> n0+8.
template <int W>
__device__ __forceinline__ uint32_t bn_lane(int lane) {
    return 2 * swz<W>((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8);
}
// B operands of two n-tiles (cols n0..n0+15) from a [k][n] tile via .trans: origin (k0, n0);
// {0,1} -> n0, {2,3} -> n0+8.
template <int W>
__device__ __forceinline__ uint32_t bk_lane(int lane) {
    return 2 * swz<W>((lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8);
}
// A operand (16 m x 16 k) via .trans from a [k][m] tile, i.e. the transpose of what is stored:
// origin (k0, m0); matrices {0,1,2,3} = (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7),
// (k 8-15, m 8-15).
template <int W>
__device__ __forceinline__ uint32_t at_lane(int lane) {
    return 2 * swz<W>((lane & 7) + ((lane >> 4) & 1) * 8, ((lane >> 3) & 1) * 8);
}
// The fragment at (row0, col0) of a tile whose lane address is la.
template <int W>
__device__ __forceinline__ uint32_t frag(uint32_t la, int row0, int col0) {
    return (la ^ (uint32_t)(2 * col0)) + (uint32_t)(2 * W * row0);
}

// rows row0..row0+ROWS of a strided global matrix (row r at g + r * stride) into a swizzled
// tile; rows >= nvalid become zeros, so garbage past tk (or past tq) never reaches the math.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(bf16 *s, const bf16 *g, int64_t stride, int row0, int nvalid) {
    constexpr int CH = D / 8, STEP = THREADS / CH;  // each pass covers STEP whole rows
    static_assert(THREADS % CH == 0 && ROWS % STEP == 0, "whole rows per pass");
    const int r = threadIdx.x / CH, c = threadIdx.x % CH;
    const bf16 *src = g + (int64_t)(row0 + r) * stride + c * 8;
    bf16 *dst = s + swz<D>(r, c * 8);
    const int64_t gstep = (int64_t)STEP * stride;
    // One pointer walks the rows (not unrolled: unrolled, the compiler keeps every pass's global
    // address live across the caller's loop).
#pragma unroll 1
    for (int rr = r; rr < ROWS; rr += STEP, src += gstep, dst += STEP * D) {
        const bool ok = row0 + rr < nvalid;
        cp_async16(dst, ok ? src : g, ok);  // g: a valid address that is never read
    }
}

// ---- forward, FlashAttention-2 style ----
// A block owns BM = 128 query rows of one head (4 warps x 32 rows, two m16 tiles each, so every
// K and V fragment read from shared memory feeds two mma) and streams 64-key tiles of K and V
// through shared memory: V_j lands while S = Q K_j^T runs, K_{j+1} while O += P V_j runs. S stays
// in registers, becomes P in place and feeds PV directly. Q stays in shared memory for D = 128
// (O and S already take 192 registers) and in registers for D = 64. Grid x = batch * heads,
// y = row tile with y = 0 the longest rows, so the heavy causal tiles are dispatched first and the
// tail is short. A warp skips the tiles its rows cannot see, and O is rescaled only when some
// row maximum of the warp moved.
constexpr int FWD_BM = 128, FWD_BN = 64, FWD_THREADS = 128;

template <int D>
__device__ __forceinline__ void fwd(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int tq,
                                    int tk, int cap, int heads, int kv_heads) {
    constexpr int BM = FWD_BM, BN = FWD_BN, TH = FWD_THREADS, NT = D / 8, KT = BN / 8, MT = 2;
    constexpr bool QREG = D <= 64;
    extern __shared__ __align__(1024) unsigned char attn_smem[];
    bf16 *Qs = reinterpret_cast<bf16 *>(attn_smem), *Ks = Qs + BM * D, *Vs = Ks + BN * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, b = bh / heads, h = bh % heads;
    const int m0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const int kvh = h / (heads / kv_heads), off = tk - tq;
    const int64_t qstride = (int64_t)heads * D, kvstride = (int64_t)kv_heads * D;
    const bf16 *qh = q + (int64_t)b * tq * qstride + h * D;
    const bf16 *kh = k + (int64_t)b * cap * kvstride + kvh * D;
    const bf16 *vh = v + (int64_t)b * cap * kvstride + kvh * D;
    const float scale = rsqrtf((float)D), sl2 = scale * LOG2E;
    const int wr = warp * 16 * MT;  // this warp's rows: m0 + wr + mt * 16 + g (c0, c1) and + 8 (c2, c3)
    const bool wlive = m0 + wr < tq;
    const int wlast = off + min(m0 + wr + 16 * MT, tq) - 1;  // position of the warp's last live row
    const int ntiles = (off + min(m0 + BM, tq) + BN - 1) / BN;  // keys past the last row's position are never needed

    load_tile<D, BM, TH>(Qs, qh, qstride, m0, tq);
    load_tile<D, BN, TH>(Ks, kh, kvstride, 0, tk);
    cp_async_commit();

    uint32_t qf[QREG ? MT : 1][QREG ? D / 16 : 1][4];
    float o[MT][NT][4] = {};
    float mx[MT][2], l[MT][2];  // mx in raw (unscaled) score units; l per thread (quad-reduced at the end)
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) mx[mt][hr] = -INFINITY, l[mt][hr] = 0.0f;

    for (int j = 0; j < ntiles; j++) {
        const int n0 = j * BN;
        // Opaque per iteration: keeps the compiler from hoisting every fragment address out of
        // the loop (some 24 live registers, which spill next to O and S).
        int ln = lane;
        asm volatile("" : "+r"(ln));
        const uint32_t qa = smem_u32(Qs) + a_lane<D>(ln), kb = smem_u32(Ks) + bn_lane<D>(ln);
        const uint32_t vb = smem_u32(Vs) + bk_lane<D>(ln);
        cp_async_wait<0>();
        __syncthreads();  // K_j (and Q) visible; every warp is done with V_{j-1}
        load_tile<D, BN, TH>(Vs, vh, kvstride, n0, tk);
        cp_async_commit();
        if (QREG && j == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int kc = 0; kc < D / 16; kc++)
                    ldsm4(qf[QREG ? mt : 0][QREG ? kc : 0], frag<D>(qa, wr + mt * 16, kc * 16));
        }
        const bool active = wlive && n0 <= wlast;  // some row of the warp sees some key of the tile
        uint32_t pa[BN / 16][MT][4];  // P in bf16 A fragments: 32 registers where S took 64
        if (active) {
            float s[MT][KT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < KT; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[mt][nt][e] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    if constexpr (QREG) {
#pragma unroll
                        for (int x = 0; x < 4; x++) a[mt][x] = qf[QREG ? mt : 0][QREG ? kc : 0][x];
                    } else {
                        ldsm4(a[mt], frag<D>(qa, wr + mt * 16, kc * 16));
                    }
                }
#pragma unroll
                for (int np = 0; np < BN / 16; np++) {
                    uint32_t bk[4];
                    ldsm4(bk, frag<D>(kb, np * 16, kc * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma(s[mt][2 * np], a[mt], bk[0], bk[1]);
                        mma(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
                    }
                }
            }
            if (n0 + BN - 1 > off + m0 + wr) {  // the tile reaches past the diagonal of some row (or past tk)
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int nt = 0; nt < KT; nt++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int key = n0 + nt * 8 + 2 * t + (e & 1);
                            const int row = m0 + wr + mt * 16 + g + (e >> 1) * 8;
                            if (key > off + row) s[mt][nt][e] = -INFINITY;
                        }
            }
            // Online softmax; the 4 threads of a quad share a row, so partial sums stay per thread
            // (every rescale is row-uniform) and are reduced once at the end.
            float corr[MT][2];
            bool moved = false;
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int hr = 0; hr < 2; hr++) {
                    float tmax = -INFINITY;
#pragma unroll
                    for (int nt = 0; nt < KT; nt++)
                        tmax = fmaxf(tmax, fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]));
                    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
                    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
                    const float mnew = fmaxf(mx[mt][hr], tmax);
                    const float base = mnew == -INFINITY ? 0.0f : mnew * sl2;  // a row with nothing visible yet
                    corr[mt][hr] = mnew == mx[mt][hr] ? 1.0f : ex2(mx[mt][hr] * sl2 - base);
                    moved |= mnew != mx[mt][hr];
                    mx[mt][hr] = mnew;
                    float rs = 0.0f;
#pragma unroll
                    for (int nt = 0; nt < KT; nt++)
#pragma unroll
                        for (int e = 2 * hr; e < 2 * hr + 2; e++) {
                            s[mt][nt][e] = ex2(fmaf(s[mt][nt][e], sl2, -base));
                            rs += s[mt][nt][e];
                        }
                    l[mt][hr] = l[mt][hr] * corr[mt][hr] + rs;
                }
            if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) {
                        o[mt][nt][0] *= corr[mt][0];
                        o[mt][nt][1] *= corr[mt][0];
                        o[mt][nt][2] *= corr[mt][1];
                        o[mt][nt][3] *= corr[mt][1];
                    }
            }
#pragma unroll
            for (int kc = 0; kc < BN / 16; kc++)
#pragma unroll
                for (int mt = 0; mt < MT; mt++) c_to_a(pa[kc][mt], s[mt][2 * kc], s[mt][2 * kc + 1]);
        }

        cp_async_wait<0>();
        __syncthreads();  // V_j visible; every warp is done with K_j
        if (j + 1 < ntiles) load_tile<D, BN, TH>(Ks, kh, kvstride, n0 + BN, tk);
        cp_async_commit();
        if (active) {
            // Column blocks of V outer: one V address live at a time.
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
#pragma unroll
                for (int kc = 0; kc < BN / 16; kc++) {
                    uint32_t bv[4];
                    ldsm4t(bv, frag<D>(vb, kc * 16, dp * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma(o[mt][2 * dp], pa[kc][mt], bv[0], bv[1]);
                        mma(o[mt][2 * dp + 1], pa[kc][mt], bv[2], bv[3]);
                    }
                }
            }
        }
    }

    // Epilogue: each warp stages its own 32 rows of O in bf16 over its own rows of the Q tile
    // (no other warp reads them), then writes them out in whole 16-byte chunks.
    if (!wlive) return;
    // Output addresses from scratch (opaque again), rather than kept live through the loop.
    int bx = blockIdx.x;
    asm volatile("" : "+r"(bx));
    bf16 *oh = out + ((int64_t)(bx / heads) * tq + m0) * qstride + (bx % heads) * D;
    float *lh = lse + ((int64_t)(bx / heads) * tq + m0) * heads + bx % heads;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float lsum = l[mt][hr];
            lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
            lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
            const float inv = 1.0f / lsum;
            const int r = wr + mt * 16 + g + hr * 8;
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                *reinterpret_cast<uint32_t *>(Qs + swz<D>(r, nt * 8 + 2 * t)) =
                    pack(o[mt][nt][2 * hr] * inv, o[mt][nt][2 * hr + 1] * inv);
            if (t == 0 && m0 + r < tq) lh[(int64_t)r * heads] = mx[mt][hr] * scale + __logf(lsum);
        }
    __syncwarp();
    constexpr int CH = D / 8;
#pragma unroll
    for (int it = 0; it < 16 * MT * CH / 32; it++) {
        const int idx = lane + it * 32, r = wr + idx / CH, c = idx % CH;
        if (m0 + r < tq)
            *reinterpret_cast<uint4 *>(oh + (int64_t)r * qstride + c * 8) =
                *reinterpret_cast<const uint4 *>(Qs + swz<D>(r, c * 8));
    }
}

// ---- backward, FlashAttention-2 style ----
// A block owns BN = 128 keys of one q head (grid x = batch * heads, y = key tile, so the heavy
// early key tiles of every head are dispatched first) and walks every 64-query tile that can see
// those keys, with Q, dO (and their lse, delta) double-buffered through cp.async. 8 warps:
//   phase 1, 2 x 4 warps of 32 queries x 32 keys: S = Q K^T, dP = dO V^T, then P and
//            dS = P (dP - delta) * scale go to shared memory as bf16 [query][key] tiles;
//   phase 2, 4 x 2 warps of 32 keys x D/2 columns: dV += P^T dO, dK += dS^T Q (fp32 registers
//            for the whole block), and 2 x 4 warps of 32 queries x D/4 columns: dQ = dS K, added
//            into dq_accum with float atomics (v2 on sm_90).
// Every operand of every product comes from shared memory in 32-row warp tiles, so each ldmatrix
// feeds two mma. Warps (and 16-row chunks) that the causal mask hides entirely skip their work.
// GQA: the q heads of a group add their dK, dV into fp32 dkv_accum with atomics (group > 1);
// with group == 1 the block writes dk, dv directly (rows tk..cap as zeros).
constexpr int BWD_BN = 128, BWD_BM = 64, BWD_THREADS = 256;

template <int D>
__device__ __forceinline__ void bwd(float *dq_accum, float *dkv_accum, bf16 *dk, bf16 *dv, const bf16 *dout,
                                    const float *lse2, const float *delta, const bf16 *q, const bf16 *k, const bf16 *v,
                                    int tq, int tk, int cap, int heads, int kv_heads) {
    constexpr int BN = BWD_BN, BM = BWD_BM, TH = BWD_THREADS;
    constexpr int DV = D / 2;  // dK, dV columns per warp in phase 2
    constexpr int DQ = D / 4;  // dQ columns per warp in phase 2
    extern __shared__ __align__(1024) unsigned char attn_smem[];
    bf16 *Ks = reinterpret_cast<bf16 *>(attn_smem), *Vs = Ks + BN * D;
    bf16 *Qs = Vs + BN * D, *Os = Qs + 2 * BM * D;  // [2][BM][D] each
    bf16 *Ps = Os + 2 * BM * D, *dSs = Ps + BM * BN;  // [BM][BN] each
    float *Ls = reinterpret_cast<float *>(dSs + BM * BN), *Dls = Ls + 2 * BM;  // [2][BM] each
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, b = bh / heads, h = bh % heads, n0 = blockIdx.y * BN;
    const int group = heads / kv_heads, kvh = h / group, off = tk - tq, tqp = (tq + BM - 1) / BM * BM;
    const int64_t qstride = (int64_t)heads * D, kvstride = (int64_t)kv_heads * D;
    const int64_t qbase = (int64_t)b * tq * qstride + h * D, kvbase = (int64_t)b * cap * kvstride + kvh * D;
    const float *lse2h = lse2 + (int64_t)bh * tqp, *deltah = delta + (int64_t)bh * tqp;
    const float scale = rsqrtf((float)D), sl2 = scale * LOG2E;
    const int sq = (warp & 1) * 32, sk = (warp >> 1) * 32;  // phase 1 tile (queries, keys)
    const int kk = (warp & 3) * 32, kd = (warp >> 2) * DV;  // phase 2 dK, dV tile (keys, columns)
    const int qq = (warp & 1) * 32, qd = (warp >> 1) * DQ;  // phase 2 dQ tile (queries, columns)

    load_tile<D, BN, TH>(Ks, k + kvbase, kvstride, n0, tk);
    load_tile<D, BN, TH>(Vs, v + kvbase, kvstride, n0, tk);
    // lse2, delta rows up to tqp exist (the preprocess pads them with zeros); query rows past tq
    // load as zeros, so their S is 0, P finite and their dV, dK, dS contributions exactly 0.
    auto load_q = [&](int i0, int bf) {
        load_tile<D, BM, TH>(Qs + bf * BM * D, q + qbase, qstride, i0, tq);
        load_tile<D, BM, TH>(Os + bf * BM * D, dout + qbase, qstride, i0, tq);
        const int c = threadIdx.x;
        if (c < BM / 4)
            cp_async16(Ls + bf * BM + 4 * c, lse2h + i0 + 4 * c, true);
        else if (c < BM / 2)
            cp_async16(Dls + bf * BM + 4 * (c - BM / 4), deltah + i0 + 4 * (c - BM / 4), true);
    };
    // Query i sees key n0 from i = n0 - off on; a tile past tk sees no query.
    const int i_first = n0 >= tk ? tq : max(0, n0 - off) / BM * BM;
    if (i_first < tq) load_q(i_first, 0);
    cp_async_commit();

    float dka[2][DV / 8][4] = {}, dva[2][DV / 8][4] = {};
    int buf = 0;
    for (int i0 = i_first; i0 < tq; i0 += BM, buf ^= 1) {
        int ln = lane;  // opaque per iteration, as in fwd: fragment addresses are not hoisted
        asm volatile("" : "+r"(ln));
        cp_async_wait<0>();
        __syncthreads();  // tile i0 visible; every warp is done with the previous tile, P and dS
        if (i0 + BM < tq) load_q(i0 + BM, buf ^ 1);  // lands while this tile computes
        cp_async_commit();
        const bf16 *Qb = Qs + buf * BM * D, *Ob = Os + buf * BM * D;
        const float *Lb = Ls + buf * BM, *Db = Dls + buf * BM;
        const uint32_t qa = smem_u32(Qb) + a_lane<D>(ln), oa = smem_u32(Ob) + a_lane<D>(ln);  // phase 1 A
        const uint32_t kn = smem_u32(Ks) + bn_lane<D>(ln), vn = smem_u32(Vs) + bn_lane<D>(ln);  // phase 1 B
        const uint32_t pt = smem_u32(Ps) + at_lane<BN>(ln), st = smem_u32(dSs) + at_lane<BN>(ln);  // 2a A
        const uint32_t ob = smem_u32(Ob) + bk_lane<D>(ln), qb = smem_u32(Qb) + bk_lane<D>(ln);  // 2a B
        const uint32_t sa_ = smem_u32(dSs) + a_lane<BN>(ln), kb = smem_u32(Ks) + bk_lane<D>(ln);  // 2b

        // phase 1: P and dS of this warp's 32 x 32 tile
        {
            float p[2][4][4] = {}, ds[2][4][4] = {};
            if (n0 + sk <= off + i0 + sq + 31) {  // some key of the tile is visible to some query
#pragma unroll
                for (int kc = 0; kc < D / 16; kc++) {
                    uint32_t a[2][4];
                    ldsm4(a[0], frag<D>(qa, sq, kc * 16));
                    ldsm4(a[1], frag<D>(qa, sq + 16, kc * 16));
#pragma unroll
                    for (int np = 0; np < 2; np++) {
                        uint32_t bk[4];
                        ldsm4(bk, frag<D>(kn, sk + np * 16, kc * 16));
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            mma(p[mt][2 * np], a[mt], bk[0], bk[1]);
                            mma(p[mt][2 * np + 1], a[mt], bk[2], bk[3]);
                        }
                    }
                }
#pragma unroll
                for (int kc = 0; kc < D / 16; kc++) {
                    uint32_t a[2][4];
                    ldsm4(a[0], frag<D>(oa, sq, kc * 16));
                    ldsm4(a[1], frag<D>(oa, sq + 16, kc * 16));
#pragma unroll
                    for (int np = 0; np < 2; np++) {
                        uint32_t bv[4];
                        ldsm4(bv, frag<D>(vn, sk + np * 16, kc * 16));
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            mma(ds[mt][2 * np], a[mt], bv[0], bv[1]);
                            mma(ds[mt][2 * np + 1], a[mt], bv[2], bv[3]);
                        }
                    }
                }
                const bool need_mask = n0 + sk + 31 > off + i0 + sq;
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int hr = 0; hr < 2; hr++) {
                        const int row = sq + mt * 16 + g + hr * 8;
                        const float l2 = Lb[row], dl = Db[row];
#pragma unroll
                        for (int nt = 0; nt < 4; nt++)
#pragma unroll
                            for (int e = 0; e < 2; e++) {
                                const int key = n0 + sk + nt * 8 + 2 * t + e;
                                float pv = ex2(fmaf(p[mt][nt][2 * hr + e], sl2, -l2));
                                if (need_mask && key > off + i0 + row) pv = 0.0f;
                                p[mt][nt][2 * hr + e] = pv;
                                ds[mt][nt][2 * hr + e] = pv * (ds[mt][nt][2 * hr + e] - dl) * scale;
                            }
                    }
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int hr = 0; hr < 2; hr++)
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) {
                        const int o = swz<BN>(sq + mt * 16 + g + hr * 8, sk + nt * 8 + 2 * t);
                        *reinterpret_cast<uint32_t *>(Ps + o) = pack(p[mt][nt][2 * hr], p[mt][nt][2 * hr + 1]);
                        *reinterpret_cast<uint32_t *>(dSs + o) = pack(ds[mt][nt][2 * hr], ds[mt][nt][2 * hr + 1]);
                    }
        }
        __syncthreads();  // P, dS visible; every warp is done reading Q, dO of this tile in phase 1

        // phase 2a: dV += P^T dO, dK += dS^T Q over the tile's 64 queries
#pragma unroll
        for (int kq = 0; kq < BM / 16; kq++) {
            if (n0 + kk > off + i0 + kq * 16 + 15) continue;  // these 16 queries see none of the warp's keys
            uint32_t pa[2][4], sa[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                ldsm4t(pa[mt], frag<BN>(pt, kq * 16, kk + mt * 16));
                ldsm4t(sa[mt], frag<BN>(st, kq * 16, kk + mt * 16));
            }
#pragma unroll
            for (int dp = 0; dp < DV / 16; dp++) {
                uint32_t bo[4], bq[4];
                ldsm4t(bo, frag<D>(ob, kq * 16, kd + dp * 16));
                ldsm4t(bq, frag<D>(qb, kq * 16, kd + dp * 16));
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma(dva[mt][2 * dp], pa[mt], bo[0], bo[1]);
                    mma(dva[mt][2 * dp + 1], pa[mt], bo[2], bo[3]);
                    mma(dka[mt][2 * dp], sa[mt], bq[0], bq[1]);
                    mma(dka[mt][2 * dp + 1], sa[mt], bq[2], bq[3]);
                }
            }
        }

        // phase 2b: dQ = dS K for this warp's 32 queries x D/4 columns
        {
            float acc[2][DQ / 8][4] = {};
#pragma unroll
            for (int kc = 0; kc < BN / 16; kc++) {
                if (n0 + kc * 16 > off + i0 + qq + 31) continue;  // keys invisible to every row of the warp
                uint32_t a[2][4];
                ldsm4(a[0], frag<BN>(sa_, qq, kc * 16));
                ldsm4(a[1], frag<BN>(sa_, qq + 16, kc * 16));
#pragma unroll
                for (int np = 0; np < DQ / 16; np++) {
                    uint32_t bk[4];
                    ldsm4t(bk, frag<D>(kb, kc * 16, qd + np * 16));
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        mma(acc[mt][2 * np], a[mt], bk[0], bk[1]);
                        mma(acc[mt][2 * np + 1], a[mt], bk[2], bk[3]);
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int hr = 0; hr < 2; hr++) {
                    const int i = i0 + qq + mt * 16 + g + hr * 8;
                    if (i >= tq) continue;
                    float *dst = dq_accum + (((int64_t)b * tq + i) * heads + h) * D + qd + 2 * t;
#pragma unroll
                    for (int nt = 0; nt < DQ / 8; nt++)
                        atomic_add2(dst + nt * 8, acc[mt][nt][2 * hr], acc[mt][nt][2 * hr + 1]);
                }
        }
    }

    cp_async_wait<0>();  // a tile past tk ran no query tile: its K, V copies must land before exit

    // Output addresses from scratch (opaque again), rather than kept live through the loop.
    int bx = blockIdx.x, nh = heads;
    asm volatile("" : "+r"(bx), "+r"(nh));
    const int64_t nkv = (int64_t)(gridDim.x / nh) * cap * kvstride;
    const int64_t obase = (int64_t)(bx / nh) * cap * kvstride + (bx % nh) / (nh / kv_heads) * D;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const int key = n0 + kk + mt * 16 + g + hr * 8;
            const int64_t base = obase + (int64_t)key * kvstride + kd + 2 * t;
            if (dkv_accum) {
                if (key >= tk) continue;  // the accumulator rows stay zero
#pragma unroll
                for (int nt = 0; nt < DV / 8; nt++) {
                    atomic_add2(dkv_accum + base + nt * 8, dka[mt][nt][2 * hr], dka[mt][nt][2 * hr + 1]);
                    atomic_add2(dkv_accum + nkv + base + nt * 8, dva[mt][nt][2 * hr], dva[mt][nt][2 * hr + 1]);
                }
            } else {
                if (key >= cap) continue;  // rows tk..cap accumulated exact zeros (masked for every query)
#pragma unroll
                for (int nt = 0; nt < DV / 8; nt++) {
                    *reinterpret_cast<__nv_bfloat162 *>(dk + base + nt * 8) =
                        __floats2bfloat162_rn(dka[mt][nt][2 * hr], dka[mt][nt][2 * hr + 1]);
                    *reinterpret_cast<__nv_bfloat162 *>(dv + base + nt * 8) =
                        __floats2bfloat162_rn(dva[mt][nt][2 * hr], dva[mt][nt][2 * hr + 1]);
                }
            }
        }
}

template <int D>
constexpr int bwd_smem_bytes() {
    return (2 * BWD_BN * D + 4 * BWD_BM * D + 2 * BWD_BM * BWD_BN) * 2 + 4 * BWD_BM * 4;
}
static_assert(bwd_smem_bytes<128>() == 164864 && bwd_smem_bytes<64>() == 99328, "header comment");

// ---- scalar helpers for the fallback kernels ----
// a (shared, float) . b (global, bf16) over n (multiple of 8) elements
__device__ __forceinline__ float dot_sg(const float *a, const bf16 *b, int n) {
    float acc = 0.0f;
    for (int d = 0; d < n; d += 8) {
        float f[8];
        unpack8(*reinterpret_cast<const uint4 *>(b + d), f);
        const float4 a0 = *reinterpret_cast<const float4 *>(a + d), a1 = *reinterpret_cast<const float4 *>(a + d + 4);
        acc += a0.x * f[0] + a0.y * f[1] + a0.z * f[2] + a0.w * f[3] + a1.x * f[4] + a1.y * f[5] + a1.z * f[6] +
               a1.w * f[7];
    }
    return acc;
}
// Lane-owned dims of a D <= 256 row: pairs 2*lane + 64*r, r < 4.
constexpr int PAIRS = 4;
__device__ __forceinline__ void axpy_pairs(float acc[PAIRS][2], float a, const bf16 *row, int D, int lane) {
#pragma unroll
    for (int r = 0; r < PAIRS; r++) {
        const int d = 2 * lane + 64 * r;
        if (d < D) {
            const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(row + d));
            acc[r][0] = fmaf(a, x.x, acc[r][0]);
            acc[r][1] = fmaf(a, x.y, acc[r][1]);
        }
    }
}
__device__ __forceinline__ void store_pairs(bf16 *row, const float acc[PAIRS][2], float mul, int D, int lane) {
#pragma unroll
    for (int r = 0; r < PAIRS; r++) {
        const int d = 2 * lane + 64 * r;
        if (d < D)
            *reinterpret_cast<__nv_bfloat162 *>(row + d) = __floats2bfloat162_rn(acc[r][0] * mul, acc[r][1] * mul);
    }
}


}  // namespace attn

// grid (batch * heads, ceil(tq / 128), 1), block 128, dynamic smem 512 * D bytes (32768 for D = 64,
// 65536 for D = 128: opt-in above 48 KB), two blocks per SM. Matches cpu::attention.
extern "C" __global__ void __launch_bounds__(128, 2)
    attention_fwd_d64(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int tq, int tk, int cap,
                      int heads, int kv_heads) {
    attn::fwd<64>(out, lse, q, k, v, tq, tk, cap, heads, kv_heads);
}
// Same geometry as attention_fwd_d64 (dynamic smem 65536 bytes).
extern "C" __global__ void __launch_bounds__(128, 2)
    attention_fwd_d128(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int tq, int tk, int cap,
                       int heads, int kv_heads) {
    attn::fwd<128>(out, lse, q, k, v, tq, tk, cap, heads, kv_heads);
}

// Fallback forward for any D % 8 == 0, D <= 256: one warp per (query row, head). Lanes score 32
// keys at once (one key each), then accumulate P V with each lane owning dim pairs.
// grid (ceil(tq * heads / 4), batch), block 128, no dynamic smem (4 KB static). Matches cpu::attention.
extern "C" __global__ void attention_fwd_generic(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                                                 int tq, int tk, int cap, int heads, int kv_heads, int head_dim) {
    using namespace attn;
    __shared__ __align__(16) float qs[4][256];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int w = blockIdx.x * 4 + warp, b = blockIdx.y;
    if (w >= tq * heads) return;
    const int i = w / heads, h = w % heads, kvh = h / (heads / kv_heads), D = head_dim;
    const float scale = rsqrtf((float)D);
    const int64_t row = (int64_t)b * tq + i, kvstride = (int64_t)kv_heads * D;
    const bf16 *kh = k + (int64_t)b * cap * kvstride + kvh * D, *vh = v + (int64_t)b * cap * kvstride + kvh * D;
    float *qw = qs[warp];
    for (int d = lane; d < D; d += 32) qw[d] = ld(q + (row * heads + h) * D + d) * scale * LOG2E;
    __syncwarp();

    const int pos = tk - tq + i;
    float m = -INFINITY, l = 0.0f, acc[PAIRS][2] = {};  // m, l in log2 units; l per lane
    for (int j0 = 0; j0 <= pos; j0 += 32) {
        const int j = j0 + lane;
        const float s = j <= pos ? dot_sg(qw, kh + j * kvstride, D) : -INFINITY;
        const float mn = fmaxf(m, warp_max(s));  // finite: key j0 is always visible
        const float corr = exp2f(m - mn), p = exp2f(s - mn);
        l = l * corr + p;
        m = mn;
#pragma unroll
        for (int r = 0; r < PAIRS; r++) acc[r][0] *= corr, acc[r][1] *= corr;
        const int nj = min(32, pos + 1 - j0);
        for (int jj = 0; jj < nj; jj++)
            axpy_pairs(acc, __shfl_sync(0xffffffffu, p, jj), vh + (j0 + jj) * kvstride, D, lane);
    }
    l = warp_sum(l);
    store_pairs(out + (row * heads + h) * D, acc, 1.0f / l, D, lane);
    if (lane == 0) lse[row * heads + h] = m * LN2 + __logf(l);
}

// Backward preprocess. Rows r = (b * heads + h) * tqp + i over [batch, heads, tqp], tqp = tq rounded
// up to 64: delta[r] = dout . out of (b, i, h), and, when not NULL, lse2[r] = lse * log2(e);
// padding rows i >= tq get 0 in both. When not NULL it also zeroes the row of dq_accum
// ([batch, tq, heads, D]) and all nkv2 floats of dkv_accum, so the caller never memsets them.
// grid ceil(batch * heads * tqp / 4), block 128, no smem. Matches big_d in cpu::attention_bwd.
extern "C" __global__ void attention_bwd_preprocess(float *delta, float *lse2, float *dq_accum, float *dkv_accum,
                                                    const bf16 *dout, const bf16 *out, const float *lse, int batch,
                                                    int tq, int heads, int head_dim, int64_t nkv2) {
    if (dkv_accum) {
        const int64_t stride = (int64_t)gridDim.x * blockDim.x;
        for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < nkv2 / 4; j += stride)
            reinterpret_cast<float4 *>(dkv_accum)[j] = float4{0.0f, 0.0f, 0.0f, 0.0f};
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tqp = (tq + 63) / 64 * 64;
    const int64_t r = (int64_t)blockIdx.x * 4 + warp;
    if (r >= (int64_t)batch * heads * tqp) return;
    const int i = (int)(r % tqp);
    const int64_t bh = r / tqp;
    if (i >= tq) {
        if (lane == 0) {
            delta[r] = 0.0f;
            if (lse2) lse2[r] = 0.0f;
        }
        return;
    }
    const int64_t row = ((bh / heads) * tq + i) * heads + bh % heads;  // (b, i, h)
    const bf16 *a = dout + row * head_dim, *o = out + row * head_dim;
    float acc = 0.0f;
    for (int d = 2 * lane; d < head_dim; d += 64) {
        const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(a + d));
        const float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(o + d));
        acc += x.x * y.x + x.y * y.y;
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        delta[r] = acc;
        if (lse2) lse2[r] = lse[row] * attn::LOG2E;
    }
    if (dq_accum)
        for (int d = 4 * lane; d < head_dim; d += 128)
            *reinterpret_cast<float4 *>(dq_accum + row * head_dim + d) = float4{0.0f, 0.0f, 0.0f, 0.0f};
}

// grid (batch * heads, ceil(n / 128), 1) with n = tk when dkv_accum is given (GQA, heads >
// kv_heads) and n = cap when it is NULL (heads == kv_heads); block 256; dynamic smem
// bwd_smem_bytes<D>(): 164864 bytes for D = 128, 99328 for D = 64 (opt-in above 48 KB), one
// block per SM. Needs delta, lse2 and zeroed dq_accum (and dkv_accum) from
// attention_bwd_preprocess. Adds dq into dq_accum; adds dk, dv into dkv_accum (dk then dv, each
// [batch, cap, kv_heads, D]) or, without it, writes dk, dv (=) in full, rows tk..cap as zeros;
// attention_bwd_convert finishes. Matches cpu::attention_bwd.
extern "C" __global__ void __launch_bounds__(256, 1)
    attention_bwd_d64(float *dq_accum, float *dkv_accum, bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse2,
                      const float *delta, const bf16 *q, const bf16 *k, const bf16 *v, int tq, int tk, int cap,
                      int heads, int kv_heads) {
    attn::bwd<64>(dq_accum, dkv_accum, dk, dv, dout, lse2, delta, q, k, v, tq, tk, cap, heads, kv_heads);
}
// Same geometry as attention_bwd_d64 (dynamic smem 164864 bytes).
extern "C" __global__ void __launch_bounds__(256, 1)
    attention_bwd_d128(float *dq_accum, float *dkv_accum, bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse2,
                       const float *delta, const bf16 *q, const bf16 *k, const bf16 *v, int tq, int tk, int cap,
                       int heads, int kv_heads) {
    attn::bwd<128>(dq_accum, dkv_accum, dk, dv, dout, lse2, delta, q, k, v, tq, tk, cap, heads, kv_heads);
}

// dq = bf16(dq_accum) (nq values), and when dkv_accum is not NULL dk, dv = bf16 of its two halves
// (nkv values each). nq, nkv multiples of 4. grid ceil((nq + 2 nkv) / 1024), block 256, no smem.
extern "C" __global__ void attention_bwd_convert(bf16 *dq, bf16 *dk, bf16 *dv, const float *dq_accum,
                                                 const float *dkv_accum, int64_t nq, int64_t nkv) {
    const int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    const float *src;
    bf16 *dst;
    if (i < nq) {
        src = dq_accum + i;
        dst = dq + i;
    } else if (dkv_accum && i < nq + 2 * nkv) {
        src = dkv_accum + (i - nq);
        dst = i < nq + nkv ? dk + (i - nq) : dv + (i - nq - nkv);
    } else {
        return;
    }
    const float4 x = *reinterpret_cast<const float4 *>(src);
    __nv_bfloat162 *d2 = reinterpret_cast<__nv_bfloat162 *>(dst);
    d2[0] = __floats2bfloat162_rn(x.x, x.y);
    d2[1] = __floats2bfloat162_rn(x.z, x.w);
}

// Fallback dq for any D % 8 == 0, D <= 256: one warp per (query row, head), 32 keys at a time.
// grid (ceil(tq * heads / 4), batch), block 128, no dynamic smem (8 KB static). Needs delta from
// attention_bwd_preprocess. Writes dq (=). Matches the dq part of cpu::attention_bwd.
extern "C" __global__ void attention_bwd_dq_generic(bf16 *dq, const bf16 *dout, const float *lse, const float *delta,
                                                    const bf16 *q, const bf16 *k, const bf16 *v, int tq, int tk,
                                                    int cap, int heads, int kv_heads, int head_dim) {
    using namespace attn;
    __shared__ __align__(16) float qs[4][256], dos[4][256];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int w = blockIdx.x * 4 + warp, b = blockIdx.y;
    if (w >= tq * heads) return;
    const int i = w / heads, h = w % heads, kvh = h / (heads / kv_heads), D = head_dim;
    const float scale = rsqrtf((float)D);
    const int64_t row = (int64_t)b * tq + i, kvstride = (int64_t)kv_heads * D, qoff = (row * heads + h) * D;
    const bf16 *kh = k + (int64_t)b * cap * kvstride + kvh * D, *vh = v + (int64_t)b * cap * kvstride + kvh * D;
    float *qw = qs[warp], *dw = dos[warp];
    for (int d = lane; d < D; d += 32) {
        qw[d] = ld(q + qoff + d) * scale * LOG2E;
        dw[d] = ld(dout + qoff + d);
    }
    __syncwarp();
    const int tqp = (tq + 63) / 64 * 64;
    const float lse2 = lse[row * heads + h] * LOG2E, dl = delta[((int64_t)b * heads + h) * tqp + i];
    const int pos = tk - tq + i;
    float acc[PAIRS][2] = {};
    for (int j0 = 0; j0 <= pos; j0 += 32) {
        const int j = j0 + lane;
        float ds = 0.0f;
        if (j <= pos) {
            const float p = exp2f(dot_sg(qw, kh + j * kvstride, D) - lse2);
            ds = p * (dot_sg(dw, vh + j * kvstride, D) - dl) * scale;
        }
        const int nj = min(32, pos + 1 - j0);
        for (int jj = 0; jj < nj; jj++)
            axpy_pairs(acc, __shfl_sync(0xffffffffu, ds, jj), kh + (j0 + jj) * kvstride, D, lane);
    }
    store_pairs(dq + qoff, acc, 1.0f, D, lane);
}

// Fallback dk, dv for any D % 8 == 0, D <= 256: one warp per (key row, kv head) over all of cap
// (rows tk..cap get zeros), looping over the group's q heads and 32 queries at a time.
// grid (ceil(cap * kv_heads / 4), batch), block 128, no dynamic smem (8 KB static). Needs delta
// from attention_bwd_preprocess. Writes dk, dv (=). Matches the dk, dv part of cpu::attention_bwd.
extern "C" __global__ void attention_bwd_dkdv_generic(bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse,
                                                      const float *delta, const bf16 *q, const bf16 *k, const bf16 *v,
                                                      int tq, int tk, int cap, int heads, int kv_heads, int head_dim) {
    using namespace attn;
    __shared__ __align__(16) float ks[4][256], vs[4][256];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int w = blockIdx.x * 4 + warp, b = blockIdx.y;
    if (w >= cap * kv_heads) return;
    const int j = w / kv_heads, kvh = w % kv_heads, D = head_dim, group = heads / kv_heads, tqp = (tq + 63) / 64 * 64;
    const float scale = rsqrtf((float)D);
    const int64_t kvstride = (int64_t)kv_heads * D, qstride = (int64_t)heads * D;
    const int64_t kvoff = ((int64_t)b * cap + j) * kvstride + kvh * D;
    float dka[PAIRS][2] = {}, dva[PAIRS][2] = {};
    if (j < tk) {
        float *kw = ks[warp], *vw = vs[warp];
        for (int d = lane; d < D; d += 32) {
            kw[d] = ld(k + kvoff + d) * scale * LOG2E;
            vw[d] = ld(v + kvoff + d);
        }
        __syncwarp();
        const int i_first = max(0, j - (tk - tq));  // first query whose position reaches key j
        for (int gi = 0; gi < group; gi++) {
            const int h = kvh * group + gi;
            const bf16 *qh = q + (int64_t)b * tq * qstride + h * D, *doh = dout + (int64_t)b * tq * qstride + h * D;
            for (int i0 = i_first; i0 < tq; i0 += 32) {
                const int i = i0 + lane;
                float p = 0.0f, ds = 0.0f;
                if (i < tq) {
                    const int64_t li = ((int64_t)b * tq + i) * heads + h;
                    p = exp2f(dot_sg(kw, qh + i * qstride, D) - lse[li] * LOG2E);
                    ds = p * (dot_sg(vw, doh + i * qstride, D) - delta[((int64_t)b * heads + h) * tqp + i]) * scale;
                }
                const int ni = min(32, tq - i0);
                for (int ii = 0; ii < ni; ii++) {
                    axpy_pairs(dva, __shfl_sync(0xffffffffu, p, ii), doh + (i0 + ii) * qstride, D, lane);
                    axpy_pairs(dka, __shfl_sync(0xffffffffu, ds, ii), qh + (i0 + ii) * qstride, D, lane);
                }
            }
        }
    }
    store_pairs(dk + kvoff, dka, 1.0f, D, lane);
    store_pairs(dv + kvoff, dva, 1.0f, D, lane);
}

// cache[b, pos0 + t, :] = src[b, t, :]; src is [batch, tq, row], cache [batch, cap, row].
// grid ceil(batch * tq * row / 256), block 256, no smem. Matches cpu::kv_write.
extern "C" __global__ void kv_write(bf16 *cache, const bf16 *src, int batch, int cap, int pos0,
                                    const uint32_t *starts, int tq, int row) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)batch * tq * row) return;
    const int64_t bt = i / row, c = i % row, b = bt / tq, t = bt % tq;
    const int64_t at = starts ? (int64_t)starts[b] : pos0;
    cache[(b * cap + at + t) * row + c] = src[i];
}
