// cuda/optimizer.cu on the host (see README.md): multi_grad_sumsq, multi_adamw_m32,
// multi_adamw_m16 and multi_sgd over one list of tensors that takes every path (several chunks, a
// short last chunk, n % 4 != 0, a tensor under four elements, an empty one, a misaligned one).
// Each output must be, bit for bit, cpu::adamw's f32 arithmetic (or SGD's axpy) followed by the
// stochastic rounding the kernel's header defines, with the bits of element_bits keyed on the
// tensor's place in the model; the f32 values are also held to a double-precision AdamW. An
// update done in groups, as the offloaded optimizer does it, must write the same bits as one
// launch over every tensor. Built by tests/kernel_emulator.rs from optimizer_emu.cpp, which
// tools/kernel_emulator/gen_ops.py writes from the kernel file.
#define EMU_STACK_BYTES (32 * 1024)
#include "emu.h"
#include "optimizer_emu.cpp"
#include <random>

static std::mt19937 rng(20261124);
static int fails = 0;
static const uint64_t SEED = 0x5eed0fada3a3ull;
// Elements past each tensor's end that must come back untouched.
static const int GUARD = 8;

static void report(const char *what, bool ok, double err) {
    if (!ok) fails++;
    printf("  %-52s %s  worst %.3g\n", what, ok ? "ok  " : "FAIL", err);
}

static uint32_t bits_of(float x) { return __float_as_uint(x); }
static uint16_t bits_of(bf16 x) { return x.x; }
static float value(float x) { return x; }
static float value(bf16 x) { return ld(&x); }

// One tensor's buffers; `skew` elements past an aligned start (1: the scalar path).
template <class M> struct Slot {
    int64_t n;
    int skew;
    std::vector<uint64_t> pstore, gstore, mstore, vstore;  // 8-byte aligned backing
    bf16 *p;
    float *g;
    M *m, *v;
    Slot(int64_t n_, int skew_) : n(n_), skew(skew_) {
        const size_t words = (size_t)n + skew + GUARD + 8;  // as many bytes as any type needs
        for (auto *s : {&pstore, &gstore, &mstore, &vstore}) s->assign(words, 0);
        p = (bf16 *)pstore.data() + skew;
        g = (float *)gstore.data() + skew;
        m = (M *)mstore.data() + skew;
        v = (M *)vstore.data() + skew;
    }
};

static bf16 bf(float x) { return to_bf16(x); }
static void put(float *p, float x) { *p = x; }
static void put(bf16 *p, float x) { *p = bf(x); }

// The model: sizes and skews chosen so that every path of the kernels runs.
static const int64_t SIZES[] = {40000, 3, 0, 16387, 1000, 33};
static const int SKEWS[] = {0, 0, 0, 0, 1, 0};
static const int NT = sizeof SIZES / sizeof SIZES[0];

template <class M> struct Model {
    std::vector<Slot<M>> slots;
    Model() {
        std::mt19937 r(7);  // every Model starts from the same values
        for (int t = 0; t < NT; t++) {
            slots.emplace_back(SIZES[t], SKEWS[t]);
            Slot<M> &s = slots.back();
            for (int64_t i = 0; i < s.n + GUARD; i++) {
                s.p[i] = bf(std::uniform_real_distribution<float>(-1, 1)(r));
                s.g[i] = std::uniform_real_distribution<float>(-0.05f, 0.05f)(r);
                put(s.m + i, std::uniform_real_distribution<float>(-0.01f, 0.01f)(r));
                put(s.v + i, std::uniform_real_distribution<float>(0, 1e-4f)(r));
            }
        }
    }
    // Descriptors of tensors [a, b), first_block counted from a.
    std::vector<optim::Tensor> descs(int a, int b, int64_t *blocks) {
        std::vector<optim::Tensor> ts;
        *blocks = 0;
        for (int t = a; t < b; t++) {
            Slot<M> &s = slots[t];
            ts.push_back({s.p, s.g, s.m, s.v, s.n, *blocks});
            *blocks += (s.n + OPTIM_CHUNK - 1) / OPTIM_CHUNK;
        }
        return ts;
    }
};

