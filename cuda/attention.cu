// Causal grouped-query attention: flash-style forward and backward on tensor cores, a scalar
// fallback for odd head sizes, and the KV-cache write. Decode is in attention_decode.cu.
// CPU oracles: cpu::attention, cpu::attention_bwd, cpu::kv_write (src/backend/cpu.rs).
//
// Layouts (row-major): q, out, dout, dq: [batch, tq, heads, D]; k, v, dk, dv: [batch, cap,
// kv_heads, D], rows 0..tk valid; lse, delta: [batch, tq, heads] float. Query i sits at absolute
// position tk - tq + i and sees keys 0..=that position; head h reads kv head h / (heads /
// kv_heads); scale 1/sqrt(D). lse is the natural-log logsumexp of the scaled scores (cpu: m + ln l).
// Every pointer must be 16-byte aligned (the tiles move 16-byte chunks); D is a multiple of 8.
//
// head_dim dispatch (the Rust side picks):
//   D == 64 or D == 128        -> attention_fwd_d{64,128}, attention_bwd_d{64,128} (+ convert)
//   other D, D % 8 == 0, <= 256 -> attention_fwd_generic, attention_bwd_{dq,dkdv}_generic
//   kv_write takes any D % 8 == 0, D <= 256.
//
// Kernel signatures (all extern "C" __global__, bf16 = __nv_bfloat16):
//   void attention_fwd_d64(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
//                          int tq, int tk, int cap, int heads, int kv_heads)
//   void attention_fwd_d128(same as attention_fwd_d64)
//   void attention_fwd_generic(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
//                              int tq, int tk, int cap, int heads, int kv_heads, int head_dim)
//   void attention_bwd_preprocess(float *delta, float *dq_accum, const bf16 *dout, const bf16 *out,
//                                 int64_t rows, int head_dim)
//   void attention_bwd_d64(float *dq_accum, bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse,
//                          const float *delta, const bf16 *q, const bf16 *k, const bf16 *v,
//                          int tq, int tk, int cap, int heads, int kv_heads)
//   void attention_bwd_d128(same as attention_bwd_d64)
//   void attention_bwd_dq_convert(bf16 *dq, const float *dq_accum, int64_t n)
//   void attention_bwd_dq_generic(bf16 *dq, const bf16 *dout, const float *lse, const float *delta,
//                                 const bf16 *q, const bf16 *k, const bf16 *v,
//                                 int tq, int tk, int cap, int heads, int kv_heads, int head_dim)
//   void attention_bwd_dkdv_generic(bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse,
//                                   const float *delta, const bf16 *q, const bf16 *k, const bf16 *v,
//                                   int tq, int tk, int cap, int heads, int kv_heads, int head_dim)
//   void kv_write(bf16 *cache, const bf16 *src, int batch, int cap, int pos0, int tq, int row)
//
// Backward sequence, fast path: attention_bwd_preprocess (writes delta, zeroes dq_accum) ->
// attention_bwd_d{64,128} -> attention_bwd_dq_convert. Fallback: attention_bwd_preprocess with
// dq_accum = NULL -> attention_bwd_dq_generic and attention_bwd_dkdv_generic (either order).
// Scratch: delta float[batch*tq*heads]; dq_accum float[batch*tq*heads*D] (fast path only). Neither
// needs zeroing by the caller. GQA: one backward block owns a kv head and loops over its q heads,
// so dk, dv need no scratch and are written (=) once, rows tk..cap as zeros.
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
__device__ __forceinline__ void ldsm4(uint32_t r[4], const bf16 *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm4t(uint32_t r[4], const bf16 *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
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

// Lane address offsets for ldmatrix, tile-relative (row0, col0 = 16-aligned origin):
// A operand from a row-major [m][k] tile (a 16x16 block).
template <int W>
__device__ __forceinline__ const bf16 *a_addr(const bf16 *s, int row0, int col0, int lane) {
    return s + swz<W>(row0 + (lane & 15), col0 + (lane >> 4) * 8);
}
// B operands of two n-tiles (rows n0..n0+15) from a [n][k] tile: regs {0,1} -> n0, {2,3} -> n0+8.
template <int W>
__device__ __forceinline__ const bf16 *bn_addr(const bf16 *s, int n0, int k0, int lane) {
    return s + swz<W>(n0 + (lane & 7) + (lane >> 4) * 8, k0 + ((lane >> 3) & 1) * 8);
}
// B operands of two n-tiles (cols n0..n0+15) from a [k][n] tile via .trans: {0,1} -> n0, {2,3} -> n0+8.
template <int W>
__device__ __forceinline__ const bf16 *bk_addr(const bf16 *s, int k0, int n0, int lane) {
    return s + swz<W>(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + (lane >> 4) * 8);
}

// rows row0..row0+ROWS of a strided global matrix (row r at g + r * stride) into a swizzled
// tile; rows >= nvalid become zeros, so garbage past tk (or past tq) never reaches the math.
template <int D, int ROWS>
__device__ __forceinline__ void load_tile(bf16 *s, const bf16 *g, int64_t stride, int row0, int nvalid) {
    constexpr int CH = D / 8;
    for (int idx = threadIdx.x; idx < ROWS * CH; idx += blockDim.x) {
        const int r = idx / CH, c = idx % CH;
        const bool ok = row0 + r < nvalid;
        const bf16 *src = g + (ok ? (int64_t)(row0 + r) * stride : 0) + c * 8;
        cp_async16(s + swz<D>(r, c * 8), src, ok);
    }
}

// ---- forward, FlashAttention-2 style ----
// A block owns 64 query rows of one head (16 per warp) and streams 64-key tiles of K and V
// through shared memory. Q lives in registers; S = QK^T stays in registers, becomes P in place,
// and feeds PV directly. The next K tile is fetched while PV runs on the current V tile.
constexpr int FWD_BM = 64, FWD_BN = 64;

template <int D>
__device__ __forceinline__ void fwd(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int tq,
                                    int tk, int cap, int heads, int kv_heads) {
    constexpr int BM = FWD_BM, BN = FWD_BN, NT = D / 8, KT = BN / 8;
    extern __shared__ __align__(16) unsigned char attn_smem[];
    bf16 *Ks = reinterpret_cast<bf16 *>(attn_smem), *Vs = Ks + BN * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest rows first: causal load balance
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads), off = tk - tq;
    const int64_t qstride = (int64_t)heads * D, kvstride = (int64_t)kv_heads * D;
    const bf16 *qh = q + (int64_t)b * tq * qstride + h * D;
    const bf16 *kh = k + (int64_t)b * cap * kvstride + kvh * D;
    const bf16 *vh = v + (int64_t)b * cap * kvstride + kvh * D;
    const float scale = rsqrtf((float)D), sl2 = scale * LOG2E;

    // Q passes through the V buffer on its way to registers.
    load_tile<D, BM>(Vs, qh, qstride, m0, tq);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kc = 0; kc < D / 16; kc++) ldsm4(qf[kc], a_addr<D>(Vs, warp * 16, kc * 16, lane));
    __syncthreads();

    const int r0 = m0 + warp * 16 + g;  // this thread's rows: r0 (c0, c1) and r0 + 8 (c2, c3)
    const int ntiles = (off + min(m0 + BM, tq) + BN - 1) / BN;  // keys past the last row's position are never needed
    float o[NT][4] = {};
    float mx[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // mx in raw (unscaled) score units

    load_tile<D, BN>(Ks, kh, kvstride, 0, tk);
    cp_async_commit();
    for (int j = 0; j < ntiles; j++) {
        const int n0 = j * BN;
        load_tile<D, BN>(Vs, vh, kvstride, n0, tk);
        cp_async_commit();
        cp_async_wait<1>();  // K_j has landed, V_j may still be in flight
        __syncthreads();

        float s[KT][4] = {};
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
#pragma unroll
            for (int np = 0; np < BN / 16; np++) {
                uint32_t bk[4];
                ldsm4(bk, bn_addr<D>(Ks, np * 16, kc * 16, lane));
                mma(s[2 * np], qf[kc], bk[0], bk[1]);
                mma(s[2 * np + 1], qf[kc], bk[2], bk[3]);
            }
        }
        if (n0 + BN - 1 > off + m0) {  // the tile reaches past the diagonal (or past tk)
#pragma unroll
            for (int nt = 0; nt < KT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = n0 + nt * 8 + 2 * t + (e & 1), row = r0 + (e >> 1) * 8;
                    if (key > off + row) s[nt][e] = -INFINITY;
                }
        }
        // Online softmax; the 4 threads of a quad share a row, so partial sums stay per thread
        // (every rescale is row-uniform) and are reduced once at the end.
        float corr[2];
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float tmax = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < KT; nt++) tmax = fmaxf(tmax, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
            tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
            tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
            const float mnew = fmaxf(mx[hr], tmax);
            const float base = mnew == -INFINITY ? 0.0f : mnew * sl2;  // a row with nothing visible yet
            corr[hr] = exp2f(mx[hr] * sl2 - base);
            mx[hr] = mnew;
            float rs = 0.0f;
#pragma unroll
            for (int nt = 0; nt < KT; nt++)
#pragma unroll
                for (int e = 2 * hr; e < 2 * hr + 2; e++) {
                    s[nt][e] = exp2f(fmaf(s[nt][e], sl2, -base));
                    rs += s[nt][e];
                }
            l[hr] = l[hr] * corr[hr] + rs;
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            o[nt][0] *= corr[0];
            o[nt][1] *= corr[0];
            o[nt][2] *= corr[1];
            o[nt][3] *= corr[1];
        }

        cp_async_wait<0>();
        __syncthreads();  // V_j visible; every warp is done with K_j
        if (j + 1 < ntiles) {
            load_tile<D, BN>(Ks, kh, kvstride, n0 + BN, tk);
            cp_async_commit();
        }
#pragma unroll
        for (int kc = 0; kc < BN / 16; kc++) {
            uint32_t pa[4];
            c_to_a(pa, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t bv[4];
                ldsm4t(bv, bk_addr<D>(Vs, kc * 16, dp * 16, lane));
                mma(o[2 * dp], pa, bv[0], bv[1]);
                mma(o[2 * dp + 1], pa, bv[2], bv[3]);
            }
        }
        __syncthreads();  // every warp is done with V_j before V_{j+1} overwrites it
    }

