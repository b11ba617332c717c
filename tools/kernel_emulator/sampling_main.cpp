// cuda/sampling.cu's sample_tokens on the host (see README.md), against a sort-based oracle
// written here from the kernel's contract: the kept set is what sampling::truncated_distribution
// keeps (stable sort by logit, the first k, then tokens while the mass before them is under
// top_p · the mass top-k kept), over the kernel's fixed-point masses; the draw walks the kept
// tokens in index order to the first whose running mass exceeds floor(mass · u24 / 2^24).
// Greedy rows, finished rows and stop tokens as the kernel's header says. Every token must be
// the oracle's exactly. Built by tests/kernel_emulator.rs from sampling_emu.cpp, which
// tools/kernel_emulator/gen_ops.py writes from the kernel file.
#define EMU_STACK_BYTES (32 * 1024)
#include "emu.h"
#include "sampling_emu.cpp"
#include <random>
#include <array>

static std::mt19937 rng(20261123);
static int fails = 0;
typedef unsigned long long u64;

// The block src/backend/cuda_rl.rs's sample_block picks on sm_80 and sm_90 (512 elsewhere, which
// the 3001-token rows also run); the per-warp histograms live in emu.h's dynamic shared buffer.
static unsigned BLOCK = 1024;

struct RowSpec {
    float t;
    int k;
    float p;
};

static u64 mass_of(float x, float m, float inv_t) { return (u64)(expf((x - m) * inv_t) * 1099511627776.0f); }

static uint32_t oracle(const bf16 *row, int vocab, RowSpec s, uint32_t u24) {
    int arg = 0;
    float m = -INFINITY;
    for (int j = 0; j < vocab; j++)
        if (ld(row + j) > m) m = ld(row + j), arg = j;
    if (s.t <= 0.0f) return (uint32_t)arg;
    const float inv_t = 1.0f / s.t;
    std::vector<int> order(vocab);
    for (int j = 0; j < vocab; j++) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return ld(row + a) > ld(row + b); });
    size_t keep = vocab;
    if (s.k > 0 && s.k < vocab) keep = s.k;
    if (s.p < 1.0f) {
        u64 total = 0;
        for (size_t i = 0; i < keep; i++) total += mass_of(ld(row + order[i]), m, inv_t);
        const double cut = (double)s.p * (double)total;
        u64 before = 0;
        size_t n = 0;
        for (; n < keep; n++) {
            if (n > 0 && !((double)before < cut)) break;
            before += mass_of(ld(row + order[n]), m, inv_t);
        }
        keep = n;
    }
    std::vector<char> kept(vocab, 0);
    for (size_t i = 0; i < keep; i++) kept[order[i]] = 1;
    u64 total = 0;
    for (int j = 0; j < vocab; j++)
        if (kept[j]) total += mass_of(ld(row + j), m, inv_t);
    const u64 target = __umul64hi(total, (u64)u24 << 40);
    u64 acc = 0;
    for (int j = 0; j < vocab; j++)
        if (kept[j]) {
            acc += mass_of(ld(row + j), m, inv_t);
            if (acc > target) return (uint32_t)j;
        }
    return (uint32_t)arg;
}

enum Fill { UNIFORM, FEW_VALUES, PEAKED, MASKED, SIGNED_ZEROS };

static void fill_row(bf16 *row, int vocab, Fill f) {
    std::uniform_real_distribution<float> u(-8.0f, 8.0f);
    for (int j = 0; j < vocab; j++) {
        float x = u(rng);
        if (f == FEW_VALUES) x = std::round(x / 2.0f);  // 9 values: ties everywhere, top-k and top-p cut through them
        if (f == SIGNED_ZEROS) x = (j % 3 == 0) ? 0.0f : (j % 3 == 1) ? -0.0f : std::round(x) / 8.0f;
        if (f == MASKED && j % 4 != 0) x = -INFINITY;
        row[j] = to_bf16(x);
    }
    if (f == PEAKED) row[vocab / 3] = to_bf16(40.0f);
}

// A row's key (seed, sequence, step) as the kernel reads it: three little-endian u64.
static void put_key(std::vector<uint32_t> &keys, int r, u64 seed, u64 seq, u64 step) {
    const u64 k[3] = {seed, seq, step};
    for (int i = 0; i < 3; i++) {
        keys[6 * r + 2 * i] = (uint32_t)k[i];
        keys[6 * r + 2 * i + 1] = (uint32_t)(k[i] >> 32);
    }
}

