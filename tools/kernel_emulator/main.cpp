#include "attention_emu.cpp"
#include <random>
#include <string>

static std::mt19937 rng(1234);
static float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }
static const bf16 BNAN = {0x7fc0};
static std::vector<bf16> rand_bf16(size_t n, float amp) { std::vector<bf16> v(n); for (auto &x : v) x = to_bf16(rnd() * amp); return v; }
static std::vector<float> f32(const std::vector<bf16> &v) { std::vector<float> r(v.size()); for (size_t i = 0; i < v.size(); i++) r[i] = ld(&v[i]); return r; }
static int fails = 0;
static void check(const char *what, const std::vector<float> &got, const std::vector<double> &ref, double tol) {
    double mref = 1e-6, merr = 0; size_t bad = 0, worst = 0;
    for (size_t i = 0; i < ref.size(); i++) mref = std::max(mref, std::fabs(ref[i]));
    for (size_t i = 0; i < ref.size(); i++) {
        double e = std::fabs(got[i] - ref[i]);
        if (!(e <= merr)) { if (std::isnan(e) || e > merr) { merr = std::isnan(e) ? INFINITY : e; worst = i; } }
        if (!(e <= tol * mref)) bad++;
    }
    bool ok = bad == 0;
    if (!ok) fails++;
    printf("  %-10s %s  max|ref| %.3g  max err %.3g (rel %.2e) at %zu  bad %zu\n", what, ok ? "ok  " : "FAIL", mref, merr, merr / mref, worst, bad);
}

struct Shape { int batch, tq, tk, cap, heads, kv, D; };

// mirrors cpu::attention, in double
static void ref_fwd(std::vector<double> &out, std::vector<double> &lse, const std::vector<float> &q, const std::vector<float> &k, const std::vector<float> &v, Shape s) {
    int group = s.heads / s.kv, D = s.D; double scale = 1.0 / std::sqrt((double)D);
    out.assign((size_t)s.batch * s.tq * s.heads * D, 0); lse.assign((size_t)s.batch * s.tq * s.heads, 0);
    for (int b = 0; b < s.batch; b++) for (int i = 0; i < s.tq; i++) for (int h = 0; h < s.heads; h++) {
        int kvh = h / group, last = s.tk - s.tq + i;
        size_t qb = (((size_t)b * s.tq + i) * s.heads + h) * D;
        std::vector<double> p(last + 1); double m = -INFINITY;
        for (int j = 0; j <= last; j++) { size_t kb = (((size_t)b * s.cap + j) * s.kv + kvh) * D; double d = 0; for (int t = 0; t < D; t++) d += (double)q[qb + t] * k[kb + t]; p[j] = d * scale; m = std::max(m, p[j]); }
        double l = 0; for (auto &x : p) { x = std::exp(x - m); l += x; }
        for (int j = 0; j <= last; j++) { size_t vb = (((size_t)b * s.cap + j) * s.kv + kvh) * D; for (int t = 0; t < D; t++) out[qb + t] += p[j] * v[vb + t] / l; }
        lse[((size_t)b * s.tq + i) * s.heads + h] = m + std::log(l);
    }
}
// mirrors cpu::attention_bwd, in double, given out and lse
static void ref_bwd(std::vector<double> &dq, std::vector<double> &dk, std::vector<double> &dv, const std::vector<float> &dout, const std::vector<float> &out, const std::vector<float> &lse,
                    const std::vector<float> &q, const std::vector<float> &k, const std::vector<float> &v, Shape s) {
    int group = s.heads / s.kv, D = s.D; double scale = 1.0 / std::sqrt((double)D);
    dq.assign(q.size(), 0); dk.assign(k.size(), 0); dv.assign(v.size(), 0);
    for (int b = 0; b < s.batch; b++) for (int h = 0; h < s.heads; h++) for (int i = 0; i < s.tq; i++) {
        int kvh = h / group; size_t qb = (((size_t)b * s.tq + i) * s.heads + h) * D;
        double l = lse[((size_t)b * s.tq + i) * s.heads + h], bigd = 0;
        for (int t = 0; t < D; t++) bigd += (double)dout[qb + t] * out[qb + t];
        for (int j = 0; j <= s.tk - s.tq + i; j++) {
            size_t kb = (((size_t)b * s.cap + j) * s.kv + kvh) * D;
            double qk = 0, dp = 0; for (int t = 0; t < D; t++) { qk += (double)q[qb + t] * k[kb + t]; dp += (double)dout[qb + t] * v[kb + t]; }
            double p = std::exp(qk * scale - l), ds = p * (dp - bigd) * scale;
            for (int t = 0; t < D; t++) { dv[kb + t] += p * dout[qb + t]; dq[qb + t] += ds * k[kb + t]; dk[kb + t] += ds * q[qb + t]; }
        }
    }
}

