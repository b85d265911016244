"""Launch configurations of the Triton kernels, the candidates of a pass's tuning.

A pass is tuned once per (pass, T, dtype, size class, device) by
:class:`~emtl_kernels.backends.fastest.Fastest`: on the first call that may be timed, every
candidate runs on the call's own data and the fastest is kept for the process. Triton's autotuner
is not used because it times a kernel by running it on the call's arguments: a combine pass that
adds into ``.grad`` would add several times. Here a call that may not run twice (an accumulating
combine, a CUDA graph capture) takes the kept choice, or the first candidate without keeping it.
Under the interpreter there is one small candidate: timing it would measure Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import triton
from triton.runtime.errors import OutOfResources


@dataclass(frozen=True)
class LaunchConfig:
    """Elements per tile, warps per program, (for persistent grids) programs per SM, and (for the
    Gram products) adjacent elements a thread sums into one accumulator slot."""

    block: int
    num_warps: int = 4
    programs_per_slot: int = 4
    vec: int = 1


#: The one configuration used under the interpreter: large tiles mean fewer Python iterations;
#: vec > 1 so that the CPU tests run the code path the GPU candidates add (vec = 1 is tested
#: explicitly).
INTERPRETER_CONFIG = LaunchConfig(block=4096, num_warps=4, programs_per_slot=4, vec=4)

# float32 values a thread may hold in registers for its accumulators and tiles: the compiled
# kernels then stay well below 255 registers, with no spills.
_REGISTER_BUDGET = 96
#: Software-pipelining stages of every launch: Triton pipelines only loads that feed tl.dot, and
#: the kernels have none.
NUM_STAGES = 1
# Bytes of the widest load a thread issues (128-bit).
_LOAD_BYTES = 16
# Largest tile: CHUNK_ELEMENTS must stay a multiple of every block size.
_MAX_BLOCK = 4096


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (>= 1), in plain Python: Triton's own is a constexpr
    function, costly to call on the host."""
    return 1 << max(0, n - 1).bit_length()


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret)


@cache
def program_slots(device: torch.device) -> int:
    """Programs a persistent grid runs per ``programs_per_slot``: the SM count (1 on a CPU)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def elementwise_candidates(values_per_element: int, element_bytes: int, *, persistent: bool) -> list[LaunchConfig]:
    """Tiles for kernels that hold ``values_per_element`` float32 registers per element of a tile
    row (the tile's rows and elementwise accumulators): per warp count, the two largest blocks within the
    register budget (more bytes in flight per iteration), the block that gives every thread one
    16-byte load a row where the budget stops short of it, and for a persistent grid two
    occupancies."""
    if interpreting():
        return [INTERPRETER_CONFIG]
    configs = []
    for warps in (4, 8):
        threads = 32 * warps
        fitting = [
            b
            for b in (256, 512, 1024, 2048, _MAX_BLOCK)
            if b >= threads and values_per_element * b <= _REGISTER_BUDGET * threads
        ]
        blocks = fitting[-2:] or [threads]
        wide = min(_MAX_BLOCK, threads * _LOAD_BYTES // element_bytes)
        if blocks[-1] < wide:
            blocks.append(wide)
        for block in blocks:
            configs += [LaunchConfig(block, warps, slots) for slots in ((2, 4) if persistent else (1,))]
    return configs


def outer_product_candidates(t_block: int, element_bytes: int) -> list[LaunchConfig]:
    """Tiles for the elementwise Gram products of ``t_block`` rows. A thread keeps t_block²
    accumulators per group of ``vec`` adjacent elements and the group's t_block·vec tile values;
    vec is 1, or one 16-byte load's worth of elements (without it, 8 rows of accumulators leave
    room for one element a thread: 4-byte loads, 2-byte ones for 16-bit storage). Per warp count and
    vec, as many groups as the register budget allows (at least one), and two occupancies."""
    if interpreting():
        return [INTERPRETER_CONFIG]
    configs = []
    for vec in sorted({1, _LOAD_BYTES // element_bytes}):
        groups = max(1, _REGISTER_BUDGET // (t_block * t_block + t_block * vec))
        for warps in (4, 8):
            block = min(_MAX_BLOCK, 32 * warps * vec * (1 << (groups.bit_length() - 1)))
            configs += [LaunchConfig(block, warps, slots, vec) for slots in (2, 4)]
    return configs


def milliseconds(run: Callable[[LaunchConfig], object], config: LaunchConfig) -> float:
    """Milliseconds ``run(config)`` takes on the device (infinite where the configuration does
    not fit the device's resources)."""
    try:
        return triton.testing.do_bench(lambda: run(config), warmup=5, rep=20)
    except OutOfResources:
        return float("inf")
