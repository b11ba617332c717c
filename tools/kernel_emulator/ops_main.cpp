// cuda/elementwise.cu, cuda/rmsnorm.cu and cuda/rope.cu on the host (see README.md): every
// extern "C" kernel, each dtype instance, on the packed and the scalar path, at the grid and block
// its launcher in src/backend/cuda.rs computes, against double-precision copies of the CPU oracles
// in src/backend/cpu.rs. Built from ops_emu.cpp, which gen_ops.py writes from the kernel files.
// EMU_DUMP=FILE writes every checked output to FILE, to compare two versions of a kernel bit for
// bit.
#define EMU_STACK_BYTES (64 * 1024)
#include "emu.h"
namespace sm80 {
#include "ops_emu.cpp"
}
// The same kernels compiled as device code for sm_90 (the H100): rms::add8 then adds dw with
// 16-byte vector atomics.
#define __CUDA_ARCH__ 900
namespace sm90 {
#include "ops_emu.cpp"
}
#undef __CUDA_ARCH__
#include <random>
#include <set>
#include <string>
#include <type_traits>

// The launchers' constants (src/backend/cuda.rs), which must match the kernels'.
constexpr int EW_BLOCK = 256, EW_U = 2, RMS_VPT_RS = 2, ROPE_HG_RS = 4;
static_assert(EW_U == sm80::ew::EW_U && RMS_VPT_RS == RMS_VPT && ROPE_HG_RS == ROPE_HG, "launcher constants");

static std::mt19937 rng(2024);
static float uni(float amp) { return std::uniform_real_distribution<float>(-amp, amp)(rng); }
static double val(bf16 v) { return ld(&v); }
static double val(float v) { return v; }
static double val(double v) { return v; }
template <class T> static T from(float f) {
    if constexpr (std::is_same_v<T, bf16>) return to_bf16(f);
    else return f;
}

// A device buffer: n values `skew` elements past a 16-byte boundary, between 256-byte guard zones.
// Everything starts as NaN (all bits set, for bf16, f32 and f64): an output the kernel should
// overwrite stays poisoned where it does not, a read past either end poisons what it feeds, and
// a write there shows in the guards.
template <class T> struct Buf {
    std::vector<uint4> mem;
    T *p;
    size_t n;
    explicit Buf(size_t n, int skew = 0) : mem((n + skew) * sizeof(T) / 16 + 33), n(n) {
        memset(mem.data(), 0xff, mem.size() * 16);
        p = reinterpret_cast<T *>(mem.data() + 16) + skew;
    }
    Buf &rand(float amp) {
        for (size_t i = 0; i < n; i++) p[i] = from<T>(uni(amp));
        return *this;
    }
    double operator[](size_t i) const { return val(p[i]); }
    std::vector<double> vals() const {
        std::vector<double> v(n);
        for (size_t i = 0; i < n; i++) v[i] = val(p[i]);
        return v;
    }
    bool guards_intact() const {
        const unsigned char *b = reinterpret_cast<const unsigned char *>(mem.data()), *e = b + mem.size() * 16;
        const unsigned char *lo = reinterpret_cast<const unsigned char *>(p), *hi = lo + n * sizeof(T);
        for (const unsigned char *c = b; c < e; c++)
            if ((c < lo || c >= hi) && *c != 0xff) return false;
        return true;
    }
};

// Tolerance of one value: a bf16 store rounds to 8 significant bits, at most 2^-8 of the value
// off; fp32 arithmetic adds a few 2^-24 of the terms it combined (`mag`), ARITH for a handful of
// operations, REDUCE where a sum runs in another order than the reference's.
constexpr double ARITH = 1e-6, REDUCE = 1e-5;
template <class T> static double tol(double want, double mag, double c) {
    return (std::is_same_v<T, bf16> ? 0x1p-8 : 0x1p-24) * std::fabs(want) + c * mag;
}

static int fails = 0;
static FILE *dump = getenv("EMU_DUMP") ? fopen(getenv("EMU_DUMP"), "wb") : nullptr;

