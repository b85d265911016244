"""The non-negative QP, one program a problem: x = argmin ½xᵀQx − bᵀx subject to x ≥ 0.

Q is symmetric positive definite, ``[T, T]``, shared by a batch of problems that differ in b
(``[B, T]``); one launch solves the batch, one program a problem, everything in registers and in
float64 whatever the storage dtype. It is the dual-cone projection of UPGrad and DualProj
(v = u + x with b = −Qu) and, with b = 1, MGDA's min-norm point on the simplex (α = x / Σx).

The method is the primal active-set method of Lawson & Hanson's NNLS (Solving Least Squares
Problems, 1974, ch. 23), on the QP's linear complementarity problem w = Qx − b, x ≥ 0, w ≥ 0,
xᵀw = 0, kept as a tableau: after principal pivots on the free set F the tableau holds
(Q_FF)⁻¹ and its constant column holds the subspace minimiser z_F = (Q_FF)⁻¹ b_F (Cottle, Pang &
Stone, The Linear Complementarity Problem, §2.3). One pivot moves one index between F and A, the
active set, at O(T²) cost, all of it tile arithmetic in one program. Each iteration, from a
feasible x:

- if z_F > 0, x = z; stop if the gradient w = Qz − b is ≥ 0 on A up to its rounding, else free
  the index of the most negative w_i;
- else step from x towards z as far as x ≥ 0 allows and make the blocking index active.

Both moves are one pivot on one index (a principal pivot on one index is its own inverse). The
objective never rises, and falls at every step that is not degenerate, so the method ends after
a finite number of pivots, in the tests at most 2T; the loop is a device-side ``while`` capped at
``max_pivots``, so nothing is read on the host. The pivots on a positive-definite Q are all
positive (Schur complements and diagonal entries of (Q_FF)⁻¹), so they need no pivoting for
stability: on the tests' matrices (cond(Q) up to 1e7) the residual (b − Qx)_F after the last pivot
is within 1.3e-14 of max |b|, and a step of iterative refinement does not lower it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import next_power_of_2

#: Multiple of T·eps(float64)·(|Q||z| + |b|)_i below which a negative gradient counts as zero:
#: a smaller threshold lets rounding free and drop the same index in turn until ``max_pivots``.
STOP_TOLERANCE = 64.0
#: The problems the kernel solves (its PROBLEM constexpr): the plain QP on Q and b as given; the
#: dual-cone projection of UPGrad and DualProj (Q = G / tr(G) + ridge · I, b = −Qu, v = u + x);
#: MGDA's min-norm point (the same Q, b = 1 on the tasks with a gradient, α = x / Σx).
PROBLEMS = {"nonnegative_qp": 0, "dual_cone": 1, "min_norm": 2}


def program_warps(block_t: int) -> int:
    """Warps of a program holding a BLOCK_T × BLOCK_T float64 tile: one per 256 values (8 a
    thread), at most 16. For sm_90, ptxas then spills nothing up to BLOCK_T = 32, and about 400
    bytes at 64, where 16 warps cap a thread at 128 registers (8 warps: about 630 bytes;
    tests/triton_sm90_solver_compile.py). Not timed on a GPU yet."""
    return max(1, min(16, block_t * block_t // 256))


@triton.jit
def _pivot(tableau, constant, index, k):
    """The principal pivot on index k of the tableau w = M x + c, which exchanges x_k and w_k:
    the new tableau, its constant column, and the pivot M_kk."""
    on_row = index[:, None] == k
    on_column = index[None, :] == k
    row = tl.sum(tl.where(on_row, tableau, 0.0), axis=0)
    column = tl.sum(tl.where(on_column, tableau, 0.0), axis=1)
    pivot = tl.sum(tl.where(index == k, row, 0.0), axis=0)
    constant_k = tl.sum(tl.where(index == k, constant, 0.0), axis=0)
    inverse = 1.0 / pivot
    updated = tableau - column[:, None] * (row[None, :] * inverse)
    updated = tl.where(on_row, -row[None, :] * inverse, updated)
    updated = tl.where(on_column, column[:, None] * inverse, updated)
    updated = tl.where(on_row & on_column, inverse, updated)
    constant = tl.where(index == k, -constant_k * inverse, constant - column * (constant_k * inverse))
    return updated, constant, pivot


@triton.jit
def _problem_matrix(matrix, offsets, inside, eye, matrix_scale, ridge_vector):
    """Q = matrix_scale · M + ridge · I on the real indices (``ridge_vector``: the ridge as a float64
    vector), float64, the identity on the padding."""
    loaded = tl.load(matrix + offsets, mask=inside, other=0.0).to(tl.float64)
    return tl.where(eye, tl.where(inside, ridge_vector[:, None], 1.0), 0.0) + loaded * matrix_scale


@triton.jit
def nonnegative_qp_kernel(
    matrix,
    linear,
    solution,
    pivot_counts,
    num_tasks,
    max_pivots,
    # float64: a Python float argument would reach a compiled kernel as float32, and a ridge rounded
    # to float32 moves an ill-conditioned solution by its relative rounding times cond(Q).
    norm_eps: tl.float64,
    ridge: tl.float64,
    PROBLEM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    TOLERANCE: tl.constexpr,
):
    """Solve problem ``program_id(0)`` of kind PROBLEM (:data:`PROBLEMS`) on ``matrix [T, T]`` and
    its row of ``linear [B, T]``; its result into its row of ``solution``, and into
    ``pivot_counts`` the pivots it made, or −1 where it stopped short of optimality
    (``max_pivots`` reached, or a pivot not positive)."""
    problem = tl.program_id(0).to(tl.int64)
    index = tl.arange(0, BLOCK_T)
    real = index < num_tasks
    inside = real[:, None] & real[None, :]
    eye = index[:, None] == index[None, :]
    offsets = index[:, None] * num_tasks + index[None, :]
    # A float64 tile of the ridge: the interpreter would round the scalar to float32 where it
    # meets a tensor.
    ridge_vector = tl.full([BLOCK_T], ridge, tl.float64)
    # Q and b of the problem. The weightings' Gram matrices are normalised by their trace (zeros
    # where it is 0 or below norm_eps), which a common scale of the gradients then leaves alone.
    if PROBLEM == 0:
        matrix_scale = 1.0
    else:
        gram = tl.load(matrix + offsets, mask=inside, other=0.0).to(tl.float64)
        gram_diagonal = tl.sum(tl.where(eye, gram, 0.0), axis=1)
        trace = tl.sum(gram_diagonal, axis=0)
        usable = (trace > 0.0) & (trace >= norm_eps)
        matrix_scale = tl.where(usable, 1.0 / tl.where(usable, trace, 1.0), 0.0)
    # Padding rows and columns are the identity with b = 0: they stay active at x = 0 and their
    # zero off-diagonal entries keep them out of every pivot on a real index.
    tableau = _problem_matrix(matrix, offsets, inside, eye, matrix_scale, ridge_vector)
    if PROBLEM == 0:
        target = tl.load(linear + problem * num_tasks + index, mask=real, other=0.0).to(tl.float64)
    elif PROBLEM == 1:
        # v = u + x with x ≥ 0 minimising (u + x)ᵀQ(u + x): b = −Qu.
        preference = tl.load(linear + problem * num_tasks + index, mask=real, other=0.0).to(tl.float64)
        target = -tl.sum(tableau * preference[None, :], axis=1)
    else:
        # b = 1 on the tasks with a gradient (on all tasks where none has one), 0 elsewhere.
        has_gradient = real & (gram_diagonal > 0.0)
        any_gradient = tl.max(has_gradient.to(tl.int32), axis=0) > 0
        support = tl.where(any_gradient, has_gradient, real)
        target = support.to(tl.float64)
    threshold = TOLERANCE * num_tasks * 2.220446049250313e-16

    constant = -target
    free = index < 0
    x = tl.zeros([BLOCK_T], dtype=tl.float64)
    pivots = 0
    done = 0
    optimal = pivots < 0
    while (pivots < max_pivots) & (done == 0):
        minimiser = tl.where(free, constant, 0.0)
        blocked = free & (minimiser <= 0.0)
        drop = tl.max(blocked.to(tl.int32), axis=0) > 0
        # Step towards the subspace minimiser until the first free x_i reaches 0.
        ratio = tl.where(blocked, x / tl.where(blocked, tl.maximum(x - minimiser, 1e-300), 1.0), float("inf"))
        step = tl.where(drop, tl.min(ratio, axis=0), 0.0)
        blocking = tl.argmin(ratio, axis=0)
        stepped = tl.where(index == blocking, 0.0, x + step * (minimiser - x))
        # At the subspace minimiser: free the index whose gradient is most negative beyond its
        # rounding, if one is. The gradient Qz − b is formed from Q itself, with the scale of its
        # rounding, |Q||z| + |b|, per index: the tableau's copy carries the pivots' rounding, and
        # one scale for all indices misjudges rows whose entries are far smaller than others'.
        products = _problem_matrix(matrix, offsets, inside, eye, matrix_scale, ridge_vector) * minimiser[None, :]
        gradient = tl.sum(products, axis=1) - target
        rounding = threshold * (tl.sum(tl.abs(products), axis=1) + tl.abs(target))
        violation = tl.where(free | ~real | (gradient >= -rounding), 0.0, gradient)
        entering = tl.argmin(violation, axis=0)
        optimal = ~drop & (tl.min(violation, axis=0) == 0.0)
        k = tl.where(drop, blocking, entering)
        x = tl.where(drop, stepped, minimiser)
        pivoted, moved, pivot = _pivot(tableau, constant, index, k)
        # A pivot that is not positive means Q is not positive definite (up to rounding): stop
        # at the last feasible point instead of dividing by it.
        singular = ~(pivot > 0.0)
        done = (optimal | singular).to(tl.int32)
        tableau = tl.where(done != 0, tableau, pivoted)
        constant = tl.where(done != 0, constant, moved)
        free = tl.where((done == 0) & (index == k), ~free, free)
        pivots += 1 - done

    # A step can leave a rounding error's worth below 0 at the indices it did not block on.
    x = tl.maximum(x, 0.0)
    if PROBLEM == 0:
        result = x
    elif PROBLEM == 1:
        result = preference + x
    else:
        # α = x / Σx on the support; a task without gradient gets the mean weight of the others
        # (1/T each where no task has one, which the support of all tasks gives already).
        alpha = x / tl.maximum(tl.sum(x, axis=0), 2.2250738585072014e-308)
        supported = tl.sum(support.to(tl.float64), axis=0)
        result = tl.where(has_gradient | ~any_gradient, alpha, 1.0 / supported)
    tl.store(solution + problem * num_tasks + index, result.to(solution.dtype.element_ty), mask=real)
    tl.store(pivot_counts + problem, tl.where(optimal, pivots, -1))


def nonnegative_qp(matrix: torch.Tensor, linear: torch.Tensor, max_pivots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = argmin ½xᵀQx − bᵀx over x ≥ 0 for Q = ``matrix [T, T]`` (symmetric positive definite)
    and each row b of ``linear [B, T]``, in one launch: ``[B, T]`` in ``linear``'s dtype, and the
    pivots each solve made, int32 ``[B]`` (−1: stopped short of optimality). The inputs must be
    contiguous and on one device; T ≤ 64 keeps a program's tile in registers on a GPU (the
    checks and the choice of path are in :mod:`emtl_kernels.weightings._triton_solvers`)."""
    solution = torch.empty_like(linear)
    return solution, _launch(PROBLEMS["nonnegative_qp"], matrix, linear, solution, max_pivots, 0.0, 0.0)