#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float lsum = l[hr];
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
        const int row = r0 + hr * 8;
        if (row >= tq) continue;
        const float inv = 1.0f / lsum;
        bf16 *orow = out + ((int64_t)b * tq + row) * qstride + h * D;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            *reinterpret_cast<__nv_bfloat162 *>(orow + nt * 8 + 2 * t) =
                __floats2bfloat162_rn(o[nt][2 * hr] * inv, o[nt][2 * hr + 1] * inv);
        if (t == 0) lse[((int64_t)b * tq + row) * heads + h] = mx[hr] * scale + __logf(lsum);
    }
}

// ---- backward, FlashAttention-2 style ----
// A block owns 64 keys of one kv head (16 per warp) and keeps their dK, dV in fp32 registers
// while it walks every q head of the group and every query tile that can see those keys. Each
// warp works on the transposed products (keys as rows): S^T = K Q^T, dV += P^T dO,
// dP^T = V dO^T, dK += dS^T Q, so P^T and dS^T chain as A operands in registers. dQ = dS K needs
// all 64 keys per query row, so dS goes to shared memory (over the dO tile) and the block
// computes dQ cooperatively, adding it into dq_accum with float atomics.
// Query tiles are 32 rows for D = 128 (K, V, Q, dO tiles then fill exactly 48 KB) and 64 for D = 64.
constexpr int BWD_BN = 64;

