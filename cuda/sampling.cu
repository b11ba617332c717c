// Token sampling for batched decoding, one block per row of logits: greedy argmax, or one draw
// after temperature, top-k and top-p, using the CPU's counter-based randomness, plus per-row stop
// detection. CPU oracles (src/sampling.rs): sampling::argmax for greedy rows,
// sampling::truncated_distribution for the distribution of a draw, sampling::uniform for the
// random number.
//
// Launcher reference (each kernel is extern "C"):
//   __global__ void sample_tokens(
//       uint32_t *next, int *done, const bf16 *logits, int vocab,
//       const float *temperature, const int *top_k, const float *top_p,
//       const uint32_t *keys,
//       const uint32_t *stop_ids, int n_stop, int pad_id);
//
// How a draw works, and where it may differ from the CPU:
// * A probability is the integer round_down(exp((x − max)/T) · 2^40). Integer sums are
//   associative, so the kept set and the drawn token depend only on (logits, seed, sequence,
//   step), never on thread scheduling. A token below 2^-40 of the row's most likely token is
//   never drawn (the CPU would draw it with probability under 2^-40 per such token).
// * A token's probability grows with its logit, so whatever top-k and top-p keep is "every token
//   whose logit is at least some value". Logits are bf16: 65536 possible values, ordered by a
//   16-bit key. An 8-bit radix select (high byte, then low byte; at most three histogram passes
//   over the row) finds that threshold exactly, with no sort.
// * Ties at the threshold: bf16 logits tie often (a 152064-token row has a few thousand distinct
//   values), and the CPU's stable sort keeps the lowest-index tokens of a tie up to k (top-k) or
//   until the mass reaches the cut (top-p). So the plan also says how many tokens with exactly
//   the threshold key to keep, and the draw keeps that many, lowest index first, counting them
//   in index order across the warps' segments. −0 and +0 count as one logit.
// * The inverse CDF walks the kept tokens in index order. Without truncation that is the CPU's
//   order, so the same uniform draws the same token (up to rounding at the edges of a token's
//   interval); with truncation the CPU walks in sorted order, so only the distribution agrees.
// * The uniform is the 24-bit integer behind sampling::uniform, so the draw target
//   floor(u · kept mass) is exact integer arithmetic.
#include "common.cuh"

namespace sampling {

typedef unsigned long long u64;

// Philox4x32-10 with the same counter and key layout as sampling::philox4x32: the CPU and the
// GPU must draw the same numbers. __host__ so tools/cuda_host_checks can test it without a GPU.
// Known-answer vectors (Random123 kat_vectors), counter / key -> output:
//   {0, 0, 0, 0} / {0, 0}
//     -> {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}
//   {0xffffffff x4} / {0xffffffff, 0xffffffff}
//     -> {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}
//   {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344} / {0xa4093822, 0x299f31d0}
//     -> {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}
__host__ __device__ inline uint4 philox4x32_10(uint4 c, uint2 k) {
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k.x += 0x9E3779B9u;
            k.y += 0xBB67AE85u;
        }
        const uint64_t p0 = 0xD2511F53ull * c.x, p1 = 0xCD9E8D57ull * c.z;
        c = make_uint4((uint32_t)(p1 >> 32) ^ c.y ^ k.x, (uint32_t)p1, (uint32_t)(p0 >> 32) ^ c.w ^ k.y,
                       (uint32_t)p0);
    }
    return c;
}

// The 24-bit integer behind sampling::uniform(seed, sequence, step): uniform = bits / 2^24.
__host__ __device__ inline uint32_t uniform_bits24(uint64_t seed, uint64_t sequence, uint64_t step) {
    const uint4 out = philox4x32_10(
        make_uint4((uint32_t)step, (uint32_t)(step >> 32), (uint32_t)sequence, (uint32_t)(sequence >> 32)),
        make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)));
    return out.x >> 8;
}

__host__ __device__ inline float uniform(uint64_t seed, uint64_t sequence, uint64_t step) {
    return (float)uniform_bits24(seed, sequence, step) * (1.0f / 16777216.0f);
}

