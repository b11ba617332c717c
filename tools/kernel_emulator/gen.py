#!/usr/bin/env python3
"""Turns cuda/attention.cu (and cuda/attention_decode.cu and cuda/attention_wgmma.cu beside it)
into host C++ for the emulator: the tensor-core helpers are swapped for emulated ones (emu_tc.h,
emu_wgmma.h), common.cuh for emu.h and the common.cuh helpers emu.h lacks, dynamic shared memory
for a host buffer.

  python3 gen.py ../../cuda/attention.cu OUT_DIR   # writes OUT_DIR/attention_emu.cpp
"""
import os
import sys

from gen_ops import common_helpers, host_shared_memory

cuda = os.path.dirname(sys.argv[1])
out_dir = sys.argv[2] if len(sys.argv) > 2 else "."


def emulated(src, start, end, header):
    """src with the text from `start` up to `end` swapped for `#include header`, and its dynamic
    shared memory pointed at the host buffer."""
    a, b = src.index(start), src.index(end)
    return host_shared_memory(src[:a] + f'#include "{header}"\n' + src[b:])


src = open(sys.argv[1]).read()
src = src.replace('#include "common.cuh"', '#include "emu.h"\n' + common_helpers(cuda))
src = emulated(
    src,
    "__device__ __forceinline__ void cp_async16",
    "__device__ __forceinline__ uint32_t pack(",
    "emu_tc.h",
)
dec = open(os.path.join(cuda, "attention_decode.cu")).read()
src += "\n" + dec.replace('#include "common.cuh"', "")
wg = open(os.path.join(cuda, "attention_wgmma.cu")).read().replace('#include "common.cuh"', "")
src += "\n" + emulated(wg, "// ---- plumbing", "// ---- end plumbing ----", "emu_wgmma.h")
src = src.replace('extern "C" ', "")
open(f"{out_dir}/attention_emu.cpp", "w").write(src)