static std::vector<bf16> make_kv(Shape s, float amp) {  // rows >= tk hold NaN garbage
    auto k = rand_bf16((size_t)s.batch * s.cap * s.kv * s.D, amp);
    for (int b = 0; b < s.batch; b++) for (int j = s.tk; j < s.cap; j++) for (int x = 0; x < s.kv * s.D; x++) k[((size_t)b * s.cap + j) * s.kv * s.D + x] = BNAN;
    return k;
}
static std::vector<float> zero_garbage(std::vector<float> x, Shape s) {  // the reference never reads rows >= tk
    for (int b = 0; b < s.batch; b++) for (int j = s.tk; j < s.cap; j++) for (int c = 0; c < s.kv * s.D; c++) x[((size_t)b * s.cap + j) * s.kv * s.D + c] = 0;
    return x;
}

static void test_attention(Shape s, bool fast) {
    printf("%s D=%d batch=%d tq=%d tk=%d cap=%d heads=%d kv=%d\n", fast ? "fast" : "generic", s.D, s.batch, s.tq, s.tk, s.cap, s.heads, s.kv);
    const int D = s.D;
    auto q = rand_bf16((size_t)s.batch * s.tq * s.heads * D, 2.0f), k = make_kv(s, 2.0f), v = make_kv(s, 1.0f);
    auto dout = rand_bf16(q.size(), 1.0f);
    std::vector<bf16> out(q.size(), BNAN), dq(q.size(), BNAN), dk(k.size(), BNAN), dv(v.size(), BNAN);
    std::vector<float> lse((size_t)s.batch * s.tq * s.heads, NAN), dqacc(q.size(), NAN);
    auto qf = f32(q), kf = zero_garbage(f32(k), s), vf = zero_garbage(f32(v), s), df = f32(dout);
    std::vector<double> ro, rl; ref_fwd(ro, rl, qf, kf, vf, s);
    if (fast) {
        dim3e grid = {(unsigned)(s.batch * s.heads), (unsigned)((s.tq + 127) / 128)};
        emu_launch(grid, {128}, [&] { (D == 64 ? attention_fwd_d64 : attention_fwd_d128)(out.data(), lse.data(), q.data(), k.data(), v.data(), s.tq, s.tk, s.cap, s.heads, s.kv); });
    } else {
        emu_launch({(unsigned)((s.tq * s.heads + 3) / 4), (unsigned)s.batch}, {128}, [&] { attention_fwd_generic(out.data(), lse.data(), q.data(), k.data(), v.data(), s.tq, s.tk, s.cap, s.heads, s.kv, D); });
    }
    check("out", f32(out), ro, 1.5e-2);
    check("lse", lse, rl, 1e-4);

    auto of = f32(out);
    std::vector<double> rdq, rdk, rdv; ref_bwd(rdq, rdk, rdv, df, of, lse, qf, kf, vf, s);
    const int tqp = (s.tq + 63) / 64 * 64, group = s.heads / s.kv;
    const int64_t rows = (int64_t)s.batch * s.heads * tqp, nq = q.size(), nkv = k.size();
    std::vector<float> delta(rows, NAN), lse2(rows, NAN), dkvacc(2 * nkv, NAN);
    float *dkvp = fast && group > 1 ? dkvacc.data() : nullptr;  // GQA: dk, dv through fp32 atomics
    emu_launch({(unsigned)((rows + 3) / 4)}, {128}, [&] { attention_bwd_preprocess(delta.data(), fast ? lse2.data() : nullptr, fast ? dqacc.data() : nullptr, dkvp, dout.data(), out.data(), lse.data(), s.batch, s.tq, s.heads, D, dkvp ? 2 * nkv : 0); });
    if (fast) {
        const int nkeys = dkvp ? s.tk : s.cap;
        emu_launch({(unsigned)(s.batch * s.heads), (unsigned)((nkeys + 127) / 128)}, {256}, [&] {
            (D == 64 ? attention_bwd_d64 : attention_bwd_d128)(dqacc.data(), dkvp, dk.data(), dv.data(), dout.data(), lse2.data(), delta.data(), q.data(), k.data(), v.data(), s.tq, s.tk, s.cap, s.heads, s.kv); });
        const int64_t n = nq + (dkvp ? 2 * nkv : 0);
        emu_launch({(unsigned)((n + 1023) / 1024)}, {256}, [&] { attention_bwd_convert(dq.data(), dk.data(), dv.data(), dqacc.data(), dkvp, nq, nkv); });
    } else {
        emu_launch({(unsigned)((s.tq * s.heads + 3) / 4), (unsigned)s.batch}, {128}, [&] { attention_bwd_dq_generic(dq.data(), dout.data(), lse.data(), delta.data(), q.data(), k.data(), v.data(), s.tq, s.tk, s.cap, s.heads, s.kv, D); });
        emu_launch({(unsigned)((s.cap * s.kv + 3) / 4), (unsigned)s.batch}, {128}, [&] { attention_bwd_dkdv_generic(dk.data(), dv.data(), dout.data(), lse.data(), delta.data(), q.data(), k.data(), v.data(), s.tq, s.tk, s.cap, s.heads, s.kv, D); });
    }
    check("dq", f32(dq), rdq, 2e-2);
    check("dk", f32(dk), rdk, 2e-2);
    check("dv", f32(dv), rdv, 2e-2);
}

