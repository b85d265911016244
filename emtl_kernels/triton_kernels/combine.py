"""The combine pass: g = Jᵀw = Σ_i w_i g_i, written straight into its destinations.

One program per chunk of the chunk table; for each tile of its chunk, the program sums
``w_i · x_i`` over the task rows (T_BLOCK rows at a time, as many blocks as T needs) in float32,
adds the destination's old value when accumulating, and rounds once to the storage dtype. The
destinations are K separate tensors (the parameters' ``.grad``, or views of a flat buffer),
reached through the output table, so one launch writes them all.

A task whose weight is exactly zero is left out with ``tl.where``, not multiplied by zero: its
gradient may hold inf or NaN (a skipped step zeroes every weight).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .tables import DeviceTable, RowTables
from .tiles import chunk_span, load_tile, row_pointers, to_storage, typed_pointer
from .tuning import NUM_STAGES, LaunchConfig, next_power_of_2

#: Task rows a program holds at once; more tasks loop over row blocks.
MAX_T_BLOCK = 16


def combine_t_block(num_tasks: int) -> int:
    """Rows of J a program holds at once for ``num_tasks`` tasks."""
    return min(next_power_of_2(num_tasks), MAX_T_BLOCK)


@triton.jit
def combine_kernel(
    pointer_table,
    output_table,
    chunk_table,
    weights,
    num_tasks,
    num_chunks,
    DTYPE: tl.constexpr,
    T_BLOCK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write (or add) the combination over chunk ``program_id(0)``."""
    chunk = tl.program_id(0)
    tensor, start, length = chunk_span(chunk_table, chunk, num_chunks)
    destination = typed_pointer(tl.load(output_table + tensor), start, DTYPE=DTYPE, ALIGNED=ALIGNED)
    elements = tl.arange(0, BLOCK)
    full = length - length % BLOCK
    # The full tiles (tail = 0), then the chunk's partial last tile if it has one (tail = 1).
    for tail in tl.static_range(2):
        for offset in range(full if tail else 0, length if tail else full, BLOCK):
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for first in range(0, num_tasks, T_BLOCK):
                rows = first + tl.arange(0, T_BLOCK)
                row_mask = rows < num_tasks
                weight = tl.load(weights + rows, mask=row_mask, other=0.0)
                pointers = row_pointers(
                    pointer_table, tensor, rows, row_mask, num_tasks, start, DTYPE=DTYPE, ALIGNED=ALIGNED
                )
                tile = load_tile(pointers, row_mask, offset, length, elements, PARTIAL_TILE=tail)
                total += tl.sum(tl.where((weight != 0.0)[:, None], tile * weight[:, None], 0.0), axis=0)
            positions = offset + elements
            mask = positions < length if tail else None
            if ACCUMULATE:
                total += tl.load(destination + positions, mask=mask).to(tl.float32)
            tl.store(destination + positions, to_storage(total, DTYPE=DTYPE), mask=mask)


def combine_launcher(
    tables: RowTables,
    num_tasks: int,
    dtype: tl.dtype,
    outputs: DeviceTable,
    config: LaunchConfig,
    *,
    accumulate: bool,
) -> Callable[[torch.Tensor], None]:
    """The combine pass over ``tables`` into the destinations of ``outputs``, ready to launch:
    each call makes one launch over every chunk with its ``weights``, float32 ``[T]`` on the
    device."""
    launch_kernel = combine_kernel[(tables.num_chunks,)]
    options = dict(
        DTYPE=dtype,
        T_BLOCK=combine_t_block(num_tasks),
        ACCUMULATE=accumulate,
        ALIGNED=tables.aligned and outputs.aligned,
        BLOCK=config.block,
        num_warps=config.num_warps,
        num_stages=NUM_STAGES,
        enable_fp_fusion=True,
    )

    def launch(weights: torch.Tensor) -> None:
        launch_kernel(
            tables.row_pointers, outputs.values, tables.chunks, weights, num_tasks, tables.num_chunks, **options
        )

    return launch
