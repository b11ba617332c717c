// Host-side checks of the __host__ __device__ arithmetic in cuda/policy_loss.cu and
// cuda/optimizer.cu, runnable without a GPU:
//   1. policy_loss_fwd_bwd emulated per sequence with the kernel's own ploss:: functions (only
//      the block reductions are replaced by loops), against the expectations of src/rl.rs's
//      tests, plus a check that masked tokens act as if they were not in the batch;
//   2. the optimizer's stochastic rounding: over all 2^16 random inputs it averages exactly to
//      the f32 value, leaves bf16 values, inf and NaN as they are, and the branch-free form
//      gives the bits of the original branching one;
//   3. the optimizer's random bits: ChunkBits, the kernels' hoisted hash, equals element_bits.
// Build and run from the repository root:
//   .cuda/nvidia/cu13/bin/nvcc -O3 -std=c++17 -arch=sm_80 -I cuda -L .cuda/nvidia/cu13/lib \
//       tools/cuda_host_checks/rl_optim_check.cu -o /tmp/rl_optim_check && /tmp/rl_optim_check
#include "../../cuda/optimizer.cu"
#include "../../cuda/policy_loss.cu"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

static int failures = 0;

#define CHECK(cond, ...)                       \
    do {                                       \
        if (!(cond)) {                         \
            failures++;                        \
            std::printf("FAIL line %d: ", __LINE__); \
            std::printf(__VA_ARGS__);          \
            std::printf("\n");                 \
        }                                      \
    } while (0)

struct Stats {
    double loss = 0, clipped = 0, kl = 0, n = 0;
    double clip_fraction() const { return n > 0 ? clipped / n : 0; }
    double approx_kl() const { return n > 0 ? kl / n : 0; }
};

struct Cfg {
    int mode = 0, agg = 0;
    float eps_low = 0.2f, eps_high = 0.2f, dual_clip = 0.0f;
};

// policy_loss_fwd_bwd, one sequence per loop iteration as one block per sequence.
static Stats emulate(const std::vector<float> &logp, const std::vector<float> &old, const std::vector<float> &adv,
                     const std::vector<float> *mask, const std::vector<int> &seq_start, const Cfg &c, int total_tokens,
                     int total_seqs, std::vector<float> &dlogp) {
    Stats st;
    dlogp.assign(logp.size(), 0.0f);
    for (size_t s = 0; s + 1 < seq_start.size(); s++) {
        const int s0 = seq_start[s], s1 = seq_start[s + 1];
        double n = 0, sum_lr = 0;
        for (int t = s0; t < s1; t++)
            if (!mask || (*mask)[t] != 0.0f) {
                n += 1;
                sum_lr += (double)(logp[t] - old[t]);
            }
        if (n == 0) continue;
        const double weight = ploss::seq_weight(c.agg, n, total_tokens, total_seqs);
        const double seq_ratio = std::exp(sum_lr / n);
        for (int t = s0; t < s1; t++) {
            if (mask && (*mask)[t] == 0.0f) continue;
            const ploss::Token k = ploss::token_term(logp[t], old[t], adv[t], c.mode, seq_ratio, weight, c.eps_low,
                                                     c.eps_high, c.dual_clip);
            dlogp[t] = k.dlogp;
            st.loss += k.loss;
            st.clipped += k.clipped;
            st.kl += k.kl;
        }
        st.n += n;
    }
    return st;
}