// The emulator's wgmma layouts against a second reading of them: CUTLASS's CuTe layouts for
// sm_90 GMMA (include/cute/atom/mma_traits_sm90_gmma.hpp: CLayout_64xN, ALayout_64x16 and the
// canonical shared-memory forms that make_gmma_desc accepts), evaluated here as CuTe defines a
// layout: a coordinate splits over the shape, first mode fastest, and the offset is the sum of
// the parts times the strides. A misreading of the PTX tables shared by the kernels and the
// emulator would show up as a disagreement here.
struct Flat {
    std::vector<int> shape, stride;
    int operator()(int i) const {
        int off = 0;
        for (size_t m = 0; m < shape.size(); m++) {
            off += (i % shape[m]) * stride[m];
            i /= shape[m];
        }
        return off;
    }
};

static void test_wgmma_layouts() {
    using namespace attn90;
    int bad = 0;
    // Accumulators of m64nNk16, N = 128: (thread, value) -> m + 64 n.
    const Flat thr = {{4, 8, 4}, {128, 1, 16}}, cval = {{2, 2, 16}, {64, 8, 512}};
    for (int t = 0; t < 128; t++)
        for (int v = 0; v < 64; v++) {
            const int idx = thr(t) + cval(v);
            int row, col;
            acc_coord(t / 32, t % 32, v / 4, v % 4, row, col);
            bad += row != idx % 64 || col != idx / 64;
        }
    // Register A of m64nNk16 for 16-bit types: (thread, value) -> m + 64 k; value v is half v % 2
    // of register v / 2.
    const Flat aval = {{2, 2, 2}, {64, 8, 512}};
    for (int t = 0; t < 128; t++)
        for (int v = 0; v < 8; v++) {
            const int idx = thr(t) + aval(v);
            int thread, reg, half;
            areg_slot(idx % 64, idx / 64, thread, reg, half);
            bad += thread != t || reg != v / 2 || half != v % 2;
        }
    // Shared operands with the 128-byte swizzle, in bf16 elements (T = 8 per 16 bytes), with
    // unusual strides so that a swap of the leading and stride offsets shows. K-major:
    // ((8, m), (T, 2)) : ((8T, SBO), (1, T)), (row, k) of a 64 x 16 operand.
    const int sbo = 2048, lbo = 8192;
    const MatDesc d = {0, (uint32_t)lbo, (uint32_t)sbo};
    const Flat krow = {{8, 8}, {64, sbo / 2}}, kcol = {{8, 2}, {1, 8}};
    for (int r = 0; r < 64; r++)
        for (int k = 0; k < 16; k++) bad += kmajor_off(d, r, k) != (uint32_t)(2 * (krow(r) + kcol(k)));
    // MN-major: ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)), (k, n) of a 16 x 128 operand.
    const Flat mn = {{8, 8, 2}, {1, 8, lbo / 2}}, kk = {{8, 2}, {64, sbo / 2}};
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 128; n++) bad += nmajor_off(d, k, n) != (uint32_t)(2 * (mn(n) + kk(k)));
    // Swizzle<3,4,3> on byte addresses: bits 4-6 ^= bits 7-9.
    for (uint32_t a = 0; a < 8192; a += 2) bad += swizzle128(a) != (a ^ ((a & (7u << 7)) >> 3));
    if (bad) fails++;
    printf("wgmma layouts against CuTe's: %s (%d mismatches)\n", bad ? "FAIL" : "ok", bad);
}