// One launch over rows with their own settings; each row is drawn at `steps` rounds, every row
// with its own seed, sequence and step, as rows of different groups are in one decode step.
static void test_case(const char *name, int vocab, const std::vector<std::pair<Fill, RowSpec>> &rows, int steps) {
    const int n = (int)rows.size();
    std::vector<bf16> logits((size_t)n * vocab);
    std::vector<float> temp(n), top_p(n);
    std::vector<int> top_k(n);
    for (int r = 0; r < n; r++) {
        fill_row(logits.data() + (size_t)r * vocab, vocab, rows[r].first);
        temp[r] = rows[r].second.t;
        top_k[r] = rows[r].second.k;
        top_p[r] = rows[r].second.p;
    }
    int bad = 0, draws = 0;
    for (int round = 0; round < steps; round++) {
        std::vector<uint32_t> next(n, 0xdeadbeefu), keys(6 * n);
        std::vector<int> done(n, 0);
        auto key = [&](int r) {
            return std::array<u64, 3>{42 + (u64)(r % 3), 0x9e3779b97f4a7c15ull * (r + 1), (u64)(round * 7 + r % 5)};
        };
        for (int r = 0; r < n; r++) put_key(keys, r, key(r)[0], key(r)[1], key(r)[2]);
        emu_launch({(unsigned)n}, {BLOCK}, [&] {
            sample_tokens(next.data(), done.data(), logits.data(), vocab, temp.data(), top_k.data(), top_p.data(),
                          keys.data(), nullptr, 0, 0);
        });
        for (int r = 0; r < n; r++) {
            const auto k = key(r);
            const int step = round;
            const uint32_t want =
                oracle(logits.data() + (size_t)r * vocab, vocab, rows[r].second, sampling::uniform_bits24(k[0], k[1], k[2]));
            draws++;
            if (next[r] != want || done[r] != 0) {
                if (bad++ < 5)
                    printf("    row %d step %d: token %u, oracle %u (T %.2f k %d p %.3f)\n", r, step, next[r], want,
                           rows[r].second.t, rows[r].second.k, rows[r].second.p);
            }
        }
    }
    if (bad) fails++;
    printf("  %-44s vocab %6d: %4d draws  %s\n", name, vocab, draws, bad ? "FAIL" : "ok");
}

// Finished rows get pad_id and stay finished; a sampled stop token finishes its row.
static void test_stop_and_done() {
    const int vocab = 3001, n = 3;
    std::vector<bf16> logits((size_t)n * vocab);
    for (int r = 0; r < n; r++) fill_row(logits.data() + (size_t)r * vocab, vocab, PEAKED);
    std::vector<float> temp = {0.0f, 0.0f, 1.0f}, top_p = {1.0f, 1.0f, 0.5f};
    std::vector<int> top_k = {0, 0, 0}, done = {0, 1, 0};
    std::vector<uint32_t> keys(6 * n, 0), next(n, 0xdeadbeefu);
    std::vector<uint32_t> stops = {7, (uint32_t)(vocab / 3)};  // the peak: greedy and top-p 0.5 both take it
    emu_launch({(unsigned)n}, {BLOCK}, [&] {
        sample_tokens(next.data(), done.data(), logits.data(), vocab, temp.data(), top_k.data(), top_p.data(),
                      keys.data(), stops.data(), (int)stops.size(), 99);
    });
    const bool ok = next[0] == (uint32_t)(vocab / 3) && done[0] == 1 && next[1] == 99 && done[1] == 1 &&
                    next[2] == (uint32_t)(vocab / 3) && done[2] == 1;
    if (!ok) fails++;
    printf("  %-44s %s (next %u %u %u, done %d %d %d)\n", "stop tokens and finished rows", ok ? "ok" : "FAIL", next[0],
           next[1], next[2], done[0], done[1], done[2]);
}

int main() {
    printf("sample_tokens, block %u\n", BLOCK);
    const std::vector<std::pair<Fill, RowSpec>> mixed = {
        {UNIFORM, {0.7f, 0, 1.0f}},     {UNIFORM, {1.0f, 50, 1.0f}},    {UNIFORM, {1.0f, 0, 0.9f}},
        {UNIFORM, {0.6f, 1000, 0.5f}},  {FEW_VALUES, {1.0f, 37, 1.0f}}, {FEW_VALUES, {1.0f, 0, 0.3f}},
        {FEW_VALUES, {0.8f, 900, 0.7f}}, {PEAKED, {1.0f, 0, 0.9f}},     {MASKED, {1.0f, 0, 0.95f}},
        {MASKED, {1.0f, 5000, 1.0f}},   {SIGNED_ZEROS, {1.0f, 100, 0.6f}}, {UNIFORM, {0.0f, 50, 0.9f}},
        {UNIFORM, {2.0f, 1, 1.0f}},     {UNIFORM, {1.0f, 3000, 0.999f}}, {UNIFORM, {1.0f, 1000, 1.0f}},
        // the k-th token deep inside the second most likely value: the counts of crowded bins decide
        {FEW_VALUES, {1.0f, 500, 1.0f}},
    };
    test_case("mixed rows (top-k, top-p, ties, masked, greedy)", 3001, mixed, 6);
    test_case("mixed rows", 20000, mixed, 3);
    test_case("Qwen2.5 vocabulary, top-k 50 and top-p 0.9",
              152064, {{UNIFORM, {1.0f, 50, 1.0f}}, {UNIFORM, {1.0f, 0, 0.9f}}, {FEW_VALUES, {1.0f, 20, 0.8f}}}, 2);
    test_stop_and_done();
    BLOCK = 512;
    printf("sample_tokens, block %u\n", BLOCK);
    test_case("mixed rows", 3001, mixed, 2);
    printf(fails ? "%d FAILED\n" : "all ok\n", fails);
    return fails ? 1 : 0;
}