// A 16-bit key whose unsigned order is the order of the bf16 values (given as their bits).
__host__ __device__ inline uint32_t ordered_key_bits(uint32_t b) {
    if (b == 0x8000u) b = 0;  // −0 and +0 must tie
    return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
}

__device__ __forceinline__ uint32_t ordered_key(bf16 v) { return ordered_key_bits(__bfloat16_as_ushort(v)); }

// Every pass recomputes a token's probability with this one function, so the passes agree.
__device__ __forceinline__ u64 fixed_prob(float x, float m, float inv_t) {
    return (u64)(__expf((x - m) * inv_t) * 1099511627776.0f);  // · 2^40
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One warp's private histogram. Each warp of the block has one in dynamic shared memory
// (SAMPLE_HIST_BYTES per warp, which the launcher passes), so warps never contend for a bin. The
// first version shared one histogram with 64-bit shared atomics, which sm_90 runs as
// compare-and-swap loops (ATOMS.CAST.SPIN.64): on logits crowded into a few high-byte bins, 32
// warps spinning on the same words made top-k and top-p sampling 14x slower than a plain draw.
struct WarpHist {
    u64 mass[256];
    uint32_t cnt[256];
};
#define SAMPLE_HIST_BYTES 3072
static_assert(sizeof(WarpHist) == SAMPLE_HIST_BYTES, "the launcher sizes shared memory by SAMPLE_HIST_BYTES");

// Adds (1, v) to bin `bin` of this warp's histogram h (256: add nothing). The lanes with one bin
// form a group: it sums its masses (__reduce_add_sync over the group, in two 32-bit halves: v <=
// 2^40, so 32 low parts of 24 bits and 32 high parts of 17 bits fit in 32 bits), and its lowest
// lane adds the group's count and mass. The groups have distinct bins, so no atomics; the
// __syncwarp orders one call's writes before the next call's reads by other lanes.
__device__ __forceinline__ void hist_add(WarpHist *h, uint32_t bin, u64 v) {
    if (__ballot_sync(0xffffffffu, bin < 256) == 0) return;  // the same in every lane
    const unsigned peers = __match_any_sync(0xffffffffu, bin);
    const uint32_t lo = __reduce_add_sync(peers, (uint32_t)(v & 0xffffffu));
    const uint32_t hi = __reduce_add_sync(peers, (uint32_t)(v >> 24));
    if (bin < 256 && (int)(threadIdx.x & 31) == __ffs(peers) - 1) {
        h->cnt[bin] += (uint32_t)__popc(peers);
        h->mass[bin] += ((u64)hi << 24) + lo;
    }
    __syncwarp();
}

// Histogram of count and fixed-point mass over one radix digit, into cnt and mass. hi < 0: every
// token, binned by the key's high byte; else only tokens whose high byte is hi, binned by the low
// byte. wh: the block's per-warp histograms (dynamic shared memory), summed at the end.
__device__ void histogram(uint32_t *cnt, u64 *mass, WarpHist *wh, const bf16 *r, int vocab, float m, float inv_t,
                          int hi) {
    WarpHist *h = wh + (threadIdx.x >> 5);
    for (int i = threadIdx.x & 31; i < 256; i += 32) {
        h->cnt[i] = 0;
        h->mass[i] = 0;
    }
    __syncwarp();
    // Whole-block strides keep every lane of a warp in the loop, as hist_add's collectives need.
    for (int base = 0; base < vocab; base += blockDim.x) {
        const int j = base + threadIdx.x;
        uint32_t bin = 256;
        u64 v = 0;
        if (j < vocab) {
            const bf16 x = r[j];
            const uint32_t key = ordered_key(x);
            if (hi < 0) bin = key >> 8;
            else if ((int)(key >> 8) == hi) bin = key & 0xffu;
            if (bin < 256) v = fixed_prob(__bfloat162float(x), m, inv_t);
        }
        hist_add(h, bin, v);
    }
    __syncthreads();
    const int nwarps = blockDim.x >> 5;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        uint32_t c = 0;
        u64 s = 0;
        for (int w = 0; w < nwarps; w++) {
            c += wh[w].cnt[b];
            s += wh[w].mass[b];
        }
        cnt[b] = c;
        mass[b] = s;
    }
    __syncthreads();
}