template <int D>
__device__ __forceinline__ void bwd(float *dq_accum, bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse,
                                    const float *delta, const bf16 *q, const bf16 *k, const bf16 *v, int tq, int tk,
                                    int cap, int heads, int kv_heads) {
    constexpr int BN = BWD_BN, BM = D == 128 ? 32 : 64, NT = D / 8, MT = BM / 8;
    static_assert(BM * BN <= BM * D, "dS must fit in the dO tile");
    extern __shared__ __align__(16) unsigned char attn_smem[];
    bf16 *Ks = reinterpret_cast<bf16 *>(attn_smem), *Vs = Ks + BN * D, *Qs = Vs + BN * D, *Os = Qs + BM * D;
    bf16 *dSs = Os;  // [BM][BN], written after every warp is done with dO
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * BN, kvh = blockIdx.y, b = blockIdx.z;
    const int group = heads / kv_heads, off = tk - tq;
    const int64_t qstride = (int64_t)heads * D, kvstride = (int64_t)kv_heads * D;
    const int64_t kvbase = (int64_t)b * cap * kvstride + kvh * D;
    const float scale = rsqrtf((float)D), sl2 = scale * LOG2E;
    const int kw = warp * 16;  // this warp's keys within the tile: rows kw + g and kw + g + 8

    load_tile<D, BN>(Ks, k + kvbase, kvstride, n0, tk);
    load_tile<D, BN>(Vs, v + kvbase, kvstride, n0, tk);
    cp_async_commit();

    float dka[NT][4] = {}, dva[NT][4] = {};
    // Query i sees key n0 from i = n0 - off on; a tile past tk has no query and writes zeros.
    const int i_first = max(0, n0 - off) / BM * BM;
    for (int gi = 0; gi < group; gi++) {
        const int h = kvh * group + gi;
        const int64_t qbase = (int64_t)b * tq * qstride + h * D;
        for (int i0 = i_first; i0 < tq; i0 += BM) {
            load_tile<D, BM>(Qs, q + qbase, qstride, i0, tq);
            load_tile<D, BM>(Os, dout + qbase, qstride, i0, tq);
            cp_async_commit();
            // lse (log2 units) and delta of the query columns this thread's fragments hold;
            // rows past tq get lse = +inf, so their P, and with it dS, is exactly 0.
            float l2[MT][2], dl[MT][2];
#pragma unroll
            for (int nt = 0; nt < MT; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int i = i0 + nt * 8 + 2 * t + e;
                    const int64_t li = ((int64_t)b * tq + i) * heads + h;
                    l2[nt][e] = i < tq ? lse[li] * LOG2E : INFINITY;
                    dl[nt][e] = i < tq ? delta[li] : 0.0f;
                }
            cp_async_wait<0>();
            __syncthreads();

            // S^T = K_w Q^T, then P^T in place
            float s[MT][4] = {};
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) {
                uint32_t a[4];
                ldsm4(a, a_addr<D>(Ks, kw, kc * 16, lane));
#pragma unroll
                for (int np = 0; np < BM / 16; np++) {
                    uint32_t bq[4];
                    ldsm4(bq, bn_addr<D>(Qs, np * 16, kc * 16, lane));
                    mma(s[2 * np], a, bq[0], bq[1]);
                    mma(s[2 * np + 1], a, bq[2], bq[3]);
                }
            }
            const bool need_mask = off + i0 < n0 + BN - 1;
#pragma unroll
            for (int nt = 0; nt < MT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = n0 + kw + g + (e >> 1) * 8, i = i0 + nt * 8 + 2 * t + (e & 1);
                    const float p = exp2f(fmaf(s[nt][e], sl2, -l2[nt][e & 1]));
                    s[nt][e] = need_mask && key > off + i ? 0.0f : p;
                }

            // dV += P^T dO
#pragma unroll
            for (int kq = 0; kq < BM / 16; kq++) {
                uint32_t pa[4];
                c_to_a(pa, s[2 * kq], s[2 * kq + 1]);
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    uint32_t bo[4];
                    ldsm4t(bo, bk_addr<D>(Os, kq * 16, dp * 16, lane));
                    mma(dva[2 * dp], pa, bo[0], bo[1]);
                    mma(dva[2 * dp + 1], pa, bo[2], bo[3]);
                }
            }

            // dP^T = V_w dO^T, then dS^T = P^T (dP^T - delta) * scale in place
            float ds[MT][4] = {};
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) {
                uint32_t a[4];
                ldsm4(a, a_addr<D>(Vs, kw, kc * 16, lane));
#pragma unroll
                for (int np = 0; np < BM / 16; np++) {
                    uint32_t bo[4];
                    ldsm4(bo, bn_addr<D>(Os, np * 16, kc * 16, lane));
                    mma(ds[2 * np], a, bo[0], bo[1]);
                    mma(ds[2 * np + 1], a, bo[2], bo[3]);
                }
            }
