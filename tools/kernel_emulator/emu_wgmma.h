// Emulated plumbing of cuda/attention_wgmma.cu (included inside namespace attn90, after
// attention.cu's emulated helpers): shared-window addresses, cp.async, and wgmma.mma_async with
// 128-byte-swizzled shared operands as PTX ISA 9.7.15.5 lays them out.
//
// wgmma is asynchronous: its accumulator reads as NaN from issue until the wgmma.wait_group
// that covers it, so a kernel that touches S or O too early fails here. Each issue is a
// warpgroup barrier (the instruction is .sync.aligned: all 128 threads must reach it), and each
// needs a wgmma.fence since the thread's last wait, as the PTX rules ask.
//
// Its shared operands are read through the async proxy (PTX ISA 9.7.15.4): here from
// emu_async_smem, which catches up with the generic view only once every live thread of the
// block has passed a fence.proxy.async. Each issue asserts that the bytes it reads look the same
// through both proxies (a tile published by a barrier without its writers' fences would not),
// and each wait that every byte a finished group read is still as it was at issue (the tensor
// cores may read it at any time before the wait). The whole-block rule is stricter than the
// hardware's, which asks only the writing threads to fence; the kernels fence in every thread.
inline uint32_t smem_addr(const void *p) { return attn::smem_u32(p); }
// A shared access must stay inside the launch's dynamic shared memory (emu.h: g_dyn_off, g_dyn_bytes).
inline void check_dyn(uint32_t a, uint32_t n) {
    const uint32_t end = g_dyn_bytes ? g_dyn_off + g_dyn_bytes : (uint32_t)sizeof emu_dyn_smem;
    assert(a >= g_dyn_off && a + n <= end && "shared access outside the launch's dynamic shared memory");
}
inline void cp_async16(uint32_t dst, const void *src, bool valid) {
    check_dyn(dst, 16);
    attn::cp_async16(emu_dyn_smem + dst, src, valid);
}
inline void cp_async_commit() { attn::cp_async_commit(); }
template <int N> inline void cp_async_wait() { attn::cp_async_wait<N>(); }
inline void fence_async_smem() {
    g_cur->proxy_gen = g_proxy_gen + 1;
    for (auto &f : *g_fibers)
        if (!f.done && f.proxy_gen <= g_proxy_gen) return;
    memcpy(emu_async_smem, emu_dyn_smem, sizeof emu_dyn_smem);
    g_proxy_gen++;
}
inline float ex2(float x) { return attn::ex2(x); }
// Named barrier 1 of the forward's issue order (warp-uniform predicates, as on the device).
inline void order_wait(int wg) { if (wg != 0) bar_wait(g_nbar[1], 256); }
inline void order_signal(int wg) { if (wg == 0) bar_arrive(g_nbar[1], 256); }
inline uint32_t pack(float lo, float hi) { return attn::pack(lo, hi); }

// A compiler-only barrier on the device; nothing to do here.
template <int N> inline void fence_regs(float (&)[N][4]) {}
template <int N> inline void fence_regs(uint32_t (&)[N][4]) {}

inline int emu_wg() { return emu_warp() >> 2; }
inline void wg_sync() { bar_wait(g_wgbar[emu_wg()], 128); }
inline void wg_fence() { g_cur->mma_fenced = true; }
inline void wg_commit() { g_cur->mma_committed++; }
template <int N> inline void wg_wait() {
    auto &p = g_cur->mma_pend;
    std::vector<PendingMma> keep;
    for (auto &m : p) {
        assert(m.group < g_cur->mma_committed && "wgmma.wait_group with an uncommitted wgmma");
        if (m.group < g_cur->mma_committed - N) {
            memcpy(m.d, m.v.data(), m.v.size() * 4);
            for (auto &a : m.a)  // the tensor cores read register operands until the wait
                assert(memcmp(a.first, a.second.data(), 16) == 0 && "A registers of a wgmma changed before its wait");
        }
        else keep.push_back(m);
    }
    p = keep;
    g_cur->mma_fenced = false;
    // The first thread of the warpgroup to wait for a group checks what the group read: a thread
    // that wrote those bytes since the issue wrote them before its own wait.
    auto &reads = g_operand_reads;
    for (size_t i = 0; i < reads.size();) {
        const OperandReads &r = reads[i];
        if (r.wg != emu_wg() || r.group >= g_cur->mma_committed - N) { i++; continue; }
        for (auto &b : r.bytes) {
            uint16_t now;
            memcpy(&now, emu_dyn_smem + b.first, 2);
            if (now != b.second) {
                fprintf(stderr, "shared bytes %u-%u, read by wgmma group %d of warpgroup %d, changed before its wait\n",
                        b.first, b.first + 1, r.group, r.wg);
                abort();
            }
        }
        reads.erase(reads.begin() + i);
    }
}

