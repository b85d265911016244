"""The Gram pass: all T(T+1)/2 dot products of the task gradients in one pass.

Stage 1 (:func:`gram_partials_kernel`): a persistent grid (about the SM count times a few programs)
walks the chunk table grid-stride; each program accumulates the products of its chunks in float32
registers and writes one ``T_BLOCK × T_BLOCK`` partial (or ``T_BLOCK`` squared norms). Stage 2
(:func:`reduce_partials_kernel`) sums the partials in program order and writes G from its upper
triangle mirrored, so G is exactly symmetric and a repeat run is bit-identical (no atomics; the
same chunks go to the same programs in the same order).

Products: an elementwise ``[T_BLOCK, T_BLOCK, BLOCK // VEC]`` accumulator, reduced once at the
end, with T_BLOCK at most 8. A thread sums the products of VEC adjacent elements into one
accumulator slot, so that 8 rows can be read with 16-byte loads within the register budget.
More tasks take a second grid axis over the pairs of 8-row blocks, each pair reading its two
blocks: J is read ⌈T/8⌉ times. That beats the alternatives measured on an H200 (P = 2²⁴ and 2²⁷,
T = 16): ``tl.dot`` in IEEE float32 runs on the FMA units and reached 0.05–0.10× the copy
bandwidth, and tensor-core dots are not an option, since their accumulation is not IEEE float32
(on an H100, TF32 dots of bfloat16 rows erred 7 to 8 times the float32-accumulation bound the
parity tests hold every backend to). The squared norms alone hold T_BLOCK ≤ 32 rows in one read.

A NaN or inf anywhere in row i reaches G_ii: masked loads fill zeros only outside J, and nothing
on the way drops a non-finite value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .tables import RowTables, index_table
from .tiles import chunk_span, load_tile, row_pointers
from .tuning import NUM_STAGES, LaunchConfig, next_power_of_2

#: Largest task block a program holds: its products, or its squares alone. More tasks tile
#: over (pairs of) blocks.
MAX_PRODUCTS_T_BLOCK = 8
MAX_NORMS_T_BLOCK = 32
#: Partial values the second stage loads at once: 64 partials of an 8×8 block a step.
_REDUCE_VALUES = 4096


def gram_t_block(num_tasks: int, norms_only: bool) -> int:
    """Rows of J a program holds at once for ``num_tasks`` tasks."""
    return min(next_power_of_2(num_tasks), MAX_NORMS_T_BLOCK if norms_only else MAX_PRODUCTS_T_BLOCK)


@functools.cache
def block_pair_starts(num_tasks: int, norms_only: bool) -> tuple[int, ...]:
    """The first rows of the pairs of task blocks the programs take, flat: (a, a) for each block
    of the norms, (a, b) with a <= b for the products."""
    t_block = gram_t_block(num_tasks, norms_only)
    starts = range(0, num_tasks, t_block)
    pairs = [(a, a) for a in starts] if norms_only else [(a, b) for a in starts for b in starts if a <= b]
    return tuple(index for pair in pairs for index in pair)


@triton.jit
def _add_outer_products(acc, tile_a, tile_b, T_BLOCK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """``acc[i, j, s] += Σ_v tile_a[i, VEC·s + v] · tile_b[j, VEC·s + v]``: a thread holds VEC
    adjacent elements (one wide load per row) but only one accumulator slot per pair of rows.
    tl.split keeps the halves it makes in the thread that held them."""
    if VEC == 1:
        acc += tile_a[:, None, :] * tile_b[None, :, :]
    else:
        a_even, a_odd = tl.split(tl.reshape(tile_a, (T_BLOCK, BLOCK // 2, 2)))
        b_even, b_odd = tl.split(tl.reshape(tile_b, (T_BLOCK, BLOCK // 2, 2)))
        acc = _add_outer_products(acc, a_even, b_even, T_BLOCK=T_BLOCK, BLOCK=BLOCK // 2, VEC=VEC // 2)
        acc = _add_outer_products(acc, a_odd, b_odd, T_BLOCK=T_BLOCK, BLOCK=BLOCK // 2, VEC=VEC // 2)
    return acc


@triton.jit
def gram_partials_kernel(
    pointer_table,
    chunk_table,
    block_pairs,
    partials,
    num_tasks,
    num_chunks,
    DTYPE: tl.constexpr,
    T_BLOCK: tl.constexpr,
    NORMS_ONLY: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    """One program's partial products (WIDTH values) of the block pair ``program_id(1)`` over its
    chunks."""
    program = tl.program_id(0)
    num_programs = tl.num_programs(0)
    pair = tl.program_id(1)
    rows_a = tl.load(block_pairs + 2 * pair).to(tl.int32) + tl.arange(0, T_BLOCK)
    rows_b = tl.load(block_pairs + 2 * pair + 1).to(tl.int32) + tl.arange(0, T_BLOCK)
    mask_a = rows_a < num_tasks
    mask_b = rows_b < num_tasks
    elements = tl.arange(0, BLOCK)
    if NORMS_ONLY:
        acc = tl.zeros([T_BLOCK, BLOCK], dtype=tl.float32)
    else:
        acc = tl.zeros([T_BLOCK, T_BLOCK, BLOCK // VEC], dtype=tl.float32)
    for chunk in range(program, num_chunks, num_programs):
        tensor, start, length = chunk_span(chunk_table, chunk, num_chunks)
        pointers_a = row_pointers(pointer_table, tensor, rows_a, mask_a, num_tasks, start, DTYPE=DTYPE, ALIGNED=ALIGNED)
        if SINGLE_BLOCK or NORMS_ONLY:
            pointers_b = pointers_a
        else:
            pointers_b = row_pointers(
                pointer_table, tensor, rows_b, mask_b, num_tasks, start, DTYPE=DTYPE, ALIGNED=ALIGNED
            )
        full = length - length % BLOCK
        # The full tiles (tail = 0), then the chunk's partial last tile if it has one (tail = 1).
        for tail in tl.static_range(2):
            for offset in range(full if tail else 0, length if tail else full, BLOCK):
                tile_a = load_tile(pointers_a, mask_a, offset, length, elements, PARTIAL_TILE=tail)
                if NORMS_ONLY:
                    acc += tile_a * tile_a
                elif SINGLE_BLOCK:
                    acc = _add_outer_products(acc, tile_a, tile_a, T_BLOCK=T_BLOCK, BLOCK=BLOCK, VEC=VEC)
                else:
                    tile_b = load_tile(pointers_b, mask_b, offset, length, elements, PARTIAL_TILE=tail)
                    acc = _add_outer_products(acc, tile_a, tile_b, T_BLOCK=T_BLOCK, BLOCK=BLOCK, VEC=VEC)
    if NORMS_ONLY:
        partial = tl.sum(acc, axis=1)
        entries = tl.arange(0, T_BLOCK)
    else:
        partial = tl.sum(acc, axis=2)
        entries = tl.arange(0, T_BLOCK)[:, None] * T_BLOCK + tl.arange(0, T_BLOCK)[None, :]
    slot = (pair * num_programs + program).to(tl.int64)
    tl.store(partials + slot * WIDTH + entries, partial)


@triton.jit
def reduce_partials_kernel(
    partials,
    out,
    block_pairs,
    num_tasks,
    num_partials,
    T_BLOCK: tl.constexpr,
    NORMS_ONLY: tl.constexpr,
    WIDTH: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Sum the partials (WIDTH values each) of block pair ``program_id(0)`` in program order;
    write the norms, or the pair's upper-triangle entries of G and their mirror images."""
    pair = tl.program_id(0)
    entries = tl.arange(0, WIDTH)
    first_row = partials + pair.to(tl.int64) * num_partials * WIDTH
    total = tl.zeros([WIDTH], dtype=tl.float32)
    for first in range(0, num_partials, ROWS):
        index = first + tl.arange(0, ROWS)
        block = tl.load(
            first_row + index[:, None] * WIDTH + entries[None, :], mask=(index < num_partials)[:, None], other=0.0
        )
        total += tl.sum(block, axis=0)
    row_start = tl.load(block_pairs + 2 * pair).to(tl.int32)
    if NORMS_ONLY:
        rows = row_start + entries
        tl.store(out + rows, total, mask=rows < num_tasks)
    else:
        rows = row_start + entries // T_BLOCK
        cols = tl.load(block_pairs + 2 * pair + 1).to(tl.int32) + entries % T_BLOCK
        upper = (rows <= cols) & (cols < num_tasks)
        tl.store(out + rows * num_tasks + cols, total, mask=upper)
        tl.store(out + cols * num_tasks + rows, total, mask=upper)