#pragma unroll
            for (int nt = 0; nt < MT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) ds[nt][e] = s[nt][e] * (ds[nt][e] - dl[nt][e & 1]) * scale;

            // dK += dS^T Q
#pragma unroll
            for (int kq = 0; kq < BM / 16; kq++) {
                uint32_t da[4];
                c_to_a(da, ds[2 * kq], ds[2 * kq + 1]);
#pragma unroll
                for (int dd = 0; dd < D / 16; dd++) {
                    uint32_t bq[4];
                    ldsm4t(bq, bk_addr<D>(Qs, kq * 16, dd * 16, lane));
                    mma(dka[2 * dd], da, bq[0], bq[1]);
                    mma(dka[2 * dd + 1], da, bq[2], bq[3]);
                }
            }
            __syncthreads();  // every warp is done reading dO: its tile now takes dS
#pragma unroll
            for (int nt = 0; nt < MT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    dSs[swz<BN>(nt * 8 + 2 * t + (e & 1), kw + g + (e >> 1) * 8)] = to_bf16(ds[nt][e]);
            __syncthreads();

            // dQ (BM x D) = dS (BM x BN) K (BN x D): warps split it into 16-row x DW-column blocks.
            constexpr int WR = BM / 16, WC = 4 / WR, DW = D / WC;
            const int wr = warp % WR, wc = warp / WR;
            uint32_t sa[BN / 16][4];
#pragma unroll
            for (int kc = 0; kc < BN / 16; kc++) ldsm4(sa[kc], a_addr<BN>(dSs, wr * 16, kc * 16, lane));
            const int qi = i0 + wr * 16 + g;  // rows qi (c0, c1) and qi + 8 (c2, c3)
            float *dq0 = dq_accum + (((int64_t)b * tq + qi) * heads + h) * D + wc * DW + 2 * t;
            float *dq1 = dq0 + (int64_t)8 * qstride;
#pragma unroll
            for (int dp = 0; dp < DW / 16; dp++) {
                float acc[2][4] = {};
#pragma unroll
                for (int kc = 0; kc < BN / 16; kc++) {
                    uint32_t bk[4];
                    ldsm4t(bk, bk_addr<D>(Ks, kc * 16, wc * DW + dp * 16, lane));
                    mma(acc[0], sa[kc], bk[0], bk[1]);
                    mma(acc[1], sa[kc], bk[2], bk[3]);
                }
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    const int col = dp * 16 + hf * 8;
                    if (qi < tq) {
                        atomicAdd(dq0 + col, acc[hf][0]);
                        atomicAdd(dq0 + col + 1, acc[hf][1]);
                    }
                    if (qi + 8 < tq) {
                        atomicAdd(dq1 + col, acc[hf][2]);
                        atomicAdd(dq1 + col + 1, acc[hf][3]);
                    }
                }
            }
            __syncthreads();  // Qs and Os are free for the next tile
        }
    }

    cp_async_wait<0>();  // a tile past tk ran no query tile: its K, V copies must land before exit

    // Rows past tk accumulated exact zeros (their keys are masked for every query).
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        const int key = n0 + kw + g + hr * 8;
        if (key >= cap) continue;
        const int64_t base = kvbase + (int64_t)key * kvstride + 2 * t;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            *reinterpret_cast<__nv_bfloat162 *>(dk + base + nt * 8) =
                __floats2bfloat162_rn(dka[nt][2 * hr], dka[nt][2 * hr + 1]);
            *reinterpret_cast<__nv_bfloat162 *>(dv + base + nt * 8) =
                __floats2bfloat162_rn(dva[nt][2 * hr], dva[nt][2 * hr + 1]);
        }
    }
}