static void check_policy_loss() {
    std::vector<float> d;
    {  // rl.rs on_policy_gradient_is_minus_advantage_weighted
        const std::vector<float> logp = {-1.0f, -2.0f, -0.5f, -0.7f, -3.0f};
        const std::vector<float> adv = {1.5f, 1.5f, -0.5f, -0.5f, -0.5f};
        const std::vector<int> ss = {0, 2, 5};
        Cfg c;
        Stats st = emulate(logp, logp, adv, nullptr, ss, c, 5, 2, d);
        CHECK(std::fabs(st.loss - (-(1.5 * 2.0) + 0.5 * 3.0) / 5.0) < 1e-9, "token-mean loss %g", st.loss);
        const float want[] = {-0.3f, -0.3f, 0.1f, 0.1f, 0.1f};
        for (int t = 0; t < 5; t++) CHECK(d[t] == want[t], "token-mean d[%d] = %.9g", t, d[t]);
        CHECK(st.clip_fraction() == 0.0 && st.approx_kl() == 0.0, "on-policy clip/kl");
        c.agg = 1;
        emulate(logp, logp, adv, nullptr, ss, c, 5, 2, d);
        CHECK(std::fabs(d[0] + 1.5 / 4.0) < 1e-7 && std::fabs(d[2] - 0.5 / 6.0) < 1e-7, "seq-mean-token-mean");
        const std::vector<float> grpo = d;
        c.mode = 1;
        emulate(logp, logp, adv, nullptr, ss, c, 5, 2, d);
        CHECK(d == grpo, "GSPO at ratio 1 equals GRPO with seq-mean-token-mean");
        c.mode = 0;
        c.agg = 2;
        emulate(logp, logp, adv, nullptr, ss, c, 5, 2, d);
        CHECK(std::fabs(d[0] + 0.75) < 1e-7 && std::fabs(d[4] - 0.25) < 1e-7, "seq-mean-token-sum");
    }
    {  // rl.rs clipping_stops_the_gradient_outside_the_trust_region
        const std::vector<float> old = {0.0f, 0.0f, 0.0f}, logp = {0.5f, -0.5f, 0.5f}, adv = {1.0f, 1.0f, -1.0f};
        Cfg c;
        c.agg = 2;
        const Stats st = emulate(logp, old, adv, nullptr, {0, 1, 2, 3}, c, 3, 1, d);
        CHECK(d[0] == 0.0f, "clipped token has no gradient: %g", d[0]);
        CHECK(std::fabs(d[1] + std::exp(-0.5)) < 1e-6, "d[1] %g", d[1]);
        CHECK(std::fabs(d[2] - std::exp(0.5)) < 1e-6, "d[2] %g", d[2]);
        CHECK(std::fabs(st.clip_fraction() - 1.0 / 3.0) < 1e-12, "clip fraction %g", st.clip_fraction());
        auto k3 = [](double lr) { return std::exp(lr) - 1.0 - lr; };
        CHECK(std::fabs(st.approx_kl() - (2.0 * k3(0.5) + k3(-0.5)) / 3.0) < 1e-9, "approx kl %g", st.approx_kl());
        c.dual_clip = 1.5f;
        const Stats dc = emulate({1.0f}, {0.0f}, {-1.0f}, nullptr, {0, 1}, c, 1, 1, d);
        CHECK(std::fabs(dc.loss - 1.5) < 1e-9 && d[0] == 0.0f, "dual clip: loss %g d %g", dc.loss, d[0]);
    }
    {  // rl.rs policy_loss_gradient_matches_finite_differences
        const std::vector<float> old = {-1.0f, -1.2f, -0.3f, -2.0f}, logp0 = {-0.9f, -1.25f, -0.1f, -2.3f};
        const std::vector<float> adv = {0.7f, 0.7f, -1.1f, -1.1f};
        const std::vector<int> ss = {0, 2, 4};
        for (int mode = 0; mode < 2; mode++) {
            Cfg c;
            c.mode = mode;
            c.eps_high = 0.28f;
            c.dual_clip = 3.0f;
            emulate(logp0, old, adv, nullptr, ss, c, 4, 2, d);
            for (int t = 0; t < 4; t++) {
                const float h = 1e-3f;
                std::vector<float> p = logp0, scratch;
                p[t] += h;
                const double lp = emulate(p, old, adv, nullptr, ss, c, 4, 2, scratch).loss;
                p[t] -= 2.0f * h;
                const double lm = emulate(p, old, adv, nullptr, ss, c, 4, 2, scratch).loss;
                const double fd = (lp - lm) / (2.0 * h);
                CHECK(std::fabs(fd - d[t]) < 1e-4, "mode %d token %d: fd %g vs %g", mode, t, fd, d[t]);
            }
        }
    }
    {  // A masked token is as if absent: compare with the compacted batch, every mode and agg.
        const std::vector<float> logp = {-0.9f, -5.0f, -1.25f, -0.1f, -2.3f, -7.0f, -0.4f, -3.0f};
        const std::vector<float> old = {-1.0f, -1.0f, -1.2f, -0.3f, -2.0f, -1.0f, -0.2f, -3.0f};
        const std::vector<float> adv = {0.7f, 0.7f, 0.7f, -1.1f, -1.1f, -1.1f, 0.3f, 0.3f};
        const std::vector<float> mask = {1, 0, 1, 1, 1, 0, 1, 0};
        const std::vector<int> ss = {0, 3, 6, 8};
        std::vector<float> cl, co, ca;
        std::vector<int> cidx, css = {0};
        for (int s = 0; s < 3; s++) {
            for (int t = ss[s]; t < ss[s + 1]; t++)
                if (mask[t] != 0.0f) {
                    cl.push_back(logp[t]);
                    co.push_back(old[t]);
                    ca.push_back(adv[t]);
                    cidx.push_back(t);
                }
            css.push_back((int)cl.size());
        }
        for (int mode = 0; mode < 2; mode++)
            for (int agg = 0; agg < 3; agg++) {
                Cfg c;
                c.mode = mode;
                c.agg = agg;
                c.dual_clip = 2.0f;
                std::vector<float> dm, dc;
                const Stats sm = emulate(logp, old, adv, &mask, ss, c, 5, 3, dm);
                const Stats sc = emulate(cl, co, ca, nullptr, css, c, 5, 3, dc);
                CHECK(sm.loss == sc.loss && sm.clipped == sc.clipped && sm.kl == sc.kl && sm.n == sc.n,
                      "mask mode %d agg %d: stats differ", mode, agg);
                for (size_t i = 0; i < cidx.size(); i++)
                    CHECK(dm[cidx[i]] == dc[i], "mask mode %d agg %d token %d", mode, agg, cidx[i]);
                for (size_t t = 0; t < mask.size(); t++)
                    if (mask[t] == 0.0f) CHECK(dm[t] == 0.0f, "masked token %zu has gradient", t);
            }
    }
}

