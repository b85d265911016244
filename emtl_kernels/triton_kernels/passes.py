"""The Triton passes over a :class:`TaskGradients`: find (or build) the device tables of its
pieces, pick a tuned launch configuration, launch. One launch per pass, whatever the number of
pieces; nothing here reads a device value on the host.
"""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl
from torch import Tensor

from ..backends.fastest import Fastest, call_key
from ..task_gradients import TaskGradients
from . import tables, tuning
from .combine import combine_t_block, launch_combine
from .gram import gram_t_block, launch_gram

#: Triton's name for each storage dtype.
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: The launch configuration kept per pass and input (:func:`call_key`).
TUNER: Fastest[tuning.LaunchConfig] = Fastest()


def gram(grads: TaskGradients) -> Tensor:
    """G = J Jᵀ in float32, ``[T, T]``, exactly symmetric; one read of J per 8 tasks."""
    return _reduction(grads, norms_only=False)


def sq_norms(grads: TaskGradients) -> Tensor:
    """The squared row norms of J in float32, ``[T]``; one read of J per 32 tasks."""
    return _reduction(grads, norms_only=True)


def combine(grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
    """``outs[k] (+)= Σ_i weights[i] · rows[i][k]``, float32 accumulation, one rounding; rows
    whose weight is exactly zero contribute nothing, even where they hold non-finite values."""
    row_tables = tables.row_tables(grads)
    output_table, outputs_aligned = tables.output_table(outs)
    dtype = TRITON_DTYPES[grads.dtype]

    def run(config: tuning.LaunchConfig) -> None:
        launch_combine(
            row_tables, grads.num_tasks, dtype, weights, output_table, outputs_aligned, config, accumulate=accumulate
        )

    def candidates() -> list[tuning.LaunchConfig]:
        # Registers per element: the tile's rows and the sum.
        return tuning.elementwise_candidates(
            combine_t_block(grads.num_tasks) + 1, _element_bytes(grads), persistent=False
        )

    with _on(grads.device):
        # Timing runs the pass several times: harmless when it overwrites, wrong when it adds.
        config = TUNER.choose(
            call_key("combine", grads),
            candidates,
            lambda config: tuning.milliseconds(run, config),
            may_time=_may_time(grads) and not accumulate,
        )
        run(config)


def _reduction(grads: TaskGradients, *, norms_only: bool) -> Tensor:
    row_tables = tables.row_tables(grads)
    dtype = TRITON_DTYPES[grads.dtype]
    slots = tuning.program_slots(grads.device)

    def run(config: tuning.LaunchConfig) -> Tensor:
        return launch_gram(row_tables, grads.num_tasks, dtype, config, slots, norms_only=norms_only)

    def candidates() -> list[tuning.LaunchConfig]:
        t_block = gram_t_block(grads.num_tasks, norms_only)
        if norms_only:
            # Registers per element: the tile's rows, and their squares.
            return tuning.elementwise_candidates(2 * t_block, _element_bytes(grads), persistent=True)
        return tuning.outer_product_candidates(t_block, _element_bytes(grads))

    with _on(grads.device):
        config = TUNER.choose(
            call_key("norms" if norms_only else "gram", grads),
            candidates,
            lambda config: tuning.milliseconds(run, config),
            may_time=_may_time(grads),
        )
        return run(config)


def _element_bytes(grads: TaskGradients) -> int:
    return grads.rows[0][0].element_size()


def _may_time(grads: TaskGradients) -> bool:
    return not (grads.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
