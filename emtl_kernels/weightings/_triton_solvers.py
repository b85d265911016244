"""The weightings' small solves in one Triton launch on a GPU, and the choice of path.

On a CUDA tensor the tensor-op solvers of :mod:`._solvers` make thousands of tiny launches a
solve. The functions here make one instead, through custom ops (one program a problem, float64 in
registers, no host read), so a CUDA graph captures them and ``torch.compile`` traces each as one
opaque node:

- :func:`solve_nonnegative_qp`: ``torch.ops.emtl_triton.nonnegative_qp``
  (:mod:`emtl_kernels.triton_kernels.nonnegative_qp`), and the weightings' problems on the same
  kernel, their normalisation and their weights' post-processing in the same launch:
  :func:`project_onto_dual_cone` (UPGrad, DualProj; ``dual_cone_projection``) and
  :func:`min_norm_weights` (MGDA; ``min_norm_weights``);
- :func:`symmetric_eigh`: ``torch.ops.emtl_triton.jacobi_eigh``
  (:mod:`emtl_kernels.triton_kernels.jacobi_eigh`), for IMTL-G and Aligned-MTL.

Where a kernel does not serve (no Triton, not CUDA, T > :data:`MAX_TASKS`), the same problem is
solved by the tensor-op path of :mod:`._solvers`, in float64 for the QP. Triton is imported on
the first solve, not here.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..backends.triton import BACKEND as TRITON_BACKEND
from ..backends.triton import OP_NAMESPACE
from ._solvers import jacobi_eigh as tensor_op_jacobi_eigh
from ._solvers import jacobi_sweeps, minimize_on_orthant, rounding_ridge, trace_normalized
from ._solvers import symmetric_eigh as tensor_op_symmetric_eigh

#: Largest T one program solves: a 64×64 float64 tile is 32 KiB of registers, 8 values a thread
#: over 16 warps; larger tiles would live in local memory.
MAX_TASKS = 64

#: "auto": the Triton kernel on CUDA tensors where it serves, tensor ops elsewhere; "triton":
#: the kernel (on a CPU, Triton's interpreter: the tests); "tensor_ops": the interior point.
SolveMethod = Literal["auto", "triton", "tensor_ops"]
SOLVE_METHODS = ("auto", "triton", "tensor_ops")


def default_max_pivots(num_tasks: int) -> int:
    """Pivots a solve may make: 4T + 8, at least twice what the tests' problems take."""
    return 4 * num_tasks + 8


def default_max_sweeps(size: int) -> int:
    """Sweeps the Jacobi kernel may make: 2·:func:`~._solvers.jacobi_sweeps`, 20 at n = 32. It
    stops sooner, once the off-diagonal part is at rounding level. On the tests' Gram matrices at
    n = 32, V Λ Vᵀ reaches rounding (1e-14 of max |A|) after 7 sweeps where G has full rank and
    after 11 where it has rank 16 or duplicated rows; the tensor-op count, 10, leaves the rank-16
    one at 1e-10 (and the tensor-op Jacobi itself at 2.6e-7)."""
    return 2 * jacobi_sweeps(size)


def triton_solve_unavailable(device: torch.device, num_tasks: int) -> str | None:
    """Why the one-launch kernel cannot solve a T = ``num_tasks`` problem on ``device`` (None: it can)."""
    if num_tasks > MAX_TASKS:
        return f"T = {num_tasks} > {MAX_TASKS}: one program holds at most {MAX_TASKS} tasks in registers"
    return TRITON_BACKEND.unavailable_reason(device)


def runs_on_triton(gram: Tensor) -> bool:
    """Whether a weighting on ``gram [T, T]`` takes the one-launch kernels ("auto"): on a CUDA
    tensor, with Triton usable there, T ≤ :data:`MAX_TASKS`. A property of the device and of T,
    never of the values."""
    return _uses_triton(gram.device, gram.shape[-1], "auto")