// Every value within its tolerance (NaN never is) and nothing written outside the buffer.
template <class T>
static void check(const char *what, const Buf<T> &got, const std::vector<double> &want, const std::vector<double> &tl) {
    size_t bad = 0, worst = 0;
    double wr = 0;  // worst error / tolerance
    for (size_t i = 0; i < got.n; i++) {
        const double e = std::fabs(got[i] - want[i]), r = e == 0 ? 0 : e / tl[i];
        if (!(e <= tl[i])) bad++;
        if (!(r <= wr)) {
            wr = std::isnan(r) ? INFINITY : r;
            worst = i;
        }
    }
    const bool guards = got.guards_intact(), ok = bad == 0 && guards;
    if (!ok) fails++;
    printf("  %-22s %s  worst err/tol %.3g at %zu, %zu bad%s\n", what, ok ? "ok  " : "FAIL", wr, worst, bad,
           guards ? "" : ", wrote outside the buffer");
    if (dump) fwrite(got.p, sizeof(T), got.n, dump);
}

// Every launch goes through here, so that main can tell a kernel no test ran.
static std::set<std::string> launched;
template <class F> static void run(const char *kernel, dim3e grid, dim3e block, F fn) {
    launched.insert(kernel);
    emu_launch(grid, block, fn);
}

// Launch geometry, as src/backend/cuda.rs computes it. `resident` stands for sm_count × the
// kernel's blocks per SM and `sms` for sm_count: small, so that grid-stride loops go round.
static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static unsigned ew_vec_grid(int64_t n, int64_t resident) {  // launch_ew_vec
    return std::clamp<int64_t>(cdiv(n, 8 * EW_U * EW_BLOCK), 1, resident);
}
static unsigned ew_grid(int64_t n, int64_t sms) { return std::min<int64_t>(cdiv(n, EW_BLOCK), 8 * sms); }  // launch_ew
static unsigned row_block(int dim) {
    if (dim % 8 || dim / 8 > RMS_VPT_RS * 1024) return 256;
    return std::clamp<int64_t>(cdiv(cdiv(dim / 8, RMS_VPT_RS), 32) * 32, 32, 1024);
}
static unsigned embedding_block(int dim) { return std::clamp<int64_t>(cdiv(cdiv(dim / 8, EW_U), 32) * 32, 32, 1024); }

// ---- elementwise.cu ----

enum class Upd { add, axpy, convert };
// y = y + x, y + a·x or x (Backend::add, axpy, copy) over n values; the skews misalign y or x.
template <class Y, class X, class K>
static void test_update(const char *name, Upd op, K kernel, int64_t n, int yskew, int xskew, int64_t resident) {
    Buf<Y> y(n, yskew);
    Buf<X> x(n, xskew);
    x.rand(2.0f);
    if (op != Upd::convert) y.rand(2.0f);
    const float a = -0.75f;
    const auto y0 = y.vals(), xv = x.vals();
    const unsigned grid = ew_vec_grid(n, resident);
    printf("%s n=%lld skew y %d x %d grid %u\n", name, (long long)n, yskew, xskew, grid);
    run(name, {grid}, {EW_BLOCK}, [&] {
        if constexpr (std::is_invocable_v<K, Y *, float, const X *, int64_t>) kernel(y.p, a, x.p, n);
        else kernel(y.p, x.p, n);
    });
    std::vector<double> want(n), tl(n);
    for (int64_t i = 0; i < n; i++) {
        const double t = op == Upd::axpy ? a * xv[i] : xv[i], y1 = op == Upd::convert ? 0 : y0[i];
        want[i] = y1 + t;
        tl[i] = tol<Y>(want[i], std::fabs(y1) + std::fabs(t), op == Upd::convert ? 0 : ARITH);
    }
    check("y", y, want, tl);
}

