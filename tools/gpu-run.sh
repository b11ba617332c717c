#!/usr/bin/env bash
# One lease, one call: check every kernel against the CPU reference, then time ours and PyTorch's
# side by side. Run on the GPU machine from the repository root, with the stripped binaries built
# here (see README "On a GPU"):
#
#   strip -o .gpu/empo-engine target/release/empo-engine
#   strip -o .gpu/kernels-bench target/release/deps/kernels-<hash>
#   strip -o .gpu/train-one-step target/release/deps/train_one_step-<hash>
#   tools/gpu-run.sh [check|sanitize|train|demo|bench|prev|criterion|all]...
#
# Logs are written under $OUT/logs (OUT defaults to ./gpu-out) and packed into
# $OUT/gpu-logs.tgz on exit, since the device tool brings back at most 8 files; a short summary
# is printed last. The steps' own time limits add up to more than one 10-minute call: in a
# lease, run `check train demo` in one call and `bench criterion` in the next. BUDGET (560 s)
# caps the whole run: a late step gets what is left, or is skipped.
set -uo pipefail
DEST=${OUT:-gpu-out}
OUT=$DEST/logs
mkdir -p "$OUT"
pack() { tar czf "$DEST/gpu-logs.tgz" -C "$DEST" logs && rm -rf "$OUT"; }
trap pack EXIT
trap 'exit 143' TERM INT
BIN=${BIN:-.gpu/empo-engine}
steps=${*:-all}

# cudarc loads libcublas/libcublasLt/libnvrtc by name; the machine's PyTorch wheel and CUDA
# install both carry CUDA 13 copies.
for lib in libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
    d=$(find /usr/local/cuda*/ /opt /usr/lib -name "$lib" 2>/dev/null | head -1)
    [ -n "$d" ] && LD_LIBRARY_PATH="$(dirname "$d"):${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
"$BIN" info | tail -4
# ptxas's registers, spills and advisories per kernel, as built (the same table as on the host).
"$BIN" info --resources >"$OUT/resources.txt" 2>&1

has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }

# The device tool ends a call at 600 s, and a call cut off there may bring back nothing packed:
# each step's limit is cut to what is left of BUDGET seconds since this script started (a margin
# for packing and the transfer), and a step with under 30 s left is skipped with a line saying
# so. budget NAME SECONDS sets LIM.
BUDGET=${BUDGET:-560}
budget() {
    LIM=$((BUDGET - SECONDS))
    ((LIM > $2)) && LIM=$2
    ((LIM >= 30)) && return 0
    echo "$1 skipped: ${LIM} s of the ${BUDGET} s budget left" | tee -a "$OUT/skipped.txt"
    return 1
}

if has check && budget check-kernels 280; then
    echo "== check-kernels"
    timeout -k 10 $LIM "$BIN" check-kernels --device cuda >"$OUT/check.txt" 2>&1
    rc=$?
    echo "check-kernels exit $rc" | tee -a "$OUT/check.txt"
    # A fault loses the CUDA context, and every check after it is a row "not run"; a hang
    # (timeout's 124, or 137 once killed) leaves the rows before it. Either way, run the checks
    # again in a fresh process without the check named (the lost one, or the last one started),
    # up to twice. The wgmma parts run last: when one of them is named, nothing else went
    # unchecked, and the later steps run without wgmma.
    skips=()
    log=$OUT/check.txt
    for again in 1 2; do
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            bad=$(sed -n 's/^check-kernels: running //p' "$log" | tail -1)
            echo "check-kernels hung in: $bad" | tee -a "$log"
        else
            bad=$(sed -n 's/^check-kernels: the device was lost in //p' "$log" | head -1)
        fi
        [ -n "$bad" ] || break
        case "$bad" in
        wgmma* | attention\ variants)
            echo "EMPO_WGMMA=0 for the remaining steps" | tee -a "$log"
            export EMPO_WGMMA=0
            [ $rc -eq 124 ] || [ $rc -eq 137 ] && break
            grep ': not run' "$log" | grep -qv -e 'wgmma probe: not run' -e 'attention variants: not run' || break
            ;;
        esac
        skips+=(--skip "$bad")
        budget check-kernels-again 200 || break
        echo "== check-kernels again, ${skips[*]}"
        log=$OUT/check-again$again.txt
        timeout -k 10 $LIM "$BIN" check-kernels --device cuda "${skips[@]}" >"$log" 2>&1
        rc=$?
        echo "check-kernels ${skips[*]} exit $rc" | tee -a "$log"
    done
