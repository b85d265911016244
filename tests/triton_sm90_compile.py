"""Compile the Triton kernels for an H100 (sm_90) without a GPU, and report what the code does.

Run as a script, without TRITON_INTERPRET (the interpreter never compiles): prints one JSON
object per kernel variant with the global-memory load and store instructions of its PTX, so a
test can check that every variant compiles and that aligned tiles use 128-bit accesses. Triton
ships ptxas, so this needs no CUDA install.
"""

from __future__ import annotations

import json
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from emtl_kernels.triton_kernels.combine import combine_kernel
from emtl_kernels.triton_kernels.gram import gram_partials_kernel, reduce_partials_kernel
from emtl_kernels.triton_kernels.tuning import NUM_STAGES

HOPPER = GPUTarget("cuda", 90, 32)

_SCALARS = {"num_tasks": "i32", "num_chunks": "i32", "num_partials": "i32"}
_FLOAT_POINTERS = {"partials", "out", "weights"}


def _signature(kernel, constants: dict) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in _SCALARS:
            signature[name] = _SCALARS[name]
        else:
            signature[name] = "*fp32" if name in _FLOAT_POINTERS else "*i64"
    return signature


def compile_variant(kernel, constants: dict, num_warps: int) -> dict:
    source = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, constants), constexprs=constants)
    compiled = triton.compile(
        source, target=HOPPER, options={"num_warps": num_warps, "num_stages": NUM_STAGES, "enable_fp_fusion": True}
    )
    ptx = compiled.asm["ptx"]
    return {
        "kernel": kernel.__name__,
        "constants": {name: str(value) for name, value in constants.items()},
        "accesses": sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*|cp\.async\.\w+\.shared\.global", ptx))),
        "wide_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32 ", ptx)),
        "mma": sorted(set(re.findall(r"(?:wgmma|mma)\.[.\w]*", ptx))),
    }


def _gram(dtype, t_block, norms_only, single_block, block, num_warps, vec=1):
    constants = dict(
        DTYPE=dtype,
        T_BLOCK=t_block,
        NORMS_ONLY=norms_only,
        SINGLE_BLOCK=single_block,
        ALIGNED=True,
        WIDTH=t_block if norms_only else t_block * t_block,
        BLOCK=block,
        VEC=vec,
    )
    return compile_variant(gram_partials_kernel, constants, num_warps)


def variants() -> list[dict]:
    """Every code path of the kernels once: products with and without element groups, float32 and
    16-bit storage, norms only, pairs of task blocks, the reduction, combine with and without
    adding."""
    reports = [
        _gram(tl.float32, 1, False, True, 4096, 8),
        _gram(tl.float32, 8, False, True, 512, 4, vec=4),
        _gram(tl.bfloat16, 8, False, True, 2048, 8, vec=8),
        _gram(tl.float16, 4, True, True, 2048, 8),
        _gram(tl.float32, 32, True, True, 512, 4),
        _gram(tl.bfloat16, 8, False, False, 1024, 4, vec=8),
    ]
    for t_block, norms_only in ((8, False), (32, True)):
        width = t_block if norms_only else t_block**2
        constants = dict(T_BLOCK=t_block, NORMS_ONLY=norms_only, WIDTH=width, ROWS=4096 // width)
        reports.append(compile_variant(reduce_partials_kernel, constants, 4))
    for dtype, accumulate in ((tl.float32, False), (tl.bfloat16, True)):
        constants = dict(DTYPE=dtype, T_BLOCK=8, ACCUMULATE=accumulate, ALIGNED=True, BLOCK=2048)
        reports.append(compile_variant(combine_kernel, constants, 8))
    return reports


if __name__ == "__main__":
    for report in variants():
        print(json.dumps(report))
