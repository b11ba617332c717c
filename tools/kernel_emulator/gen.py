#!/usr/bin/env python3
"""Turns cuda/attention.cu (and cuda/attention_decode.cu and cuda/attention_wgmma.cu beside it)
into host C++ for the emulator: the tensor-core helpers are swapped for emulated ones (emu_tc.h,
emu_wgmma.h), common.cuh for emu.h, dynamic shared memory for a host buffer.

  python3 gen.py ../../cuda/attention.cu OUT_DIR   # writes OUT_DIR/attention_emu.cpp
"""
import os
import re
import sys

src = open(sys.argv[1]).read()
out_dir = sys.argv[2] if len(sys.argv) > 2 else "."
src = src.replace('#include "common.cuh"', '#include "emu.h"')
a = src.index("__device__ __forceinline__ void cp_async16")
b = src.index("__device__ __forceinline__ uint32_t pack(")
src = src[:a] + '#include "emu_tc.h"\n' + src[b:]
src = re.sub(
    r"extern __shared__ __align__\(\d+\) unsigned char attn_smem\[\];",
    "unsigned char *attn_smem = emu_dyn_smem;",
    src,
)
dec = open(os.path.join(os.path.dirname(sys.argv[1]), "attention_decode.cu")).read()
src += "\n" + dec.replace('#include "common.cuh"', "")
wg = open(os.path.join(os.path.dirname(sys.argv[1]), "attention_wgmma.cu")).read()
wg = wg.replace('#include "common.cuh"', "")
a = wg.index("// ---- plumbing")
b = wg.index("// ---- end plumbing ----")
wg = wg[:a] + '#include "emu_wgmma.h"\n' + wg[b:]
wg = re.sub(
    r"extern __shared__ __align__\(\d+\) unsigned char attn90_smem\[\];",
    "unsigned char *attn90_smem = emu_dyn_smem;",
    wg,
)
src += "\n" + wg
src = src.replace('extern "C" ', "")
open(f"{out_dir}/attention_emu.cpp", "w").write(src)
