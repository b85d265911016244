"""Device tables that let one kernel launch walk every piece of J, with nothing concatenated.

J's row i is split over K shared tensors; ``rows[i][k]`` is its own allocation in general. A
launch reads them through three small int64 tables:

- the chunk table ``[3, C]`` (task-independent): each shared tensor k is cut into chunks of at most
  :data:`CHUNK_ELEMENTS`; chunk c covers elements ``start[c] : start[c] + length[c]`` of tensor
  ``tensor[c]``. Programs of a launch take chunks, so thousands of parameter tensors cost one
  launch, and a chunk's ``start`` is int64 (P may exceed 2³¹ elements).
- the row-pointer table ``[K, T]``: the address of ``rows[i][k]`` at ``k * T + i``. It is cached
  by the pieces' addresses in task-major order (:meth:`TaskGradients.flat_pieces`), read with
  one C-level pass over the pieces.
- the output table ``[K]``: the address of the combine pass's destination for tensor k.

Tables are cached by their contents (the sizes, or the addresses), so a step that sees the same
tensors again (the caching allocator hands a training loop the same addresses step after step)
copies nothing to the device, and a CUDA graph replays with the tables it captured.

A whole step captured in a CUDA graph meets new tensors (the graph's own memory pool): their
tables are copied from pinned host memory by a copy the graph records and repeats at every
replay, from entries that are never reused (:class:`_CaptureStaging`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..task_gradients import TaskGradients

#: Elements in a chunk: the unit of work a program takes. A multiple of every block size, so that
#: only a tensor's last chunk has a partial tile; large enough that the table stays small
#: (8 K chunks for P = 2²⁷), small enough to balance ~500 programs.
CHUNK_ELEMENTS = 1 << 14

#: The kernels claim 16-byte alignment (for 128-bit loads) only when every address has it.
VECTOR_BYTES = 16


class RowTables(NamedTuple):
    """The tables of one :class:`TaskGradients`: what both passes over it read."""

    #: int64 ``[3, C]``: tensor, start and length of each chunk.
    chunks: Tensor
    num_chunks: int
    #: int64 ``[K, T]``: the address of ``rows[i][k]`` at ``[k, i]``.
    row_pointers: Tensor
    #: Every piece starts on a :data:`VECTOR_BYTES` boundary.
    aligned: bool


class _CaptureStaging:
    """Pinned host memory for the tables made while a CUDA graph is captured.

    The graph records their host-to-device copies and repeats them at every replay, reading the
    host side again: a staged entry is therefore never overwritten or freed. Pinned memory cannot
    be allocated during a capture, so eager calls keep room in reserve (twice the entries of each
    table they build or find: a capture of the same step needs its row and output tables once).
    """

    #: Entries of the smallest buffer (32 KiB).
    MIN_ENTRIES = 4096

    def __init__(self, pin_memory: bool = True) -> None:
        # Unpinned only in CPU tests of the bookkeeping (a CPU-only torch cannot pin).
        self._pin_memory = pin_memory
        self._buffer: Tensor | None = None
        self._used = 0
        # Earlier buffers: graphs may still replay copies from them.
        self._retired: list[Tensor] = []

    def reserve(self, entries: int) -> None:
        """Outside a capture: make sure ``entries`` are free for the next capture."""
        if self._buffer is not None and self._buffer.numel() - self._used >= entries:
            return
        if self._buffer is not None:
            self._retired.append(self._buffer)
        self._buffer = torch.empty(max(entries, self.MIN_ENTRIES), dtype=torch.int64, pin_memory=self._pin_memory)
        self._used = 0

    def stage(self, values: Tensor) -> Tensor:
        """During a capture: ``values`` copied into entries that nothing will write again."""
        count = values.numel()
        if self._buffer is None or self._buffer.numel() - self._used < count:
            raise RuntimeError(
                "the Triton backend has no pinned memory in reserve for the tables of a CUDA graph "
                "capture; run the step once eagerly, on tensors of the same sizes, before capturing it"
            )
        staged = self._buffer[self._used : self._used + count]
        self._used += count
        return staged.copy_(values)


class DeviceTable(NamedTuple):
    """A table on the device, and whether its every value is a multiple of :data:`VECTOR_BYTES`
    (for a table of addresses: every address allows 128-bit accesses), found once when built."""

    values: Tensor
    aligned: bool


class _DeviceTableCache:
    """int64 device tables keyed by their contents, least recently used evicted first.

    A table read by a kernel captured in a CUDA graph must outlive the graph: tables looked up
    while a capture is under way are pinned (never evicted), and those made during a capture are
    copied from :class:`_CaptureStaging`.
    """

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: OrderedDict[tuple, DeviceTable] = OrderedDict()
        self._pinned: dict[tuple, DeviceTable] = {}

    def get(self, key: tuple, device: torch.device, build: Callable[[], Tensor]) -> DeviceTable:
        """The table cached under ``key`` on ``device``; ``build()`` makes it on the host first."""
        key = (device, key)
        capturing = is_capturing(device)
        table = self._pinned.get(key)
        if table is not None:
            return table
        table = self._entries.get(key)
        if table is None:
            host = build()
            aligned = not bool((host % VECTOR_BYTES).any())
            if capturing:
                staged = CAPTURE_STAGING.stage(host).to(device, non_blocking=True)
                self._pinned[key] = table = DeviceTable(staged, aligned)
                return table
            table = DeviceTable(_to_device(host, device), aligned)
            self._entries[key] = table
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        if capturing:
            self._pinned[key] = self._entries.pop(key)
        elif device.type == "cuda":
            CAPTURE_STAGING.reserve(2 * table.values.numel())
        return table

    def clear(self) -> None:
        """Forget every table not pinned by a capture."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries) + len(self._pinned)