struct MatDesc { uint32_t start, lbo, sbo; };
inline MatDesc decode(uint64_t d) {
    assert((d >> 62) == 1 && "128-byte swizzle");
    assert(((d >> 49) & 7) == 0 && "base offset 0: operands start on the swizzle's 1 KB period");
    assert(((d >> 14) & 3) == 0 && ((d >> 30) & 3) == 0 && ((d >> 46) & 7) == 0 && ((d >> 52) & 0x3ff) == 0);
    return {(uint32_t)(d & 0x3fff) << 4, (uint32_t)((d >> 16) & 0x3fff) << 4, (uint32_t)((d >> 32) & 0x3fff) << 4};
}
// The hardware XORs address bits 4-6 (the 16-byte chunk) with bits 7-9 (the 128-byte row).
inline uint32_t swizzle128(uint32_t a) { return a ^ (((a >> 7) & 7) << 4); }
inline float smem_at(uint32_t a) {
    a = swizzle128(a);
    check_dyn(a, 2);
    bf16 h;
    memcpy(&h, emu_async_smem + a, 2);
    return __bfloat162float(h);
}
// Run by one thread of the warpgroup at an issue, over the (unswizzled) addresses of every
// element the issue reads: each must read the same through both proxies, and is noted for the
// wait (wg_wait).
inline void note_reads(const std::vector<uint32_t> &addrs) {
    OperandReads r{emu_wg(), g_cur->mma_committed, {}};
    for (uint32_t a : addrs) {
        a = swizzle128(a);
        check_dyn(a, 2);
        uint16_t gen, async;
        memcpy(&gen, emu_dyn_smem + a, 2);
        memcpy(&async, emu_async_smem + a, 2);
        if (gen != async) {
            fprintf(stderr, "wgmma of warpgroup %d reads shared bytes %u-%u, written with no fence.proxy.async since\n",
                    r.wg, a, a + 1);
            abort();
        }
        r.bytes.push_back({a, gen});
    }
    g_operand_reads.push_back(std::move(r));
}
// K-major: byte offset of element (row, k) of a (rows x 16) operand: rows 128 bytes apart in
// 8-row groups `sbo` apart, k contiguous.
inline uint32_t kmajor_off(MatDesc d, int row, int k) { return (row % 8) * 128 + (row / 8) * d.sbo + k * 2; }
// N-major (or M-major for A, with n the row): byte offset of element (k, n) of a (16 x N)
// operand: 64 n contiguous, 64-column blocks `lbo` apart, k rows 128 bytes apart in 8-row groups
// `sbo` apart.
inline uint32_t nmajor_off(MatDesc d, int k, int n) { return (n % 64) * 2 + (n / 64) * d.lbo + (k % 8) * 128 + (k / 8) * d.sbo; }
inline float kmajor(MatDesc d, int row, int k) { return smem_at(d.start + kmajor_off(d, row, k)); }
inline float nmajor(MatDesc d, int k, int n) { return smem_at(d.start + nmajor_off(d, k, n)); }

// Accumulator e of column block n of thread `lane` of warp w (of its warpgroup): (row, col) of the
// 64 x N result.
inline void acc_coord(int w, int lane, int n, int e, int &row, int &col) {
    row = 16 * w + (lane >> 2) + 8 * (e >> 1);
    col = 8 * n + 2 * (lane & 3) + (e & 1);
}
// Where element (row, k) of a register A operand (64 x 16) lives: thread of the warpgroup,
// register (0-3) and half (0 low, 1 high).
inline void areg_slot(int row, int k, int &thread, int &reg, int &half) {
    const int rr = row % 16;
    thread = (row / 16) * 32 + (rr % 8) * 4 + (k % 8) / 2;
    reg = rr / 8 + 2 * (k / 8);
    half = k & 1;
}

