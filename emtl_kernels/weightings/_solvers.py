"""The small T×T solvers behind the weightings on devices other than the CPU (and on the CPU when
the compiled extension is not built): fixed iteration counts, tensor ops only.

On a CPU tensor the weightings call the compiled solvers instead (:mod:`._compiled`). The QP
solvers here take their problems in float64 (:data:`SOLVE_DTYPE`) whatever the dtype of G, as
the compiled ones do. Every solver here runs on the device of its inputs with batched tensor ops and a number of
iterations fixed before it starts. None reads a value on the host or branches in Python on one,
so a step that uses them can be captured in a CUDA graph and traced by ``torch.compile``: where an
iteration has converged or a factorisation failed, it stops moving through ``torch.where``, not
through a ``break``. Linear systems go through ``cholesky_ex`` and triangular solves, which report
failure in a tensor instead of reading an error flag on the host as ``torch.linalg.solve`` does.

- :func:`minimize_on_orthant`: a primal-dual interior-point method for a smooth convex objective
  over {x ≥ 0} or the simplex {x ≥ 0, aᵀx = 1}; MGDA, CAGrad, UPGrad and DualProj use it.
- :func:`project_onto_dual_cone`: the non-negative QP behind UPGrad and DualProj.
- :func:`symmetric_eigh`: eigen-decomposition by LAPACK on the CPU and by parallel cyclic Jacobi
  sweeps elsewhere (``torch.linalg.eigh`` on CUDA reads its error flag on the host, which a CUDA
  graph cannot capture); :func:`pinv_apply` builds the pseudo-inverse on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

#: Iterations of :func:`minimize_on_orthant`. On the normalised problems of the weightings, solved
#: in float64, 30 bring the KKT residual to about 1e-11 over random, rank-deficient and
#: 1e-6..1e6-scaled Gram matrices of T ≤ 32 in the tests.
IPM_ITERATIONS = 30
#: Fraction of the way to the boundary of the orthant that an interior-point step may go.
TO_BOUNDARY = 0.995

#: The dtype the weightings' QPs and Newton iterations are solved in, whatever the dtype of G:
#: their accuracy then depends on the conditioning of G, not on float32's rounding.
SOLVE_DTYPE = torch.float64

EigenSolver = Literal["auto", "lapack", "jacobi"]
EIGEN_SOLVERS = ("auto", "lapack", "jacobi")

#: ``objective(x) -> (gradient, Hessian)`` of a smooth convex function, batched over x's leading dims.
Objective = Callable[[Tensor], tuple[Tensor, Tensor]]


def rounding_ridge(num_tasks: int, dtype: torch.dtype) -> float:
    """T·eps: the diagonal added to a trace-normalised Gram matrix so that rounding, which can make
    it slightly indefinite, never breaks a Cholesky factorisation. It moves solutions by O(T·eps)."""
    return num_tasks * torch.finfo(dtype).eps


def trace_normalized(gram: Tensor, threshold: float = 0.0) -> Tensor:
    """G / trace(G), or zeros where the trace is 0 or below ``threshold``: the weightings that
    solve on it are unchanged when every task gradient is scaled by one factor."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    usable = (trace > 0) & (trace >= threshold)
    return torch.where(usable, gram / torch.where(usable, trace, 1), 0)