static void test_updates(int64_t n, int yskew, int xskew, int64_t resident) {
    using namespace sm80;
    test_update<bf16, bf16>("add_bf16_bf16", Upd::add, add_bf16_bf16, n, yskew, xskew, resident);
    test_update<float, float>("add_f32_f32", Upd::add, add_f32_f32, n, yskew, xskew, resident);
    test_update<float, bf16>("add_f32_bf16", Upd::add, add_f32_bf16, n, yskew, xskew, resident);
    test_update<bf16, bf16>("axpy_bf16_bf16", Upd::axpy, axpy_bf16_bf16, n, yskew, xskew, resident);
    test_update<bf16, float>("axpy_bf16_f32", Upd::axpy, axpy_bf16_f32, n, yskew, xskew, resident);
    test_update<float, float>("axpy_f32_f32", Upd::axpy, axpy_f32_f32, n, yskew, xskew, resident);
    test_update<float, bf16>("axpy_f32_bf16", Upd::axpy, axpy_f32_bf16, n, yskew, xskew, resident);
    test_update<bf16, float>("convert_bf16_f32", Upd::convert, convert_bf16_f32, n, yskew, xskew, resident);
    test_update<float, bf16>("convert_f32_bf16", Upd::convert, convert_f32_bf16, n, yskew, xskew, resident);
}

// cpu::swiglu and cpu::swiglu_bwd; `skew` misaligns up.
static void test_swiglu(int64_t n, int skew, int64_t resident) {
    Buf<bf16> gate(n), up(n, skew), dout(n), out(n), dgate(n), dup(n);
    gate.rand(3.0f), up.rand(1.0f), dout.rand(1.0f);
    const unsigned grid = ew_vec_grid(n, resident);
    printf("swiglu n=%lld skew %d grid %u\n", (long long)n, skew, grid);
    run("swiglu_fwd", {grid}, {EW_BLOCK}, [&] { sm80::swiglu_fwd(out.p, gate.p, up.p, n); });
    run("swiglu_bwd", {grid}, {EW_BLOCK}, [&] { sm80::swiglu_bwd(dgate.p, dup.p, dout.p, gate.p, up.p, n); });
    std::vector<double> wo(n), to(n), wg(n), tg(n), wu(n), tu(n);
    for (int64_t i = 0; i < n; i++) {
        const double g = gate[i], u = up[i], d = dout[i], s = 1 / (1 + std::exp(-g));
        wo[i] = g * s * u;
        to[i] = tol<bf16>(wo[i], std::fabs(wo[i]), ARITH);
        wu[i] = d * g * s;
        tu[i] = tol<bf16>(wu[i], std::fabs(wu[i]), ARITH);
        wg[i] = d * u * s * (1 + g * (1 - s));
        tg[i] = tol<bf16>(wg[i], std::fabs(d * u * s) * (1 + std::fabs(g)), ARITH);
    }
    check("swiglu_fwd out", out, wo, to);
    check("swiglu_bwd dgate", dgate, wg, tg);
    check("swiglu_bwd dup", dup, wu, tu);
}

// Matmul's bias: out[r, j] = bias[j] (a copy), and dbias[j] += Σ_r dout[r, j] (cpu::matmul_bwd).
static void test_bias(int rows, int n, int64_t sms) {
    Buf<bf16> out((size_t)rows * n), bias(n), dout((size_t)rows * n);
    Buf<float> db(n);
    bias.rand(1.0f), dout.rand(1.0f), db.rand(1.0f);
    const auto d0 = db.vals();
    const unsigned grid = ew_grid((int64_t)rows * n, sms);
    printf("bias rows=%d n=%d grid %u, bwd grid %lld x (32, 8)\n", rows, n, grid, (long long)cdiv(n, 32));
    run("bias_broadcast", {grid}, {EW_BLOCK}, [&] { sm80::bias_broadcast(out.p, bias.p, rows, n); });
    run("bias_bwd", {(unsigned)cdiv(n, 32)}, {32, 8}, [&] { sm80::bias_bwd(db.p, dout.p, rows, n); });
    std::vector<double> wo(out.n), to(out.n, 0), wd(d0), td(n);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < n; j++) wo[(size_t)r * n + j] = bias[j];
    for (int j = 0; j < n; j++) {
        double mag = std::fabs(d0[j]);
        for (int r = 0; r < rows; r++) wd[j] += dout[(size_t)r * n + j], mag += std::fabs(dout[(size_t)r * n + j]);
        td[j] = tol<float>(wd[j], mag, REDUCE);
    }
    check("bias_broadcast out", out, wo, to);
    check("bias_bwd dbias (+=)", db, wd, td);
}