struct ArgMax {
    float v;
    int i;
};

// The larger value; the lower index among equals, as sampling::argmax keeps the first maximum.
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
    for (int o = 16; o > 0; o >>= 1) {
        const ArgMax b = {__shfl_xor_sync(0xffffffffu, a.v, o), __shfl_xor_sync(0xffffffffu, a.i, o)};
        a = better(a, b);
    }
    return a;
}

// Every thread gets the row's (max, first index of the max); index 0x7fffffff when every logit
// is −inf (the caller maps that to 0, as the CPU does).
__device__ ArgMax block_argmax(const bf16 *r, int vocab) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    ArgMax a = {-INFINITY, 0x7fffffff};
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float x = ld(r + j);
        if (x > a.v) a = {x, j};  // strict: this thread's first maximum stays
    }
    a = warp_argmax(a);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = a.v;
        si[warp] = a.i;
    }
    __syncthreads();
    const int nwarps = blockDim.x >> 5;
    a = lane < nwarps ? ArgMax{sv[lane], si[lane]} : ArgMax{-INFINITY, 0x7fffffff};
    return warp_argmax(a);
}

// Decisions taken by thread 0 between passes, read by the whole block. The deciding functions
// are __host__ so tools/cuda_host_checks can test them against truncated_distribution.
struct Plan {
    uint32_t thr;    // keep tokens with ordered_key > thr, and tie_keep of those == thr
    uint32_t tie_keep; // the lowest-index tokens with key thr that are kept (TIE_ALL: every one)
    int hb, lb;      // top-k threshold key = hb << 8 | lb (hb = -1: no top-k)
    uint32_t above;  // tokens above bin hb
    uint32_t kk_cnt; // tokens with the top-k threshold key that top-k keeps: k − tokens above it
    u64 kk_mass;     // their mass
    int hp;          // high byte where the top-p cut falls (-1: keep all that top-k kept)
    int pass_c;      // the top-p cut needs the low-byte histogram of bin hp
    u64 before;      // mass of kept tokens above bin hp
    double cut;      // top_p · (mass kept by top-k)
    int warp;        // warp whose index segment holds the draw
    u64 rem;         // draw target minus the mass of the segments before that warp
    uint32_t tok;
};

constexpr uint32_t TIE_ALL = 0xffffffffu;

__host__ __device__ inline void plan_init(Plan *pl) {
    pl->thr = 0;
    pl->tie_keep = TIE_ALL;
    pl->hb = -1;
    pl->lb = 0;
    pl->above = 0;
    pl->kk_cnt = 0;
    pl->kk_mass = 0;
    pl->hp = -1;
    pl->pass_c = 0;
    pl->before = 0;
    pl->cut = 0.0;
}

// The bin holding the k-th largest key, given `above` tokens in higher digits; *above_bin gets
// the count above that bin. The counts add up to at least k, so bin 0 is the last resort.
__host__ __device__ inline int kth_bin(const uint32_t *cnt, uint32_t k, uint32_t above, uint32_t *above_bin) {
    int b = 255;
    for (; b > 0; b--) {
        if (above + cnt[b] >= k) break;
        above += cnt[b];
    }
    *above_bin = above;
    return b;
}

// Top-k after pass A (high digits): fixes hb and the count above it.
__host__ __device__ inline void plan_topk_hi(Plan *pl, const uint32_t *cnt_hi, int k) {
    pl->hb = kth_bin(cnt_hi, (uint32_t)k, 0, &pl->above);
}

// Top-k after pass B (low digits of bin hb): fixes the threshold key, and how many of the tokens
// with that key the CPU's top-k keeps. Every token with one key has the same logit, so the same
// fixed-point mass: their share of the mass is exact.
__host__ __device__ inline void plan_topk_lo(Plan *pl, const uint32_t *cnt_lo, const u64 *mass_lo, int k) {
    uint32_t above;
    pl->lb = kth_bin(cnt_lo, (uint32_t)k, pl->above, &above);
    pl->thr = (uint32_t)(pl->hb << 8 | pl->lb);
    pl->kk_cnt = (uint32_t)k - above;
    pl->kk_mass = mass_lo[pl->lb] / cnt_lo[pl->lb] * pl->kk_cnt;
    pl->tie_keep = pl->kk_cnt;
}