// The wgmma kernels round their dynamic shared memory up to the swizzle's 1 KB period
// themselves: each launch places it at the next of these window offsets (16 is the worst case,
// 1008 bytes of padding) and holds it to the bytes its launcher in
// src/backend/cuda_attention.rs gives (probe 2·32768 + 128·128 + 1024, forward 5·32768 + 1024,
// backward 149504).
static void launch_wgmma(uint32_t bytes, dim3e grid, std::function<void()> fn) {
    static const uint32_t offsets[] = {16, 0, 528, 1008};
    static int next = 0;
    g_dyn_off = offsets[next++ % 4];
    g_dyn_bytes = bytes;
    emu_launch(grid, {256}, fn);
    g_dyn_off = g_dyn_bytes = 0;
}

// wgmma_probe: each wgmma form of the two kernels alone, on small integers, so the product must
// be exact. The GPU runs the same probe (check-kernels), against the same plain products.
static void test_wgmma_probe() {
    struct Form { int m, k, n; bool at, bt; };  // D (m x n) = A B with A stored [k][m] if at, B [n][k] if bt
    const Form forms[5] = {{128, 128, 128, false, true}, {128, 128, 128, false, false}, {128, 128, 64, false, true},
                           {128, 64, 128, false, false}, {64, 128, 128, true, false}};
    for (int f = 0; f < 5; f++) {
        const Form F = forms[f];
        std::vector<bf16> a((size_t)F.m * F.k), b((size_t)F.k * F.n);
        for (auto &x : a) x = to_bf16((float)((int)(rng() % 7) - 3));
        for (auto &x : b) x = to_bf16((float)((int)(rng() % 7) - 3));
        std::vector<float> d((size_t)F.m * F.n, NAN);
        launch_wgmma(2 * 32768 + 128 * 128 + 1024, {1}, [&] { wgmma_probe(d.data(), a.data(), b.data(), f); });
        std::vector<double> want(d.size(), 0);
        for (int i = 0; i < F.m; i++) for (int j = 0; j < F.n; j++) for (int k = 0; k < F.k; k++)
            want[(size_t)i * F.n + j] += (double)ld(&a[F.at ? (size_t)k * F.m + i : (size_t)i * F.k + k]) * ld(&b[F.bt ? (size_t)j * F.k + k : (size_t)k * F.n + j]);
        char name[32];
        snprintf(name, sizeof name, "form %d", f);
        check(name, d, want, 0.0);
    }
}

