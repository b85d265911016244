"""What a weighting is: a map from (losses, Gram matrix) to T task weights, on the device."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .task_orders import SeededGenerators

#: Which entries of the Gram matrix a weighting reads. "diagonal": the squared norms only;
#: "diagonal_and_total": those and the sum of all entries, 1ᵀG1 = ‖Σ_i g_i‖²; "full": all of G.
#: A step in memory mode forms all of G (by one vectorised backward) only for a weighting that reads
#: it all; one that reads less gets, from T backward passes, a matrix with the exact diagonal (and
#: exact total), other entries undefined.
GramUse = Literal["diagonal", "diagonal_and_total", "full"]

#: A per-task option (a preference, a reference point): T numbers, or a tensor that may live on the
#: losses' device (a list is copied there at each call).
Vector = Sequence[float] | Tensor


class Weighting:
    """Base of the weightings: ``weighting(losses, gram) -> weights``.

    ``losses`` is ``[T]`` (detached), ``gram`` the ``[T, T]`` float32 Gram matrix of the task
    gradients on the shared parameters. The weights, ``[T]`` on the losses' device, are held
    constant by the step: the update is the gradient of Σ_i w_i L_i. Subclasses implement
    :meth:`weights` with tensor ops only (no ``.item()``, no data-dependent Python branch), so a
    step stays capturable in a CUDA graph, and declare :attr:`gram_use`.
    """

    gram_use: GramUse = "full"
    #: Whether the weights depend on the loss values (not only on their device and dtype).
    reads_losses: bool = False
    #: Whether the weights depend on G at all. A step skips a weighting that does when G holds a
    #: non-finite value (a gradient norm beyond float32's range among them); one that does not
    #: (equal weighting) is skipped only when what the step writes is not finite.
    reads_gram: bool = True
    #: ε in the relative contributions r_i = L_i / (‖g_i‖ + ε) a step records
    #: (``StepRecord.relative_contributions``); a weighting with an ``eps`` of its own on the
    #: gradient norms (EMTL, gradient-norm scaling) records with that one.
    contribution_eps: float = 1e-8

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        raise NotImplementedError

    def random_source(self) -> SeededGenerators | None:
        """Where the weights' random draws come from (PCGrad's and GradVac's task orders, RLW's
        weights); None for a weighting that draws nothing. Under data parallelism every rank
        must draw alike: :class:`~emtl_kernels.distributed.DistributedMTLStep` checks and shares
        the seed through it."""
        return None

    def __call__(self, losses: Tensor, gram: Tensor) -> Tensor:
        check_weighting_inputs(losses, gram)
        return self.weights(losses, gram)

    def after_backward(self, losses: Tensor, skipped: Tensor) -> None:
        """Called by the step once it has written (or skipped) the update weighted by this
        weighting: ``losses`` ``[T]`` as given to the weights, ``skipped`` the step's 0-dim bool.
        A stateful weighting updates its state here, with tensor ops (a loss history, the
        gradient of its own learnable parameters); the others have nothing to do."""

    def after_optimizer_step(self, losses: Tensor) -> None:
        """The losses ``[T]`` of the same batch after the optimiser step, for a weighting that
        learns from the change the step made (FAMO); nothing for the others."""


class FunctionWeighting(Weighting):
    """A :class:`Weighting` made of a pure weights function and fixed keyword options.

    Subclasses set :attr:`function` (a ``staticmethod``) and give ``__init__`` the options with
    their defaults, check them, and pass them on to ``super().__init__``. The function is a public
    ``*_weights`` function, which checks its inputs itself: calling the weighting checks them once,
    there.
    """

    #: ``function(losses, gram, **options) -> weights``.
    function: Callable[..., Tensor]

    def __init__(self, **options):
        self.options = options

    def __call__(self, losses: Tensor, gram: Tensor) -> Tensor:
        return self.weights(losses, gram)

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return self.function(losses, gram, **self.options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


def check_weighting_inputs(losses: Tensor, gram: Tensor) -> None:
    """Shape, dtype and device checks shared by every weighting (metadata only, no sync)."""
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor [T], got shape {tuple(losses.shape)}")
    num_tasks = losses.numel()
    if gram.shape != (num_tasks, num_tasks):
        raise ValueError(f"gram must be [T, T] = [{num_tasks}, {num_tasks}], got {tuple(gram.shape)}")
    if not (losses.is_floating_point() and gram.is_floating_point()):
        raise TypeError(f"losses and gram must be floating point, got {losses.dtype} and {gram.dtype}")
    if losses.device != gram.device:
        raise ValueError(f"losses are on {losses.device}, gram on {gram.device}")


def compute_dtype(losses: Tensor) -> torch.dtype:
    """Weights are computed in float32, or in float64 when the losses are float64."""
    return torch.promote_types(losses.dtype, torch.float32)


def task_norms(gram: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The gradient norms c_i = sqrt(G_ii) and the mask of tasks with c_i > 0.

    A task with c_i = 0 has no gradient on the shared parameters (no path to them, or an exactly
    zero gradient); the weightings leave it out of every task average and give it weight 1 (the
    Gram-matrix methods: see :func:`fill_zero_gradient_tasks` and each method's docstring).
    """
    norms = gram.diagonal().to(dtype).clamp_min(0).sqrt()
    return norms, norms > 0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty), without a host sync."""
    count = mask.sum().clamp_min(1).to(values.dtype)
    return torch.where(mask, values, 0).sum() / count


def fill_zero_gradient_tasks(weights: Tensor, has_gradient: Tensor, neutral: float) -> Tensor:
    """``weights`` with every task that has no gradient on the shared parameters given the mean
    weight of the tasks that have one, so that its head trains at the scale of a typical task;
    ``neutral`` for all tasks when none has a gradient (the update is then zero whatever they are).

    Such a task cannot change the shared update (g_i = 0), so the solvers that need G to be
    definite on the tasks they weigh (IMTL-G, MGDA, CAGrad, Nash-MTL, Aligned-MTL) leave it out.
    """
    fill = torch.where(has_gradient.any(), masked_mean(weights, has_gradient), neutral)
    return torch.where(has_gradient, weights, fill)


def check_number(name: str, value: object, *, positive: bool = False) -> None:
    """Raise unless ``value`` is a finite real number ≥ 0 (> 0 when ``positive``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        valid = False
    else:
        valid = value > 0 if positive else value >= 0
    if not valid:
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def check_vector(name: str, vector: object, num_tasks: int | None) -> None:
    """Raise unless ``vector`` is None, a tensor or a sequence of numbers, of T entries when the
    number of tasks is known (its values are not read: a tensor may live on the device)."""
    if vector is None:
        return
    if not isinstance(vector, (Sequence, Tensor)) or isinstance(vector, str):
        raise ValueError(f"{name} must be a sequence of T numbers, a tensor or None, got {vector!r}")
    if num_tasks is not None and len(vector) != num_tasks:
        raise ValueError(f"{name} has {len(vector)} entries, for T={num_tasks} losses")


def check_count(name: str, value: object) -> None:
    """Raise unless ``value`` is an int ≥ 1 (an iteration count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