// cpu::embedding and cpu::embedding_bwd, with repeated ids; `skew` misaligns out.
static void test_embedding(int rows, int dim, int skew, int64_t resident = 3) {
    const int vocab = 12;
    std::vector<uint32_t> ids(rows);
    for (int i = 0; i < rows; i++) ids[i] = (i * 7) % 11;
    Buf<bf16> table((size_t)vocab * dim), out((size_t)rows * dim, skew), dout((size_t)rows * dim);
    Buf<float> dt((size_t)vocab * dim);
    table.rand(1.0f), dout.rand(1.0f), dt.rand(1.0f);
    const auto d0 = dt.vals();
    const unsigned block = embedding_block(dim);
    const unsigned grid = std::min<int64_t>(rows, resident);
    printf("embedding rows=%d dim=%d skew %d block %u grid %u\n", rows, dim, skew, block, grid);
    run("embedding_fwd", {grid}, {block}, [&] { sm80::embedding_fwd(out.p, table.p, ids.data(), rows, dim); });
    run("embedding_bwd", {(unsigned)rows}, {256}, [&] { sm80::embedding_bwd(dt.p, dout.p, ids.data(), dim); });
    std::vector<double> wo(out.n), to(out.n, 0), wd(d0), mag(d0.size()), td(d0.size());
    for (size_t i = 0; i < d0.size(); i++) mag[i] = std::fabs(d0[i]);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < dim; j++) {
            const size_t o = (size_t)r * dim + j, t = (size_t)ids[r] * dim + j;
            wo[o] = table[t];
            wd[t] += dout[o];
            mag[t] += std::fabs(dout[o]);
        }
    for (size_t i = 0; i < wd.size(); i++) td[i] = tol<float>(wd[i], mag[i], REDUCE);
    check("embedding_fwd out", out, wo, to);
    check("embedding_bwd (+=)", dt, wd, td);
}

// Backend::sum_squares: *acc += Σ x² (from a nonzero start, so an overwrite shows).
template <class X, class K> static void test_sum_squares(const char *name, K kernel, int64_t n, int64_t sms) {
    Buf<X> x(n);
    x.rand(1.0f);
    Buf<double> acc(1);
    acc.p[0] = 0.375;
    const unsigned grid = ew_grid(n, sms);
    printf("%s n=%lld grid %u\n", name, (long long)n, grid);
    run(name, {grid}, {EW_BLOCK}, [&] { kernel(acc.p, x.p, n); });
    double want = 0.375;
    for (int64_t i = 0; i < n; i++) want += x[i] * x[i];
    check("acc (+=)", acc, {want}, {REDUCE * want});
}

// cpu::adamw, with the launcher's f32 step constants.
template <class P, class K> static void test_adamw(const char *name, K kernel, int64_t n, int64_t sms) {
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f, gscale = 0.5f;
    const int step = 3;
    const double bc1 = 1 - std::pow((double)b1, step), bc2 = 1 - std::pow((double)b2, step);
    const float decay = 1.0f - lr * wd, step_size = (float)(lr / bc1), bc2_sqrt = (float)std::sqrt(bc2);
    Buf<P> p(n);
    Buf<float> g(n), m(n), v(n);
    p.rand(1.0f), g.rand(1.0f), m.rand(0.1f), v.rand(0.1f);
    for (int64_t i = 0; i < n; i++) v.p[i] *= v.p[i];
    const auto p0 = p.vals(), g0 = g.vals(), m0 = m.vals(), v0 = v.vals();
    const unsigned grid = ew_grid(n, sms);
    printf("%s n=%lld grid %u\n", name, (long long)n, grid);
    run(name, {grid}, {EW_BLOCK}, [&] { kernel(p.p, g.p, m.p, v.p, n, decay, b1, b2, eps, step_size, bc2_sqrt, gscale); });
    std::vector<double> wp(n), tp(n), wm(n), tm(n), wv(n), tv(n);
    for (int64_t i = 0; i < n; i++) {
        const double gi = g0[i] * gscale, c1 = 1 - (double)b1, c2 = 1 - (double)b2;
        wm[i] = b1 * m0[i] + c1 * gi;
        tm[i] = tol<float>(wm[i], std::fabs(b1 * m0[i]) + std::fabs(c1 * gi), ARITH);
        wv[i] = b2 * v0[i] + c2 * gi * gi;
        tv[i] = tol<float>(wv[i], std::fabs(wv[i]), ARITH);
        const double upd = step_size * wm[i] / (std::sqrt(wv[i]) / bc2_sqrt + eps);
        wp[i] = p0[i] * decay - upd;
        tp[i] = tol<P>(wp[i], std::fabs(p0[i] * decay) + std::fabs(upd), ARITH);
    }
    check("p", p, wp, tp);
    check("m", m, wm, tm);
    check("v", v, wv, tv);
}