// attention_fwd_d128_wgmma and attention_bwd_d128_wgmma against the same oracles; the backward
// runs between the fast path's preprocess and convert, from the wgmma forward's out and lse.
static void test_wgmma(Shape s) {
    printf("wgmma D=%d batch=%d tq=%d tk=%d cap=%d heads=%d kv=%d\n", s.D, s.batch, s.tq, s.tk, s.cap, s.heads, s.kv);
    auto q = rand_bf16((size_t)s.batch * s.tq * s.heads * s.D, 2.0f), k = make_kv(s, 2.0f), v = make_kv(s, 1.0f);
    auto dout = rand_bf16(q.size(), 1.0f);
    std::vector<bf16> out(q.size(), BNAN), dq(q.size(), BNAN), dk(k.size(), BNAN), dv(v.size(), BNAN);
    std::vector<float> lse((size_t)s.batch * s.tq * s.heads, NAN), dqacc(q.size(), NAN);
    auto qf = f32(q), kf = zero_garbage(f32(k), s), vf = zero_garbage(f32(v), s), df = f32(dout);
    std::vector<double> ro, rl;
    ref_fwd(ro, rl, qf, kf, vf, s);
    dim3e grid = {(unsigned)(s.batch * s.heads), (unsigned)((s.tq + 127) / 128)};
    launch_wgmma(5 * 32768 + 1024, grid, [&] { attention_fwd_d128_wgmma(out.data(), lse.data(), q.data(), k.data(), v.data(), s.tq, s.tk, s.cap, s.heads, s.kv); });
    check("out", f32(out), ro, 1.5e-2);
    check("lse", lse, rl, 1e-4);
    if (s.tq != s.tk) return;  // training backward only runs over full sequences

    auto of = f32(out);
    std::vector<double> rdq, rdk, rdv;
    ref_bwd(rdq, rdk, rdv, df, of, lse, qf, kf, vf, s);
    const int tqp = (s.tq + 63) / 64 * 64, group = s.heads / s.kv;
    const int64_t rows = (int64_t)s.batch * s.heads * tqp, nq = q.size(), nkv = k.size();
    std::vector<float> delta(rows, NAN), lse2(rows, NAN), dkvacc(2 * nkv, NAN);
    float *dkvp = group > 1 ? dkvacc.data() : nullptr;
    emu_launch({(unsigned)((rows + 3) / 4)}, {128}, [&] { attention_bwd_preprocess(delta.data(), lse2.data(), dqacc.data(), dkvp, dout.data(), out.data(), lse.data(), s.batch, s.tq, s.heads, s.D, dkvp ? 2 * nkv : 0); });
    const int nkeys = dkvp ? s.tk : s.cap;
    launch_wgmma(149504, {(unsigned)(s.batch * s.heads), (unsigned)((nkeys + 127) / 128)}, [&] {
        attention_bwd_d128_wgmma(dqacc.data(), dkvp, dk.data(), dv.data(), dout.data(), lse2.data(), delta.data(), q.data(), k.data(), v.data(), s.tq, s.tk, s.cap, s.heads, s.kv); });
    const int64_t n = nq + (dkvp ? 2 * nkv : 0);
    emu_launch({(unsigned)((n + 1023) / 1024)}, {256}, [&] { attention_bwd_convert(dq.data(), dk.data(), dv.data(), dqacc.data(), dkvp, nq, nkv); });
    check("dq", f32(dq), rdq, 2e-2);
    check("dk", f32(dk), rdk, 2e-2);
    check("dv", f32(dv), rdv, 2e-2);
}

