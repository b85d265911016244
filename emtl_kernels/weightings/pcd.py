"""PCD: priority-constrained descent ("Not All Objectives Are Born Equal:
Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR 2026,
arXiv 2606.29521).

Task 0 is the primary objective, the others secondary. With g̃_i = s_i g_i the gradients normalised
by s_i = 1 / √(v̂_i + ε), v̂_i the bias-corrected moving average (rate 1 − β) of ‖g_i‖² over the
steps, PCD follows the primary gradient as closely as the secondaries allow:

    d̃ = argmin_d ½ ‖d − g̃_0‖²   subject to   g̃_jᵀ d ≥ τ_j ‖g̃_j‖²  for every j ≥ 1,

and the update is d̃ rescaled to ‖g_0‖. By the KKT conditions d̃ = g̃_0 + Σ_j μ_j g̃_j with μ ≥ 0 the
solution of the dual, a non-negative QP on G alone:

    μ = argmin_{μ ≥ 0} ½ μᵀ G̃_s μ − bᵀμ,   G̃_s = (G̃_jk)_{j,k ≥ 1},   b_j = τ_j G̃_jj − G̃_j0,

solved on a CPU tensor exactly by the compiled active-set solver
(``torch.ops.emtl_solvers.pcd_weights``, from the scales on), elsewhere by the interior point of
:func:`~emtl_kernels.weightings._solvers.minimize_on_orthant` in float64 on the device. TorchJD's
``PCDWeighting`` solves the same QP exactly by Goldfarb and Idnani's active-set method on the
host: the compiled solve gives its update to rounding, the interior point to its own accuracy.
The moving average stays in tensor ops on either path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from ._solvers import IPM_ITERATIONS, minimize_on_orthant
from .base import check_count, check_number, compute_dtype
from .stateful import StatefulWeighting, continued_state, finite_inputs

#: A constraint broken by at most this fraction of max_j G̃_jj counts as satisfied. When the
#: constraints cannot all hold, the dual is unbounded: the interior point's μ runs off and the
#: constraints stay broken by far more than this, which is how those cases are recognised.
FEASIBILITY_TOL = 1e-6


class PCD(StatefulWeighting):
    """PCD task weights ``[T]``, as a :class:`~emtl_kernels.weightings.Weighting`; the first task
    is the primary one.

    Args:
        tau: in [0, 1], the fraction τ of its normalised first-order progress each secondary task
            is guaranteed (TorchJD's default, 0.02); a float for all or a ``[T − 1]`` tensor.
        beta: in [0, 1), the decay of the moving average of the squared norms (default 0.999).
        eps: ≥ 0, added to that average before its inverse square root (default 1e-8).
        iterations: interior-point iterations of the tensor-op solver (default 30; the compiled
            CPU solver is exact).

    State: the moving average of ‖g_i‖² (``sq_norm_average``) and the number of steps it holds
    (``steps``), float64 tensors on the device; :meth:`reset` clears both.

    Cases, as TorchJD's: g_0 = 0 gives zero weights; constraints that cannot hold together (two
    opposite secondary gradients) are dropped, and the weights give g_0 alone; a d̃ that is zero up
    to the rounding of G gives zero weights. A secondary task with a zero gradient has a
    constraint 0 ≥ 0 and weight 0.
    """

    def __init__(
        self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8, iterations: int = IPM_ITERATIONS
    ):
        if isinstance(tau, Tensor):
            if tau.dim() != 1:
                raise ValueError(f"tau must be a float or a [T - 1] tensor, got shape {tuple(tau.shape)}")
        else:
            check_number("tau", tau)
            if tau > 1:
                raise ValueError(f"tau must be in [0, 1], got {tau!r}")
        check_number("beta", beta)
        if beta >= 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        check_number("eps", eps)
        check_count("iterations", iterations)
        self.tau, self.beta, self.eps, self.iterations = tau, beta, eps, iterations
        #: ``[T]`` moving average of the squared gradient norms (not bias-corrected), or None.
        self.sq_norm_average: Tensor | None = None
        #: 0-dim count of the steps the average holds, or None.
        self.steps: Tensor | None = None

    def reset(self) -> None:
        self.sq_norm_average = None
        self.steps = None

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        num_tasks = losses.numel()
        device = losses.device
        taus = self._taus(num_tasks, device)
        scales = self._update_scales(gram.diagonal().to(torch.float64), finite_inputs(losses, gram))
        if _compiled.runs_compiled(gram):
            return _compiled.ops().pcd_weights(losses, gram, scales, taus)
        return self._solve_by_interior_point(gram, scales, taus).to(compute_dtype(losses))

    def _solve_by_interior_point(self, gram: Tensor, scales: Tensor, taus: Tensor) -> Tensor:
        """The tensor-op solve of :meth:`weights` from the scales on, in float64 (the rounding of
        G's own dtype sizes the test of a zero update)."""
        num_tasks = gram.shape[-1]
        precision = 10 * torch.finfo(gram.dtype).eps
        gram64 = gram.to(torch.float64)
        sq_norms = gram64.diagonal()
        normalized = gram64 * torch.outer(scales, scales)
        multipliers = torch.ones(num_tasks, dtype=torch.float64, device=gram64.device)
        if num_tasks > 1:
            multipliers = torch.cat([multipliers[:1], self._dual_solution(normalized, taus)])
        direction_sq_norm = multipliers @ normalized @ multipliers
        # The rounding of d̃'s squared norm when formed from G, from the entries it sums.
        magnitude = (multipliers.abs() @ normalized.diagonal().clamp_min(0).sqrt()).square()
        usable = (sq_norms[0] > 0) & (direction_sq_norm > precision * magnitude)
        rescale = torch.where(usable, sq_norms[0] / torch.where(usable, direction_sq_norm, 1), 0).sqrt()
        return multipliers * scales * rescale

    def _taus(self, num_tasks: int, device: torch.device) -> Tensor:
        if isinstance(self.tau, Tensor):
            if self.tau.shape != (num_tasks - 1,):
                raise ValueError(f"tau has {self.tau.numel()} entries, for {num_tasks - 1} secondary tasks")
            return self.tau.to(dtype=torch.float64, device=device)
        return torch.full((num_tasks - 1,), self.tau, dtype=torch.float64, device=device)

    def _update_scales(self, sq_norms: Tensor, finite: Tensor) -> Tensor:
        """s_i = 1 / √(v̂_i + ε) after this step's squared norms enter the average (0 where that
        is infinite: a gradient that has always been zero, with ε = 0)."""
        self.sq_norm_average, _ = continued_state(
            self.sq_norm_average, tuple(sq_norms.shape), torch.float64, sq_norms.device
        )
        self.steps, _ = continued_state(self.steps, (), torch.float64, sq_norms.device)
        average = self.beta * self.sq_norm_average + (1 - self.beta) * sq_norms
        steps = self.steps + 1
        self.sq_norm_average.copy_(torch.where(finite, average, self.sq_norm_average))
        self.steps.copy_(torch.where(finite, steps, self.steps))
        denominators = (average / (1 - self.beta**steps) + self.eps).sqrt()
        return torch.where(denominators > 0, 1 / torch.where(denominators > 0, denominators, 1), 0)

    def _dual_solution(self, normalized: Tensor, taus: Tensor) -> Tensor:
        """μ ``[T − 1]``, or zeros where the constraints cannot hold together."""
        secondary = normalized[1:, 1:]
        offsets = taus * secondary.diagonal() - normalized[1:, 0]

        def objective(mu: Tensor) -> tuple[Tensor, Tensor]:
            return secondary @ mu - offsets, secondary

        mu = minimize_on_orthant(
            objective, (secondary.shape[0],), dtype=torch.float64, device=secondary.device, iterations=self.iterations
        )
        broken = (offsets - secondary @ mu).max()
        feasible = broken <= FEASIBILITY_TOL * normalized.diagonal().max()
        # A zero secondary gradient leaves its μ_j free (its constraint reads 0 ≥ 0): 0, as TorchJD.
        mu = torch.where(secondary.diagonal() > 0, mu, 0)
        return torch.where(feasible & torch.isfinite(mu).all(), mu, 0)

    def __repr__(self) -> str:
        return f"PCD(tau={self.tau!r}, beta={self.beta}, eps={self.eps})"
