// Multi-tensor optimizer kernels: one launch covers every parameter tensor. Global gradient-norm
// clipping stays on the device: multi_grad_sumsq leaves Σg² in a double that the update kernels
// read themselves, so no host round-trip sits between the two launches. Params are bf16 and are
// written with stochastic rounding (unbiased, so an update below bf16 resolution still moves the
// weight on average); the random bits are a hash of (seed, step, tensor, element), so a run is
// reproducible, and the same whether the tensors are updated in one launch or in groups. CPU oracles: optim::Optimizer::step with cpu::adamw (AdamW) or Backend::axpy
// (SGD), which round to nearest in f32 instead.
//
// Launcher reference (each kernel is extern "C"):
//   __global__ void multi_grad_sumsq(double *sumsq, double *partials, unsigned int *counter,
//                                    const optim::Tensor *ts, int n_tensors);
//   __global__ void multi_adamw_m32(const optim::Tensor *ts, int n_tensors, const double *sumsq,
//                                   float max_norm, float decay, float beta1, float beta2, float eps,
//                                   float step_size, float bc2_sqrt, uint64_t seed, uint64_t step,
//                                   int first_tensor);
//   __global__ void multi_adamw_m16(same arguments as multi_adamw_m32);
//   __global__ void multi_sgd(const optim::Tensor *ts, int n_tensors, const double *sumsq,
//                             float max_norm, float lr, uint64_t seed, uint64_t step, int first_tensor);
//
// Descriptor array (device memory, n_tensors entries, sorted by first_block), 48 bytes each:
//   offset  0  param        bf16*  [n]
//   offset  8  grad         float* [n] (fp32 gradients)
//   offset 16  m            float* [n] (multi_adamw_m32) or bf16* [n] (multi_adamw_m16); unused
//   offset 24  v            same as m                                    by sumsq and SGD (0)
//   offset 32  n            int64  elements
//   offset 40  first_block  int64  Σ over earlier tensors of ceil(n / OPTIM_CHUNK)
// Rust mirror: #[repr(C)] struct OptimTensor { param: u64, grad: u64, m: u64, v: u64, n: i64,
// first_block: i64 } (no padding: every field is 8 bytes).
// Global chunk c (OPTIM_CHUNK = 16384 elements) is chunk c − first_block[t] of the tensor t with
// the largest first_block <= c, found by binary search. Update-kernel block b works on chunk b,
// multi_grad_sumsq block b on chunk grid − 1 − b; grid = Σ ceil(n / OPTIM_CHUNK) blocks (an empty
// tensor has no chunks and is skipped), block 256. The same descriptor array serves all four
// kernels. Within a chunk a thread takes groups of 4 consecutive elements as one 16-byte (f32)
// or 8-byte (bf16) access, so the vector path wants param/m/v/grad 16-byte aligned (f32) or
// 8-byte aligned (bf16), as cudaMalloc'd buffers are; a tensor with a pointer that is not goes
// element by element, as does the last n % 4 of each tensor; the results are the same.
// Descriptor t is the model's tensor first_tensor + t (its place in the whole parameter list).
// Element e of that tensor, in chunk k = e / OPTIM_CHUNK of it, rounds with
// element_bits(tensor_key(seed, step, first_tensor + t), k, e % OPTIM_CHUNK): bits 0-15 for the
// param, 16-31 for m and 32-47 for v (bf16 moments only). Keying on the tensor's place rather
// than on the launch's chunk numbering is what lets the offloaded optimizer, which updates the
// tensors a group at a time, write the same bits as one launch over all of them.
//
// Clipping, as optim.rs: norm = sqrt(*sumsq); scale = max_norm / (norm + 1e-6) when max_norm > 0
// and norm > max_norm, else 1; the gradient is multiplied by scale. A null sumsq means no
// clipping. A non-finite *sumsq makes the update kernels return without writing anything: the
// host reads *sumsq afterwards and stops training as optim.rs does, with the weights intact.
#include "common.cuh"

#define OPTIM_CHUNK 16384

