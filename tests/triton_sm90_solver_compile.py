"""Compile the one-launch non-negative QP solve for an H100 (sm_90) without a GPU, and report
what ptxas makes of it: one JSON object per variant (BLOCK_T, storage dtype) with its registers
a thread, the bytes it spills to local memory, and its float64 FMAs (it computes in float64).

Run as a script, without TRITON_INTERPRET (the interpreter never compiles); Triton ships ptxas.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas

from emtl_kernels.triton_kernels.nonnegative_qp import STOP_TOLERANCE, nonnegative_qp_kernel, program_warps

HOPPER = GPUTarget("cuda", 90, 32)


def compile_variant(block_t: int, storage: str) -> dict:
    signature = {
        "matrix": f"*{storage}",
        "linear": f"*{storage}",
        "solution": f"*{storage}",
        "pivot_counts": "*i32",
        "num_tasks": "i32",
        "max_pivots": "i32",
        "BLOCK_T": "constexpr",
        "TOLERANCE": "constexpr",
    }
    constants = {"BLOCK_T": block_t, "TOLERANCE": STOP_TOLERANCE}
    source = triton.compiler.ASTSource(fn=nonnegative_qp_kernel, signature=signature, constexprs=constants)
    options = {"num_warps": program_warps(block_t), "num_stages": 1, "enable_fp_fusion": True}
    ptx = triton.compile(source, target=HOPPER, options=options).asm["ptx"]
    usage = _ptxas_usage(ptx)
    return {
        "block_t": block_t,
        "storage": storage,
        "num_warps": program_warps(block_t),
        "registers": int(re.search(r"Used (\d+) registers", usage).group(1)),
        "spill_bytes": sum(map(int, re.findall(r"(\d+) bytes spill (?:stores|loads)", usage))),
        "float64_fma": len(re.findall(r"\bfma\.rn\.f64\b", ptx)),
    }


def _ptxas_usage(ptx: str) -> str:
    """ptxas's resource report (-v) of the PTX for sm_90a, by the ptxas Triton itself runs."""
    ptxas = get_ptxas(HOPPER.arch).path
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        command = [ptxas, "-arch=sm_90a", "-v", source, "-o", os.path.join(folder, "kernel.cubin")]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
    return result.stdout + result.stderr


if __name__ == "__main__":
    for block_t in (2, 16, 32, 64):
        for storage in ("fp32", "fp64"):
            print(json.dumps(compile_variant(block_t, storage)))