def dual_cone_projection(
    gram: torch.Tensor, preferences: torch.Tensor, norm_eps: float, ridge: float, max_pivots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """v = argmin vᵀQv subject to v ≥ u for each row u of ``preferences [B, T]``, Q = G / tr(G) +
    ridge · I (G / tr(G) replaced by zeros where tr(G) ≤ 0 or < ``norm_eps``), in one launch:
    ``[B, T]`` in the preferences' dtype, and the pivots each solve made."""
    solution = torch.empty_like(preferences)
    return solution, _launch(PROBLEMS["dual_cone"], gram, preferences, solution, max_pivots, norm_eps, ridge)


def min_norm_weights(
    gram: torch.Tensor, ridge: float, dtype: torch.dtype, max_pivots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MGDA's weights in one launch: α = argmin αᵀQα on the simplex of the tasks with a gradient
    (G_ii > 0; all tasks where none has one), Q = G / tr(G) + ridge · I, by the non-negative QP
    with b = 1 on that support, α = x / Σx; a task without gradient gets the mean weight of the
    others. ``[T]`` in ``dtype``, and the pivots made (``[1]``)."""
    solution = torch.empty(1, gram.shape[-1], dtype=dtype, device=gram.device)
    # The solution stands in for ``linear``, which this problem does not read, for the grid's size.
    pivots = _launch(PROBLEMS["min_norm"], gram, solution, solution, max_pivots, 0.0, ridge)
    return solution[0], pivots


def _launch(
    problem: int,
    matrix: torch.Tensor,
    linear: torch.Tensor,
    solution: torch.Tensor,
    max_pivots: int,
    norm_eps: float,
    ridge: float,
) -> torch.Tensor:
    """One launch, a program for each row of ``linear``; the pivot counts."""
    num_problems, num_tasks = linear.shape
    pivot_counts = torch.empty(num_problems, dtype=torch.int32, device=linear.device)
    if num_problems == 0:
        return pivot_counts
    block_t = next_power_of_2(num_tasks)
    nonnegative_qp_kernel[(num_problems,)](
        matrix,
        linear,
        solution,
        pivot_counts,
        num_tasks,
        max_pivots,
        norm_eps,
        ridge,
        PROBLEM=problem,
        BLOCK_T=block_t,
        TOLERANCE=STOP_TOLERANCE,
        num_warps=program_warps(block_t),
        num_stages=1,
        enable_fp_fusion=True,
    )
    return pivot_counts