struct Adam {
    float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f;
    uint64_t step = 3;
    float max_norm = 0;  // set per case
    // The host's scalars, as src/backend/cuda_rl.rs computes them.
    float decay() const { return 1.0f - lr * wd; }
    float step_size() const { return (float)((double)lr / (1.0 - std::pow((double)b1, (double)step))); }
    float bc2_sqrt() const { return (float)std::sqrt(1.0 - std::pow((double)b2, (double)step)); }
};

// The clip scale the kernels apply, for the whole model's Σg².
static float scale_for(double sumsq, float max_norm) {
    const double norm = std::sqrt(sumsq);
    return max_norm > 0 && norm > max_norm ? (float)(max_norm / (norm + 1e-6)) : 1.0f;
}

static double model_sumsq(Model<float> &md) {
    double s = 0;
    for (auto &sl : md.slots)
        for (int64_t i = 0; i < sl.n; i++) s += (double)sl.g[i] * sl.g[i];
    return s;
}

static uint64_t element(uint64_t step, int t, int64_t e) {
    return optim::element_bits(optim::tensor_key(SEED, step, (uint64_t)t), (uint64_t)(e / OPTIM_CHUNK),
                               e % OPTIM_CHUNK);
}

// How far x lies from want, beyond one bf16 step around want when `rounded`, relative to the size
// of the terms that made want (cancellation can leave want small; f32 rounding scales with them).
static double beyond(double x, double want, bool rounded, double terms) {
    const double step = rounded ? std::ldexp(1.0, std::ilogb(std::fabs(want) * (1 + 1e-5) + 1e-30) - 7) : 0.0;
    return std::max(0.0, std::fabs(x - want) - step) / (terms + 1e-30);
}

static uint16_t round_sr(float x, uint32_t bits) { return optim::round_stochastic_bits(__float_as_uint(x), bits); }

// Runs one update kernel over tensors [a, b) as descriptor list and grid say.
template <class M>
static void launch(const char *kernel, Model<M> &md, int a, int b, const double *sumsq, const Adam &h, float lr_sgd) {
    int64_t blocks;
    auto ts = md.descs(a, b, &blocks);
    const int n = (int)ts.size();
    emu_launch({(unsigned)blocks}, {256}, [&] {
        if (!strcmp(kernel, "multi_adamw_m32"))
            multi_adamw_m32(ts.data(), n, sumsq, h.max_norm, h.decay(), h.b1, h.b2, h.eps, h.step_size(), h.bc2_sqrt(),
                            SEED, h.step, a);
        else if (!strcmp(kernel, "multi_adamw_m16"))
            multi_adamw_m16(ts.data(), n, sumsq, h.max_norm, h.decay(), h.b1, h.b2, h.eps, h.step_size(), h.bc2_sqrt(),
                            SEED, h.step, a);
        else
            multi_sgd(ts.data(), n, sumsq, h.max_norm, lr_sgd, SEED, h.step, a);
    });
}

// multi_grad_sumsq twice in a row (the counter must be back at 0 for the second), against Σg² in
// double.
static void check_sumsq() {
    printf("multi_grad_sumsq\n");
    Model<float> md;
    int64_t blocks;
    auto ts = md.descs(0, NT, &blocks);
    const double want = model_sumsq(md);
    double worst = 0;
    bool ok = true;
    unsigned counter = 0;
    for (int run = 0; run < 2; run++) {
        double sumsq = NAN;
        std::vector<double> partials(blocks, NAN);
        emu_launch({(unsigned)blocks}, {256},
                   [&] { multi_grad_sumsq(&sumsq, partials.data(), &counter, ts.data(), (int)ts.size()); });
        const double e = std::fabs(sumsq - want) / want;
        worst = std::max(worst, e);
        ok &= e <= 1e-13 && counter == 0;
    }
    report("sum of squares, twice (counter reset)", ok, worst);
}