static void test_decode(int batch, std::vector<int> lens, int cap, int heads, int kv, int D, int chunk) {
    int splits = 0; for (int l : lens) splits = std::max(splits, (l + chunk - 1) / chunk);
    printf("decode D=%d heads=%d kv=%d cap=%d chunk=%d splits=%d lens", D, heads, kv, cap, chunk, splits); for (int l : lens) printf(" %d", l); printf("\n");
    auto q = rand_bf16((size_t)batch * heads * D, 2.0f), k = rand_bf16((size_t)batch * cap * kv * D, 2.0f), v = rand_bf16(k.size(), 1.0f);
    for (int b = 0; b < batch; b++) for (int j = lens[b]; j < cap; j++) for (int x = 0; x < kv * D; x++) { k[((size_t)b * cap + j) * kv * D + x] = BNAN; v[((size_t)b * cap + j) * kv * D + x] = BNAN; }
    std::vector<bf16> out(q.size(), BNAN); std::vector<float> lse((size_t)batch * heads, NAN);
    std::vector<float> po((size_t)splits * batch * heads * D, NAN), pml((size_t)splits * batch * heads * 2, NAN);
    int group = heads / kv, hch = (group + 7) / 8;
    auto kern = D <= 64 ? attention_decode_d64 : D <= 128 ? attention_decode_d128 : attention_decode_d256;
    emu_launch({(unsigned)splits, (unsigned)(kv * hch), (unsigned)batch}, {128}, [&] { kern(out.data(), lse.data(), po.data(), pml.data(), q.data(), k.data(), v.data(), lens.data(), cap, heads, kv, D, chunk); });
    if (splits > 1) emu_launch({(unsigned)heads, (unsigned)batch}, {128}, [&] { attention_decode_combine(out.data(), lse.data(), po.data(), pml.data(), splits, heads, D); });
    std::vector<double> ro, rl;
    for (int b = 0; b < batch; b++) {
        Shape s = {1, 1, lens[b], cap, heads, kv, D};
        auto kb = f32(std::vector<bf16>(k.begin() + (size_t)b * cap * kv * D, k.begin() + (size_t)(b + 1) * cap * kv * D));
        auto vb = f32(std::vector<bf16>(v.begin() + (size_t)b * cap * kv * D, v.begin() + (size_t)(b + 1) * cap * kv * D));
        std::vector<float> qf((size_t)heads * D); for (size_t i = 0; i < qf.size(); i++) qf[i] = ld((bf16 *)&q[(size_t)b * heads * D + i]);
        std::vector<double> o1, l1; ref_fwd(o1, l1, qf, zero_garbage(kb, s), zero_garbage(vb, s), s);
        ro.insert(ro.end(), o1.begin(), o1.end()); rl.insert(rl.end(), l1.begin(), l1.end());
    }
    for (size_t i = 0; i < rl.size(); i++)  // an empty sequence: lse -inf on both sides
        if (std::isinf(rl[i]) && lse[i] == rl[i]) rl[i] = lse[i] = 0;
    check("out", f32(out), ro, 1.5e-2);
    check("lse", lse, rl, 1e-4);
}

// starts empty: every sequence at pos0; else sequence b at starts[b] (a ragged cache).
static void test_kv_write(int batch, int tq, int pos0, std::vector<uint32_t> starts) {
    int cap = 10, row = 24;
    auto cache = rand_bf16((size_t)batch * cap * row, 1.f), src = rand_bf16((size_t)batch * tq * row, 1.f);
    auto want = cache;
    for (int b = 0; b < batch; b++) {
        const size_t at = starts.empty() ? pos0 : starts[b];
        for (int i = 0; i < tq * row; i++) want[((size_t)b * cap + at) * row + i] = src[(size_t)b * tq * row + i];
    }
    int64_t n = (int64_t)batch * tq * row;
    const uint32_t *sp = starts.empty() ? nullptr : starts.data();
    emu_launch({(unsigned)((n + 255) / 256)}, {256}, [&] { kv_write(cache.data(), src.data(), batch, cap, pos0, sp, tq, row); });
    bool ok = memcmp(cache.data(), want.data(), cache.size() * 2) == 0;
    if (!ok) fails++;
    printf("kv_write batch %d tq %d %s %s\n", batch, tq, starts.empty() ? "one start" : "per-sequence starts",
           ok ? "ok" : "FAIL");
}

