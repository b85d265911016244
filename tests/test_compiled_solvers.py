"""The compiled CPU solvers (``torch.ops.emtl_solvers.*``): their op contract, their parity with the
tensor-op solvers they stand in for on the CPU, and their accuracy against float64 references
(quadprog, cvxpy, TorchJD's own Nash-MTL) at T up to 50, float32 inputs included.

Each reference solves the float64 problem of the G the solver is given: a float32 G is widened
first, so that what is measured is the solve, not the rounding of G.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
from _weighting_cases import random_orders, update_gap
from torch import Tensor

from emtl_kernels import _extension
from emtl_kernels.weightings import (
    PCD,
    GradVac,
    _compiled,
    aligned_mtl_weights,
    cagrad_weights,
    config_weights,
    dualproj_weights,
    fairgrad,
    fairgrad_weights,
    imtl_g_weights,
    mgda_weights,
    nash_mtl_weights,
    pcgrad_weights,
    upgrad_weights,
)
from emtl_kernels.weightings._solvers import rounding_ridge

pytestmark = pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason="the compiled extension is not built")

DTYPES = [torch.float64, torch.float32]
#: The accuracy target: relative error of the weights (or of the objective) against the float64
#: optimum, for T ≤ 64 and cond(G) ≤ 1e3, whatever the dtype of G.
TARGET = 1e-6


def random_jacobian(num_tasks: int, numel: int, seed: int, *, conflict: float = 0.5) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_tasks, numel, generator=generator, dtype=torch.float64)
    return rows - conflict * rows.mean(0)


def adversarial_gram(kind: str, num_tasks: int) -> Tensor:
    """Float64 Gram matrices the solvers must survive: rank-deficient or rank-one, norms over
    1e-3..1e3, duplicate or opposite tasks, a zero gradient."""
    generator = torch.Generator().manual_seed(num_tasks)
    rows = torch.randn(num_tasks, 3 * num_tasks, generator=generator, dtype=torch.float64)
    if kind == "rank_deficient":
        rows = torch.randn(num_tasks, 3, generator=generator, dtype=torch.float64) @ rows[:3]
    elif kind == "scales":
        rows = rows * torch.logspace(-3, 3, num_tasks, dtype=torch.float64)[:, None]
    elif kind == "duplicates":
        rows[1::2] = rows[0::2][: num_tasks // 2]
    elif kind == "zero_gradient":
        rows[num_tasks // 3] = 0
    elif kind == "rank_one":
        rows = torch.randn(num_tasks, 1, generator=generator, dtype=torch.float64) @ rows[:1]
    elif kind == "opposite":
        rows[1::2] = -rows[0::2][: num_tasks // 2]
    return rows @ rows.T


def assert_same_update(weights: Tensor, expected: Tensor, gram: Tensor, *, same_weights: bool = False) -> None:
    """The same update Jᵀw to 1e-9 of Σ_i (|w_i| + |w'_i|)‖g_i‖; with ``same_weights`` (G definite on
    the tasks with a gradient: one set of weights gives it) the same weights too."""
    scale = ((weights.abs() + expected.abs()) * gram.diagonal().sqrt()).sum()
    assert update_gap(weights, expected, gram) <= 1e-9 * scale
    if same_weights:
        torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def as_inputs(gram: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.ones(gram.shape[0], dtype=dtype), gram.to(dtype)


def given64(gram: Tensor, dtype: torch.dtype) -> Tensor:
    """The G a solver sees in ``dtype``, widened back: what its reference must solve."""
    return gram.to(dtype).double()


# --- References ---------------------------------------------------------------------------------


def quadprog_dual_cone(gram: Tensor, preference: Tensor, reg_eps: float) -> Tensor:
    """argmin vᵀG̃v s.t. v ≥ u, G̃ = G / tr(G) + reg_eps·I, by quadprog (as TorchJD solves it)."""
    import quadprog

    matrix = (gram / gram.trace() + reg_eps * torch.eye(len(gram), dtype=torch.float64)).numpy()
    num_tasks = len(gram)
    solution = quadprog.solve_qp(matrix, np.zeros(num_tasks), np.eye(num_tasks), preference.numpy(), 0)[0]
    return torch.from_numpy(solution)


def quadprog_min_norm(gram: Tensor) -> float:
    """min αᵀ(G / tr(G))α over the simplex, by quadprog (on G plus 1e-14·I so that it factors)."""
    import quadprog

    num_tasks = len(gram)
    matrix = (gram / gram.trace()).numpy() + 1e-14 * np.eye(num_tasks)
    constraints = np.concatenate([np.ones((num_tasks, 1)), np.eye(num_tasks)], 1)
    bounds = np.concatenate([[1.0], np.zeros(num_tasks)])
    alpha = quadprog.solve_qp(matrix, np.zeros(num_tasks), constraints, bounds, 1)[0]
    return float(alpha @ (gram / gram.trace()).numpy() @ alpha)


def cvxpy_cagrad_optimum(jacobian: Tensor, c: float) -> float:
    """max_d min_i g_i·d subject to ‖d − g0‖ ≤ c‖g0‖, on J / √tr(G), by cvxpy (float64)."""
    import cvxpy as cp

    rows = (jacobian / jacobian.square().sum().sqrt()).numpy()
    mean = rows.mean(0)
    direction = cp.Variable(rows.shape[1])
    worst = cp.Variable()
    problem = cp.Problem(
        cp.Maximize(worst), [rows @ direction >= worst, cp.norm(direction - mean) <= c * np.linalg.norm(mean)]
    )
    problem.solve(solver=cp.CLARABEL)
    return float(problem.value)


@functools.cache
def graded_gram(num_tasks: int, condition: float, seed: int) -> Tensor:
    """G = Q diag(λ) Qᵀ with eigenvalues spread over ``condition``: a Gram matrix of known cond."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(num_tasks, num_tasks, generator=generator, dtype=torch.float64))
    values = torch.logspace(0, -np.log10(condition), num_tasks, dtype=torch.float64)
    # Shifted so that the mean gradient conflicts with some tasks (negative entries of G).
    shift = torch.randn(num_tasks, generator=generator, dtype=torch.float64)
    basis = basis * torch.sign(shift)
    return basis @ torch.diag(values) @ basis.T


