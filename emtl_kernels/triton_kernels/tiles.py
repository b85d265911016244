"""Device helpers shared by the kernels: reading the chunk and pointer tables, loading tiles.

A tile is ``[T_BLOCK, BLOCK]``: T_BLOCK task rows (masked beyond T) of BLOCK consecutive elements
of one chunk, loaded as float32. Rows come from different allocations, so each row's address is
read from the pointer table and cast to a typed pointer. Elements are masked only on a chunk's
last, partial tile: a mask that varies along a row would stop the compiler from issuing 128-bit
loads.

Words: ``tensor`` is the index k of a shared tensor (a chunk-table entry); ``start`` a chunk's
first element in its tensor; ``offset`` a tile's first element in its chunk; ``elements`` the
element indices ``0 .. BLOCK-1`` within a tile; ``rows`` task indices.
"""

import triton
import triton.language as tl


@triton.jit
def chunk_span(chunk_table, chunk, num_chunks):
    """(tensor, start, length) of ``chunk``: start is int64, length fits int32."""
    tensor = tl.load(chunk_table + chunk)
    start = tl.load(chunk_table + num_chunks + chunk)
    length = tl.load(chunk_table + 2 * num_chunks + chunk).to(tl.int32)
    return tensor, start, length


@triton.jit
def typed_pointer(address, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """``address`` (int64) as a pointer to DTYPE, advanced by ``start`` elements. ALIGNED: the
    host checked that every address is 16-byte aligned; chunk starts keep that alignment."""
    pointer = address.to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def row_pointers(pointer_table, tensor, rows, row_mask, num_tasks, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers to element ``start`` of ``rows[i][tensor]`` for the tile's rows."""
    addresses = tl.load(pointer_table + tensor * num_tasks + rows, mask=row_mask, other=0)
    return typed_pointer(
        addresses,
        start,
        DTYPE=DTYPE,
        ALIGNED=ALIGNED,
    )


@triton.jit
def load_tile(pointers, row_mask, offset, length, elements, PARTIAL_TILE: tl.constexpr):
    """The float32 tile of elements ``offset + elements`` of each row; zeros where masked, so that
    a padded row or element adds nothing (and a non-finite value stays where it is). PARTIAL_TILE:
    the tile runs past the chunk's ``length``, whose elements beyond it are masked."""
    positions = offset + elements
    if PARTIAL_TILE:
        mask = row_mask[:, None] & (positions < length)[None, :]
    else:
        mask = row_mask[:, None]
    return tl.load(pointers[:, None] + positions[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def to_storage(values, DTYPE: tl.constexpr):
    """float32 ``values`` rounded to nearest (ties to even) in DTYPE. bfloat16 is rounded with
    integer ops: Triton's interpreter truncates in its float32→bfloat16 conversion, and the CPU
    tests must check the code the GPU runs. Inf stays inf, NaN stays NaN."""
    if tl.bfloat16 == DTYPE:
        bits = values.to(tl.uint32, bitcast=True)
        upper = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        upper = tl.where(values != values, 0x7FC0, upper)
        result = upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = values.to(DTYPE)
    return result