// ---- rmsnorm.cu ----

// cpu::rmsnorm; `skew` misaligns x.
static void test_rmsnorm_fwd(int rows, int dim, int skew) {
    const float eps = 1e-6f;
    Buf<bf16> x((size_t)rows * dim, skew), w(dim), out((size_t)rows * dim);
    Buf<float> rstd(rows);
    x.rand(2.0f), w.rand(1.0f);
    const unsigned block = row_block(dim);
    printf("rmsnorm_fwd rows=%d dim=%d skew %d block %u\n", rows, dim, skew, block);
    run("rmsnorm_fwd", {(unsigned)rows}, {block}, [&] { sm80::rmsnorm_fwd(out.p, rstd.p, x.p, w.p, dim, eps); });
    std::vector<double> wo(out.n), to(out.n), wr(rows), tr(rows);
    for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int j = 0; j < dim; j++) ss += x[(size_t)r * dim + j] * x[(size_t)r * dim + j];
        wr[r] = 1 / std::sqrt(ss / dim + eps);
        tr[r] = tol<float>(wr[r], wr[r], REDUCE);
        for (int j = 0; j < dim; j++) {
            const size_t i = (size_t)r * dim + j;
            wo[i] = x[i] * wr[r] * w[j];
            to[i] = tol<bf16>(wo[i], std::fabs(wo[i]), REDUCE);
        }
    }
    check("out", out, wo, to);
    check("rstd", rstd, wr, tr);
}

// cpu::rmsnorm_bwd from random dx and dw (both accumulate), with `resident` blocks: a block walks
// ⌈rows / resident⌉ rows. dx_skew / dw_skew misalign dx (the scalar path) or dw (add8's
// fallback). `bwd` is the sm_80 or the sm_90 build of the kernel.
template <class K> static void test_rmsnorm_bwd(const char *arch, K bwd, int rows, int dim, int64_t resident, int dx_skew, int dw_skew) {
    Buf<bf16> dx((size_t)rows * dim, dx_skew), dout((size_t)rows * dim), x((size_t)rows * dim), w(dim);
    Buf<float> dw(dim, dw_skew), rstd(rows);
    dx.rand(1.0f), dout.rand(1.0f), x.rand(2.0f), w.rand(1.0f), dw.rand(1.0f);
    for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int j = 0; j < dim; j++) ss += x[(size_t)r * dim + j] * x[(size_t)r * dim + j];
        rstd.p[r] = (float)(1 / std::sqrt(ss / dim + 1e-6));
    }
    const auto dx0 = dx.vals(), dw0 = dw.vals();
    const unsigned block = row_block(dim), grid = cdiv(rows, cdiv(rows, std::max<int64_t>(resident, 1)));
    printf("rmsnorm_bwd %s rows=%d dim=%d skew dx %d dw %d grid %u block %u\n", arch, rows, dim, dx_skew, dw_skew, grid, block);
    run("rmsnorm_bwd", {grid}, {block}, [&] { bwd(dx.p, dw.p, dout.p, x.p, w.p, rstd.p, rows, dim); });
    std::vector<double> wx(dx0), tx(dx.n), wd(dw0), md(dim), td(dim);
    for (int j = 0; j < dim; j++) md[j] = std::fabs(dw0[j]);
    for (int r = 0; r < rows; r++) {
        const double rs = rstd.p[r];
        const size_t o = (size_t)r * dim;
        double dot = 0, adot = 0;
        for (int j = 0; j < dim; j++) {
            const double t = dout[o + j] * w[j] * x[o + j] * rs;
            dot += t, adot += std::fabs(t);
        }
        const double mean = dot / dim;
        for (int j = 0; j < dim; j++) {
            const double xhat = x[o + j] * rs, g = dout[o + j] * w[j];
            wx[o + j] += rs * (g - xhat * mean);
            const double mag = std::fabs(dx0[o + j]) + std::fabs(rs * g) + std::fabs(rs * xhat) * (std::fabs(mean) + adot / dim);
            tx[o + j] = tol<bf16>(wx[o + j], mag, REDUCE);
            wd[j] += dout[o + j] * xhat;
            md[j] += std::fabs(dout[o + j] * xhat);
        }
    }
    for (int j = 0; j < dim; j++) td[j] = tol<float>(wd[j], md[j], REDUCE);
    check("dx (+=)", dx, wx, tx);
    check("dw (+=)", dw, wd, td);
}

