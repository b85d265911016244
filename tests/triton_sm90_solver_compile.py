"""Compile the one-launch solves (non-negative QP, Jacobi eigen-decomposition) for an H100 (sm_90)
without a GPU, and report what ptxas makes of them: one JSON object per variant (kernel, problem,
tile size, storage dtype) with its registers a thread, the bytes it spills to local memory, and its
float64 instructions (FMAs, and the eigen-solver's float64 tensor-core products).

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

from emtl_kernels.triton_kernels import jacobi_eigh, nonnegative_qp

HOPPER = GPUTarget("cuda", 90, 32)


def qp_variant(problem: str, block_t: int, storage: str) -> dict:
    signature = {
        "matrix": f"*{storage}",
        "linear": f"*{storage}",
        "solution": f"*{storage}",
        "pivot_counts": "*i32",
        "num_tasks": "i32",
        "max_pivots": "i32",
        "norm_eps": "fp64",
        "ridge": "fp64",
        "PROBLEM": "constexpr",
        "BLOCK_T": "constexpr",
        "TOLERANCE": "constexpr",
    }
    constants = {
        "PROBLEM": nonnegative_qp.PROBLEMS[problem],
        "BLOCK_T": block_t,
        "TOLERANCE": nonnegative_qp.STOP_TOLERANCE,
    }
    warps = nonnegative_qp.program_warps(block_t)
    report = _report(nonnegative_qp.nonnegative_qp_kernel, signature, constants, warps, block_t, storage)
    return {**report, "problem": problem}


def eigh_variant(block: int, storage: str) -> dict:
    signature = {
        "matrix": f"*{storage}",
        "values": f"*{storage}",
        "vectors": f"*{storage}",
        "size": "i32",
        "sweeps": "i32",
        "BLOCK": "constexpr",
        "ROUNDING": "constexpr",
    }
    constants = {"BLOCK": block, "ROUNDING": jacobi_eigh.ROUNDING}
    warps = jacobi_eigh.program_warps(block)
    return _report(jacobi_eigh.jacobi_eigh_kernel, signature, constants, warps, block, storage)


def _report(kernel, signature: dict, constants: dict, num_warps: int, block: int, storage: str) -> dict:
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    options = {"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": True}
    ptx = triton.compile(source, target=HOPPER, options=options).asm["ptx"]
    usage = _ptxas_usage(ptx)
    return {
        "kernel": kernel.__name__,
        "block": block,
        "storage": storage,
        "num_warps": num_warps,
        "registers": int(re.search(r"Used (\d+) registers", usage).group(1)),
        "spill_bytes": sum(map(int, re.findall(r"(\d+) bytes spill (?:stores|loads)", usage))),
        "float64_fma": len(re.findall(r"\bfma\.rn\.f64\b", ptx)),
        "float64_mma": len(re.findall(r"\bmma\.sync\.aligned\.m8n8k4\.row\.col\.f64\.f64\.f64\.f64\b", ptx)),
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
    for storage in ("fp32", "fp64"):
        for block_t in (2, 16, 32, 64):
            print(json.dumps(qp_variant("nonnegative_qp", block_t, storage)))
        for problem in ("dual_cone", "min_norm"):
            print(json.dumps(qp_variant(problem, 16, storage)))
        for block in (16, 32, 64):
            print(json.dumps(eigh_variant(block, storage)))
