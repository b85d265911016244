"""The Triton passes over a :class:`TaskGradients`: find (or build) the device tables of its
pieces, pick a tuned launch configuration, launch. One launch per pass, whatever the number of
pieces; nothing here reads a device value on the host.

What a call launches is kept per pass and input (:func:`_input_key`: device, dtype, T, the shared
tensors' sizes and the pieces' addresses; for the combine also its destinations' addresses and
whether it adds): a steady-state training step, whose new tensors take the previous step's
memory, then costs a lookup, its allocations and its launches. A call inside a CUDA graph
capture builds its launcher again: its table lookups pin what the graph reads. An eager call that
finds its launcher keeps pinned memory in reserve for a capture's tables, as one that looks its
tables up does (:class:`~emtl_kernels.triton_kernels.tables._CaptureStaging`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton.language as tl
from torch import Tensor

from ..backends.fastest import Fastest, call_key
from ..task_gradients import TaskGradients
from . import tables, tuning
from .combine import combine_launcher, combine_t_block
from .gram import gram_launcher, gram_t_block

#: Triton's name for each storage dtype.
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: The launch configuration kept per pass and input (:func:`call_key`).
TUNER: Fastest[tuning.LaunchConfig] = Fastest()


class _Launcher(NamedTuple):
    """A pass ready to launch on one input, and the entries of the largest table it reads."""

    launch: Callable
    table_entries: int


# Launchers by input: each holds its tables, so a few dozen cover a training loop.
_LAUNCHERS: OrderedDict[tuple, _Launcher] = OrderedDict()
_LAUNCHERS_KEPT = 64


def gram(grads: TaskGradients) -> Tensor:
    """G = J Jᵀ in float32, ``[T, T]``, exactly symmetric; one read of J per 8 tasks."""
    return _reduction(grads, norms_only=False)


def sq_norms(grads: TaskGradients) -> Tensor:
    """The squared row norms of J in float32, ``[T]``; one read of J per 32 tasks."""
    return _reduction(grads, norms_only=True)


def combine(grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
    """``outs[k] (+)= Σ_i weights[i] · rows[i][k]``, float32 accumulation, one rounding; rows
    whose weight is exactly zero contribute nothing, even where they hold non-finite values."""
    key = ("combine", *_input_key(grads), tuple(map(Tensor.data_ptr, outs)), accumulate)
    with _on(grads.device):
        _launcher(key, grads.device, lambda: _combine_launcher(grads, weights, outs, accumulate))(weights)


def clear() -> None:
    """Forget every tuned configuration and kept launcher."""
    TUNER.clear()
    _LAUNCHERS.clear()


def _reduction(grads: TaskGradients, *, norms_only: bool) -> Tensor:
    kind = "norms" if norms_only else "gram"
    with _on(grads.device):
        key = (kind, *_input_key(grads))
        return _launcher(key, grads.device, lambda: _reduction_launcher(grads, kind, norms_only))()


def _input_key(grads: TaskGradients) -> tuple:
    return grads.device, grads.dtype, grads.num_tasks, grads.sizes, tables.piece_addresses(grads)


def _launcher(key: tuple, device: torch.device, build: Callable[[], tuple[_Launcher, bool]]) -> Callable:
    """The launch kept under ``key``, or the one ``build()`` makes (kept if it says so)."""
    capturing = tables.is_capturing(device)
    launcher = None if capturing else _LAUNCHERS.get(key)
    if launcher is not None:
        _LAUNCHERS.move_to_end(key)
        if device.type == "cuda":
            tables.CAPTURE_STAGING.reserve(2 * launcher.table_entries)
        return launcher.launch
    launcher, keep = build()
    if keep and not capturing:
        _LAUNCHERS[key] = launcher
        while len(_LAUNCHERS) > _LAUNCHERS_KEPT:
            _LAUNCHERS.popitem(last=False)
    return launcher.launch


def _reduction_launcher(grads: TaskGradients, kind: str, norms_only: bool) -> tuple[_Launcher, bool]:
    """The launcher of a Gram or norms pass over ``grads``, tuned on them on the first call of
    its kind, and whether its configuration is the kept one."""
    row_tables = tables.row_tables(grads)
    dtype = TRITON_DTYPES[grads.dtype]
    slots = tuning.program_slots(grads.device)

    def launcher(config: tuning.LaunchConfig) -> Callable[[], Tensor]:
        return gram_launcher(row_tables, grads.num_tasks, dtype, config, slots, norms_only=norms_only)

    def candidates() -> list[tuning.LaunchConfig]:
        t_block = gram_t_block(grads.num_tasks, norms_only)
        if norms_only:
            # Registers per element: the tile's rows, and their squares.
            return tuning.elementwise_candidates(2 * t_block, _element_bytes(grads), persistent=True)
        return tuning.outer_product_candidates(t_block, _element_bytes(grads))

    key = call_key(kind, grads)
    config = TUNER.choose(
        key,
        candidates,
        lambda config: tuning.milliseconds(lambda c: launcher(c)(), config),
        may_time=not tables.is_capturing(grads.device),
    )
    return _Launcher(launcher(config), _largest(row_tables)), TUNER.kept(key) == config


def _combine_launcher(
    grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool
) -> tuple[_Launcher, bool]:
    """The launcher of a combine pass over ``grads`` into ``outs``, tuned on them on the first
    call that overwrites, and whether its configuration is the kept one."""
    row_tables = tables.row_tables(grads)
    outputs = tables.output_table(outs)
    dtype = TRITON_DTYPES[grads.dtype]

    def launcher(config: tuning.LaunchConfig) -> Callable[[Tensor], None]:
        return combine_launcher(row_tables, grads.num_tasks, dtype, outputs, config, accumulate=accumulate)

    def candidates() -> list[tuning.LaunchConfig]:
        # Registers per element: the tile's rows and the sum.
        return tuning.elementwise_candidates(
            combine_t_block(grads.num_tasks) + 1, _element_bytes(grads), persistent=False
        )

    key = call_key("combine", grads)
    config = TUNER.choose(
        key,
        candidates,
        # Timing runs the pass several times: harmless when it overwrites, wrong when it adds.
        lambda config: tuning.milliseconds(lambda c: launcher(c)(weights), config),
        may_time=not (accumulate or tables.is_capturing(grads.device)),
    )
    return _Launcher(launcher(config), _largest(row_tables, outputs.values)), TUNER.kept(key) == config


def _largest(row_tables: tables.RowTables, *others: Tensor) -> int:
    return max(row_tables.chunks.numel(), row_tables.row_pointers.numel(), *(table.numel() for table in others))


def _element_bytes(grads: TaskGradients) -> int:
    return grads.rows[0][0].element_size()


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