static void test_rmsnorm_bwds(int rows, int dim, int64_t resident, int dx_skew, int dw_skew) {
    test_rmsnorm_bwd("sm_80", sm80::rmsnorm_bwd, rows, dim, resident, dx_skew, dw_skew);
    test_rmsnorm_bwd("sm_90", sm90::rmsnorm_bwd, rows, dim, resident, dx_skew, dw_skew);
}

// ---- rope.cu ----

// cpu::rope, both directions: the angle in f32 as the oracle computes it (rope_inv_freq), its
// sine and cosine and the rotation in double. `skew` misaligns x. With `starts`, sequence b
// starts at starts[b] instead of pos0 (a decode step over a ragged cache).
static void test_rope(int batch, int seq, int heads, int hd, int pos0, int skew, int64_t resident = 2,
                      std::vector<uint32_t> starts = {}) {
    const float theta = 1e6f;
    const int64_t rows = (int64_t)batch * seq, n = rows * heads * hd;
    const int half = hd / 2;
    for (int inverse : {0, 1}) {
        Buf<bf16> x(n, skew);
        x.rand(1.0f);
        const auto x0 = x.vals();
        const bool packed = half % 8 == 0 && reinterpret_cast<uintptr_t>(x.p) % 16 == 0;
        const unsigned grid = packed ? std::clamp<int64_t>(cdiv(rows * cdiv(heads, ROPE_HG_RS) * (hd / 16), 256), 1, resident)
                                     : cdiv(rows * heads * half, 256);
        printf("rope batch=%d seq=%d heads=%d head_dim=%d pos0=%d%s skew %d inverse %d grid %u\n", batch, seq, heads,
               hd, pos0, starts.empty() ? "" : " (per-sequence starts)", skew, inverse, grid);
        const uint32_t *sp = starts.empty() ? nullptr : starts.data();
        run("rope", {grid}, {256}, [&] { sm80::rope(x.p, rows, seq, heads, hd, pos0, sp, theta, inverse); });
        std::vector<double> want(n), tl(n);
        for (int64_t r = 0; r < rows; r++)
            for (int i = 0; i < half; i++) {
                const float inv = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
                const int64_t at = starts.empty() ? pos0 : starts[r / seq];
                const float angle = (float)(at + r % seq) * inv;
                const double s = (inverse ? -1 : 1) * std::sin((double)angle), c = std::cos((double)angle);
                for (int h = 0; h < heads; h++) {
                    const int64_t b = (r * heads + h) * hd + i;
                    const double x1 = x0[b], x2 = x0[b + half];
                    want[b] = x1 * c - x2 * s;
                    want[b + half] = x2 * c + x1 * s;
                    tl[b] = tol<bf16>(want[b], std::fabs(x1) + std::fabs(x2), ARITH);
                    tl[b + half] = tol<bf16>(want[b + half], std::fabs(x1) + std::fabs(x2), ARITH);
                }
            }
        check("x (in place)", x, want, tl);
    }
}