// One m64n(8 NB)k16 issue: this thread's 4 NB accumulators (the mma.sync C layout of its warp's
// 16 rows, over NB column blocks), from `a(row, k)` and `b(k, col)`.
template <int NB, class A, class B>
inline void wg_issue(float (&d)[NB][4], bool accumulate, A a, B b, const uint32_t *areg = nullptr) {
    assert(g_cur->mma_fenced && "wgmma without a wgmma.fence since the last wait");
    float *key = &d[0][0];
    std::vector<float> in(key, key + 4 * NB);
    PendingMma *prev = nullptr;
    for (auto &m : g_cur->mma_pend)
        if (m.d == key) prev = &m;  // chained on an earlier, unwaited wgmma: its result is the input
    if (prev) in = prev->v;
    std::vector<float> outv(4 * NB);
    for (int n = 0; n < NB; n++)
        for (int e = 0; e < 4; e++) {
            int row, col;
            acc_coord(emu_warp() & 3, emu_lane(), n, e, row, col);
            float acc = accumulate ? in[4 * n + e] : 0.0f;
            for (int k = 0; k < 16; k++) acc += a(row, k) * b(k, col);
            outv[4 * n + e] = acc;
        }
    if (!prev) { g_cur->mma_pend.push_back({key, {}, 0, {}}); prev = &g_cur->mma_pend.back(); }
    prev->v = outv;
    prev->group = g_cur->mma_committed;
    if (areg) prev->a.push_back({areg, std::vector<uint32_t>(areg, areg + 4)});
    for (int i = 0; i < 4 * NB; i++) key[i] = NAN;
}

// m64n(8 NB)k16 with both operands in shared memory: A K-major (TA 0) or M-major (TA 1), B
// K-major (TB 0) or N-major (TB 1).
template <int TA, int TB, int NB>
inline void wg_issue_ss(float (&d)[NB][4], uint64_t da, uint64_t db, int accumulate) {
    wg_sync();
    const MatDesc a = decode(da), b = decode(db);
    if ((emu_tid() & 127) == 0) {
        std::vector<uint32_t> addrs;
        for (int k = 0; k < 16; k++) {
            for (int row = 0; row < 64; row++) addrs.push_back(a.start + (TA ? nmajor_off(a, k, row) : kmajor_off(a, row, k)));
            for (int col = 0; col < 8 * NB; col++) addrs.push_back(b.start + (TB ? nmajor_off(b, k, col) : kmajor_off(b, col, k)));
        }
        note_reads(addrs);
    }
    wg_issue(d, accumulate != 0, [&](int row, int k) { return TA ? nmajor(a, k, row) : kmajor(a, row, k); },
             [&](int k, int col) { return TB ? nmajor(b, k, col) : kmajor(b, col, k); });
    wg_sync();
}
inline void wgmma_ss(float (&d)[16][4], uint64_t da, uint64_t db, int accumulate) { wg_issue_ss<0, 0>(d, da, db, accumulate); }
template <int TA, int TB>
inline void wgmma_ss64(float (&d)[8][4], uint64_t da, uint64_t db, int accumulate) { wg_issue_ss<TA, TB>(d, da, db, accumulate); }

static uint32_t g_wga[8][128][4];  // register A operands, by warpgroup and thread
inline void wgmma_rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db) {
    memcpy(g_wga[emu_wg()][emu_tid() & 127], a, 16);
    wg_sync();
    const MatDesc b = decode(db);
    if ((emu_tid() & 127) == 0) {
        std::vector<uint32_t> addrs;
        for (int k = 0; k < 16; k++)
            for (int col = 0; col < 128; col++) addrs.push_back(b.start + nmajor_off(b, k, col));
        note_reads(addrs);
    }
    uint32_t (*wa)[4] = g_wga[emu_wg()];
    // A of m64nNk16 from registers: warp row / 16 holds its 16 rows in the mma.sync A layout.
    auto areg = [&](int row, int k) {
        int thread, reg, half;
        areg_slot(row, k, thread, reg, half);
        return attn::half_of(wa[thread][reg], half);
    };
    wg_issue(d, true, areg, [&](int k, int col) { return nmajor(b, k, col); }, a);
    wg_sync();
}