namespace optim {

// ChunkBits relies on chunk · OPTIM_CHUNK + i == chunk · OPTIM_CHUNK ^ i for 0 <= i < OPTIM_CHUNK.
static_assert((OPTIM_CHUNK & (OPTIM_CHUNK - 1)) == 0 && OPTIM_CHUNK <= (1 << 30),
              "OPTIM_CHUNK must be a power of two no larger than 2^30");

struct Tensor {
    void *param;
    const float *grad;
    void *m;
    void *v;
    int64_t n;
    int64_t first_block;
};
static_assert(sizeof(Tensor) == 48, "the Rust side mirrors this layout");

// Groups of four consecutive elements whose loads one thread keeps in flight together, per
// loop iteration: the update kernels and multi_grad_sumsq are pure streams, and several 16-byte
// loads per thread keep enough bytes in flight to cover the DRAM latency.
constexpr int kUpdateUnroll = 2;
constexpr int kSumsqUnroll = 4;

// The tensor whose chunks include chunk c: the last descriptor with first_block <= c.
__device__ __forceinline__ int find_tensor(const Tensor *ts, int n_tensors, int64_t c) {
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (ts[mid].first_block <= c) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Fixed-order block sum (every thread gets it): the norm, and so the clip scale, must not
// depend on timing, or the same seed would not give the same run.
__device__ double block_sum_d(double v) {
    __shared__ double part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? part[lane] : 0.0;
    return warp_sum_d(v);
}

constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ull, kMix2 = 0x94D049BB133111EBull;

// splitmix64's finalizer: a bijection that scatters nearby inputs.
__host__ __device__ inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * kMix1;
    z = (z ^ (z >> 27)) * kMix2;
    return z ^ (z >> 31);
}

// The definition of the random bits: 64 of them for element i of chunk `chunk` of the tensor
// whose key is `key`; distinct elements of one tensor hash distinct inputs (chunk · OPTIM_CHUNK
// + i is the element's index), and tensors have unrelated keys. The kernels compute it through
// ChunkBits.
__host__ __device__ inline uint64_t element_bits(uint64_t key, uint64_t chunk, int64_t i) {
    return mix64(key ^ (chunk * OPTIM_CHUNK + (uint64_t)i));
}

// element_bits(key, chunk, i) for every i of one chunk, bit for bit, with the part that does
// not depend on i done once: OPTIM_CHUNK is a power of two and 0 <= i < OPTIM_CHUNK, so the
// input is k ^ i with k = key ^ chunk · OPTIM_CHUNK; i < 2^30 leaves (k ^ i) >> 30 = k >> 30, so
// mix64's first step gives (k ^ (k >> 30)) ^ i, whose upper 32 bits are the chunk's. Checked
// against element_bits in tools/cuda_host_checks/rl_optim_check.cu.
struct ChunkBits {
    uint32_t lo;  // low half of k ^ (k >> 30)
    uint64_t hi;  // its high half times kMix1, mod 2^64: the product's part that i cannot change
    __host__ __device__ ChunkBits(uint64_t key, uint64_t chunk) {
        const uint64_t k = key ^ (chunk * OPTIM_CHUNK), z = k ^ (k >> 30);
        lo = (uint32_t)z;
        hi = (uint64_t)((uint32_t)(z >> 32) * (uint32_t)kMix1) << 32;
    }
    __host__ __device__ uint64_t operator()(uint32_t i) const {
        uint64_t x = (uint64_t)(lo ^ i) * kMix1 + hi;  // ((z ^ i) * kMix1) mod 2^64
        x = (x ^ (x >> 27)) * kMix2;
        return x ^ (x >> 31);
    }
};

// The key of the model's tensor `tensor` at this step: step and tensor each go through their own
// mix64 before they meet the seed, so that no (step, tensor) pair can alias another.
__host__ __device__ inline uint64_t tensor_key(uint64_t seed, uint64_t step, uint64_t tensor) {
    return mix64(seed ^ mix64(step + 0x9E3779B97F4A7C15ull) ^ mix64(~tensor));
}

// The bits of chunk `chunk` of the model's tensor `tensor`, held in registers: left to itself
// the compiler recomputes the key (four mix64) inside the element loops to shorten live ranges.
__device__ __forceinline__ ChunkBits block_bits(uint64_t seed, uint64_t step, int tensor, int64_t chunk) {
    ChunkBits b(tensor_key(seed, step, (uint64_t)tensor), (uint64_t)chunk);
#ifdef __CUDA_ARCH__
    asm volatile("" : "+r"(b.lo), "+l"(b.hi));
#endif
    return b;
}

// bf16 bits of the f32 with bits u, rounded up or down with probability proportional to
// closeness: adding 16 random bits below the kept 16 carries into them with probability
// (dropped bits) / 2^16. Sign-magnitude makes this work for negative values too. Inf stays inf,
// NaN stays NaN (truncating a NaN's low payload could turn it into inf). __host__ for
// tools/cuda_host_checks.
__host__ __device__ inline uint16_t round_stochastic_bits(uint32_t u, uint32_t bits) {
    // Branch-free, so a warp's hashes and roundings stay one straight stream. Only NaN needs
    // its own case: inf has 16 zero bits below the kept ones, so adding bits cannot carry.
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return (uint16_t)(nan ? (u >> 16) | 0x40u : (u + (bits & 0xffffu)) >> 16);
}

__device__ __forceinline__ bf16 round_stochastic(float x, uint32_t bits) {
    return __ushort_as_bfloat16(round_stochastic_bits(__float_as_uint(x), bits));
}

// Two stochastically rounded bf16 in one word, a in the low half.
__device__ __forceinline__ uint32_t round_stochastic2(float a, uint32_t bits_a, float b, uint32_t bits_b) {
    return (uint32_t)round_stochastic_bits(__float_as_uint(a), bits_a) |
           (uint32_t)round_stochastic_bits(__float_as_uint(b), bits_b) << 16;
}

__device__ __forceinline__ void store_moment(float *p, float x, uint32_t) { *p = x; }
__device__ __forceinline__ void store_moment(bf16 *p, float x, uint32_t bits) { *p = round_stochastic(x, bits); }

// Four consecutive elements as one aligned access: float4 for f32, 8 bytes for bf16. The update
// kernels touch every byte once per step, so their loads and stores stream (.cs, evict first);
// that also leaves the gradients multi_grad_sumsq read last in L2 for the update's first blocks.
__device__ __forceinline__ void load4(const float *p, float (&x)[4]) {
    const float4 r = __ldcs(reinterpret_cast<const float4 *>(p));
    x[0] = r.x;
    x[1] = r.y;
    x[2] = r.z;
    x[3] = r.w;
}
__device__ __forceinline__ void load4(const bf16 *p, float (&x)[4]) {
    const uint2 r = __ldcs(reinterpret_cast<const uint2 *>(p));
    x[0] = __uint_as_float(r.x << 16);
    x[1] = __uint_as_float(r.x & 0xffff0000u);
    x[2] = __uint_as_float(r.y << 16);
    x[3] = __uint_as_float(r.y & 0xffff0000u);
}
// bf16 is stochastically rounded with the low 16 bits of bits[e]; f32 ignores bits.
__device__ __forceinline__ void store4(float *p, const float (&x)[4], const uint32_t (&)[4]) {
    __stcs(reinterpret_cast<float4 *>(p), make_float4(x[0], x[1], x[2], x[3]));
}
__device__ __forceinline__ void store4(bf16 *p, const float (&x)[4], const uint32_t (&bits)[4]) {
    __stcs(reinterpret_cast<uint2 *>(p),
           make_uint2(round_stochastic2(x[0], bits[0], x[1], bits[1]), round_stochastic2(x[2], bits[2], x[3], bits[3])));
}

// Whether four T from p on are one aligned access. Chunks start at multiples of OPTIM_CHUNK
// elements, so this is the alignment of the tensor's base pointer (separate allocations are
// 256-byte aligned; a misaligned one takes the scalar path).
template <typename T>
__device__ __forceinline__ bool aligned4(const T *p) {
    return ((uintptr_t)p & (4 * sizeof(T) - 1)) == 0;
}

// The gradient's multiplier, or −1 when the gradient is not finite (then nothing may be written).
__device__ __forceinline__ float clip_scale(const double *sumsq, float max_norm) {
    if (sumsq == nullptr) return 1.0f;
    const double ss = *sumsq;
    if (!isfinite(ss)) return -1.0f;
    const double norm = sqrt(ss);
    return max_norm > 0.0f && norm > (double)max_norm ? (float)((double)max_norm / (norm + 1e-6)) : 1.0f;
}

// Chunk c of the launch: its descriptor, the descriptor's index, and the chunk's first element
// in the tensor and length (OPTIM_CHUNK but for a tensor's last).
struct Chunk {
    Tensor t;
    int index;
    int64_t beg;
    int n;
};
__device__ __forceinline__ Chunk launch_chunk(const Tensor *ts, int n_tensors, int64_t c) {
    Chunk k;
    k.index = find_tensor(ts, n_tensors, c);
    k.t = ts[k.index];
    k.beg = (c - k.t.first_block) * OPTIM_CHUNK;
    k.n = (int)min(k.t.n - k.beg, (int64_t)OPTIM_CHUNK);
    return k;
}

// cpu::adamw per element, in the same order: scale the gradient, decay the weight, update the
// moments, then the bias-corrected step. Block b updates chunk b; thread x takes groups of four
// elements x, x + blockDim.x, ... (kUpdateUnroll groups' loads in flight at once), the last
// n % 4 elements of a tensor and any tensor with a misaligned pointer go one element at a time.
template <typename M>
__device__ __forceinline__ void adamw(const Tensor *ts, int n_tensors, const double *sumsq, float max_norm,
                                      float decay, float b1, float b2, float eps, float step_size, float bc2_sqrt,
                                      uint64_t seed, uint64_t step, int first_tensor) {
    const float scale = clip_scale(sumsq, max_norm);
    if (scale < 0.0f) return;
    const Chunk k = launch_chunk(ts, n_tensors, blockIdx.x);
    const int n = k.n;
    bf16 *p = (bf16 *)k.t.param + k.beg;
    const float *g = k.t.grad + k.beg;
    M *m = (M *)k.t.m + k.beg, *v = (M *)k.t.v + k.beg;
    const ChunkBits bits = block_bits(seed, step, first_tensor + k.index, k.beg / OPTIM_CHUNK);
    // gi, w, mi, vi: the gradient, weight and moments in; w, mi, vi: the new ones out.
    const auto update = [=](float gi, float &w, float &mi, float &vi) {
        gi *= scale;
        w *= decay;
        mi = b1 * mi + (1.0f - b1) * gi;
        vi = b2 * vi + (1.0f - b2) * gi * gi;
        w -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    };
    int done = 0;
    if (aligned4(p) && aligned4(g) && aligned4(m) && aligned4(v)) {
        const int groups = n >> 2, stride = blockDim.x;
        for (int q0 = threadIdx.x; q0 < groups; q0 += kUpdateUnroll * stride) {
            float gx[kUpdateUnroll][4], px[kUpdateUnroll][4], mx[kUpdateUnroll][4], vx[kUpdateUnroll][4];
#pragma unroll
            for (int u = 0; u < kUpdateUnroll; u++) {
                const int j = 4 * (q0 + u * stride);
                if (j < 4 * groups) {
                    load4(g + j, gx[u]);
                    load4(p + j, px[u]);
                    load4(m + j, mx[u]);
                    load4(v + j, vx[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < kUpdateUnroll; u++) {
                const int j = 4 * (q0 + u * stride);
                if (j >= 4 * groups) break;
                uint32_t bp[4], bm[4], bv[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    update(gx[u][e], px[u][e], mx[u][e], vx[u][e]);
                    const uint64_t r = bits((uint32_t)(j + e));
                    bp[e] = (uint32_t)r;
                    bm[e] = (uint32_t)(r >> 16);
                    bv[e] = (uint32_t)(r >> 32);
                }
                store4(m + j, mx[u], bm);
                store4(v + j, vx[u], bv);
                store4(p + j, px[u], bp);
            }
        }
        done = 4 * groups;
    }
    for (int j = done + threadIdx.x; j < n; j += blockDim.x) {
        float w = ld(p + j), mi = ld(m + j), vi = ld(v + j);
        update(g[j], w, mi, vi);
        const uint64_t r = bits((uint32_t)j);
        store_moment(m + j, mi, (uint32_t)(r >> 16));
        store_moment(v + j, vi, (uint32_t)(r >> 32));
        p[j] = round_stochastic(w, (uint32_t)r);
    }
}

}  // namespace optim

// *sumsq = Σ over every tensor of Σ grad², deterministic: each block writes its chunk's sum to
// partials[chunk], and the last block to finish adds the partials in a fixed order. Block b reads
// chunk grid − 1 − b: blocks start roughly in index order, so the gradients read last are those
// the update launch reads first, and some are still in L2.
// grid Σ ceil(n / OPTIM_CHUNK), block 256, no dynamic shared memory.
// Scratch: partials = double[grid] (no zeroing); counter = one uint32 that must be 0 before the
// first launch (memset once at allocation): the last block resets it, so it stays 0 between
// launches. *sumsq is overwritten, not accumulated (no zeroing).
// CPU oracle: Optimizer::grad_norm(...)² (cpu sum_squares: per-element f64).
extern "C" __global__ void __launch_bounds__(256) multi_grad_sumsq(double *sumsq, double *partials,
                                                                   unsigned int *counter, const optim::Tensor *ts,
                                                                   int n_tensors) {
    __shared__ bool last;
    const int64_t c = (int64_t)gridDim.x - 1 - blockIdx.x;
    const optim::Chunk k = optim::launch_chunk(ts, n_tensors, c);
    const int n = k.n;
    const float *g = k.t.grad + k.beg;
    // Loads are .cg (L2 only, nothing to reuse in L1) and keep the normal L2 policy: see above.
    double s = 0.0;  // g² is exact in f64; only the additions round
    int done = 0;
    if (optim::aligned4(g)) {
        const float4 *g4 = reinterpret_cast<const float4 *>(g);
        const int groups = n >> 2, stride = blockDim.x;
        for (int q0 = threadIdx.x; q0 < groups; q0 += optim::kSumsqUnroll * stride) {
            float4 r[optim::kSumsqUnroll];
#pragma unroll
            for (int u = 0; u < optim::kSumsqUnroll; u++) {
                const int q = q0 + u * stride;
                r[u] = q < groups ? __ldcg(g4 + q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int u = 0; u < optim::kSumsqUnroll; u++) {
                s += (double)r[u].x * r[u].x;
                s += (double)r[u].y * r[u].y;
                s += (double)r[u].z * r[u].z;
                s += (double)r[u].w * r[u].w;
            }
        }
        done = 4 * groups;
    }
    for (int j = done + threadIdx.x; j < n; j += blockDim.x) {
        const double x = __ldcg(g + j);
        s += x * x;
    }
    s = optim::block_sum_d(s);
    if (threadIdx.x == 0) {
        partials[c] = s;
        __threadfence();  // the partial is visible device-wide before the ticket is taken
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // __ldcg reads L2, where the other blocks' partials are, never a stale L1 line; eight loads
    // in flight per thread, added in a fixed order.
    constexpr int kBatch = 8;
    double acc = 0.0;
    for (unsigned i0 = threadIdx.x; i0 < gridDim.x; i0 += kBatch * blockDim.x) {
        double x[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; u++) {
            const unsigned i = i0 + u * blockDim.x;
            x[u] = i < gridDim.x ? __ldcg(partials + i) : 0.0;
        }
#pragma unroll
        for (int u = 0; u < kBatch; u++) acc += x[u];
    }
    acc = optim::block_sum_d(acc);
    if (threadIdx.x == 0) {
        *sumsq = acc;
        *counter = 0;
    }
}

// AdamW with fp32 moments (descriptor m, v: float*). decay = 1 − lr·weight_decay, step_size =
// lr / (1 − β1^t) and bc2_sqrt = sqrt(1 − β2^t) computed on the host in f64 exactly as
// cpu::adamw; seed/step pick the stochastic-rounding bits (step = the optimizer step is fine), and
// first_tensor is the first descriptor's place among the model's tensors (0 for all of them).
// grid Σ ceil(n / OPTIM_CHUNK), block 256, no shared memory, nothing to zero. sumsq: the output
// of multi_grad_sumsq earlier on the same stream (null: no clipping). max_norm = grad_clip
// (<= 0: off). CPU oracle: Optimizer::step with cpu::adamw, up to the stochastic rounding of p.
extern "C" __global__ void __launch_bounds__(256, 4)
    multi_adamw_m32(const optim::Tensor *ts, int n_tensors, const double *sumsq, float max_norm, float decay,
                    float beta1, float beta2, float eps, float step_size, float bc2_sqrt, uint64_t seed, uint64_t step,
                    int first_tensor) {
    optim::adamw<float>(ts, n_tensors, sumsq, max_norm, decay, beta1, beta2, eps, step_size, bc2_sqrt, seed, step,
                              first_tensor);
}

// As multi_adamw_m32 with bf16 moments (descriptor m, v: bf16*), stored with stochastic rounding
// from independent bits (for when fp32 moments do not fit). Same geometry and arguments.
extern "C" __global__ void __launch_bounds__(256, 4)
    multi_adamw_m16(const optim::Tensor *ts, int n_tensors, const double *sumsq, float max_norm, float decay,
                    float beta1, float beta2, float eps, float step_size, float bc2_sqrt, uint64_t seed, uint64_t step,
                    int first_tensor) {
    optim::adamw<bf16>(ts, n_tensors, sumsq, max_norm, decay, beta1, beta2, eps, step_size, bc2_sqrt, seed, step,
                              first_tensor);
}

// SGD: p += (−lr · scale) · g with the clip scale above, the alpha optim.rs hands to axpy, then
// stochastic rounding to bf16. Descriptor m and v are unused. grid Σ ceil(n / OPTIM_CHUNK), block
// 256, no shared memory, nothing to zero. CPU oracle: Optimizer::step for OptimizerKind::Sgd.
// Same chunk and group layout as the AdamW kernels.
extern "C" __global__ void __launch_bounds__(256) multi_sgd(const optim::Tensor *ts, int n_tensors,
                                                            const double *sumsq, float max_norm, float lr,
                                                            uint64_t seed, uint64_t step, int first_tensor) {
    using namespace optim;
    const float scale = clip_scale(sumsq, max_norm);
    if (scale < 0.0f) return;
    const float alpha = -lr * scale;
    const Chunk k = launch_chunk(ts, n_tensors, blockIdx.x);
    const int n = k.n;
    bf16 *p = (bf16 *)k.t.param + k.beg;
    const float *g = k.t.grad + k.beg;
    const ChunkBits bits = block_bits(seed, step, first_tensor + k.index, k.beg / OPTIM_CHUNK);
    int done = 0;
    if (aligned4(p) && aligned4(g)) {
        const int groups = n >> 2, stride = blockDim.x;
        for (int q0 = threadIdx.x; q0 < groups; q0 += kUpdateUnroll * stride) {
            float gx[kUpdateUnroll][4], px[kUpdateUnroll][4];
#pragma unroll
            for (int u = 0; u < kUpdateUnroll; u++) {
                const int j = 4 * (q0 + u * stride);
                if (j < 4 * groups) {
                    load4(g + j, gx[u]);
                    load4(p + j, px[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < kUpdateUnroll; u++) {
                const int j = 4 * (q0 + u * stride);
                if (j >= 4 * groups) break;
                uint32_t bp[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    px[u][e] = px[u][e] + alpha * gx[u][e];
                    bp[e] = (uint32_t)bits((uint32_t)(j + e));
                }
                store4(p + j, px[u], bp);
            }
        }
        done = 4 * groups;
    }
    for (int j = done + threadIdx.x; j < n; j += blockDim.x)
        p[j] = round_stochastic(ld(p + j) + alpha * g[j], (uint32_t)bits((uint32_t)j));
}
