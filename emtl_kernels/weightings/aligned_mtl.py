"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023, arXiv 2305.19000).

Aligned-MTL replaces the task gradients by the closest matrix whose singular values are all
equal, so that no task dominates the update through the conditioning of J. With the
eigen-decomposition G = V Λ Vᵀ restricted to its rank r (eigenvalues above T·eps·λ_max), the
aligned gradients are B J with the balance matrix

    B = √σ · V Λ^{-1/2} Vᵀ,      so that (B J)(B J)ᵀ = B G B = σ · V Vᵀ,

σ being the smallest kept eigenvalue ("min", the paper's choice and the default of the authors'
code), their median ("median") or their mean ("rmse"), the three modes of the authors' code. The
update is the mean of the aligned gradients, (1/T) Σ_i (B J)_i = Jᵀ (B π) with π = 1/T: the
weights are α = B π, as in TorchJD's ``AlignedMTLWeighting``, which this follows. The authors'
code (SamsungLabs/MTL) and LibMTL's ``Aligned_MTL`` sum the aligned gradients instead: their
weights are B·1 = T·α, an update T times as long.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import _compiled
from ._solvers import EigenSolver, check_eigen_solver, kept_eigenvalues, symmetric_eigh, trace_normalized
from .base import (
    FunctionWeighting,
    check_weighting_inputs,
    compute_dtype,
    fill_zero_gradient_tasks,
    masked_mean,
    task_norms,
)

ScaleMode = Literal["min", "median", "rmse"]
_SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_weights(
    losses: Tensor, gram: Tensor, *, scale_mode: ScaleMode = "min", eigen_solver: EigenSolver = "auto"
) -> Tensor:
    """Aligned-MTL task weights ``[T]``; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        scale_mode: the common singular value² σ of the aligned gradients: "min" (default),
            "median" (lower median, as ``torch.median``) or "rmse" (mean) of the kept eigenvalues.
        eigen_solver: "auto" (LAPACK on the CPU, Jacobi sweeps elsewhere, so that a CUDA step
            never waits on the host), "lapack" or "jacobi". On a CPU tensor "auto" and "lapack"
            run the whole method compiled, in float64 (LAPACK's dsyevd); the rank cut stays that
            of the weights' dtype.

    The eigen-decomposition is of G / tr(G): B is unchanged by a common scale of the gradients.

    Degenerate inputs: T = 1 gives weight 1. A rank-deficient G is aligned on its range only
    (identical gradients: one kept direction, weights 1/T). With G = 0 (no kept eigenvalue) B is
    the identity, as in TorchJD, so the weights are 1/T. A task with a zero gradient lies in the
    null space, where B is 0; it gets the mean weight of the others rather than 0 (TorchJD: 0), so
    its head still trains. In float32 eigenvalues below T·1.2e-7·λ_max count as zero: gradients
    whose norms differ by more than about 1e3 lose the smaller direction (float64: about 1e7).
    """
    check_weighting_inputs(losses, gram)
    _check_options(scale_mode, eigen_solver)
    if eigen_solver != "jacobi" and _compiled.runs_compiled(gram):
        return _compiled.ops().aligned_mtl_weights(losses, gram, scale_mode)
    dtype = compute_dtype(losses)
    num_tasks = losses.numel()
    _, has_gradient = task_norms(gram, dtype)
    values, vectors = symmetric_eigh(trace_normalized(gram.to(dtype)), eigen_solver)
    kept = kept_eigenvalues(values)
    rank = kept.sum()
    inverse_root = torch.where(kept, torch.rsqrt(torch.where(kept, values, 1)), 0)
    scale = _common_value(values, kept, rank, scale_mode)
    mean = torch.full((num_tasks,), 1 / num_tasks, dtype=dtype, device=losses.device)
    aligned = scale.sqrt() * (vectors @ (inverse_root * (vectors.mT @ mean)))
    weights = torch.where(rank > 0, aligned, mean)
    return fill_zero_gradient_tasks(weights, has_gradient, neutral=1 / num_tasks)


def _common_value(values: Tensor, kept: Tensor, rank: Tensor, scale_mode: str) -> Tensor:
    """σ from the kept eigenvalues, which are the last ``rank`` of the ascending ``values``."""
    num_tasks = values.numel()
    if scale_mode == "rmse":
        return masked_mean(values, kept)
    # "median": torch.median's lower median of the kept values, located without leaving the device.
    index = num_tasks - rank if scale_mode == "min" else num_tasks - rank + (rank - 1).clamp_min(0) // 2
    return values.gather(0, index.clamp(max=num_tasks - 1).reshape(1))[0].clamp_min(0)


def _check_options(scale_mode: str, eigen_solver: str) -> None:
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}")
    check_eigen_solver(eigen_solver)


class AlignedMTL(FunctionWeighting):
    """:func:`aligned_mtl_weights` with fixed options, as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(aligned_mtl_weights)

    def __init__(self, scale_mode: ScaleMode = "min", eigen_solver: EigenSolver = "auto"):
        _check_options(scale_mode, eigen_solver)
        super().__init__(scale_mode=scale_mode, eigen_solver=eigen_solver)