// ---- scalar helpers for the fallback kernels ----
__device__ __forceinline__ void ld8(const bf16 *p, float f[8]) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 x = __bfloat1622float2(h[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
}
// a (shared, float) . b (global, bf16) over n (multiple of 8) elements
__device__ __forceinline__ float dot_sg(const float *a, const bf16 *b, int n) {
    float acc = 0.0f;
    for (int d = 0; d < n; d += 8) {
        float f[8];
        ld8(b + d, f);
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

// grid (ceil(tq / 64), heads, batch), block 128, dynamic smem 256 * D bytes (16 KB for D = 64,
// 32 KB for D = 128). Matches cpu::attention.
extern "C" __global__ void attention_fwd_d64(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                                             int tq, int tk, int cap, int heads, int kv_heads) {
    attn::fwd<64>(out, lse, q, k, v, tq, tk, cap, heads, kv_heads);
}
// Same geometry as attention_fwd_d64 (dynamic smem 32768 bytes).
extern "C" __global__ void attention_fwd_d128(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                                              int tq, int tk, int cap, int heads, int kv_heads) {
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

// delta[r] = dout[r] . out[r] per (row, head) r, and dq_accum[r] = 0 when dq_accum is not NULL,
// so the caller never memsets it. rows = batch * tq * heads.
// grid ceil(rows / 4), block 128, no smem. Matches big_d in cpu::attention_bwd.
extern "C" __global__ void attention_bwd_preprocess(float *delta, float *dq_accum, const bf16 *dout, const bf16 *out,
                                                    int64_t rows, int head_dim) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * 4 + warp;
    if (r >= rows) return;
    const bf16 *a = dout + r * head_dim, *o = out + r * head_dim;
    float acc = 0.0f;
    for (int d = lane; d < head_dim; d += 32) acc += ld(a + d) * ld(o + d);
    acc = warp_sum(acc);
    if (lane == 0) delta[r] = acc;
    if (dq_accum)
        for (int d = lane; d < head_dim; d += 32) dq_accum[r * head_dim + d] = 0.0f;
}

// grid (ceil(cap / 64), kv_heads, batch), block 128, dynamic smem 49152 bytes for D = 128 (exactly
// 48 KB, no opt-in needed) and 32768 bytes for D = 64. Needs delta and a zeroed dq_accum from
// attention_bwd_preprocess; writes dk, dv (=) in full, rows tk..cap as zeros, and adds dq into
// dq_accum; attention_bwd_dq_convert then writes dq. Matches cpu::attention_bwd.
extern "C" __global__ void attention_bwd_d64(float *dq_accum, bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse,
                                             const float *delta, const bf16 *q, const bf16 *k, const bf16 *v, int tq,
                                             int tk, int cap, int heads, int kv_heads) {
    attn::bwd<64>(dq_accum, dk, dv, dout, lse, delta, q, k, v, tq, tk, cap, heads, kv_heads);
}
// Same geometry as attention_bwd_d64 (dynamic smem 49152 bytes).
extern "C" __global__ void attention_bwd_d128(float *dq_accum, bf16 *dk, bf16 *dv, const bf16 *dout, const float *lse,
                                              const float *delta, const bf16 *q, const bf16 *k, const bf16 *v, int tq,
                                              int tk, int cap, int heads, int kv_heads) {
    attn::bwd<128>(dq_accum, dk, dv, dout, lse, delta, q, k, v, tq, tk, cap, heads, kv_heads);
}

// dq = dq_accum in bf16; n = batch * tq * heads * D. grid ceil(n / 256), block 256, no smem.
extern "C" __global__ void attention_bwd_dq_convert(bf16 *dq, const float *dq_accum, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dq[i] = to_bf16(dq_accum[i]);
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
    const float lse2 = lse[row * heads + h] * LOG2E, dl = delta[row * heads + h];
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
    const int j = w / kv_heads, kvh = w % kv_heads, D = head_dim, group = heads / kv_heads;
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
                    ds = p * (dot_sg(vw, doh + i * qstride, D) - delta[li]) * scale;
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
extern "C" __global__ void kv_write(bf16 *cache, const bf16 *src, int batch, int cap, int pos0, int tq, int row) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)batch * tq * row) return;
    const int64_t bt = i / row, c = i % row, b = bt / tq, t = bt % tq;
    cache[(b * cap + pos0 + t) * row + c] = src[i];
}