CAPTURE_STAGING = _CaptureStaging()

# Entries hold their keys (tuples of T·K addresses): a few dozen cover a training loop.
DEVICE_TABLES = _DeviceTableCache(capacity=32)


def is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return host.to(device)
    # From pinned memory the copy is asynchronous: no wait for the device. The caching host
    # allocator keeps the pinned buffer alive until the copy has run.
    return host.pin_memory().to(device, non_blocking=True)


def chunk_spans(sizes: tuple[int, ...]) -> Tensor:
    """The chunk table ``[3, C]`` (tensor, start, length) for shared tensors of ``sizes``, on the
    host. Every chunk but a tensor's last has :data:`CHUNK_ELEMENTS` elements."""
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    counts = (sizes_t + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
    tensor = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    start = (torch.arange(tensor.numel(), dtype=torch.int64) - first_chunk[tensor]) * CHUNK_ELEMENTS
    length = torch.clamp(sizes_t[tensor] - start, max=CHUNK_ELEMENTS)
    return torch.stack([tensor, start, length])


def piece_addresses(grads: TaskGradients) -> tuple[int, ...]:
    """The addresses of ``grads``' pieces, task-major, read once per object (a C-level pass)."""
    return grads.derived("piece addresses", lambda: tuple(map(Tensor.data_ptr, grads.flat_pieces())))


def row_tables(grads: TaskGradients) -> RowTables:
    """The device tables of ``grads``: found or built on its first pass, kept for the others."""
    # Under capture the lookups must go through the device cache, which pins what a graph reads.
    if is_capturing(grads.device):
        return _row_tables(grads)
    return grads.derived("triton row tables", lambda: _row_tables(grads))


def _row_tables(grads: TaskGradients) -> RowTables:
    addresses = piece_addresses(grads)
    chunks = DEVICE_TABLES.get(("chunks", grads.sizes), grads.device, lambda: chunk_spans(grads.sizes)).values
    pointers = DEVICE_TABLES.get(
        ("task-major addresses", addresses),
        grads.device,
        lambda: _int64(addresses).view(grads.num_tasks, len(grads.sizes)).T.flatten(),
    )
    return RowTables(chunks=chunks, num_chunks=chunks.shape[1], row_pointers=pointers.values, aligned=pointers.aligned)


def output_table(outs: list[Tensor]) -> DeviceTable:
    """The output table ``[K]`` of the combine pass (the destinations' addresses)."""
    addresses = tuple(map(Tensor.data_ptr, outs))
    return DEVICE_TABLES.get(("addresses", addresses), outs[0].device, lambda: _int64(addresses))


def index_table(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A small int64 table of ``values`` on ``device`` (cached like the others)."""
    return DEVICE_TABLES.get(("indices", values), device, lambda: _int64(values)).values


def _int64(values: tuple[int, ...]) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)