# --- Op contract --------------------------------------------------------------------------------


def test_opcheck_every_solver_op():
    ops = _compiled.ops()
    for dtype in DTYPES:
        losses, gram = as_inputs(adversarial_gram("random", 5), dtype)
        preferences = torch.eye(5, dtype=dtype) / 5
        torch.library.opcheck(ops.project_onto_dual_cone.default, (gram, preferences, 0.0, 1e-4))
        torch.library.opcheck(ops.mgda_weights.default, (losses, gram))
        torch.library.opcheck(ops.cagrad_weights.default, (losses, gram, 0.5))
        torch.library.opcheck(ops.nash_mtl_weights.default, (losses, gram, 1e-9, 1.0, 40))
        torch.library.opcheck(ops.nash_mtl_weights.default, (losses, gram, 1e-9, None, 40))
        torch.library.opcheck(ops.imtl_g_weights.default, (losses, gram))
        torch.library.opcheck(ops.aligned_mtl_weights.default, (losses, gram, "median"))
        torch.library.opcheck(ops.fairgrad_weights.default, (losses, gram, 2.0, 1e-8, 1e-6, 50))
        torch.library.opcheck(ops.config_weights.default, (losses, gram, None))
        torch.library.opcheck(ops.config_weights.default, (losses, gram, torch.arange(1.0, 6.0)))
        scales, taus = torch.rand(5, dtype=torch.float64) + 0.5, torch.full((4,), 0.5, dtype=torch.float64)
        torch.library.opcheck(ops.pcd_weights.default, (losses, gram, scales, taus))
        torch.library.opcheck(ops.pcgrad_weights.default, (losses, gram, torch.rand(5, 5, dtype=dtype)))
        keys, targets = torch.rand(5, 5, dtype=dtype), torch.rand(5, 5, dtype=dtype) - 0.5
        torch.library.opcheck(ops.gradvac_weights.default, (losses, gram, keys, targets, 0.5, 1e-8))
    assert set(_compiled.FAKES) == {
        name for name in dir(ops) if not name.startswith("_") and hasattr(getattr(ops, name), "default")
    }


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda ops: ops.mgda_weights(torch.ones(3), torch.ones(2, 2)), "gram must be"),
        (lambda ops: ops.mgda_weights(torch.ones(2, 2), torch.ones(2, 2)), "losses must be"),
        (lambda ops: ops.imtl_g_weights(torch.ones(2), torch.ones(2, 2, dtype=torch.int64)), "floating point"),
        (lambda ops: ops.aligned_mtl_weights(torch.ones(2), torch.eye(2), "max"), "scale_mode"),
        (lambda ops: ops.project_onto_dual_cone(torch.eye(2), torch.ones(2), 0.0, 0.0), "preferences must be"),
        (lambda ops: ops.fairgrad_weights(torch.ones(2), torch.eye(2), 0.0, 1e-8, 1e-6, 50), "p must be"),
        (lambda ops: ops.config_weights(torch.ones(2), torch.eye(2), torch.ones(3)), "preference must be"),
        (lambda ops: ops.pcd_weights(torch.ones(3), torch.eye(3), torch.ones(2), torch.ones(2)), "scales must be"),
        (lambda ops: ops.pcd_weights(torch.ones(3), torch.eye(3), torch.ones(3), torch.ones(3)), "taus must be"),
        (lambda ops: ops.pcgrad_weights(torch.ones(3), torch.eye(3), torch.ones(3, 2)), "order_keys must be"),
        (lambda ops: ops.pcgrad_weights(torch.ones(2), torch.eye(2), torch.ones(2, 2, dtype=torch.int64)), "floating"),
    ],
)
def test_solver_ops_reject_bad_inputs(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(_compiled.ops())


def test_weightings_on_cpu_run_the_compiled_ops(monkeypatch):
    """On a CPU tensor each Gram-based weighting calls its op, and no tensor-op solver."""
    calls = []
    monkeypatch.setattr(_compiled, "ops", lambda: _Recorder(calls))
    losses, gram = as_inputs(adversarial_gram("random", 4), torch.float32)
    for function in (upgrad_weights, dualproj_weights, mgda_weights, cagrad_weights, nash_mtl_weights):
        function(losses, gram)
    imtl_g_weights(losses, gram)
    aligned_mtl_weights(losses, gram)
    fairgrad_weights(losses, gram)
    PCD()(losses, gram)
    config_weights(losses, gram)
    pcgrad_weights(losses, gram)
    GradVac()(losses, gram)
    assert calls == [
        "project_onto_dual_cone",
        "project_onto_dual_cone",
        "mgda_weights",
        "cagrad_weights",
        "nash_mtl_weights",
        "imtl_g_weights",
        "aligned_mtl_weights",
        "fairgrad_weights",
        "pcd_weights",
        "config_weights",
        "pcgrad_weights",
        "gradvac_weights",
    ]


class _Recorder:
    """``torch.ops.emtl_solvers`` that records the names of the ops called."""

    def __init__(self, calls: list[str]):
        self.calls = calls

    def __getattr__(self, name: str):
        def call(*args):
            self.calls.append(name)
            return getattr(torch.ops.emtl_solvers, name)(*args)

        return call


# --- Parity with the tensor-op solvers ----------------------------------------------------------

#: Each method with the options under test and the relative tolerance of its parity in float64
#: (the tensor-op solvers stop after fixed iteration counts: about 1e-10 for the interior points).
PARITY = {
    "upgrad": (upgrad_weights, {}, 1e-8),
    "dualproj": (dualproj_weights, {}, 1e-8),
    "mgda": (mgda_weights, {}, 1e-6),
    "cagrad": (cagrad_weights, {"c": 0.5}, 1e-6),
    "nash_mtl": (nash_mtl_weights, {"max_norm": None}, 1e-6),
    "imtl_g": (imtl_g_weights, {}, 1e-9),
    "aligned_mtl": (aligned_mtl_weights, {"scale_mode": "median"}, 1e-6),
    "fairgrad": (fairgrad_weights, {"p": 2.0}, 1e-10),
    "config": (config_weights, {}, 1e-9),
}


def tensor_op_weights(function, losses: Tensor, gram: Tensor, **options) -> Tensor:
    """The weights by the tensor-op solvers, as on a device without the compiled ones."""
    with tensor_op_solvers():
        return function(losses, gram, **options)


@contextlib.contextmanager
def tensor_op_solvers():
    """The weightings take their tensor-op solvers inside, as on a device without the compiled ones."""
    original = _compiled.runs_compiled
    _compiled.runs_compiled = lambda gram: False
    try:
        yield
    finally:
        _compiled.runs_compiled = original


@pytest.mark.parametrize("kind", ["random", "zero_gradient"])
@pytest.mark.parametrize("name", list(PARITY))
def test_compiled_solvers_match_the_tensor_op_solvers(name, kind):
    """On well-conditioned G. On graded G (norms over 1e-3..1e3) the interior points stop short:
    there the compiled solvers meet the references' accuracy (tests below), which the interior
    points do not."""
    function, options, rtol = PARITY[name]
    gram = adversarial_gram(kind, 8)
    losses, given = as_inputs(gram, torch.float64)
    compiled = function(losses, given, **options)
    expected = tensor_op_weights(function, losses, given, **options)
    # The update Jᵀα, measured in G's metric, relative to the scale Σ|α_i|·‖g_i‖.
    scale = (expected.abs() * gram.diagonal().sqrt()).sum()
    assert update_gap(compiled, expected, gram) <= rtol * scale
    torch.testing.assert_close(compiled, expected, rtol=1e3 * rtol, atol=1e3 * rtol * expected.abs().max())


@pytest.mark.parametrize("kind", ["rank_deficient", "duplicates"])
@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda", "nash_mtl", "imtl_g", "aligned_mtl", "config"])
def test_compiled_solvers_give_the_tensor_op_update_on_singular_gram(name, kind):
    """Where G is singular the weights of one update are many: the updates agree."""
    function, options, rtol = PARITY[name]
    gram = adversarial_gram(kind, 8)
    losses, given = as_inputs(gram, torch.float64)
    expected = tensor_op_weights(function, losses, given, **options)
    scale = gram.diagonal().sqrt().sum()
    assert update_gap(function(losses, given, **options), expected, gram) <= 1e2 * rtol * scale


# --- Accuracy against float64 references --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 20), (32, 114), (50, 100), (64, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dual_cone_weights_are_quadprogs_to_the_target(shape, dtype):
    """TorchJD's test_solution_weights shapes, in float32 too, and T = 64 at cond(G) = 1e3 (no J:
    numel 0): UPGrad and DualProj within 1e-6 relative of quadprog's float64 solution."""
    num_tasks, numel = shape
    if numel:
        jacobian = random_jacobian(num_tasks, numel, seed=num_tasks)
        gram = jacobian @ jacobian.T
    else:
        gram = graded_gram(num_tasks, 1e3, seed=num_tasks)
    losses, given = as_inputs(gram, dtype)
    reference = given64(gram, dtype)
    unit = torch.eye(num_tasks, dtype=torch.float64) / num_tasks
    upgrad = sum(quadprog_dual_cone(reference, row, 1e-4) for row in unit)
    dualproj = quadprog_dual_cone(reference, torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64), 1e-4)
    rounding = torch.finfo(dtype).eps
    for weights, expected in ((upgrad_weights(losses, given), upgrad), (dualproj_weights(losses, given), dualproj)):
        error = (weights.double() - expected).norm() / expected.norm()
        assert error <= TARGET + rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks,condition", [(8, 1e3), (32, 1e3), (50, 1e3), (64, 1e3), (32, 1e6)])