def spd_solve(matrix: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """X with ``matrix @ X = rhs`` for symmetric positive-definite ``matrix [..., n, n]`` and
    ``rhs [..., n, k]``, and ``ok [...]``: False where the Cholesky factorisation failed (X then
    holds zeros). Nothing here reads the device from the host."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    solution = cholesky_apply(factor, rhs)
    ok = info == 0
    return torch.where(ok[..., None, None], solution, 0).nan_to_num(), ok


def minimize_on_orthant(
    objective: Objective,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    equality: Tensor | None = None,
    iterations: int = IPM_ITERATIONS,
) -> Tensor:
    """Minimise a smooth convex f over x ≥ 0, and over the simplex aᵀx = 1 when ``equality`` a is
    given (``[n]`` or ``[..., n]``, with a positive entry).

    ``objective(x)`` returns (∇f(x) ``[..., n]``, ∇²f(x) ``[..., n, n]`` or ``[n, n]``) for a batch
    ``x`` of ``shape``; the problems of a batch are solved at once and independently.

    The method is a primal-dual interior point with Mehrotra's predictor-corrector and one step
    length for primal and dual variables, started at x = 1/n and z = 1 (z: the multipliers of
    x ≥ 0), run for exactly ``iterations`` iterations (:data:`IPM_ITERATIONS`). Each one factors
    ∇²f + diag(z/x) once and solves with it twice. A problem stops moving once its duality
    measure xᵀz/n is below eps², or where a factorisation fails or a step is not finite.
    """
    stalled = torch.finfo(dtype).eps ** 2
    x = torch.full(shape, 1.0 / shape[-1], dtype=dtype, device=device)
    z = torch.ones_like(x)
    y = torch.zeros_like(x[..., :1])
    for _ in range(iterations):
        grad, hess = objective(x)
        dual_residual = grad - z if equality is None else grad - z - y * equality
        primal_residual = None if equality is None else (equality * x).sum(-1, keepdim=True) - 1
        factor, info = torch.linalg.cholesky_ex(hess + torch.diag_embed(z / x))

        def newton(
            complementarity: Tensor,
            x=x,
            z=z,
            y=y,
            factor=factor,
            dual_residual=dual_residual,
            primal_residual=primal_residual,
        ) -> tuple[Tensor, Tensor, Tensor]:
            # Newton step of: ∇f − z − y·a = 0, aᵀx = 1, x∘z = target, with dz eliminated.
            rhs = -dual_residual - complementarity / x
            if equality is None:
                dx, dy = cholesky_apply(factor, rhs[..., None])[..., 0], torch.zeros_like(y)
            else:
                both = cholesky_apply(factor, torch.stack([rhs, equality.expand_as(rhs)], -1))
                toward, along = both[..., 0], both[..., 1]
                dy = -(primal_residual + (equality * toward).sum(-1, keepdim=True)) / (
                    (equality * along).sum(-1, keepdim=True)
                )
                dx = toward + along * dy
            return dx, (-complementarity - z * dx) / x, dy

        mu = (x * z).mean(-1, keepdim=True)
        dx, dz, _ = newton(x * z)
        reach = step_to_boundary(x, z, dx, dz)
        mu_affine = ((x + reach * dx) * (z + reach * dz)).mean(-1, keepdim=True)
        centering = (mu_affine / mu).clamp(0, 1) ** 3
        dx, dz, dy = newton(x * z + dx * dz - centering * mu)
        step = TO_BOUNDARY * step_to_boundary(x, z, dx, dz)
        moving = (info == 0)[..., None] & (mu > stalled) & torch.isfinite(step)
        moving = moving & torch.isfinite(dx).all(-1, keepdim=True) & torch.isfinite(dy)
        x = torch.where(moving, x + step * dx, x)
        z = torch.where(moving, z + step * dz, z)
        y = torch.where(moving, y + step * dy, y)
    return x


def cholesky_apply(factor: Tensor, columns: Tensor) -> Tensor:
    """X with (L Lᵀ) X = columns ``[..., n, k]``, for the Cholesky factor L."""
    half = torch.linalg.solve_triangular(factor, columns, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def step_to_boundary(x: Tensor, z: Tensor, dx: Tensor, dz: Tensor) -> Tensor:
    """The largest t ≤ 1 with x + t·dx ≥ 0 and z + t·dz ≥ 0 (x, z > 0), per problem."""
    values, steps = torch.cat([x, z], -1), torch.cat([dx, dz], -1)
    shrinking = steps < 0
    ratios = torch.where(shrinking, values / torch.where(shrinking, -steps, 1), math.inf)
    return ratios.amin(-1, keepdim=True).clamp(max=1)


def project_onto_dual_cone(
    gram: Tensor,
    preferences: Tensor,
    *,
    norm_eps: float,
    reg_eps: float,
    iterations: int = IPM_ITERATIONS,
) -> Tensor:
    """Weights v of the projections of Jᵀu onto the dual cone {x : Jx ≥ 0}, one per row u of
    ``preferences [B, T]``: π(Jᵀu) = Jᵀv (Quinton & Rey, arXiv 2406.16232, Proposition 1), with

        v = argmin_v vᵀ G̃ v   subject to v ≥ u,    G̃ = G / tr(G) + reg_eps · I.

    TorchJD's ``QuadprogProjector`` solves the same problem with quadprog on the host: G is
    normalised by its trace (replaced by zeros when the trace is below ``norm_eps``) and made
    definite by ``reg_eps``. Here v = u + x with x ≥ 0 minimising (u + x)ᵀG̃(u + x), by
    :func:`minimize_on_orthant` in float64, all rows at once; v comes back in the preferences' dtype.
    """
    dtype = SOLVE_DTYPE
    num_tasks = gram.shape[-1]
    wide_preferences = preferences.to(dtype)
    eye = torch.eye(num_tasks, dtype=dtype, device=gram.device)
    regularized = trace_normalized(gram.to(dtype), norm_eps) + (reg_eps + rounding_ridge(num_tasks, dtype)) * eye

    def objective(x: Tensor) -> tuple[Tensor, Tensor]:
        return (x + wide_preferences) @ regularized, regularized

    shift = minimize_on_orthant(
        objective, tuple(preferences.shape), dtype=dtype, device=gram.device, iterations=iterations
    )
    return (wide_preferences + shift).to(preferences.dtype)


def symmetric_eigh(matrix: Tensor, method: EigenSolver = "auto") -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of a symmetric ``[n, n]``.

    ``method``: "lapack" (``torch.linalg.eigh``), "jacobi" (:func:`jacobi_eigh`), or "auto":
    LAPACK on the CPU, where it is fastest and waits on nothing, Jacobi on any other device, where
    ``torch.linalg.eigh`` reads an error flag on the host and cannot be captured in a CUDA graph.
    """
    check_eigen_solver(method)
    if method == "lapack" or (method == "auto" and matrix.device.type == "cpu"):
        return torch.linalg.eigh(matrix)
    return jacobi_eigh(matrix)


def check_eigen_solver(method: object) -> None:
    """Raise unless ``method`` names an eigen solver of :func:`symmetric_eigh`."""
    if method not in EIGEN_SOLVERS:
        raise ValueError(f"eigen_solver must be one of {EIGEN_SOLVERS}, got {method!r}")


def jacobi_sweeps(size: int) -> int:
    """Sweeps :func:`jacobi_eigh` runs: ⌈log2 n⌉ + 5. Cyclic Jacobi converges quadratically once
    the off-diagonal part is small; with this count the relative residual of V Λ Vᵀ is below
    1e-13 in float64 for n ≤ 32 (about 1e-10 for n = 64) on random, low-rank, repeated-row and
    1e-3..1e3-scaled Gram matrices, and at rounding level in float32."""
    return math.ceil(math.log2(max(size, 2))) + 5


def jacobi_eigh(matrix: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric ``[n, n]`` matrix by parallel cyclic Jacobi rotations.

    A sweep visits every pair (p, q) once, in n − 1 rounds of n/2 disjoint pairs (round-robin
    order); the rotations of a round (Golub & Van Loan, Algorithm 8.5.2) are applied together as
    one orthogonal matrix. An odd n is padded with a zero row and column. Runs ``sweeps`` sweeps
    (default :func:`jacobi_sweeps`); eigenvalues come out ascending.
    """
    size = matrix.shape[-1]
    padded = size + size % 2
    work = torch.zeros(padded, padded, dtype=matrix.dtype, device=matrix.device)
    work[:size, :size] = (matrix + matrix.mT) / 2
    vectors = torch.eye(padded, dtype=matrix.dtype, device=matrix.device)
    first, second = _round_robin(padded, matrix.device)
    for _ in range(jacobi_sweeps(size) if sweeps is None else sweeps):
        for p, q in zip(first, second, strict=True):
            rotation = _jacobi_rotation(work, p, q)
            work = rotation.mT @ work @ rotation
            vectors = vectors @ rotation
    values = work.diagonal()[:size]
    order = values.argsort()
    # Every rotation that touches the padding index has a zero off-diagonal entry, hence angle 0:
    # the padding never mixes with the other indices, and cutting it off leaves an orthonormal basis.
    return values[order], vectors[:size, :size][:, order]


def _jacobi_rotation(work: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """The orthogonal matrix that zeroes work[p_k, q_k] for every pair k at once, each by the
    smaller of the two angles that do so."""
    app, aqq, apq = work[p, p], work[q, q], work[p, q]
    nonzero = apq != 0
    tau = (aqq - app) / torch.where(nonzero, 2 * apq, 1)
    sign = torch.where(tau >= 0, 1.0, -1.0).to(work.dtype)
    tangent = torch.where(nonzero, sign / (tau.abs() + torch.hypot(torch.ones_like(tau), tau)), 0)
    cosine = torch.rsqrt(1 + tangent * tangent)
    sine = tangent * cosine
    rotation = torch.zeros_like(work)
    rotation[p, p] = cosine
    rotation[q, q] = cosine
    rotation[p, q] = sine
    rotation[q, p] = -sine
    return rotation


def _round_robin(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """n − 1 rounds of n/2 disjoint pairs (p, q) that cover every pair of 0..n−1 once, as two
    ``[n − 1, n/2]`` index tensors (circle method: seat 0 stays, the others turn one seat a round).

    Built by arithmetic on the device: an index tensor made from a host list would be a
    host-to-device copy, which a CUDA graph cannot capture."""
    rounds = torch.arange(size - 1, device=device)[:, None]
    seats = torch.arange(size // 2, device=device)[None, :]

    def player(seat: Tensor) -> Tensor:
        return torch.where(seat == 0, 0, (seat - 1 - rounds) % (size - 1) + 1)

    return player(seats), player(size - 1 - seats)


def kept_eigenvalues(values: Tensor) -> Tensor:
    """Mask of the eigenvalues (ascending) above n·eps·λ_max: the default cut of
    ``torch.linalg.pinv`` and the rank test of Aligned-MTL; the others count as zero."""
    return values > values.shape[-1] * torch.finfo(values.dtype).eps * values[-1].clamp_min(0)


def pinv_apply(matrix: Tensor, rhs: Tensor, *, method: EigenSolver = "auto") -> tuple[Tensor, Tensor]:
    """M⁺ rhs for a symmetric PSD ``matrix [n, n]`` and ``rhs [n]``: the minimum-norm
    least-squares solution of M x = rhs, directions of eigenvalues cut by
    :func:`kept_eigenvalues` dropped; and a 0-dim bool, whether rhs has a part in the range of M
    above rounding (10·n·eps·‖rhs‖). Where it has none the exact solution is 0, and the one
    computed is rounding noise that a caller must not rescale."""
    values, vectors = symmetric_eigh(matrix, method)
    kept = kept_eigenvalues(values)
    inverse = torch.where(kept, 1 / torch.where(kept, values, 1), 0)
    along = torch.where(kept, vectors.mT @ rhs, 0)
    in_range = along.norm() > 10 * rhs.shape[-1] * torch.finfo(rhs.dtype).eps * rhs.norm()
    return vectors @ (inverse * along), in_range