int main() {
    using namespace sm80;
    setvbuf(stdout, nullptr, _IOLBF, 0);  // what ran before a crash still shows
    test_updates(13005, 0, 0, 3);  // packed: 3 blocks stride over 1625 packs, a 5-value tail
    test_updates(3001, 0, 1, 2);   // x misaligned: the scalar loop
    test_update<bf16, float>("convert_bf16_f32", Upd::convert, convert_bf16_f32, 1000, 3, 0, 2);  // copy_range's offsets
    test_update<float, bf16>("convert_f32_bf16", Upd::convert, convert_f32_bf16, 1000, 1, 0, 2);
    test_swiglu(13005, 0, 3);
    test_swiglu(1001, 1, 2);
    test_bias(37, 100, 1);
    test_embedding(14, 520, 0);   // 65 packs: 64 threads, the second pack of thread 0 only; 3 blocks walk 14 rows
    test_embedding(14, 4800, 0);  // 600 packs over 320 threads, the second pack of the last 20 idle
    test_embedding(2, 3584, 0);   // fewer rows than blocks
    test_embedding(17, 3584, 0, 4);  // Qwen2.5-7B's rows: 224 threads, 4 blocks, a ragged last round
    test_embedding(5, 40000, 0, 2);  // past 16384 values a row: the scalar loop
    test_embedding(14, 77, 0);    // dim % 8: scalar
    test_embedding(14, 520, 1);   // out misaligned: scalar
    test_sum_squares<float>("sum_squares_f32", sum_squares_f32, 5000, 1);
    test_sum_squares<bf16>("sum_squares_bf16", sum_squares_bf16, 5000, 1);
    test_adamw<bf16>("adamw_bf16", adamw_bf16, 3001, 1);
    test_adamw<float>("adamw_f32", adamw_f32, 3001, 1);

    test_rmsnorm_fwd(5, 560, 0);    // 70 packs: 64 threads, a few hold two
    test_rmsnorm_fwd(3, 3584, 0);   // Qwen2.5-7B hidden: 224 threads of two packs
    test_rmsnorm_fwd(4, 100, 0);    // dim % 8: scalar
    test_rmsnorm_fwd(3, 560, 1);    // x misaligned: scalar
    test_rmsnorm_fwd(2, 16448, 0);  // more packs than 256 threads hold: scalar
    test_rmsnorm_bwds(11, 560, 3, 0, 0);  // 3 blocks of 4, 4 and 3 rows
    test_rmsnorm_bwds(7, 3584, 2, 0, 0);
    test_rmsnorm_bwds(5, 560, 8, 0, 0);   // a row per block
    test_rmsnorm_bwds(6, 560, 2, 0, 1);   // dw misaligned: add8's scalar atomics
    test_rmsnorm_bwds(6, 100, 4, 0, 0);   // dim % 8: scalar
    test_rmsnorm_bwds(4, 560, 2, 1, 0);   // dx misaligned: scalar
    test_rmsnorm_bwds(3, 16448, 2, 0, 0); // more packs than 256 threads hold: scalar

    test_rope(2, 5, 6, 128, 3, 0);     // a group of 4 heads and one of 2
    test_rope(2, 40, 7, 128, 5, 0);    // 1280 units on 2 resident blocks: 2.5 rounds, the last partial
    test_rope(3, 37, 28, 128, 9, 0, 3);  // Qwen2.5-7B's q heads: 7 groups, 3 blocks, a ragged last round
    test_rope(1, 7, 3, 64, 3000, 0);   // one group of 3, long positions
    test_rope(2, 5, 4, 128, 32760, 0); // Qwen2.5's 32K context: the reduction to [-pi, pi] matters
    test_rope(5, 1, 28, 128, 0, 0, 3, {0, 17, 4000, 3, 31000});  // a decode step over a ragged cache
    test_rope(3, 2, 3, 16, 0, 0, 2, {9, 0, 31});                  // packed, one group of 3 heads
    test_rope(3, 2, 3, 12, 0, 0, 2, {9, 0, 31});                  // the unpacked path: half 6
    test_rope(1, 3, 2, 520, 1000, 0);  // half 260: more frequencies than threads, scalar
    test_rope(2, 3, 4, 64, 0, 0);      // whole groups, position 0
    test_rope(2, 3, 5, 24, 3, 0);      // half 12: scalar
    test_rope(1, 4, 6, 64, 3, 1);      // x misaligned: scalar
    for (const char *k : sm80::ops_kernels)
        if (!launched.count(k)) {
            printf("%s: no test runs it FAIL\n", k);
            fails++;
        }
    printf(fails ? "%d FAILED\n" : "all ok\n", fails);
    if (dump) fclose(dump);
    return fails != 0;
}