def test_mgda_reaches_the_min_norm_to_the_target(num_tasks, condition, dtype):
    """MGDA's objective αᵀGα within 1e-6 relative of quadprog's float64 optimum; at cond 1e6 too
    (float32 there reached 1.05e-3 against an optimum of 2.35e-5 before)."""
    gram = graded_gram(num_tasks, condition, seed=num_tasks)
    losses, given = as_inputs(gram, dtype)
    reference = given64(gram, dtype)
    optimum = quadprog_min_norm(reference)
    weights = mgda_weights(losses, given).double()
    assert torch.all(weights >= 0)
    torch.testing.assert_close(
        weights.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=4 * torch.finfo(dtype).eps, atol=0
    )
    normalized = reference / reference.trace()
    value = float(weights @ normalized @ weights)
    assert value <= optimum * (1 + TARGET) + 4 * torch.finfo(dtype).eps * float(normalized.diagonal().max())
    # KKT: (Gα)_i ≥ αᵀGα, with equality on the support.
    gradient = normalized @ weights
    assert torch.all(gradient >= value - 1e-6 * float(normalized.diagonal().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [0.5, 0.9])
@pytest.mark.parametrize("num_tasks", [4, 16, 32])
def test_cagrad_reaches_the_best_worst_improvement(num_tasks, c, dtype):
    """CAGrad's d = Jᵀα lies in the ball and its worst improvement is cvxpy's optimum, to 1e-6
    relative of the mean gradient's scale (float32 at c = 0.9 was wrong before)."""
    jacobian = random_jacobian(num_tasks, 3 * num_tasks, seed=num_tasks)
    gram = jacobian @ jacobian.T
    losses, given = as_inputs(gram, dtype)
    weights = cagrad_weights(losses, given, c=c).double()
    normalized = given64(gram, dtype) / given64(gram, dtype).trace()
    mean = torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)
    radius = c * (mean @ normalized @ mean).sqrt()
    offset = weights - mean
    # On the ball's boundary: within the rounding of the weights to their dtype, which α − π
    # (a tenth of α and less) magnifies.
    assert (offset @ normalized @ offset).sqrt() <= radius * (1 + 100 * torch.finfo(dtype).eps)
    # cvxpy on the J whose Gram matrix is G: the float64 J (a float32 G is its rounding).
    optimum = cvxpy_cagrad_optimum(jacobian, c)
    worst = float((normalized @ weights).min())
    mean_norm = float((mean @ normalized @ mean).sqrt())
    assert worst >= optimum - TARGET * mean_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(20, 10), (20, 5), (4, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cagrad_conflicts_with_no_task_once_the_ball_holds_zero(shape, c, dtype):
    """c ≥ 1: the ball around g0 holds 0, so the best worst improvement is ≥ 0 (0 where the
    gradients cancel, T > rank); TorchJD's test_non_conflicting found the compiled solve
    conflicting on such G before."""
    num_tasks, numel = shape
    jacobian = random_jacobian(num_tasks, numel, seed=numel)
    gram = jacobian @ jacobian.T
    weights = cagrad_weights(*as_inputs(gram, dtype), c=c).double()
    normalized = given64(gram, dtype) / given64(gram, dtype).trace()
    assert torch.isfinite(weights).all()
    improvements = normalized @ weights
    # To the rounding of (Gα)_i, whose terms are G_ij α_j.
    scale = (normalized.abs() @ weights.abs()).max()
    assert improvements.min() >= -1e2 * torch.finfo(dtype).eps * scale
    mean = torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)
    offset = weights - mean
    radius = c * (mean @ normalized @ mean).sqrt()
    assert (offset @ normalized @ offset).sqrt() <= radius * (1 + 100 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("kind", ["random", "rank_deficient", "scales", "duplicates", "zero_gradient"])
@pytest.mark.parametrize("num_tasks", [32, 50])
def test_float32_gram_of_many_tasks_gives_finite_optimal_weights(kind, num_tasks):
    """Adversarial float32 G at T = 32 and 50: every compiled solver returns finite weights, and
    the dual-cone projections meet their KKT conditions on the float32 G to 1e-6."""
    gram = adversarial_gram(kind, num_tasks)
    losses, given = as_inputs(gram, torch.float32)
    for function in (upgrad_weights, dualproj_weights, mgda_weights, cagrad_weights, nash_mtl_weights):
        assert torch.isfinite(function(losses, given)).all(), function.__name__
    assert torch.isfinite(imtl_g_weights(losses, given)).all()
    assert torch.isfinite(aligned_mtl_weights(losses, given)).all()
    reference = given64(gram, torch.float32)
    regularized = reference / reference.trace() + 1e-4 * torch.eye(num_tasks, dtype=torch.float64)
    mean = torch.full((1, num_tasks), 1 / num_tasks, dtype=torch.float32)
    projection = _compiled.ops().project_onto_dual_cone(given, mean, 0.0, 1e-4)[0].double()
    multipliers = regularized @ projection
    assert torch.all(projection >= mean[0].double() - 1e-7)
    assert torch.all(multipliers >= -1e-6 * regularized.diagonal().max())
    assert ((projection - mean[0].double()) * multipliers).abs().max() <= 1e-6 * regularized.diagonal().max()


# --- FairGrad and PCD ---------------------------------------------------------------------------

ZOO_NUM_TASKS = [1, 2, 3, 8, 16, 32]
#: G whose FairGrad and PCD solutions are unique and well conditioned.
WELL_POSED_KINDS = ["random", "scales", "zero_gradient"]
#: G where a positive combination of the gradients vanishes: FairGrad's ridge alone makes a
#: solution exist, α ~ reg_eps^(−p/(p+1)) with a Newton system of condition ~1/reg_eps.
SINGULAR_KINDS = ["rank_one", "opposite"]


def fairgrad_residual(gram: Tensor, weights: Tensor, p: float, reg_eps: float = 1e-8) -> float:
    """max_i |(G̃α̃)_i − α̃_i^(−1/p)| relative to the terms it sums, on the tasks with a gradient,
    G̃ = G / tr(G) with each G̃_ii times 1 + reg_eps and α̃ = α·tr(G)^(p/(p+1)): the equations
    both solvers solve."""
    active = gram.diagonal() > 0
    if not active.any():
        return 0.0
    scale = gram.diagonal()[active].sum()
    fair = gram[active][:, active] / scale
    fair = fair + reg_eps * torch.diag(fair.diagonal())
    alpha = weights[active] * scale ** (p / (p + 1))
    terms = fair.abs() @ alpha + alpha ** (-1 / p)
    return float(((fair @ alpha - alpha ** (-1 / p)) / terms).abs().max())


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("num_tasks", ZOO_NUM_TASKS)
@pytest.mark.parametrize("kind", WELL_POSED_KINDS + SINGULAR_KINDS)
def test_fairgrad_compiled_solves_the_tensor_op_equations(kind, num_tasks, p):
    """Both solvers meet the ridged equations to 1e-11 of their terms (6e-13 the worst measured).
    The compiled weights are the tensor-op ones to 1e-10 relative where the solution is well
    posed, to 1e-6 where only the ridge makes one (κ·eps₆₄ with κ ≈ 1/reg_eps: 7e-8 measured),
    and give the same update to 1e-10 of Σ|α_i|‖g_i‖ either way."""
    gram = adversarial_gram(kind, num_tasks)
    losses = torch.ones(num_tasks, dtype=torch.float64)
    compiled = fairgrad_weights(losses, gram, p=p)
    expected = tensor_op_weights(fairgrad_weights, losses, gram, p=p)
    assert torch.all(compiled > 0)
    assert fairgrad_residual(gram, compiled, p) <= 1e-11
    assert fairgrad_residual(gram, expected, p) <= 1e-11
    rtol = 1e-10 if kind in WELL_POSED_KINDS else 1e-6
    torch.testing.assert_close(compiled, expected, rtol=rtol, atol=0)
    scale = (expected.abs() * gram.diagonal().sqrt()).sum()
    assert update_gap(compiled, expected, gram) <= 1e-10 * scale


@pytest.mark.parametrize("tau", [0.02, 0.5])
@pytest.mark.parametrize("num_tasks", ZOO_NUM_TASKS)
@pytest.mark.parametrize("kind", [*WELL_POSED_KINDS, *SINGULAR_KINDS, "duplicates"])
def test_pcd_compiled_is_torchjds_exact_solution_over_steps(kind, num_tasks, tau):
    """Over three steps of a G scaled at each (so that the moving average matters), the compiled
    PCD gives the update of TorchJD's exact float64 solve (Goldfarb and Idnani's) and of the
    tensor-op interior point to 1e-9 of Σ|α_i|‖g_i‖, and TorchJD's weights themselves where they
    are unique (no duplicate, opposite or rank-one tasks)."""
    from torchjd.aggregation import PCDWeighting

    base = adversarial_gram(kind, num_tasks)
    losses = torch.ones(num_tasks, dtype=torch.float64)
    compiled, interior_point, theirs = PCD(tau=tau, beta=0.9), PCD(tau=tau, beta=0.9), PCDWeighting(tau=tau, beta=0.9)
    for factor in (1.0, 3.0, 0.5):
        gram = base * factor
        weights = compiled(losses, gram)
        with tensor_op_solvers():
            expected_by_interior_point = interior_point(losses, gram)
        expected = theirs(gram)
        assert_same_update(weights, expected_by_interior_point, gram)
        assert_same_update(weights, expected, gram, same_weights=kind in WELL_POSED_KINDS)


@pytest.mark.parametrize("num_tasks", ZOO_NUM_TASKS)
@pytest.mark.parametrize("kind", [*WELL_POSED_KINDS, *SINGULAR_KINDS, "duplicates"])
def test_config_compiled_matches_the_tensor_op_solver_with_a_preference(kind, num_tasks):
    """With cosines p_i over 0.5..2 (and 1 each): the same update Jᵀw to 1e-9 of Σ|w_i|‖g_i‖, and
    the same weights where C is definite on the tasks with a gradient."""
    gram = adversarial_gram(kind, num_tasks)
    losses = torch.ones(num_tasks, dtype=torch.float64)
    for preference in (None, torch.linspace(0.5, 2.0, num_tasks, dtype=torch.float64)):
        compiled = config_weights(losses, gram, preference=preference)
        expected = tensor_op_weights(config_weights, losses, gram, preference=preference)
        assert_same_update(compiled, expected, gram, same_weights=kind in WELL_POSED_KINDS)


@pytest.mark.parametrize("num_tasks", ZOO_NUM_TASKS)
@pytest.mark.parametrize("kind", [*WELL_POSED_KINDS, *SINGULAR_KINDS, "duplicates"])
def test_pcgrad_compiled_matches_the_tensor_op_solver_on_the_same_draws_and_orders(kind, num_tasks):
    """Float64 both: the same projections, so the same weights up to rounding (a projected
    gradient that becomes orthogonal to another can meet it with an inner product of either sign
    at rounding level: the projection it then takes is of that size)."""
    losses, gram = as_inputs(adversarial_gram(kind, num_tasks), torch.float64)
    orders = random_orders(num_tasks, seed=0)
    scale = gram.diagonal().max().sqrt()
    # Each solve gets options of its own: a generator is used up by the draws it makes.
    for options in (lambda: {"orders": orders}, lambda: {"generator": torch.Generator().manual_seed(7)}):
        compiled = pcgrad_weights(losses, gram, **options())
        expected = tensor_op_weights(pcgrad_weights, losses, gram, **options())
        assert update_gap(compiled, expected, gram) <= 1e-12 * (expected.abs().sum() + 1) * scale
        torch.testing.assert_close(compiled, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_tasks", ZOO_NUM_TASKS)
@pytest.mark.parametrize("kind", [*WELL_POSED_KINDS, "duplicates"])
def test_gradvac_compiled_matches_the_tensor_op_solver_over_steps(kind, num_tasks):
    """Float64 both, three steps on the same draws, given orders on the last: the same corrections
    and the same moved targets, up to rounding amplified by 1/√(1 − φ̂²) as targets near ±1. Not on
    rank-one or opposite G: similarities of exactly ±1 make that factor unbounded, and the two
    solvers' rounding then part at any precision (TorchJD's as well)."""
    losses, gram = as_inputs(adversarial_gram(kind, num_tasks), torch.float64)
    orders = random_orders(num_tasks, seed=0)
    compiled, tensor_op = GradVac(seed=3), GradVac(seed=3)
    for step in range(3):
        options = {"orders": orders} if step == 2 else {}
        weights = compiled.weights(losses, gram, **options)
        with tensor_op_solvers():
            expected = tensor_op.weights(losses, gram, **options)
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
        torch.testing.assert_close(compiled.targets, tensor_op.targets, rtol=1e-6, atol=1e-7)
    if kind == "random" and num_tasks > 1:
        assert compiled.targets.abs().sum() > 0


def test_fairgrad_pcd_and_config_tensor_op_solvers_trace_in_one_graph():
    """On a CPU tensor the weightings run their compiled ops (tests/test_weighting_steps.py traces
    those); their tensor-op solvers, the path of every other device, trace without a graph break
    too (two iterations prove the loop body free of host syncs)."""
    losses, gram = as_inputs(adversarial_gram("random", 4), torch.float32)
    with tensor_op_solvers():
        for function in (
            functools.partial(fairgrad_weights, p=2.0, iterations=2),
            functools.partial(config_weights, preference=torch.tensor([0.5, 1.0, 2.0, 1.0])),
        ):
            torch._dynamo.reset()
            compiled = torch.compile(function, fullgraph=True, backend="eager")
            torch.testing.assert_close(compiled(losses, gram), function(losses, gram), rtol=1e-6, atol=0)
        traced, eager = PCD(tau=0.5, iterations=2), PCD(tau=0.5, iterations=2)
        compiled = torch.compile(traced.weights, fullgraph=True, backend="eager")
        for factor in (1.0, 3.0):
            expected = eager.weights(losses, gram * factor)
            torch.testing.assert_close(compiled(losses, gram * factor), expected, rtol=1e-6, atol=0)


# --- Nash-MTL against TorchJD -------------------------------------------------------------------


def torchjd_nash_mtl(jacobian: Tensor, max_norm: float) -> Tensor:
    from torchjd.aggregation import NashMTL

    return NashMTL(n_tasks=jacobian.shape[0], max_norm=max_norm).weighting(jacobian)


@pytest.mark.parametrize(
    "jacobian",
    [
        torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64),
        random_jacobian(5, 12, seed=3),
    ],
    ids=["issue_reproducer", "random_5x12"],
)
def test_nash_mtl_matches_torchjd(jacobian):
    """α_i (Gα)_i = 1, as TorchJD's port of the authors' code solves it (ECOS: to about 1e-4), and
    the same clipping at the shared default max_norm = 1.0."""
    pytest.importorskip("cvxpy")
    gram = jacobian @ jacobian.T
    losses = torch.zeros(len(gram), dtype=torch.float64)
    unclipped = nash_mtl_weights(losses, gram, max_norm=None)
    torch.testing.assert_close(
        unclipped * (gram @ unclipped), torch.ones(len(gram), dtype=torch.float64), rtol=1e-7, atol=0
    )
    theirs = torchjd_nash_mtl(jacobian, max_norm=0.0).double()
    torch.testing.assert_close(unclipped, theirs, rtol=1e-3, atol=0)
    torch.testing.assert_close((jacobian.T @ unclipped).norm(), (jacobian.T @ theirs).norm(), rtol=1e-3, atol=0)
    clipped = nash_mtl_weights(losses, gram)
    torch.testing.assert_close(clipped, torchjd_nash_mtl(jacobian, max_norm=1.0).double(), rtol=1e-3, atol=0)
    torch.testing.assert_close(
        (jacobian.T @ clipped).norm(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name", list(PARITY))
def test_torch_compile_traces_each_compiled_solve_in_one_graph(name):
    """fullgraph=True: the op is one opaque node of the graph (its fake kernel gives the shape)."""
    function, options, _ = PARITY[name]
    losses, gram = as_inputs(adversarial_gram("random", 5), torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(functools.partial(function, **options), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(losses, gram), function(losses, gram, **options), rtol=0, atol=0)


#: A float32 G of eight nearly dependent gradients, some opposite (found by the property test of
#: finite weights): rounding left it indefinite by 6e-8 of its scaled diagonal, beyond reg_eps.
INDEFINITE_BY_ROUNDING = [
    [
        2.374669075012207,
        -0.45217281579971313,
        -3.357506036758423,
        0.8759503960609436,
        -1.671244740486145,
        -2.1552300453186035,
        0.6215559244155884,
        1.2913953065872192,
    ],
    [
        -0.45217281579971313,
        0.08610052615404129,
        0.6393197774887085,
        -0.16679416596889496,
        0.31823021173477173,
        0.410388320684433,
        -0.11835362762212753,
        -0.24590115249156952,
    ],
    [
        -3.357506036758423,
        0.6393197774887085,
        4.7471232414245605,
        -1.2384920120239258,
        2.362945795059204,
        3.0472447872161865,
        -0.8788078427314758,
        -1.825882911682129,
    ],
    [
        0.8759503960609436,
        -0.16679416596889496,
        -1.2384920120239258,
        0.3231141269207001,
        -0.6164764165878296,
        -0.7950053811073303,
        0.2292749583721161,
        0.47636038064956665,
    ],
    [
        -1.671244740486145,
        0.31823021173477173,
        2.362945795059204,
        -0.6164764165878296,
        1.1761887073516846,
        1.5168079137802124,
        -0.4374386668205261,
        -0.9088582992553711,
    ],
    [
        -2.1552300453186035,
        0.410388320684433,
        3.0472447872161865,
        -0.7950053811073303,
        1.5168079137802124,
        1.9560691118240356,
        -0.5641190409660339,
        -1.1720597743988037,
    ],
    [
        0.6215559244155884,
        -0.11835362762212753,
        -0.8788078427314758,
        0.2292749583721161,
        -0.4374386668205261,
        -0.5641190409660339,
        0.16268867254257202,
        0.33801528811454773,
    ],
    [
        1.2913953065872192,
        -0.24590115249156952,
        -1.825882911682129,
        0.47636038064956665,
        -0.9088582992553711,
        -1.1720597743988037,
        0.33801528811454773,
        0.7022881507873535,
    ],
]


def test_fairgrad_solves_a_float32_gram_that_rounding_left_indefinite():
    """The equations on the G above have no solution with the ridge reg_eps: the first solve
    diverges, and both solvers then solve them with the ridge reg_eps + 2·T·eps."""
    gram = torch.tensor(INDEFINITE_BY_ROUNDING, dtype=torch.float32)
    losses = torch.ones(8)
    assert not torch.isfinite(fairgrad._solve_by_newton(gram, 1.0, 1e-8, 50)).all()
    with tensor_op_solvers():
        expected = fairgrad_weights(losses, gram)
    weights = fairgrad_weights(losses, gram)
    assert torch.isfinite(weights).all() and (weights > 0).all()
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=0)
    ridge = 1e-8 + rounding_ridge(2 * 8, gram.dtype)
    assert fairgrad_residual(gram.double(), weights.double(), 1.0, reg_eps=ridge) <= 1e-6


def test_mgda_keeps_its_optimum_on_gram_graded_below_the_null_space_cut():
    """Gradient norms from 1e-3 to 3.5e3 (found by the property test of MGDA's optimality): the
    smallest tasks' directions fall below the least-norm step's null-space cut relative to λ_max,
    yet decide the optimum, whose αᵀGα is 5e-7. The step must not move along them: KKT holds."""
    jacobian = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 1e-3, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1e-3, 1e-3],
            [0.0, 0.0, 0.0, -1e3, 0.0],
            [0.0, 0.0, 1.0, 0.0, 0.0],
            [0.0, -1e3, -1e3, -3e3, 1e3],
        ],
        dtype=torch.float64,
    )
    gram = jacobian @ jacobian.T
    weights = mgda_weights(torch.ones(7, dtype=torch.float64), gram)
    has_gradient = gram.diagonal() > 0
    optimum = weights @ gram @ weights
    assert (weights[has_gradient] >= 0).all() and abs(float(weights[has_gradient].sum()) - 1) <= 1e-12
    assert ((gram @ weights)[has_gradient] >= optimum * (1 - 1e-6)).all()
    with tensor_op_solvers():
        expected = mgda_weights(torch.ones(7, dtype=torch.float64), gram)
    torch.testing.assert_close(optimum, expected @ gram @ expected, rtol=1e-3, atol=0)