// Top-p over the high digits: finds the bin hp holding the last kept logit. Bin hb (top-k's)
// counts only the tokens top-k keeps, from the pass-B histogram in cnt_lo/mass_lo: exactly k
// tokens in all, as the CPU's top-p sees them, even when a tie straddles the k-th.
__host__ __device__ inline void plan_topp_hi(Plan *pl, const uint32_t *cnt_hi, const u64 *mass_hi,
                                             const uint32_t *cnt_lo, const u64 *mass_lo, float p) {
    const int hb = pl->hb;
    uint32_t cnt_hb = pl->kk_cnt;
    u64 mass_hb = pl->kk_mass;
    if (hb >= 0)
        for (int l = pl->lb + 1; l < 256; l++) {
            cnt_hb += cnt_lo[l];
            mass_hb += mass_lo[l];
        }
    u64 total = hb >= 0 ? mass_hb : 0;
    for (int b = 255; b > hb; b--) total += mass_hi[b];
    const double cut = (double)p * (double)total;
    // Walking down the bins: a whole bin is kept while the mass through it stays under the cut
    // (then the next bin's first logit is kept too); the bin where it reaches the cut holds the
    // last kept logit.
    u64 before = 0;
    pl->hp = -1;
    for (int b = 255; b >= 0 && b >= hb; b--) {
        const uint32_t c = b == hb ? cnt_hb : cnt_hi[b];
        const u64 w = b == hb ? mass_hb : mass_hi[b];
        if (c == 0) continue;
        if ((double)(before + w) < cut) {
            before += w;
            continue;
        }
        pl->hp = b;
        break;
    }
    pl->before = before;
    pl->cut = cut;
    pl->pass_c = pl->hp >= 0 && pl->hp != hb;
}

// Top-p within bin hp (cnt_lo/mass_lo: its low digits), token by token as truncated_distribution
// goes: a token is kept while the mass before it is under the cut; the first always is. Inside
// the bin where the cut falls, tokens of one key share one mass w, so the kept count of that key
// is arithmetic. In top-k's bin, its threshold key holds only the kk_cnt tokens top-k kept.
__host__ __device__ inline void plan_topp_lo(Plan *pl, const uint32_t *cnt_lo, const u64 *mass_lo) {
    if (pl->hp < 0) return;
    const bool in_k = pl->hp == pl->hb;
    const int lmin = in_k ? pl->lb : 0;
    u64 before = pl->before;
    for (int l = 255; l >= lmin; l--) {
        const bool kth = in_k && l == pl->lb;
        const uint32_t c = kth ? pl->kk_cnt : cnt_lo[l];
        if (c == 0) continue;
        if (before != 0 && !((double)before < pl->cut)) break;
        const u64 w = (kth ? pl->kk_mass : mass_lo[l]) / c;
        // Tokens of this key kept: the j-th (0-based) is kept while before + j·w < cut.
        uint32_t n = c;
        if (w > 0 && (double)(before + (u64)c * w) >= pl->cut) {
            const double need = (pl->cut - (double)before) / (double)w;  // j < need
            double nn = need <= 0.0 ? 1.0 : (double)(uint64_t)need + ((double)(uint64_t)need < need ? 1.0 : 0.0);
            n = nn < 1.0 ? 1u : nn > (double)c ? c : (uint32_t)nn;
            // Guard the float division: recheck the edge the CPU decides token by token.
            while (n < c && (double)(before + (u64)n * w) < pl->cut) n++;
            while (n > 1 && !((double)(before + (u64)(n - 1) * w) < pl->cut)) n--;
        }
        pl->thr = (uint32_t)(pl->hp << 8 | l);
        pl->tie_keep = n == c && !kth ? TIE_ALL : n;
        before += (u64)n * w;
        if (n < c) break;
    }
}

