"""ConFIG: conflict-free inverse gradients (Liu et al., ICLR 2025, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", arXiv 2408.11104, Equation 2).

ConFIG takes the direction whose cosine with every unit task gradient u_i = g_i / c_i is the
preference p_i (1 for every task by default), the minimum-norm solution U⁺p of U x = p, and gives
it the length of the summed projections of the task gradients on it:

    d = U⁺p / ‖U⁺p‖,    update = (Σ_i g_i·d) d.

With D = diag(c) and C = D⁻¹ G D⁻¹ = U Uᵀ, U⁺p = Uᵀ β with β = C⁺ p, so the update is Jᵀw for

    w = s · D⁻¹ β,    s = (Σ_i g_i · Uᵀβ) / ‖Uᵀβ‖² = cᵀ C β / βᵀ C β,

which equals TorchJD's ``aggregation.ConFIG(pref_vector=p)`` output on the task-gradient matrix.
C⁺ drops the eigenvalues at or below T·eps·λ_max, solved in float64 whatever the dtype of G: on a
CPU tensor by a compiled op (``torch.ops.emtl_solvers.config_weights``, LAPACK's dsyevd),
elsewhere by tensor ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from ._solvers import SOLVE_DTYPE, EigenSolver, check_eigen_solver, pinv_apply
from .base import (
    FunctionWeighting,
    Vector,
    check_vector,
    check_weighting_inputs,
    compute_dtype,
    fill_zero_gradient_tasks,
    task_norms,
)


def config_weights(
    losses: Tensor, gram: Tensor, *, preference: Vector | None = None, eigen_solver: EigenSolver = "auto"
) -> Tensor:
    """ConFIG task weights ``[T]`` from the Gram matrix; the losses give the device and dtype only.

    Args:
        losses: ``[T]`` task losses.
        gram: ``[T, T]`` Gram matrix of the task gradients on the shared parameters.
        preference: p ``[T]``, the cosines asked of the update with the task gradients (up to one
            factor); 1 for every task when None. A tensor on the losses' device keeps the step
            capturable in a CUDA graph.
        eigen_solver: how C⁺ is formed; see :func:`~emtl_kernels.weightings._solvers.symmetric_eigh`.
            On a CPU tensor "auto" and "lapack" run the whole method compiled.

    Degenerate inputs: a task with a zero gradient has no unit gradient (TorchJD's zero row of U);
    it is left out of C and gets the mean weight of the others. When p has no part in the range
    of C (the unit gradients cancel) U⁺p = 0, and so is the update: every weight is 0.
    """
    check_weighting_inputs(losses, gram)
    check_vector("preference", preference, losses.numel())
    check_eigen_solver(eigen_solver)
    if eigen_solver != "jacobi" and _compiled.runs_compiled(gram):
        cosines = None if preference is None else torch.as_tensor(preference, dtype=SOLVE_DTYPE)
        return _compiled.ops().config_weights(losses, gram, cosines)
    dtype = SOLVE_DTYPE
    norms, has_gradient = task_norms(gram, dtype)
    safe_norms = torch.where(has_gradient, norms, 1)
    both = has_gradient[:, None] & has_gradient[None, :]
    correlation = torch.where(both, gram.to(dtype) / torch.outer(safe_norms, safe_norms), 0)
    if preference is None:
        target = has_gradient.to(dtype)
    else:
        target = torch.where(has_gradient, torch.as_tensor(preference, dtype=dtype, device=losses.device), 0)
    solution, in_range = pinv_apply(correlation, target, method=eigen_solver)
    solution = torch.where(has_gradient, solution, 0)
    projections = correlation @ solution
    squared_length = solution @ projections
    # Where U⁺p = 0 the solution is rounding noise: its length must not be set from it.
    usable = in_range & (squared_length > 0)
    scale = (norms @ projections) / torch.where(usable, squared_length, 1)
    weights = torch.where(usable, scale * solution / safe_norms, 0).to(compute_dtype(losses))
    return fill_zero_gradient_tasks(weights, has_gradient, neutral=1.0)


class ConFIG(FunctionWeighting):
    """:func:`config_weights` as a :class:`~emtl_kernels.weightings.Weighting`."""

    function = staticmethod(config_weights)

    def __init__(self, preference: Vector | None = None, eigen_solver: EigenSolver = "auto"):
        check_vector("preference", preference, None)
        check_eigen_solver(eigen_solver)
        super().__init__(preference=preference, eigen_solver=eigen_solver)