// One AdamW launch over the whole model against the f32 and double references.
template <class M> static void check_adamw(const char *kernel, bool clip) {
    printf("%s, %s\n", kernel, clip ? "clipped to half the norm" : "no clipping (null sumsq)");
    Model<M> md, before;
    Adam h;
    double ss = 0;
    for (auto &sl : md.slots)
        for (int64_t i = 0; i < sl.n; i++) ss += (double)sl.g[i] * sl.g[i];
    h.max_norm = clip ? (float)(0.5 * std::sqrt(ss)) : 0.0f;
    launch(kernel, md, 0, NT, clip ? &ss : nullptr, h, 0);
    const float scale = clip ? scale_for(ss, h.max_norm) : 1.0f;
    const bool m16 = sizeof(M) == 2;
    long bad_bits = 0, bad_guard = 0;
    double worst_p = 0, worst_mv = 0;
    for (int t = 0; t < NT; t++) {
        Slot<M> &s = md.slots[t], &o = before.slots[t];
        for (int64_t i = 0; i < s.n; i++) {
            // cpu::adamw in f32, in its order
            const float g = o.g[i] * scale;
            float w = value(o.p[i]) * h.decay();
            const float mi = h.b1 * value(o.m[i]) + (1.0f - h.b1) * g;
            const float vi = h.b2 * value(o.v[i]) + (1.0f - h.b2) * g * g;
            w -= h.step_size() * mi / (sqrtf(vi) / h.bc2_sqrt() + h.eps);
            const uint64_t r = element(h.step, t, i);
            bool same = s.p[i].x == round_sr(w, (uint32_t)r);
            if (m16)
                same &= bits_of(s.m[i]) == round_sr(mi, (uint32_t)(r >> 16)) &&
                        bits_of(s.v[i]) == round_sr(vi, (uint32_t)(r >> 32));
            else
                same &= bits_of(s.m[i]) == bits_of(mi) && bits_of(s.v[i]) == bits_of(vi);
            bad_bits += !same;
            // The same step in double: the stored param is one of the two bf16 around it (so are
            // bf16 moments), up to f32 rounding of the terms that made it.
            const double gd = (double)o.g[i] * scale, m0 = value(o.m[i]), v0 = value(o.v[i]);
            const double md_ = h.b1 * m0 + (1 - (double)h.b1) * gd, vd = h.b2 * v0 + (1 - (double)h.b2) * gd * gd;
            const double wdec = value(o.p[i]) * (double)h.decay(),
                         upd = h.step_size() * md_ / (std::sqrt(vd) / h.bc2_sqrt() + h.eps), wd = wdec - upd;
            worst_p = std::max(worst_p, beyond(value(s.p[i]), wd, true, std::fabs(wdec) + std::fabs(upd)));
            worst_mv = std::max({worst_mv,
                                 beyond(value(s.m[i]), md_, m16, std::fabs(h.b1 * m0) + std::fabs((1 - h.b1) * gd)),
                                 beyond(value(s.v[i]), vd, m16, vd)});
        }
        for (int64_t i = s.n; i < s.n + GUARD; i++)
            bad_guard += s.p[i].x != o.p[i].x || bits_of(s.m[i]) != bits_of(o.m[i]) || bits_of(s.v[i]) != bits_of(o.v[i]);
    }
    char what[96];
    snprintf(what, sizeof what, "bits = f32 AdamW + rounding (%ld differ)", bad_bits);
    report(what, bad_bits == 0, (double)bad_bits);
    report("param: a bf16 next to double AdamW", worst_p <= 1e-6, worst_p);
    report(m16 ? "moments: a bf16 next to double AdamW" : "moments: double AdamW to 1e-6", worst_mv <= 1e-6, worst_mv);
    report("nothing written past a tensor's end", bad_guard == 0, (double)bad_guard);
}

static void check_sgd() {
    printf("multi_sgd, clipped to half the norm\n");
    Model<float> md, before;
    Adam h;
    const double ss = model_sumsq(md);
    h.max_norm = (float)(0.5 * std::sqrt(ss));
    const float lr = 0.5f;
    launch("multi_sgd", md, 0, NT, &ss, h, lr);
    const float alpha = -lr * scale_for(ss, h.max_norm);
    long bad = 0, bad_guard = 0;
    for (int t = 0; t < NT; t++) {
        Slot<float> &s = md.slots[t], &o = before.slots[t];
        for (int64_t i = 0; i < s.n; i++)
            bad += s.p[i].x != round_sr(value(o.p[i]) + alpha * o.g[i], (uint32_t)element(h.step, t, i));
        for (int64_t i = s.n; i < s.n + GUARD; i++) bad_guard += s.p[i].x != o.p[i].x;
    }
    report("bits = p + alpha g + rounding", bad == 0, (double)bad);
    report("nothing written past a tensor's end", bad_guard == 0, (double)bad_guard);
}