static double f32_of_bits(uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

static void check_stochastic_rounding() {
    const float xs[] = {1.0f, 1.0f + 1e-3f, -1.0f - 1e-3f, 3.14159265f, -2.71828f, 1e-20f, -7.5e-30f,
                        65504.1f, 1.0e30f, 0.999999f, 1.9999999f, -1.9999999f, 3.0e38f};
    for (float x : xs) {
        uint32_t u;
        std::memcpy(&u, &x, 4);
        const uint32_t lo = u >> 16;
        double sum = 0;
        bool bracketed = true;
        for (uint32_t r = 0; r < 65536; r++) {
            const uint32_t b = optim::round_stochastic_bits(u, r);
            bracketed &= b == lo || b == lo + 1;
            sum += f32_of_bits(b << 16);
        }
        CHECK(bracketed, "SR of %g left its two neighbours", x);
        CHECK(sum == 65536.0 * (double)x, "SR of %g averages %.17g", x, sum / 65536.0);
    }
    const uint32_t specials[] = {0x3f800000u, 0xbf800000u, 0x7f800000u, 0xff800000u, 0x00000000u, 0x80000000u};
    for (uint32_t u : specials)
        for (uint32_t r : {0u, 1u, 0x7fffu, 0xffffu})
            CHECK(optim::round_stochastic_bits(u, r) == (u >> 16), "SR moved %08x", u);
    for (uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xff800001u}) {
        const uint32_t b = optim::round_stochastic_bits(nan, 0xffffu) << 16;
        CHECK(std::isnan(f32_of_bits(b)), "SR of NaN %08x gave %08x", nan, b);
    }
}

// The rounding as first written (a branch for inf/NaN), which the kernels' branch-free
// round_stochastic_bits must reproduce bit for bit.
static uint16_t round_stochastic_bits_ref(uint32_t u, uint32_t bits) {
    if ((u & 0x7f800000u) == 0x7f800000u) return (uint16_t)((u >> 16) | ((u & 0x007fffffu) ? 0x40u : 0u));
    return (uint16_t)((u + (bits & 0xffffu)) >> 16);
}

static uint64_t next_u64(uint64_t &s) { return optim::mix64(s += 0x9E3779B97F4A7C15ull); }

static void check_rounding_matches_reference() {
    uint64_t rng = 1;
    int bad = 0;
    // Every 2^32 / 65521-th f32 bit pattern (all signs and exponents) with random bits, plus
    // every pattern around inf/NaN and the rounding-carry edges with extreme bits.
    for (uint64_t k = 0; k < (1ull << 32); k += 65521) {
        const uint32_t u = (uint32_t)k;
        for (int t = 0; t < 8; t++) {
            const uint32_t r = (uint32_t)next_u64(rng);
            bad += optim::round_stochastic_bits(u, r) != round_stochastic_bits_ref(u, r);
        }
    }
    for (uint32_t hi : {0x7f7fu, 0x7f80u, 0x7fc0u, 0x7fffu, 0xff7fu, 0xff80u, 0xffc0u, 0xffffu, 0x0000u, 0x8000u})
        for (uint32_t lo = 0; lo < 65536; lo++)
            for (uint32_t r : {0u, 1u, 0x8000u, 0xffffu, 0xffffffffu}) {
                const uint32_t u = hi << 16 | lo;
                bad += optim::round_stochastic_bits(u, r) != round_stochastic_bits_ref(u, r);
            }
    CHECK(bad == 0, "branch-free stochastic rounding differs from the reference in %d cases", bad);
}

static void check_chunk_bits() {
    uint64_t rng = 7;
    int bad = 0;
    for (int trial = 0; trial < 64; trial++) {
        const uint64_t key = next_u64(rng);
        // Chunk indices from 0 to far beyond any real grid, so every key bit meets chunk bits.
        const uint64_t chunk = trial < 4 ? (uint64_t)trial : next_u64(rng) >> (trial % 50);
        const optim::ChunkBits bits(key, chunk);
        for (uint32_t i = 0; i < OPTIM_CHUNK; i += trial < 8 ? 1 : 7)
            bad += bits(i) != optim::element_bits(key, chunk, i);
    }
    CHECK(bad == 0, "ChunkBits differs from element_bits in %d cases", bad);
}

int main() {
    check_policy_loss();
    check_stochastic_rounding();
    check_rounding_matches_reference();
    check_chunk_bits();
    if (failures) {
        std::printf("%d failures\n", failures);
        return 1;
    }
    std::printf("all policy-loss and optimizer host checks passed\n");
    return 0;
}