def solve_nonnegative_qp(
    matrix: Tensor, linear: Tensor, *, method: SolveMethod = "auto", max_pivots: int | None = None
) -> Tensor:
    """x = argmin ½xᵀQx − bᵀx subject to x ≥ 0, for Q = ``matrix [T, T]`` (symmetric positive
    definite) and each row b of ``linear [B, T]``: ``[B, T]`` in ``linear``'s dtype, solved in
    float64 whatever the inputs' dtype.

    ``method`` picks the path (:data:`SolveMethod`); ``max_pivots`` caps the kernel's active-set
    pivots (default :func:`default_max_pivots`). Where the kernel stops at the cap its x is
    feasible but not optimal; on positive-definite Q the tests never reach it.
    """
    _check_problem(matrix, linear, method, max_pivots)
    num_tasks = matrix.shape[-1]
    if _uses_triton(matrix.device, num_tasks, method):
        pivots = default_max_pivots(num_tasks) if max_pivots is None else max_pivots
        solution, _ = torch.ops.emtl_triton.nonnegative_qp(matrix.contiguous(), linear.contiguous(), pivots)
        return solution
    matrix64, linear64 = matrix.double(), linear.double()

    def objective(x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ matrix64 - linear64, matrix64

    return minimize_on_orthant(objective, tuple(linear.shape), dtype=torch.float64, device=linear.device).to(
        linear.dtype
    )


def project_onto_dual_cone(
    gram: Tensor,
    preferences: Tensor,
    *,
    norm_eps: float,
    reg_eps: float,
    method: SolveMethod = "auto",
    max_pivots: int | None = None,
) -> Tensor:
    """The weights v of :func:`._solvers.project_onto_dual_cone` (UPGrad, DualProj): per row u of
    ``preferences [B, T]``, v = argmin vᵀG̃v subject to v ≥ u with G̃ = G / tr(G) + reg_eps · I
    (+ T·eps₆₄ · I against rounding), normalised and solved in float64, in the preferences'
    dtype: v = u + x, x the non-negative QP with Q = G̃, b = −G̃u. The kernel does all of it in
    one launch."""
    _check_problem(gram, preferences, method, max_pivots)
    num_tasks = gram.shape[-1]
    ridge = reg_eps + rounding_ridge(num_tasks, torch.float64)
    if _uses_triton(gram.device, num_tasks, method):
        pivots = default_max_pivots(num_tasks) if max_pivots is None else max_pivots
        projection, _ = torch.ops.emtl_triton.dual_cone_projection(
            gram.contiguous(), preferences.contiguous(), norm_eps, ridge, pivots
        )
        return projection
    eye = torch.eye(num_tasks, dtype=torch.float64, device=gram.device)
    regularized = trace_normalized(gram.double(), norm_eps) + ridge * eye
    preferences64 = preferences.double()
    shift = solve_nonnegative_qp(regularized, -(preferences64 @ regularized), method="tensor_ops")
    return (preferences64 + shift).to(preferences.dtype)


def min_norm_weights(
    gram: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    ridge: float | None = None,
    method: SolveMethod = "auto",
    max_pivots: int | None = None,
) -> Tensor:
    """MGDA's weights ``[T]`` in ``dtype``: α = argmin αᵀQα over the simplex of the tasks with a
    gradient (G_ii > 0; all tasks where none has one), Q = G / tr(G) + ridge · I (default
    T·eps₆₄), solved in float64; a task without gradient gets the mean weight of the others.

    The KKT conditions of the simplex problem, Qα − λ1 − μ = 0 with λ = αᵀQα > 0, are those of the
    non-negative QP with b = 1 scaled by λ: α = x / Σx for x = argmin ½xᵀQx − 1ᵀx over x ≥ 0. A
    task outside the support gets b_i = 0, and with it x_i = 0 (its row of G is zero). The
    kernel does all of it in one launch.

    Identical tasks split their weight evenly only through the ridge: the active-set solve frees
    one of them first, and the other's gradient, −ridge · x, must then exceed the kernel's stop
    threshold (64·T·eps₆₄ of its scale), which a ridge of 1e-12 does; with less, one of the twins
    takes the whole share (the same update and norm, other weights). Their shares then agree to
    about eps/ridge relative (measured, 8 identical tasks: 7e-12 at ridge 1e-12, 7e-10 at
    1e-10), the conditioning of the system on the twins.
    """
    _check_square(gram, method)
    if max_pivots is not None:
        _check_max_pivots(max_pivots)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    num_tasks = gram.shape[-1]
    ridge = rounding_ridge(num_tasks, torch.float64) if ridge is None else ridge
    if _uses_triton(gram.device, num_tasks, method):
        pivots = default_max_pivots(num_tasks) if max_pivots is None else max_pivots
        weights, _ = torch.ops.emtl_triton.min_norm_weights(gram.contiguous(), ridge, dtype, pivots)
        return weights
    eye = torch.eye(num_tasks, dtype=torch.float64, device=gram.device)
    has_gradient = gram.diagonal() > 0
    support = torch.where(has_gradient.any(), has_gradient, True)
    matrix = trace_normalized(gram.double()) + ridge * eye
    x = solve_nonnegative_qp(matrix, support.double()[None, :], method="tensor_ops")[0]
    alpha = x / x.sum().clamp_min(torch.finfo(torch.float64).tiny)
    fill = 1 / support.sum(dtype=torch.float64)
    return torch.where(has_gradient | ~has_gradient.any(), alpha, fill).to(dtype)


def symmetric_eigh(matrix: Tensor, *, method: SolveMethod = "auto", sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of the symmetric part of
    ``matrix [n, n]``, in its dtype. The kernel computes in float64 with at most ``sweeps``
    parallel cyclic Jacobi sweeps (default :func:`default_max_sweeps`); the tensor-op path is
    :func:`~._solvers.symmetric_eigh` (LAPACK on a CPU, tensor-op Jacobi elsewhere), or exactly
    ``sweeps`` tensor-op Jacobi sweeps where given."""
    _check_square(matrix, method)
    if sweeps is not None and (isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0):
        raise ValueError(f"sweeps must be a non-negative int, got {sweeps!r}")
    size = matrix.shape[-1]
    if _uses_triton(matrix.device, size, method):
        return torch.ops.emtl_triton.jacobi_eigh(matrix, default_max_sweeps(size) if sweeps is None else sweeps)
    if sweeps is not None:
        return tensor_op_jacobi_eigh(matrix, sweeps)
    return tensor_op_symmetric_eigh(matrix, "lapack" if matrix.device.type == "cpu" else "jacobi")


def _uses_triton(device: torch.device, num_tasks: int, method: SolveMethod) -> bool:
    """Whether ``method`` takes the kernel for this problem; raises where "triton" cannot."""
    if method == "auto":
        return device.type == "cuda" and triton_solve_unavailable(device, num_tasks) is None
    if method == "triton":
        reason = triton_solve_unavailable(device, num_tasks)
        if reason is not None:
            raise RuntimeError(f"the Triton solve cannot run here: {reason}")
        return True
    return False


def _check_square(matrix: Tensor, method: object) -> None:
    if method not in SOLVE_METHODS:
        raise ValueError(f"method must be one of {SOLVE_METHODS}, got {method!r}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square [T, T], got shape {tuple(matrix.shape)}")
    if matrix.shape[0] == 0:
        raise ValueError("the problem needs at least one task (T ≥ 1)")
    if matrix.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"matrix must be float32 or float64, got {matrix.dtype}")


def _check_problem(matrix: Tensor, linear: Tensor, method: object, max_pivots: int | None) -> None:
    _check_square(matrix, method)
    if linear.dim() != 2 or linear.shape[1] != matrix.shape[0]:
        raise ValueError(f"linear must be [B, T] with T = {matrix.shape[0]}, got shape {tuple(linear.shape)}")
    if linear.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"linear must be float32 or float64, got {linear.dtype}")
    if matrix.device != linear.device:
        raise ValueError(f"matrix is on {matrix.device}, linear on {linear.device}: they must share a device")
    if max_pivots is not None:
        _check_max_pivots(max_pivots)


def _check_max_pivots(max_pivots: object) -> None:
    if isinstance(max_pivots, bool) or not isinstance(max_pivots, int) or max_pivots < 1:
        raise ValueError(f"max_pivots must be a positive int, got {max_pivots!r}")


@functools.cache
def _kernel(name: str):
    return importlib.import_module(f"emtl_kernels.triton_kernels.{name}")


def _nonnegative_qp(matrix: Tensor, linear: Tensor, max_pivots: int) -> tuple[Tensor, Tensor]:
    return _kernel("nonnegative_qp").nonnegative_qp(matrix, linear, max_pivots)


def _dual_cone_projection(
    gram: Tensor, preferences: Tensor, norm_eps: float, ridge: float, max_pivots: int
) -> tuple[Tensor, Tensor]:
    return _kernel("nonnegative_qp").dual_cone_projection(gram, preferences, norm_eps, ridge, max_pivots)


def _fake_dual_cone_projection(
    gram: Tensor, preferences: Tensor, norm_eps: float, ridge: float, max_pivots: int
) -> tuple[Tensor, Tensor]:
    return _fake_nonnegative_qp(gram, preferences, max_pivots)


def _min_norm_weights(gram: Tensor, ridge: float, dtype: torch.dtype, max_pivots: int) -> tuple[Tensor, Tensor]:
    return _kernel("nonnegative_qp").min_norm_weights(gram, ridge, dtype, max_pivots)


def _fake_min_norm_weights(gram: Tensor, ridge: float, dtype: torch.dtype, max_pivots: int) -> tuple[Tensor, Tensor]:
    return gram.new_empty(gram.shape[-1:], dtype=dtype), gram.new_empty((1,), dtype=torch.int32)


def _jacobi_eigh(matrix: Tensor, sweeps: int) -> tuple[Tensor, Tensor]:
    return _kernel("jacobi_eigh").jacobi_eigh(matrix, sweeps)


def _fake_jacobi_eigh(matrix: Tensor, sweeps: int) -> tuple[Tensor, Tensor]:
    return matrix.new_empty(matrix.shape[-1:]), torch.empty_like(matrix)


def _fake_nonnegative_qp(matrix: Tensor, linear: Tensor, max_pivots: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(linear), linear.new_empty((linear.shape[0],), dtype=torch.int32)


def _register(name: str, function: Callable, fake: Callable, schema: str) -> None:
    torch.library.custom_op(f"{OP_NAMESPACE}::{name}", function, mutates_args=(), schema=schema).register_fake(fake)


_register(
    "nonnegative_qp",
    _nonnegative_qp,
    _fake_nonnegative_qp,
    "(Tensor matrix, Tensor linear, int max_pivots) -> (Tensor, Tensor)",
)
_register(
    "dual_cone_projection",
    _dual_cone_projection,
    _fake_dual_cone_projection,
    "(Tensor gram, Tensor preferences, float norm_eps, float ridge, int max_pivots) -> (Tensor, Tensor)",
)
_register(
    "min_norm_weights",
    _min_norm_weights,
    _fake_min_norm_weights,
    "(Tensor gram, float ridge, ScalarType dtype, int max_pivots) -> (Tensor, Tensor)",
)
_register("jacobi_eigh", _jacobi_eigh, _fake_jacobi_eigh, "(Tensor matrix, int sweeps) -> (Tensor, Tensor)")