// A non-finite Σg² (a NaN gradient) leaves every buffer as it was.
static void check_nan() {
    printf("non-finite sum of squares\n");
    long changed = 0;
    for (const char *k : {"multi_adamw_m32", "multi_sgd"}) {
        Model<float> md, before;
        md.slots[3].g[5] = NAN;
        const double ss = NAN;
        Adam h;
        h.max_norm = 1.0f;
        launch(k, md, 0, NT, &ss, h, 0.5f);
        for (int t = 0; t < NT; t++)
            for (int64_t i = 0; i < md.slots[t].n + GUARD; i++)
                changed += md.slots[t].p[i].x != before.slots[t].p[i].x || md.slots[t].m[i] != before.slots[t].m[i];
    }
    {
        Model<bf16> md, before;
        const double ss = INFINITY;
        Adam h;
        launch("multi_adamw_m16", md, 0, NT, &ss, h, 0);
        for (int t = 0; t < NT; t++)
            for (int64_t i = 0; i < md.slots[t].n + GUARD; i++)
                changed += md.slots[t].p[i].x != before.slots[t].p[i].x || md.slots[t].v[i].x != before.slots[t].v[i].x;
    }
    report("no kernel writes anything", changed == 0, (double)changed);
}

// The update in groups of tensors, each launch given its first tensor's place and the whole
// model's Σg², against one launch over all of them; then the same groups each numbered from 0,
// which must differ (so the comparison can fail).
template <class M> static long grouped_vs_whole(const char *kernel, bool keyed) {
    Model<M> whole, grouped;
    Adam h;
    double ss = 0;
    for (auto &sl : whole.slots)
        for (int64_t i = 0; i < sl.n; i++) ss += (double)sl.g[i] * sl.g[i];
    h.max_norm = (float)(0.5 * std::sqrt(ss));
    launch(kernel, whole, 0, NT, &ss, h, 0.5f);
    const int cuts[] = {0, 1, 3, 4, NT};
    for (int k = 0; k + 1 < 5; k++) {
        Model<M> &md = grouped;
        int64_t blocks;
        auto ts = md.descs(cuts[k], cuts[k + 1], &blocks);
        if (blocks == 0) continue;
        const int first = keyed ? cuts[k] : 0;
        emu_launch({(unsigned)blocks}, {256}, [&] {
            if (!strcmp(kernel, "multi_adamw_m16"))
                multi_adamw_m16(ts.data(), (int)ts.size(), &ss, h.max_norm, h.decay(), h.b1, h.b2, h.eps, h.step_size(),
                                h.bc2_sqrt(), SEED, h.step, first);
            else
                multi_sgd(ts.data(), (int)ts.size(), &ss, h.max_norm, 0.5f, SEED, h.step, first);
        });
    }
    long differ = 0;
    for (int t = 0; t < NT; t++)
        for (int64_t i = 0; i < whole.slots[t].n; i++)
            differ += whole.slots[t].p[i].x != grouped.slots[t].p[i].x ||
                      bits_of(whole.slots[t].m[i]) != bits_of(grouped.slots[t].m[i]) ||
                      bits_of(whole.slots[t].v[i]) != bits_of(grouped.slots[t].v[i]);
    return differ;
}

static void check_groups() {
    printf("in groups [0, 1) [1, 3) [3, 4) [4, 6) against one launch\n");
    const long m16 = grouped_vs_whole<bf16>("multi_adamw_m16", true);
    const long sgd = grouped_vs_whole<float>("multi_sgd", true);
    report("multi_adamw_m16: same bits", m16 == 0, (double)m16);
    report("multi_sgd: same bits", sgd == 0, (double)sgd);
    const long unkeyed = grouped_vs_whole<bf16>("multi_adamw_m16", false);
    report("numbered from 0 in each group instead: bits differ", unkeyed > 0, (double)unkeyed);
}

int main() {
    check_sumsq();
    check_adamw<float>("multi_adamw_m32", true);
    check_adamw<float>("multi_adamw_m32", false);
    check_adamw<bf16>("multi_adamw_m16", true);
    check_sgd();
    check_nan();
    check_groups();
    // Every kernel of the file ran above.
    printf("kernels in the file: %zu\n", sizeof ops_kernels / sizeof ops_kernels[0]);
    if (sizeof ops_kernels / sizeof ops_kernels[0] != 4) fails++;
    printf(fails ? "%d FAILED\n" : "all ok\n", fails);
    return fails != 0;
}