def gram_launcher(
    tables: RowTables,
    num_tasks: int,
    dtype: tl.dtype,
    config: LaunchConfig,
    program_slots: int,
    *,
    norms_only: bool,
) -> Callable[[], torch.Tensor]:
    """The Gram pass over ``tables``, ready to launch: each call allocates G ``[T, T]`` (or the
    squared norms ``[T]`` when ``norms_only``) in float32, makes the two launches and returns it.

    ``program_slots`` is the number of programs that run at once per ``config.programs_per_slot``
    (the SM count on a GPU); the persistent grid never exceeds the chunk count.
    """
    device = tables.chunks.device
    t_block = gram_t_block(num_tasks, norms_only)
    pair_starts = block_pair_starts(num_tasks, norms_only)
    num_pairs = len(pair_starts) // 2
    pair_table = index_table(pair_starts, device)
    num_programs = min(tables.num_chunks, program_slots * config.programs_per_slot)
    width = t_block if norms_only else t_block * t_block
    partials_shape = (num_pairs, num_programs, width)
    shape = (num_tasks,) if norms_only else (num_tasks, num_tasks)
    launch_partials = gram_partials_kernel[(num_programs, num_pairs)]
    partials_options = dict(
        DTYPE=dtype,
        T_BLOCK=t_block,
        NORMS_ONLY=norms_only,
        SINGLE_BLOCK=t_block >= num_tasks,
        ALIGNED=tables.aligned,
        WIDTH=width,
        BLOCK=config.block,
        VEC=config.vec,
        num_warps=config.num_warps,
        num_stages=NUM_STAGES,
        enable_fp_fusion=True,
    )
    launch_reduce = reduce_partials_kernel[(num_pairs,)]
    reduce_options = dict(
        T_BLOCK=t_block,
        NORMS_ONLY=norms_only,
        WIDTH=width,
        ROWS=max(1, _REDUCE_VALUES // width),
        num_warps=4,
        enable_fp_fusion=True,
    )

    def launch() -> torch.Tensor:
        partials = torch.empty(partials_shape, dtype=torch.float32, device=device)
        launch_partials(
            tables.row_pointers, tables.chunks, pair_table, partials, num_tasks, tables.num_chunks, **partials_options
        )
        out = torch.empty(shape, dtype=torch.float32, device=device)
        launch_reduce(partials, out, pair_table, num_tasks, num_programs, **reduce_options)
        return out

    return launch
