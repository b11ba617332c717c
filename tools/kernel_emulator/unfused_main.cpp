// cuda/attention_unfused.cu on the host (see README.md): the two row kernels of the unfused
// attention path, against double-precision copies of what src/backend/cuda_attention_unfused.rs
// (and its host test of the GEMM plan) expects of them: the causal softmax of the scaled raw
// scores with its lse, and P, dS = P(dP - delta)·scale in the backward. Every output starts as
// NaN, so a value the kernel leaves unwritten (the zeros past the causal limit included) fails.
// Built by tests/kernel_emulator.rs from unfused_emu.cpp, which gen_ops.py writes.
#define EMU_STACK_BYTES (64 * 1024)
#include "emu.h"
#include "unfused_emu.cpp"
#include <random>

static std::mt19937 rng(5);
static int fails = 0;

static void report(const char *what, bool ok, double err) {
    if (!ok) fails++;
    printf("  %-30s %s  worst %.3g\n", what, ok ? "ok  " : "FAIL", err);
}

static float uni(float amp) { return std::uniform_real_distribution<float>(-amp, amp)(rng); }

// Sequence `seq` of `batch`, `heads` query heads, tq queries over tk keys.
static void test_case(int batch, int seq, int heads, int tq, int tk, int head_dim, float amp) {
    printf("batch %d seq %d heads %d tq %d tk %d d %d\n", batch, seq, heads, tq, tk, head_dim);
    const float scale = 1.0f / std::sqrt((float)head_dim);
    const size_t plane = (size_t)heads * tq * tk;
    const int tqp = (tq + 63) / 64 * 64;
    std::vector<float> s(plane), dp(plane), lse((size_t)batch * tq * heads, NAN),
        delta((size_t)batch * heads * tqp);
    for (auto &x : s) x = uni(amp);
    for (auto &x : dp) x = uni(1);
    for (auto &x : delta) x = uni(1);
    std::vector<bf16> p(plane, {0x7fc0}), ds(plane, {0x7fc0});
    emu_launch({(unsigned)tq, (unsigned)heads}, {UNFUSED_THREADS}, [&] {
        attention_unfused_softmax(p.data(), lse.data(), s.data(), seq, tq, tk, heads, scale);
    });
    // the double-precision softmax of each row over its visible keys
    std::vector<double> want_p(plane, 0.0), want_lse((size_t)batch * tq * heads, NAN);
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < tq; i++) {
            const size_t row = ((size_t)h * tq + i) * tk;
            const int n = tk - tq + i + 1;
            double m = -INFINITY, l = 0;
            for (int j = 0; j < n; j++) m = std::max(m, (double)s[row + j] * scale);
            for (int j = 0; j < n; j++) l += std::exp(s[row + j] * scale - m);
            const double L = m + std::log(l);
            want_lse[((size_t)seq * tq + i) * heads + h] = L;
            for (int j = 0; j < n; j++) want_p[row + j] = std::exp(s[row + j] * scale - L);
        }
    double worst = 0;
    bool ok = true;
    for (size_t r = 0; r < lse.size(); r++) {
        const bool mine = r / ((size_t)tq * heads) == (size_t)seq;
        if (!mine) {
            ok &= std::isnan(lse[r]);  // other sequences' rows untouched
            continue;
        }
        const double e = std::fabs(lse[r] - want_lse[r]);
        worst = std::max(worst, e);
        ok &= e <= 1e-5 * std::max(1.0, std::fabs(want_lse[r]));
    }
    report("lse", ok, worst);
    worst = 0;
    ok = true;
    for (size_t e = 0; e < plane; e++) {
        const double err = std::fabs(ld(&p[e]) - want_p[e]);
        worst = std::max(worst, err);
        ok &= err <= 0x1p-8 * want_p[e] + 1e-7;  // one bf16 rounding
    }
    report("p (zero past the causal limit)", ok, worst);

    std::vector<bf16> p2(plane, {0x7fc0});
    emu_launch({(unsigned)tq, (unsigned)heads}, {UNFUSED_THREADS}, [&] {
        attention_unfused_softmax_bwd(p2.data(), ds.data(), s.data(), dp.data(), lse.data(), delta.data(), seq, tq,
                                      tk, heads, scale);
    });
    double worst_p = 0, worst_ds = 0;
    bool ok_p = true, ok_ds = true;
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < tq; i++) {
            const double dl = delta[((size_t)seq * heads + h) * tqp + i];
            for (int j = 0; j < tk; j++) {
                const size_t e = ((size_t)h * tq + i) * tk + j;
                const double want_ds = want_p[e] * (dp[e] - dl) * scale;
                const double ep = std::fabs(ld(&p2[e]) - want_p[e]), ed = std::fabs(ld(&ds[e]) - want_ds);
                worst_p = std::max(worst_p, ep);
                worst_ds = std::max(worst_ds, ed);
                ok_p &= ep <= 0x1p-8 * want_p[e] + 1e-7;
                ok_ds &= ed <= 0x1p-8 * std::fabs(want_ds) + 1e-7;
            }
        }
    report("bwd p", ok_p, worst_p);
    report("bwd ds", ok_ds, worst_ds);
}

int main() {
    test_case(1, 0, 2, 9, 9, 64, 8);      // full causal rows, fewer keys than threads
    test_case(3, 1, 3, 5, 300, 128, 6);   // queries after a cached prefix, rows past a block
    test_case(2, 1, 2, 70, 70, 16, 12);   // tq past one 64-row delta tile
    printf(fails ? "%d FAILED\n" : "all ok\n", fails);
    return fails != 0;
}