int main(int argc, char **argv) {
    test_kv_write(2, 4, 3, {});
    test_kv_write(3, 1, 0, {9, 0, 4});
    for (int D : {64, 128}) {
        test_attention({2, 70, 70, 75, 4, 2, D}, true);    // training shape, ragged tiles, GQA, cap > tk
        test_attention({1, 20, 100, 130, 3, 1, D}, true);  // chunked prefill
        test_attention({1, 1, 65, 65, 2, 1, D}, true);     // one query
        test_attention({1, 128, 128, 128, 2, 2, D}, true); // exact tiles
        test_attention({1, 200, 260, 300, 2, 1, D}, true); // several key tiles, GQA, chunked prefill
        test_attention({1, 160, 160, 300, 1, 1, D}, true); // several key tiles, no GQA, cap well past tk
    }
    test_wgmma_layouts();
    test_wgmma_probe();
    test_wgmma({2, 70, 70, 75, 4, 2, 128});     // one row tile, ragged, GQA, cap > tk
    test_wgmma({1, 20, 100, 130, 3, 1, 128});   // chunked prefill: every row past the first key tile
    test_wgmma({1, 256, 256, 256, 2, 2, 128});  // exact tiles, two row tiles, no GQA
    test_wgmma({1, 300, 390, 400, 2, 1, 128});  // several key tiles, prefill offset, ragged end
    test_wgmma({1, 5, 5, 8, 2, 1, 128});        // a second warpgroup with no live row
    test_wgmma({1, 200, 200, 260, 2, 1, 128});  // backward: no GQA, cap past tk, three key tiles
    test_wgmma({2, 130, 130, 130, 4, 2, 128});  // backward: GQA, a ragged query tile
    for (int D : {8, 24, 40})
        test_attention({2, 37, 50, 53, 6, 2, D}, false);
    for (int D : {64, 128, 24}) {
        test_decode(3, {1, 37, 150}, 160, 14, 2, D, 1024);
        test_decode(3, {1, 37, 150}, 160, 14, 2, D, 48);
    }
    test_decode(2, {70, 9}, 80, 10, 1, 64, 32);  // group 10: two head chunks
    test_decode(2, {5, 100}, 100, 3, 3, 128, 64);         // group 1 (MHA), a 5-key split
    test_decode(3, {1, 300, 129}, 300, 16, 2, 128, 128);  // group 8: one full head chunk
    test_decode(3, {1, 300, 129}, 300, 16, 2, 128, 1024);
    test_decode(1, {40}, 48, 16, 1, 64, 16);              // group 16: two full head chunks
    test_decode(2, {1500, 777}, 1600, 7, 1, 128, 512);    // Qwen2.5-7B group, long cache
    test_decode(2, {1500, 777}, 1600, 7, 1, 128, 2048);   // one split of many steps per warp
    test_decode(2, {33, 100}, 100, 4, 2, 256, 64);        // D 256
    test_decode(2, {33, 100}, 100, 6, 2, 200, 1024);      // D 200: d256 with padded chunks
    test_decode(2, {65, 17}, 70, 6, 3, 72, 32);           // D 72: d128 with padded chunks
    test_decode(3, {0, 50, 0}, 64, 14, 2, 128, 32);       // empty sequences: out 0, lse -inf
    printf("ldmatrix calls %ld, bank-conflicting phases %ld\n", g_ldsm, g_conflicts);
    printf(fails ? "%d FAILED\n" : "all ok\n", fails);
    return fails != 0;
}
