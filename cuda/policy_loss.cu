// The clipped policy loss of GRPO (token-level ratio) and GSPO (sequence-level ratio) over a
// packed batch of tokens, and d(loss)/d(logπ) per token, in one launch. CPU oracle:
// rl::policy_loss (with rl::clipped_term), whose arithmetic this follows in fp64.
//
// Launcher reference (each kernel is extern "C"):
//   __global__ void policy_loss_fwd_bwd(
//       float *dlogp, float *stats,
//       const float *logp, const float *old_logp, const float *adv, const float *mask,
//       const int *seq_start, float eps_low, float eps_high, float dual_clip,
//       int mode, int agg, int total_tokens, int total_seqs);
//
// Mapping from the CPU's arguments:
// * Sequence s owns tokens [seq_start[s], seq_start[s+1]) of logp/old_logp/adv/mask/dlogp.
// * adv is per token: broadcast each SeqSpan's advantage over its tokens.
// * mask (1 = counted, 0 = not; null = all 1) shrinks a sequence to its counted tokens: a
//   sequence's length (GSPO's mean, seq-mean-token-mean's 1/len) is its number of counted
//   tokens. All-ones masks give exactly rl::policy_loss over SeqSpan{start, len, advantage}.
// * dual_clip <= 0 is the CPU's None. mode: 0 PolicyLoss::Grpo, 1 PolicyLoss::Gspo. agg: 0
//   TokenMean, 1 SeqMeanTokenMean, 2 SeqMeanTokenSum. total_tokens/total_seqs are the
//   mini-batch totals, as on the CPU.
// * stats (float[4], zeroed by the Rust side before the launch) receives sums, so several
//   micro-batch launches may accumulate into one buffer:
//     stats[0] += loss (already weighted: PolicyLossStats::loss)
//     stats[1] += number of counted tokens whose clipped term was active
//     stats[2] += Σ over counted tokens of the k3 estimator (ρ − 1) − ln ρ, ρ the token ratio
//     stats[3] += number of counted tokens
//   so clip_fraction = stats[1] / stats[3] and approx_kl = stats[2] / stats[3] (0 when
//   stats[3] = 0), as PolicyLossStats. Block partials are fp64; only the cross-block atomics
//   are fp32, so the stats (not dlogp) may differ in the last bits from run to run.
#include "common.cuh"

namespace ploss {

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets it. A fixed tree, so dlogp does not depend on timing.
__device__ double block_sum_d(double v) {
    __shared__ double part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();  // part[] may still be read by the previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? part[lane] : 0.0;
    return warp_sum_d(v);
}

struct Term {
    double loss, dratio;
    bool clipped;
};

// rl::clipped_term: the larger of the unclipped and clipped losses; at a tie the unclipped one
// (and its gradient) wins. The dual clip caps the loss of a negative-advantage token at −adv·c.
// __host__ (here and below) so tools/cuda_host_checks can run the same arithmetic on the CPU.
__host__ __device__ inline Term clipped_term(double ratio, double adv, float eps_low, float eps_high,
                                             float dual_clip) {
    const double lo = 1.0 - (double)eps_low, hi = 1.0 + (double)eps_high;
    // f64::clamp: NaN stays NaN (fmin/fmax would turn it into a bound).
    const double clamped = ratio < lo ? lo : (ratio > hi ? hi : ratio);
    const double unclipped = -adv * ratio, clipped = -adv * clamped;
    Term t = unclipped >= clipped ? Term{unclipped, -adv, false} : Term{clipped, 0.0, true};
    if (dual_clip > 0.0f && adv < 0.0 && t.loss > -adv * (double)dual_clip) {
        t.loss = -adv * (double)dual_clip;
        t.dratio = 0.0;
        t.clipped = true;
    }
    return t;
}

// The weight of one token of a sequence with n counted tokens in the aggregated loss.
__host__ __device__ inline double seq_weight(int agg, double n, int total_tokens, int total_seqs) {
    const double seqs = total_seqs > 1 ? (double)total_seqs : 1.0;
    if (agg == 0) return 1.0 / (total_tokens > 1 ? (double)total_tokens : 1.0);
    return agg == 1 ? 1.0 / (seqs * n) : 1.0 / seqs;
}

struct Token {
    double loss, clipped, kl;
    float dlogp;
};

// One counted token: its weighted loss, d loss / d logπ, whether it was clipped, and its k3.
// The log-ratio is an f32 difference widened to f64, as (logp[t] - logp_old[t]) as f64.
__host__ __device__ inline Token token_term(float logp, float old_logp, float adv, int mode, double seq_ratio,
                                            double weight, float eps_low, float eps_high, float dual_clip) {
    const double log_ratio = (double)(logp - old_logp);
    const double tok_ratio = exp(log_ratio);
    // GSPO: every token takes the sequence ratio as its value, and d ratio / d logπ_t = ratio
    // (the token form of GSPO), as the CPU.
    const double ratio = mode == 1 ? seq_ratio : tok_ratio;
    const Term c = clipped_term(ratio, (double)adv, eps_low, eps_high, dual_clip);
    return Token{weight * c.loss, c.clipped ? 1.0 : 0.0, tok_ratio - 1.0 - log_ratio,
                 (float)(weight * c.dratio * ratio)};
}

}  // namespace ploss

