// cuda/softmax_entropy.cu on the host (see README.md): the split-row forward with its arrival
// counters and last-CTA merge, and the backward from saved statistics, against double-precision
// copies of cpu::softmax_stats and cpu::softmax_stats_bwd. Built by tests/kernel_emulator.rs
// from softmax_emu.cpp, which tools/kernel_emulator/gen_ops.py writes from the kernel file.
#define EMU_STACK_BYTES (64 * 1024)
#include "emu.h"
#include "softmax_emu.cpp"
#include <random>

static std::mt19937 rng(99);
static int fails = 0;

struct Ref {
    double lse, entropy, logprob, mean_z;
};

// cpu::row_stats in double
static Ref ref_row(const bf16 *row, int vocab, uint32_t y, double t) {
    double m = -INFINITY;
    for (int j = 0; j < vocab; j++) m = std::max(m, (double)ld(row + j) / t);
    double s = 0, zs = 0;
    for (int j = 0; j < vocab; j++) {
        const double z = ld(row + j) / t, e = std::exp(z - m);
        s += e;
        if (e > 0) zs += e * z;  // a masked logit (−inf) adds nothing
    }
    Ref r;
    r.lse = m + std::log(s);
    r.mean_z = zs / s;
    r.entropy = r.lse - r.mean_z;
    r.logprob = y == NO_TARGET ? 0.0 : ld(row + y) / t - r.lse;
    return r;
}

static void report(const char *what, bool ok, double err) {
    if (!ok) fails++;
    printf("  %-28s %s  worst %.3g\n", what, ok ? "ok  " : "FAIL", err);
}

// One case: `offset` values of padding before the logits make them 2-byte aligned only.
// `masked`: some logits are −inf (masked tokens): row 0's first 8 (all of one thread's first
// pack, or its first values on the scalar path) and every fifth of row 3, never a target.
static void test_case(int rows, int vocab, int splits, float temp, float amp, int offset, bool in_place,
                      bool masked = false) {
    printf("rows %d vocab %d splits %d T %.2f amp %.0f offset %d%s%s\n", rows, vocab, splits, temp, amp, offset,
           in_place ? " in place" : "", masked ? " masked" : "");
    std::vector<bf16> buf((size_t)rows * vocab + offset + 8);
    for (auto &x : buf) x = to_bf16(std::uniform_real_distribution<float>(-amp, amp)(rng));
    bf16 *logits = buf.data() + offset;
    if (rows > 1) logits[(size_t)1 * vocab + vocab / 3] = to_bf16(amp * 6);  // a peaked row
    std::vector<uint32_t> targets(rows);
    for (int r = 0; r < rows; r++) targets[r] = r == 0 ? vocab - 1 : r == 2 ? NO_TARGET : (r * 977 + 8) % vocab;
    if (masked) {
        for (int j = 0; j < 8; j++) logits[j] = to_bf16(-INFINITY);
        if (rows > 3)
            for (int j = 1; j < vocab; j += 5)
                if ((uint32_t)j != targets[3]) logits[(size_t)3 * vocab + j] = to_bf16(-INFINITY);
    }
    std::vector<Ref> ref(rows);
    for (int r = 0; r < rows; r++) ref[r] = ref_row(logits + (size_t)r * vocab, vocab, targets[r], temp);

    std::vector<float> stats(3 * rows, NAN), partial((size_t)3 * splits * rows, NAN);
    std::vector<unsigned> arrived(rows, 0);
    emu_launch({(unsigned)splits, (unsigned)rows}, {SME_THREADS}, [&] {
        softmax_stats_fwd(stats.data(), partial.data(), arrived.data(), logits, targets.data(), vocab, temp);
    });
    double worst = 0;
    bool ok = true;
    for (int r = 0; r < rows; r++) {
        const double want[3] = {ref[r].lse, ref[r].entropy, ref[r].logprob};
        for (int k = 0; k < 3; k++) {
            const double e = std::fabs(stats[3 * r + k] - want[k]);
            worst = std::max(worst, e);
            // f32 sums of a few thousand terms: 1e-5 of the size of the statistic
            if (!(e <= 1e-5 * std::max(1.0, std::fabs(want[k])))) ok = false;
        }
    }
    report("stats (lse, entropy, logp)", ok, worst);
    bool zero = true;
    for (unsigned a : arrived) zero &= a == 0;
    report("arrival counters reset", zero, 0);

    std::vector<float> a(rows), b(rows);
    for (int r = 0; r < rows; r++) {
        a[r] = std::uniform_real_distribution<float>(-1, 1)(rng);
        b[r] = std::uniform_real_distribution<float>(-1, 1)(rng);
    }
    std::vector<bf16> dbuf(buf.size(), {0x7fc0});
    bf16 *dlogits = in_place ? logits : dbuf.data() + offset;
    std::vector<float> keep((size_t)rows * vocab);
    for (size_t i = 0; i < keep.size(); i++) keep[i] = ld(logits + i);
    emu_launch({(unsigned)splits, (unsigned)rows}, {SME_THREADS}, [&] {
        softmax_stats_bwd_saved(dlogits, logits, stats.data(), targets.data(), a.data(), b.data(), vocab, temp);
    });
    worst = 0;
    ok = true;
    for (int r = 0; r < rows; r++) {
        const double cb = targets[r] == NO_TARGET ? 0.0 : b[r];
        for (int j = 0; j < vocab; j++) {
            const double z = keep[(size_t)r * vocab + j] / temp, p = std::exp(z - ref[r].lse);
            double want = p > 0 ? (a[r] * (-p * (z - ref[r].mean_z)) - cb * p) / temp : 0.0;
            if ((uint32_t)j == targets[r]) want += cb / temp;
            const double got = ld(dlogits + (size_t)r * vocab + j), e = std::fabs(got - want);
            worst = std::max(worst, e);
            // one bf16 rounding of the output (2^-8 relative) plus the f32 error of p·(z − E[z])
            if (!(e <= 4e-3 * std::fabs(want) + 1e-6)) ok = false;
        }
    }
    report("dlogits from saved stats", ok, worst);
}

int main() {
    test_case(3, 1000, 1, 0.7f, 8, 0, false);    // one CTA a row, packed
    test_case(4, 1000, 3, 0.7f, 8, 0, false);    // split rows, packed, ragged spans
    test_case(3, 80, 7, 1.0f, 4, 0, false);      // 10 packs over 7 CTAs: empty spans
    test_case(5, 1001, 4, 0.5f, 8, 0, false);    // odd vocabulary: the scalar path
    test_case(3, 1000, 4, 0.7f, 8, 1, false);    // misaligned logits: the scalar path
    test_case(3, 4104, 5, 1.0f, 16, 0, true);    // in place (dlogits = logits)
    test_case(2, 152064, 7, 0.7f, 8, 0, false);  // Qwen2.5's vocabulary, as the launcher splits it
    test_case(4, 4096, 3, 0.7f, 8, 0, false, true);  // masked logits, packed
    test_case(4, 1001, 3, 0.7f, 8, 0, true, true);   // masked logits, scalar path, in place
    printf(fails ? "%d FAILED\n" : "all ok\n", fails);
    return fails != 0;
}