// Token j's fixed-point mass if the plan keeps it, else 0; called by a whole warp for 32
// consecutive tokens, in index order: rank counts the threshold-key tokens seen so far.
__device__ __forceinline__ u64 kept_mass(const bf16 *r, int j, int end, uint32_t thr, uint32_t tie_keep,
                                         uint32_t &rank, float m, float inv_t) {
    const int lane = threadIdx.x & 31;
    uint32_t key = 0;
    float x = 0.0f;
    if (j < end) {
        const bf16 b = r[j];
        key = ordered_key(b);
        x = __bfloat162float(b);
    }
    const bool tie = j < end && key == thr;
    const unsigned ties = __ballot_sync(0xffffffffu, tie);
    const uint32_t my_rank = rank + __popc(ties & ((1u << lane) - 1u));
    rank += __popc(ties);
    const bool keep = j < end && (key > thr || (tie && (tie_keep == TIE_ALL || my_rank < tie_keep)));
    return keep ? fixed_prob(x, m, inv_t) : 0ull;
}

// One draw with temperature 1/inv_t, top-k k (0 or >= vocab: off), top-p p (>= 1: off).
// m is the row's max logit, arg its first index, u24 the 24-bit uniform.
__device__ uint32_t draw(const bf16 *r, int vocab, float m, int arg, float inv_t, int k, float p, uint32_t u24) {
    __shared__ uint32_t cnt_hi[256], cnt_lo[256];
    __shared__ u64 mass_hi[256], mass_lo[256];
    __shared__ u64 wsum[32];
    __shared__ uint32_t wties[32];
    __shared__ Plan plan;
    extern __shared__ __align__(16) unsigned char sample_smem[];
    WarpHist *wh = reinterpret_cast<WarpHist *>(sample_smem);
    const bool use_k = k > 0 && k < vocab, use_p = p < 1.0f;
    const int tid = threadIdx.x;
    if (tid == 0) {
        plan_init(&plan);
        plan.tok = (uint32_t)arg;  // only if integer sums and the walk disagreed, which they cannot
    }
    // (histogram() syncs before anyone reads plan)
    if (use_k || use_p) {
        histogram(cnt_hi, mass_hi, wh, r, vocab, m, inv_t, -1);
        if (use_k) {
            if (tid == 0) plan_topk_hi(&plan, cnt_hi, k);
            __syncthreads();
            histogram(cnt_lo, mass_lo, wh, r, vocab, m, inv_t, plan.hb);
            if (tid == 0) plan_topk_lo(&plan, cnt_lo, mass_lo, k);
        }
        if (use_p) {
            if (tid == 0) plan_topp_hi(&plan, cnt_hi, mass_hi, cnt_lo, mass_lo, p);
            __syncthreads();
            if (plan.pass_c) histogram(cnt_lo, mass_lo, wh, r, vocab, m, inv_t, plan.hp);
            if (tid == 0) plan_topp_lo(&plan, cnt_lo, mass_lo);
        }
    }
    __syncthreads();
    const uint32_t thr = plan.thr, tie_keep = plan.tie_keep;

    // Inverse CDF in index order: each warp owns a contiguous segment of the row (coalesced
    // reads), sums its kept mass; the segment holding the target is then walked 32 at a time.
    const int lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int seg = ((vocab + nwarps - 1) / nwarps + 31) & ~31;
    const int beg = warp * seg, end = min(vocab, beg + seg);
    // Threshold-key tokens before this warp's segment, when only the first tie_keep count.
    uint32_t rank0 = 0;
    if (tie_keep != TIE_ALL) {
        uint32_t c = 0;
        for (int j = beg + lane; j < end; j += 32) c += ordered_key(r[j]) == thr;
        for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
        if (lane == 0) wties[warp] = c;
        __syncthreads();
        for (int w = 0; w < warp; w++) rank0 += wties[w];
    }
    uint32_t rank = rank0;
    u64 s = 0;
    for (int base = beg; base < end; base += 32) s += kept_mass(r, base + lane, end, thr, tie_keep, rank, m, inv_t);
    s = warp_sum_u64(s);
    if (lane == 0) wsum[warp] = s;
    __syncthreads();
    if (tid == 0) {
        u64 total = 0;
        for (int w = 0; w < nwarps; w++) total += wsum[w];
        // floor(total · u24 / 2^24) < total: the 64×64 high half of total · (u24 · 2^40).
        const u64 target = __umul64hi(total, (u64)u24 << 40);
        u64 acc = 0;
        int w = 0;
        for (; w < nwarps - 1; w++) {
            if (acc + wsum[w] > target) break;
            acc += wsum[w];
        }
        plan.warp = w;
        plan.rem = target - acc;
    }
    __syncthreads();
    if (warp == plan.warp) {
        const u64 rem = plan.rem;
        u64 acc = 0;
        rank = rank0;
        for (int base = beg; base < end; base += 32) {
            const int j = base + lane;
            u64 v = kept_mass(r, j, end, thr, tie_keep, rank, m, inv_t);
            for (int o = 1; o < 32; o <<= 1) {  // inclusive scan
                const u64 t = __shfl_up_sync(0xffffffffu, v, o);
                if (lane >= o) v += t;
            }
            // The first token whose inclusive cumulative mass exceeds the target, as the CPU's
            // `u < acc`; it has nonzero mass, so it is a kept token.
            const unsigned hit = __ballot_sync(0xffffffffu, acc + v > rem);
            if (hit) {
                if (lane == 0) plan.tok = (uint32_t)(base + __ffs(hit) - 1);
                break;
            }
            acc += __shfl_sync(0xffffffffu, v, 31);
        }
    }
    __syncthreads();
    return plan.tok;
}

}  // namespace sampling