// grid (n_seqs), block 256 (any multiple of 32 up to 1024), no dynamic shared memory (256 B
// static). Zero before launch: stats[0..4] (it is accumulated into). dlogp is written for every
// token of every sequence (0 where mask is 0); tokens outside [seq_start[0], seq_start[n_seqs])
// are not touched. CPU oracle: rl::policy_loss (see the file header for the argument mapping).
extern "C" __global__ void policy_loss_fwd_bwd(float *dlogp, float *stats, const float *logp, const float *old_logp,
                                               const float *adv, const float *mask, const int *seq_start,
                                               float eps_low, float eps_high, float dual_clip, int mode, int agg,
                                               int total_tokens, int total_seqs) {
    const int s0 = seq_start[blockIdx.x], s1 = seq_start[blockIdx.x + 1];
    // The sequence's counted length and its summed log-ratio (GSPO's mean). The log-ratio is an
    // f32 difference widened to f64, as (logp[t] - logp_old[t]) as f64 on the CPU.
    double n = 0.0, sum_lr = 0.0;
    for (int t = s0 + threadIdx.x; t < s1; t += blockDim.x)
        if (mask == nullptr || mask[t] != 0.0f) {
            n += 1.0;
            sum_lr += (double)(logp[t] - old_logp[t]);
        }
    n = ploss::block_sum_d(n);
    if (mode == 1) sum_lr = ploss::block_sum_d(sum_lr);
    if (n == 0.0) {  // the CPU skips an empty span
        for (int t = s0 + threadIdx.x; t < s1; t += blockDim.x) dlogp[t] = 0.0f;
        return;
    }
    const double weight = ploss::seq_weight(agg, n, total_tokens, total_seqs);
    const double seq_ratio = exp(sum_lr / n);  // used by GSPO only
    double loss = 0.0, clipped = 0.0, kl = 0.0;
    for (int t = s0 + threadIdx.x; t < s1; t += blockDim.x) {
        if (mask != nullptr && mask[t] == 0.0f) {
            dlogp[t] = 0.0f;
            continue;
        }
        const ploss::Token k = ploss::token_term(logp[t], old_logp[t], adv[t], mode, seq_ratio, weight, eps_low,
                                                 eps_high, dual_clip);
        dlogp[t] = k.dlogp;
        loss += k.loss;
        clipped += k.clipped;
        kl += k.kl;
    }
    loss = ploss::block_sum_d(loss);
    clipped = ploss::block_sum_d(clipped);
    kl = ploss::block_sum_d(kl);
    if (threadIdx.x == 0) {
        atomicAdd(stats + 0, (float)loss);
        atomicAdd(stats + 1, (float)clipped);
        atomicAdd(stats + 2, (float)kl);
        atomicAdd(stats + 3, (float)n);
    }
}