fi
if has sanitize && budget sanitize 300; then
    echo "== compute-sanitizer (quick checks)"
    timeout $LIM compute-sanitizer --print-limit 20 "$BIN" check-kernels --device cuda --quick \
        >"$OUT/sanitize.txt" 2>&1
    echo "sanitize exit $?" | tee -a "$OUT/sanitize.txt"
fi
# The driver on the GPU: `train` one step on fixed rollouts against PyTorch autograd
# (tests/train_one_step.rs, whose GPU test skips everywhere else), then EMPO on the embedded demo,
# sampling included, with greedy accuracy and semantic entropy before and after.
if has train && [ -x .gpu/train-one-step ] && budget train-one-step 120; then
    echo "== train one step vs PyTorch"
    EMPO_BIN=$BIN EMPO_FIXTURES=tests/fixtures timeout $LIM .gpu/train-one-step \
        --test-threads 1 --nocapture >"$OUT/train.txt" 2>&1
    echo "train-one-step exit $?" | tee -a "$OUT/train.txt"
fi
if has demo && budget demo 300; then
    echo "== EMPO on the embedded demo"
    EMPO_DEMO_DIR=assets/demo timeout $LIM "$BIN" train --device cuda --out "$OUT/demo-run" \
        >"$OUT/demo.txt" 2>&1
    echo "demo exit $?" | tee -a "$OUT/demo.txt"
    cp "$OUT/demo-run/summary.json" "$OUT/demo-summary.json" 2>/dev/null
    rm -rf "$OUT/demo-run"
fi
if has bench && budget bench 200; then
    echo "== bench"
    # BENCH_SKIP="softmax-entropy;sampling" leaves those sections out (bench --skip): for a call
    # after one whose check-kernels or bench lost the device in them.
    bargs=()
    IFS=';' read -ra bskip <<<"${BENCH_SKIP:-}"
    for x in "${bskip[@]}"; do bargs+=(--skip "$x"); done
    timeout $LIM "$BIN" bench --json "$OUT/bench.json" "${bargs[@]}" >"$OUT/bench.txt" 2>&1
    echo "bench exit $?" | tee -a "$OUT/bench.txt"
fi
if has bench && budget torch 120; then
    PYTHONUNBUFFERED=1 timeout $LIM python3 tools/bench_torch_gpu.py --ours "$OUT/bench.json" \
        >"$OUT/torch.txt" 2>&1
    echo "torch exit $?" | tee -a "$OUT/torch.txt"
fi
# A/B against an older build in the same lease (same clocks, same GPU): carry it as
# .gpu/empo-engine-prev (see docs/gpu/README.md) and ask for `prev`.
if has prev && [ -x .gpu/empo-engine-prev ] && budget bench-prev 150; then
    echo "== bench, previous build"
    timeout $LIM .gpu/empo-engine-prev bench --json "$OUT/bench-prev.json" >"$OUT/bench-prev.txt" 2>&1
    echo "bench-prev exit $?" | tee -a "$OUT/bench-prev.txt"
fi
if has criterion && budget criterion 240; then
    echo "== cargo bench (criterion executable)"
    timeout $LIM .gpu/kernels-bench --bench --warm-up-time 1 --measurement-time 3 \
        >"$OUT/criterion.txt" 2>&1
    echo "criterion exit $?" | tee -a "$OUT/criterion.txt"
fi

for f in skipped check check-again1 check-again2 sanitize train demo bench torch bench-prev criterion; do
    [ -f "$OUT/$f.txt" ] && { echo "---- $f"; tail -n 60 "$OUT/$f.txt"; }
done