// next[row] = the token sampled from logits[row] (bf16 [rows, vocab]).
// grid (rows), block 1024, or 512 where a block cannot opt into 104 KB of shared memory (any
// multiple of 32 up to 1024 works; 1024 needs <= 64 registers),
// static shared 7-8 KB, dynamic shared (block / 32) · SAMPLE_HIST_BYTES (96 KB for 1024, which
// the launcher opts into), uninitialized: each pass zeroes what it uses. Nothing to zero: done[] is
// the caller's per-row state (0 = still generating), kept across steps.
// Per row: temperature[row] <= 0 is greedy (sampling::argmax, first index of the max);
// top_k[row] 0 or >= vocab is off; top_p[row] >= 1 is off; top_k and top_p may be null (off).
// keys holds each row's (seed, sequence, step) as three little-endian u64, i.e. six u32 per row:
// the draw uses sampling::uniform(seed, sequence, step), so rows of different groups and at
// different steps share a launch and each draws what it would alone.
// A row with done[row] != 0 gets pad_id and stays done; a row that samples one of stop_ids gets
// done[row] = 1 (the stop token itself is written to next).
// CPU oracle: sampling::sample with the same uniform (distribution-level; see the file header).
extern "C" __global__ void sample_tokens(uint32_t *next, int *done, const bf16 *logits, int vocab,
                                         const float *temperature, const int *top_k, const float *top_p,
                                         const uint32_t *keys, const uint32_t *stop_ids, int n_stop, int pad_id) {
    const int row = blockIdx.x;
    if (done[row] != 0) {  // the same for the whole block: no barrier is skipped by a few threads
        if (threadIdx.x == 0) next[row] = (uint32_t)pad_id;
        return;
    }
    const bf16 *r = logits + (int64_t)row * vocab;
    const sampling::ArgMax best = sampling::block_argmax(r, vocab);
    const int arg = best.i == 0x7fffffff ? 0 : best.i;
    const float t = temperature[row];
    uint32_t tok = (uint32_t)arg;
    if (t > 0.0f) {
        const uint32_t *key = keys + 6 * row;
        const uint64_t seed = (uint64_t)key[0] | (uint64_t)key[1] << 32;
        const uint64_t seq = (uint64_t)key[2] | (uint64_t)key[3] << 32;
        const uint64_t step = (uint64_t)key[4] | (uint64_t)key[5] << 32;
        const uint32_t u24 = sampling::uniform_bits24(seed, seq, step);
        tok = sampling::draw(r, vocab, best.v, arg, 1.0f / t, top_k ? top_k[row] : 0, top_p ? top_p[row] : 1.0f,
                             u24);
    }
    if (threadIdx.x == 0) {
        next[row] = tok;
        for (int i = 0; i < n_stop; i++)
            if (stop_ids[i] == tok) {
                done[row] = 1;
                break;
            }
    }
}
