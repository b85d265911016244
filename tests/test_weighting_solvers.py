"""The Gram-matrix weightings of the method zoo (IMTL-G, MGDA, PCGrad, CAGrad, Aligned-MTL, UPGrad,
DualProj, Nash-MTL) and their small solvers, against float64 computations written here from each
paper: optimality conditions, closed forms, the papers' algorithms and independent solvers.

Every weighting runs in float64 (float64 losses) and in float32 (the compute dtype of a step with
float32 losses), on random Gram matrices and on adversarial ones. The float64 references are
computed on the exact Gram matrix, so the float32 tolerances also cover the rounding of G.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from _weighting_cases import NUM_TASKS, random_orders, random_problem
from torch import Tensor

from emtl_kernels.weightings import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    DualProj,
    NashMTL,
    PCGrad,
    UPGrad,
    aligned_mtl_weights,
    cagrad_weights,
    dualproj_weights,
    imtl_g_weights,
    make_weighting,
    mgda_weights,
    nash_mtl_weights,
    pcgrad_weights,
    upgrad_weights,
)
from emtl_kernels.weightings._solvers import (
    jacobi_eigh,
    minimize_on_orthant,
    pinv_apply,
    project_onto_dual_cone,
    spd_solve,
    symmetric_eigh,
)
from emtl_kernels.weightings.nash_mtl import REG_EPS
from emtl_kernels.weightings.task_orders import other_tasks_in_order

DTYPES = [torch.float64, torch.float32]
EPS = {dtype: torch.finfo(dtype).eps for dtype in DTYPES}
ADVERSARIAL = ("rank_deficient", "identical", "zero_gradient", "opposite", "spread", "nearly_parallel")
CASES = [pytest.param("random", t, id=f"random-{t}") for t in [*NUM_TASKS, 32]] + [
    pytest.param(kind, 8, id=kind) for kind in ADVERSARIAL
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many thousands of ops on T×T tensors, each far below a parallel grain: more
    threads only add their synchronisation, which on a busy 2-core machine costs over tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Inputs -------------------------------------------------------------------------------------


@functools.cache
def task_gradients(kind: str, num_tasks: int) -> Tensor:
    """Float64 task gradients J ``[T, P]`` of one kind (cached: never modify the result)."""
    generator = torch.Generator().manual_seed(num_tasks)

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    numel = 40
    if kind == "random":  # norms spread over 1e-3..1e2, as task gradients are
        return random_problem(num_tasks, seed=num_tasks, numel=numel)[1]
    if kind == "rank_deficient":  # T > rank = 3
        return normal(num_tasks, 3) @ normal(3, numel)
    if kind == "identical":
        return normal(1, numel).repeat(num_tasks, 1)
    if kind == "zero_gradient":
        rows = normal(num_tasks, numel)
        rows[num_tasks // 2] = 0
        return rows
    if kind == "opposite":  # 0 in the convex hull: g_1 = −g_0 exactly
        rows = normal(num_tasks, numel)
        rows[1] = -rows[0]
        return rows
    if kind == "spread":
        return normal(num_tasks, numel) * torch.logspace(-6, 6, num_tasks, dtype=torch.float64)[:, None]
    if kind == "nearly_parallel":
        return normal(1, numel) + 1e-6 * normal(num_tasks, numel)
    raise ValueError(kind)


def exact_gram(kind: str, num_tasks: int) -> Tensor:
    rows = task_gradients(kind, num_tasks)
    return rows @ rows.T


def inputs(gram: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(losses, Gram matrix) in ``dtype``: the losses' dtype sets the compute dtype, and these
    weightings read no loss value."""
    return torch.ones(gram.shape[0], dtype=dtype), gram.to(dtype)


def with_gradient(gram: Tensor) -> Tensor:
    return gram.diagonal() > 0


def restricted(gram: Tensor, mask: Tensor) -> Tensor:
    return gram[mask][:, mask]


def weights_on_case(function, kind: str, num_tasks: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(exact G, the weights in float64, the mask of the tasks with a gradient)."""
    gram = exact_gram(kind, num_tasks)
    return gram, function(*inputs(gram, dtype)).double(), with_gradient(gram)


def assert_sums_to_one(alpha: Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=10 * EPS[dtype])


def assert_mean_of_the_others(weights: Tensor, active: Tensor, dtype: torch.dtype) -> None:
    """The documented weight of a task without gradient: the mean weight of the others."""
    expected = weights[active].mean().expand(int((~active).sum()))
    torch.testing.assert_close(weights[~active], expected, rtol=10 * EPS[dtype], atol=0)


def mean_vector(size: int) -> Tensor:
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


# --- Float64 reference solvers ------------------------------------------------------------------


def project_onto_weighted_simplex(point: Tensor, weights: Tensor) -> Tensor:
    """Euclidean projection onto {v ≥ 0, weightsᵀv = 1}: v = max(point − τ·weights, 0), τ found
    among the breakpoints point_i / weights_i taken in decreasing order (Duchi et al., 2008)."""
    ratios = point / weights
    order = ratios.argsort(descending=True)
    thresholds = ((weights * point)[order].cumsum(0) - 1) / (weights * weights)[order].cumsum(0)
    last = (ratios[order] > thresholds).nonzero().max()
    return (point - thresholds[last] * weights).clamp_min(0)


def minimize_on_simplex(objective, norms: Tensor, iterations: int = 500) -> Tensor:
    """argmin over {α ≥ 0, Σα = 1} of a convex ``objective(α) -> (value, gradient)``.

    Accelerated projected gradient with backtracking and restarts on v = norms ∘ α: the Gram
    matrices here have norms spread over orders of magnitude, their correlation matrices do not,
    and in v the objectives see the correlations."""
    inverse = 1 / norms

    def in_v(v: Tensor) -> tuple[Tensor, Tensor]:
        value, gradient = objective(v * inverse)
        return value, gradient * inverse

    v = torch.ones_like(norms) / inverse.sum()
    ahead, momentum, lipschitz = v, 1.0, 1.0
    best = in_v(v)[0]
    for _ in range(iterations):
        value, gradient = in_v(ahead)
        while True:
            candidate = project_onto_weighted_simplex(ahead - gradient / lipschitz, inverse)
            step = candidate - ahead
            candidate_value = in_v(candidate)[0]
            if candidate_value <= value + gradient @ step + lipschitz / 2 * (step @ step):
                break
            lipschitz *= 2
        if torch.equal(candidate, v):  # a fixed point of the projected step is the minimum
            break
        if candidate_value > best:
            ahead, momentum = v, 1.0
            continue
        lipschitz *= 0.9
        best = candidate_value
        next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        ahead = candidate + (momentum - 1) / next_momentum * (candidate - v)
        v, momentum = candidate, next_momentum
    return v * inverse


def nonnegative_qp_by_enumeration(matrix: Tensor, lower: Tensor) -> Tensor:
    """argmin vᵀMv subject to v ≥ lower, for a positive-definite ``matrix`` of size T ≤ 8.

    Exact: every set F of free coordinates is tried (v_F solves M_FF v_F = −M_FA lower_A, v = lower
    elsewhere) and the one that meets the KKT conditions (v ≥ lower, (Mv)_A ≥ 0) is kept: a
    strictly convex problem has exactly one. Rounding makes the exact one miss them by a few eps
    of the entries' scale; a wrong set misses them by far more, so the least violation wins."""
    size = matrix.shape[0]
    free = torch.tensor(list(itertools.product([False, True], repeat=size)))
    both = free[:, :, None] & free[:, None, :]
    eye = torch.eye(size, dtype=matrix.dtype)
    system = torch.where(both, matrix, eye)
    fixed = torch.where(free, 0, lower)
    rhs = torch.where(free, -(fixed @ matrix), fixed)
    candidates = torch.linalg.solve(system, rhs)
    gradient = candidates @ matrix
    below_bound = (lower - candidates).clamp_min(0) / (candidates.abs().amax(1, keepdim=True) + 1e-300)
    descent = torch.where(free, 0, -gradient).clamp_min(0) / ((candidates.abs() @ matrix.abs()) + 1e-300)
    violation = torch.maximum(below_bound, descent).amax(1)
    best = violation.argmin()
    assert violation[best] <= 1e3 * EPS[torch.float64]
    return candidates[best]


def pcgrad64(jacobian: Tensor, orders: Tensor) -> Tensor:
    """Algorithm 1 of Yu et al. (2020) on the gradient vectors, task i meeting the others in the
    order of row i of ``orders``: the update Σ_i g_i^PC."""
    update = torch.zeros_like(jacobian[0])
    for i, order in enumerate(orders.tolist()):
        projected = jacobian[i].clone()
        for j in order:
            inner = projected @ jacobian[j]
            if j != i and inner < 0:
                projected -= inner / (jacobian[j] @ jacobian[j]) * jacobian[j]
        update += projected
    return update


def kept_spectrum(gram: Tensor, cut: float) -> tuple[Tensor, Tensor]:
    """Eigenvalues of G / tr(G) above cut·T·λ_max (the rank test of Aligned-MTL) and their vectors."""
    values, vectors = torch.linalg.eigh(gram / gram.trace())
    kept = values > len(values) * cut * values[-1]
    return values[kept], vectors[:, kept]


def aligned_mtl64(gram: Tensor, scale_mode: str, cut: float) -> Tensor:
    """α = B π with B = √σ V Λ^{-1/2} Vᵀ on the eigenvalues above ``cut``·T·λ_max of G / tr(G)
    (Senushkin et al., 2023); a zero-gradient task, where B is 0, takes the others' mean."""
    num_tasks = gram.shape[0]
    values, vectors = kept_spectrum(gram, cut)
    sigma = common_value(values, scale_mode)
    balance = sigma.sqrt() * vectors @ torch.diag(values.rsqrt()) @ vectors.T
    weights = balance @ mean_vector(num_tasks)
    active = with_gradient(gram)
    return torch.where(active, weights, weights[active].mean())


def common_value(values: Tensor, scale_mode: str) -> Tensor:
    """σ of the ascending kept eigenvalues: the smallest, the lower median (torch.median's) or the mean."""
    return {"min": values[0], "median": values[(len(values) - 1) // 2], "rmse": values.mean()}[scale_mode]


# --- IMTL-G -------------------------------------------------------------------------------------

# Cases whose unit gradients have a combination with equal projections (1 in the range of C).
EQUAL_PROJECTIONS = [p for p in CASES if p.values[0] not in ("rank_deficient", "opposite")]


def projections_on_unit_gradients(weights: Tensor, gram: Tensor) -> tuple[Tensor, Tensor]:
    """(g·u_i for g = Jᵀα, Σ_j |α_j| c_j): the projections and the scale of their rounding."""
    norms = gram.diagonal().sqrt()
    return (gram @ weights) / norms, (weights.abs() * norms).sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,num_tasks", EQUAL_PROJECTIONS)
def test_imtl_g_projects_equally_on_every_unit_gradient(kind, num_tasks, dtype):
    gram, weights, active = weights_on_case(imtl_g_weights, kind, num_tasks, dtype)
    alpha = weights[active]
    assert_sums_to_one(alpha, dtype)
    projections, scale = projections_on_unit_gradients(alpha, restricted(gram, active))
    spread = (projections - projections.mean()).abs().max()
    assert spread <= {torch.float64: 1e-12, torch.float32: 1e-5}[dtype] * scale
    assert_mean_of_the_others(weights, active, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", [2, 3, 8, 17, 32])
def test_imtl_g_is_the_closed_form_for_full_rank_gram(num_tasks, dtype):
    """The closed form α ∝ G⁻¹c (c the gradient norms), normalised to Σα = 1."""
    gram = exact_gram("random", num_tasks)
    expected = torch.linalg.solve(gram, gram.diagonal().sqrt())
    expected = expected / expected.sum()
    weights = imtl_g_weights(*inputs(gram, dtype)).double()
    rtol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(weights, expected, rtol=rtol, atol=rtol * expected.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rank_deficient", "opposite"])
def test_imtl_g_without_equal_projections_solves_them_in_least_squares(kind, dtype):
    """α ∝ D⁻¹C⁺1: β = C⁺1 is the minimum-norm least-squares solution of C β = 1, eigenvalues at
    or below T·eps·λ_max of the compute dtype counted as zero."""
    gram = exact_gram(kind, 8)
    norms = gram.diagonal().sqrt()
    correlation = gram / torch.outer(norms, norms)
    beta = torch.linalg.pinv(correlation, rtol=8 * EPS[dtype], hermitian=True) @ torch.ones(8, dtype=torch.float64)
    expected = (beta / norms) / (beta / norms).sum()
    weights = imtl_g_weights(*inputs(gram, dtype)).double()
    torch.testing.assert_close(weights, expected, rtol=0, atol={torch.float64: 1e-12, torch.float32: 1e-5}[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_imtl_g_weights_are_zero_when_they_cannot_be_normalised(dtype):
    """For g and −2g, C⁺1 = 0: no combination has equal projections, and Σα = 1 has no solution."""
    gradient = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = torch.stack([gradient, -2 * gradient])
    weights = imtl_g_weights(*inputs(rows @ rows.T, dtype))
    assert torch.equal(weights, torch.zeros(2, dtype=dtype))


# --- MGDA ---------------------------------------------------------------------------------------


@functools.cache
def min_norm_in_hull(kind: str, num_tasks: int) -> float:
    """min over the simplex of αᵀ(G / max_i G_ii)α, over the tasks with a gradient."""
    gram = exact_gram(kind, num_tasks)
    gram = restricted(gram, with_gradient(gram)) / gram.diagonal().max()
    alpha = minimize_on_simplex(lambda a: (a @ gram @ a, 2 * gram @ a), gram.diagonal().sqrt())
    return float(alpha @ gram @ alpha)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,num_tasks", CASES)
def test_mgda_weights_are_the_min_norm_point_of_the_convex_hull(kind, num_tasks, dtype):
    gram, weights, active = weights_on_case(mgda_weights, kind, num_tasks, dtype)
    alpha = weights[active]
    gram = restricted(gram, active) / gram.diagonal().max()
    # The KKT conditions of min αᵀGα on the simplex (the docstring's residual, relative to max G_ii).
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]
    assert torch.all(alpha >= 0)
    assert_sums_to_one(alpha, dtype)
    norm_squared = alpha @ gram @ alpha
    slack = gram @ alpha - norm_squared
    assert slack.min() >= -tol, "some task would conflict with the update: (Gα)_i < αᵀGα"
    assert (alpha * slack).abs().max() <= tol, "a task with weight has (Gα)_i > αᵀGα"
    assert norm_squared <= min_norm_in_hull(kind, num_tasks) + tol
    assert_mean_of_the_others(weights, active, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mgda_update_vanishes_when_zero_is_in_the_hull(dtype):
    gram = exact_gram("opposite", 8)
    alpha = mgda_weights(*inputs(gram, dtype)).double()
    assert alpha @ gram @ alpha <= {torch.float64: 1e-12, torch.float32: 1e-6}[dtype] * gram.diagonal().max()


# --- PCGrad -------------------------------------------------------------------------------------


def assert_same_update(weights: Tensor, jacobian: Tensor, expected: Tensor, rtol: float) -> None:
    """Jᵀw against ``expected``, relative to Σ_i |w_i|‖g_i‖, the scale of the rounding of Jᵀw."""
    weights = weights.double()
    scale = (weights.abs() * jacobian.norm(dim=1)).sum()
    assert (weights @ jacobian - expected).norm() <= rtol * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,num_tasks", CASES)
def test_pcgrad_is_algorithm_1_on_the_gradients(kind, num_tasks, dtype):
    rows = task_gradients(kind, num_tasks)
    orders = random_orders(num_tasks, seed=num_tasks)
    weights = pcgrad_weights(*inputs(rows @ rows.T, dtype), orders=orders)
    assert_same_update(weights, rows, pcgrad64(rows, orders), rtol={torch.float64: 1e-12, torch.float32: 1e-5}[dtype])


def test_pcgrad_keeps_weight_one_without_conflict_or_without_gradient():
    rows = task_gradients("random", 6).abs()  # every inner product positive: the plain sum
    weights = pcgrad_weights(*inputs(rows @ rows.T, torch.float64), orders=random_orders(6, seed=1))
    assert torch.equal(weights, torch.ones(6, dtype=torch.float64))
    # A zero gradient is never projected onto, even among conflicting gradients.
    gram = exact_gram("zero_gradient", 8)
    weights = pcgrad_weights(*inputs(gram, torch.float64), orders=random_orders(8, seed=1))
    assert weights[4] == 1 and not torch.equal(weights, torch.ones(8, dtype=torch.float64))


def test_pcgrad_seed_reproduces_its_orders():
    rows = task_gradients("random", 8)
    losses, gram = inputs(rows @ rows.T, torch.float64)
    draws = [PCGrad(seed=7)(losses, gram) for _ in range(2)]
    sequence = PCGrad(seed=7)
    successive = [sequence(losses, gram) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and torch.equal(successive[0], draws[0])
    # Each call draws new orders, and another seed draws others: with these conflicting gradients
    # the orders change the weights.
    assert not torch.equal(successive[1], successive[0])
    assert not torch.equal(PCGrad(seed=8)(losses, gram), draws[0])
    # The documented draw: row ranks of torch.rand(T, T) from the seeded generator.
    orders = torch.rand(8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64).argsort(dim=1)
    assert_same_update(draws[0], rows, pcgrad64(rows, orders), rtol=1e-12)


@pytest.mark.parametrize(
    "orders,match",
    [
        (torch.zeros(3, 3, dtype=torch.int64), "orders must be"),
        (torch.zeros(4, 4, dtype=torch.float32), "orders must be"),
        (torch.zeros(4, 4, dtype=torch.int64, device="meta"), "orders are on"),
    ],
    ids=["shape", "dtype", "device"],
)
def test_pcgrad_rejects_bad_orders(orders, match):
    with pytest.raises(ValueError, match=match):
        pcgrad_weights(torch.ones(4), torch.eye(4), orders=orders)


def test_other_tasks_in_order_drops_each_rows_own_index_and_keeps_the_others_order():
    orders = random_orders(7, seed=3)
    others = other_tasks_in_order(7, orders.device, torch.float32, orders=orders)
    assert others.shape == (7, 6)
    for task, row in enumerate(orders.tolist()):
        assert others[task].tolist() == [other for other in row if other != task]


# --- CAGrad -------------------------------------------------------------------------------------


@functools.cache
def best_worst_improvement(kind: str, num_tasks: int, c: float) -> float:
    """The optimum of max_d min_i g_i·d over ‖d − g0‖ ≤ c‖g0‖, on G / tr(G), by the paper's dual
    min_{w ∈ Δ} g_wᵀg0 + c‖g0‖‖g_w‖ over the tasks with a gradient. Any w gives an upper bound."""
    gram = exact_gram(kind, num_tasks)
    active = with_gradient(gram)
    gram = gram / gram.trace()
    toward_mean = (gram @ mean_vector(num_tasks))[active]
    radius = c * (mean_vector(num_tasks) @ gram @ mean_vector(num_tasks)).sqrt()
    gram = restricted(gram, active)

    def dual(w: Tensor) -> tuple[Tensor, Tensor]:
        norm = (w @ gram @ w).clamp_min(0).sqrt()
        gradient = toward_mean + (radius * (gram @ w) / norm if norm > 0 else 0)
        return w @ toward_mean + radius * norm, gradient

    return float(dual(minimize_on_simplex(dual, gram.diagonal().sqrt()))[0])


def assert_cagrad_optimal(
    weights: Tensor, kind: str, num_tasks: int, c: float, tol: float, dtype: torch.dtype = torch.float64
) -> None:
    """d = Jᵀα lies in the ball (to rounding) and its worst improvement is the optimum (to ``tol``),
    both on G / tr(G)."""
    gram = exact_gram(kind, num_tasks)
    active = with_gradient(gram)
    gram = gram / gram.trace()
    mean = mean_vector(num_tasks)
    radius = c * (mean @ gram @ mean).sqrt()
    offset = weights - mean
    assert (offset @ gram @ offset).clamp_min(0).sqrt() <= radius * (1 + 100 * EPS[dtype]), "d leaves the ball"
    worst = (gram @ weights)[active].min()
    assert worst >= best_worst_improvement(kind, num_tasks, c) - tol
    # A task without gradient has no constraint and keeps its share of g0.
    torch.testing.assert_close(weights[~active], mean[~active], rtol=0, atol=EPS[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,num_tasks", CASES)
def test_cagrad_maximises_the_worst_improvement_in_the_ball(kind, num_tasks, dtype):
    weights = cagrad_weights(*inputs(exact_gram(kind, num_tasks), dtype), c=0.5).double()
    # The docstring's accuracy: 1e-8·tr(G) in float64; 1e-5·tr(G) in float32, 1e-3·tr(G) there
    # for rank-deficient G.
    tol = {torch.float64: 1e-8, torch.float32: 1e-3 if kind in ("rank_deficient", "opposite") else 1e-5}[dtype]
    assert_cagrad_optimal(weights, kind, num_tasks, c=0.5, tol=tol, dtype=dtype)


@pytest.mark.parametrize("c", [0.1, 2.0])
def test_cagrad_radius_scales_the_ball(c):
    weights = cagrad_weights(*inputs(exact_gram("random", 8), torch.float64), c=c)
    assert_cagrad_optimal(weights, "random", 8, c=c, tol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_weights_at_a_cancellation_have_no_part_in_the_null_space(dtype):
    """With g_1 = −g_0 the dual optimum has g_w = 0, where the paper's π + (r/‖g_w‖)w is undefined.
    A part of α − π along the null space of G (here e_0 + e_1) would leave d unchanged and only
    scale the heads of the two tasks."""
    gram = exact_gram("opposite", 8)
    weights = cagrad_weights(*inputs(gram, dtype)).double()
    along_null_space = (weights - mean_vector(8))[:2].sum() / math.sqrt(2)
    assert along_null_space.abs() <= {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]


@pytest.mark.parametrize("rescale,divisor", [("none", 1.0), ("1+c^2", 1.25), ("1+c", 1.5)])
def test_cagrad_rescale_divides_the_weights(rescale, divisor):
    gram = exact_gram("random", 8)
    weights = cagrad_weights(*inputs(gram, torch.float64), c=0.5, rescale=rescale)
    assert_cagrad_optimal(weights * divisor, "random", 8, c=0.5, tol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_without_radius_or_mean_gradient_is_the_mean(dtype):
    num_tasks = 8
    mean = torch.full((num_tasks,), 1 / num_tasks, dtype=dtype)
    assert torch.equal(cagrad_weights(*inputs(exact_gram("random", num_tasks), dtype), c=0.0), mean)
    # g and −g: g0 = 0, the ball is the point g0.
    rows = task_gradients("random", 1).repeat(2, 1) * torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    assert torch.equal(cagrad_weights(*inputs(rows @ rows.T, dtype)), torch.full((2,), 0.5, dtype=dtype))


# --- Aligned-MTL --------------------------------------------------------------------------------

# float32 keeps eigenvalues above T·1.2e-7·λ_max only: it aligns the inputs whose kept spectrum
# sits well above that cut, and its error grows with λ_max / λ_min of the kept eigenvalues.
ALIGNED_FLOAT32 = ["rank_deficient", "identical", "zero_gradient", "opposite", "nearly_parallel"]


def assert_aligned_update(weights: Tensor, gram: Tensor, scale_mode: str, cut: float, rtol: float) -> None:
    """The update is the mean of the aligned gradients B J, whose Gram matrix B G B = σ P has every
    nonzero eigenvalue σ (P: the projection onto the range of G): ‖Jᵀα‖² = σ πᵀPπ, on G / tr(G)."""
    active = with_gradient(gram)
    values, range_basis = kept_spectrum(restricted(gram, active), cut)
    mean = mean_vector(len(weights))[active]
    alpha = weights[active]
    update = alpha @ restricted(gram, active) @ alpha / gram.trace()
    expected = common_value(values, scale_mode) * (range_basis.T @ mean).square().sum()
    torch.testing.assert_close(update, expected, rtol=rtol, atol=0)


def alignment_rtol(gram: Tensor, cut: float, eps: float) -> float:
    """B = √σ G^(-1/2) on the kept spectrum, and σ one of its eigenvalues: relative to λ_max each
    eigenvalue is known to about eps, so B to about eps·λ_max/λ_min (the test's float64 reference
    included)."""
    values, _ = kept_spectrum(restricted(gram, with_gradient(gram)), cut)
    return 100 * eps * float(values[-1] / values[0])


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("kind,num_tasks", CASES)
def test_aligned_mtl_weights_are_the_balance_matrix_applied_to_the_mean(kind, num_tasks, scale_mode):
    gram = exact_gram(kind, num_tasks)
    weights = aligned_mtl_weights(*inputs(gram, torch.float64), scale_mode=scale_mode)
    expected = aligned_mtl64(gram, scale_mode, EPS[torch.float64])
    rtol = alignment_rtol(gram, EPS[torch.float64], EPS[torch.float64])
    torch.testing.assert_close(weights, expected, rtol=rtol, atol=rtol * expected.abs().max())
    assert_aligned_update(weights, gram, scale_mode, EPS[torch.float64], rtol=rtol)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("kind", ALIGNED_FLOAT32)
def test_aligned_mtl_in_float32(kind, scale_mode):
    gram = exact_gram(kind, 8)
    weights = aligned_mtl_weights(*inputs(gram, torch.float32), scale_mode=scale_mode).double()
    expected = aligned_mtl64(gram, scale_mode, EPS[torch.float32])
    rtol = alignment_rtol(gram, EPS[torch.float32], EPS[torch.float32])
    torch.testing.assert_close(weights, expected, rtol=rtol, atol=rtol * expected.abs().max())
    assert_aligned_update(weights, gram, scale_mode, EPS[torch.float32], rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_mtl_of_identical_gradients_is_the_mean(dtype):
    weights = aligned_mtl_weights(*inputs(exact_gram("identical", 8), dtype))
    torch.testing.assert_close(weights, torch.full((8,), 1 / 8, dtype=dtype), rtol=10 * EPS[dtype], atol=0)


# --- UPGrad and DualProj ------------------------------------------------------------------------


def regularized64(gram: Tensor, reg_eps: float) -> Tensor:
    """G̃ = G / tr(G) + reg_eps·I, the matrix of both projections (as in TorchJD)."""
    return gram / gram.trace() + reg_eps * torch.eye(gram.shape[0], dtype=gram.dtype)


def upgrad64(gram: Tensor, reg_eps: float) -> Tensor:
    """Σ_i v(e_i / T): the projections of the task gradients onto the dual cone, averaged."""
    matrix = regularized64(gram, reg_eps)
    return sum(nonnegative_qp_by_enumeration(matrix, row) for row in torch.eye(len(gram), dtype=gram.dtype) / len(gram))


def dualproj64(gram: Tensor, reg_eps: float) -> Tensor:
    return nonnegative_qp_by_enumeration(regularized64(gram, reg_eps), mean_vector(len(gram)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,num_tasks", CASES)
def test_upgrad_and_dualproj_weights_are_projections_onto_the_dual_cone(kind, num_tasks, dtype):
    """v(u) = argmin vᵀG̃v s.t. v ≥ u gives the projection Jᵀv of Jᵀu onto the dual cone of the
    gradients: UPGrad's weights are Σ_i v(e_i / T), DualProj's are v(π)."""
    reg_eps = 1e-4
    gram = exact_gram(kind, num_tasks)
    losses, given = inputs(gram, dtype)
    preferences = torch.cat([torch.eye(num_tasks), torch.full((1, num_tasks), 1.0)]).to(dtype) / num_tasks
    projections = project_onto_dual_cone(given, preferences, norm_eps=0.0, reg_eps=reg_eps).double()
    preferences = preferences.double()
    # The KKT conditions of each QP: v ≥ u, multipliers G̃v ≥ 0, (v − u)_i (G̃v)_i = 0.
    multipliers = projections @ regularized64(gram, reg_eps)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]
    assert torch.all(projections >= preferences - tol)
    assert torch.all(multipliers >= -tol)
    assert ((projections - preferences) * multipliers).abs().max() <= tol
    upgrad = upgrad_weights(losses, given, reg_eps=reg_eps).double()
    dualproj = dualproj_weights(losses, given, reg_eps=reg_eps).double()
    # On the CPU the weightings run the compiled active set, the projections above the tensor-op
    # interior point: both within about 1e-10 of the optimum in float64.
    parity = max(tol, 1e-9)
    torch.testing.assert_close(upgrad, projections[:-1].sum(0), rtol=0, atol=parity)
    torch.testing.assert_close(dualproj, projections[-1], rtol=0, atol=parity)
    # Neither update conflicts with a task beyond the regularisation: (Gα)_i ≥ −reg_eps·tr(G)·α_i.
    for weights in (upgrad, dualproj):
        assert torch.all(gram @ weights / gram.trace() >= -reg_eps * weights - tol * weights.abs().sum())
    if num_tasks <= 8:
        assert_dual_cone_accuracy(upgrad, upgrad64(gram, reg_eps), gram, reg_eps, dtype)
        assert_dual_cone_accuracy(dualproj, dualproj64(gram, reg_eps), gram, reg_eps, dtype)


def assert_dual_cone_accuracy(weights: Tensor, expected: Tensor, gram: Tensor, reg_eps: float, dtype) -> None:
    """The docstrings' accuracy: about 1e-10 relative in float64, 1e-7·κ in float32, κ the condition
    number of G̃. Measured, float32 also misses by about eps/√reg_eps = 1e-5 on each bound that is
    active with a (near) zero multiplier, where the interior point stops at x·z = eps² with
    z ≈ reg_eps·x; a projection has up to T − 1 of them."""
    if dtype == torch.float64:
        torch.testing.assert_close(weights, expected, rtol=1e-9, atol=0)
    else:
        condition = float(torch.linalg.cond(regularized64(gram, reg_eps)))
        weak_bounds = len(gram) * EPS[dtype] / math.sqrt(reg_eps)
        torch.testing.assert_close(weights, expected, rtol=0, atol=1e-7 * condition + weak_bounds)


@pytest.mark.parametrize("function", [upgrad_weights, dualproj_weights], ids=["upgrad", "dualproj"])
def test_dual_cone_norm_eps_turns_small_gradients_into_the_mean(function):
    gram = exact_gram("opposite", 8)
    losses, gram = inputs(gram / gram.trace() * 1e-5, torch.float64)
    mean = torch.full((8,), 1 / 8, dtype=torch.float64)
    torch.testing.assert_close(function(losses, gram, norm_eps=1e-4), mean, rtol=1e-10, atol=0)
    # The default, 0, keeps them scale-free: the same weights as for the unscaled gradients.
    torch.testing.assert_close(function(losses, gram), function(losses, gram * 1e5), rtol=1e-9, atol=0)
    assert not torch.allclose(function(losses, gram), mean)


# --- Nash-MTL -----------------------------------------------------------------------------------


def bargaining_residual(weights: Tensor, gram: Tensor, reg_eps: float) -> Tensor:
    """‖G̃α − 1/α‖ / ‖1/α‖ with G̃ = G + reg_eps·diag(G): Theorem 5.1 of Navon et al. (2022),
    α_i (Gα)_i = 1, with the ridge the weights are solved with."""
    matrix = gram + reg_eps * torch.diag(gram.diagonal())
    return (matrix @ weights - 1 / weights).norm() / (1 / weights).norm()


unclipped_nash_mtl_weights = functools.partial(nash_mtl_weights, max_norm=None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,num_tasks", [p for p in CASES if p.values[0] != "opposite"])
def test_nash_mtl_weights_are_the_bargaining_solution(kind, num_tasks, dtype):
    gram, weights, active = weights_on_case(unclipped_nash_mtl_weights, kind, num_tasks, dtype)
    alpha = weights[active]
    assert torch.all(alpha > 0)
    # The Frobenius norm of the restricted G is that of G: the zero row adds nothing.
    # A float32 G gets the ridge of its rounding too, 2·T·eps₃₂ (see nash_mtl_weights).
    ridge = REG_EPS + (2 * num_tasks * EPS[torch.float32] if dtype == torch.float32 else 0.0)
    residual = bargaining_residual(alpha, restricted(gram, active), ridge)
    # Solved in float64 whatever the dtype: float32 adds the rounding of the weights. Where no
    # solution exists without the ridge (rank-deficient G), B's condition number is ~1/ridge, and
    # a float32 G's own rounding (4e-8 of diag(G) here) moves the far-out solution by 2e-2.
    tol = (
        {torch.float64: 1e-5, torch.float32: 5e-2}
        if kind == "rank_deficient"
        else {torch.float64: 1e-10, torch.float32: 1e-6}
    )
    tol = tol[dtype]
    assert residual <= tol
    # The paper's condition itself, α_i (Gα)_i = 1, within the ridge's distortion where a solution
    # exists without it (definite G) and the ridge is reg_eps alone (a float64 G).
    if kind in ("random", "zero_gradient", "spread", "nearly_parallel") and dtype == torch.float64:
        torch.testing.assert_close(
            alpha * (restricted(gram, active) @ alpha), torch.ones_like(alpha), rtol=0, atol=1e-6
        )
    assert_mean_of_the_others(weights, active, dtype)


def test_nash_mtl_with_opposite_gradients_keeps_the_update_bounded():
    """No bargaining solution exists without reg_eps: the weights of g and −g grow like
    (reg_eps·G_00)^(-1/2) while ‖Jᵀα‖² = T − reg_eps·Σ_i G_ii α_i² stays below T."""
    gram = exact_gram("opposite", 8)
    for reg_eps in (1e-4, 1e-6, REG_EPS):
        weights = nash_mtl_weights(*inputs(gram, torch.float64), reg_eps=reg_eps, max_norm=None)
        # B's condition number is about 1 / reg_eps.
        assert bargaining_residual(weights, gram, reg_eps) <= 1e-16 / reg_eps
        assert weights[:2].min() >= 0.1 / math.sqrt(reg_eps * gram[0, 0])
        update = weights @ gram @ weights
        ridge = reg_eps * (gram.diagonal() * weights**2).sum()
        torch.testing.assert_close(update, 8 - ridge, rtol=1e-14 / reg_eps, atol=0)
        assert update <= 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_nash_mtl_max_norm_clips_the_update(dtype):
    gram = exact_gram("random", 8)
    free = nash_mtl_weights(*inputs(gram, dtype), max_norm=None).double()
    free_norm = (free @ gram @ free).sqrt()
    # ‖Jᵀα‖² = T less the ridge's share (2·T·eps₃₂ of diag(G) for a float32 G).
    root_t = torch.tensor(8.0, dtype=torch.float64).sqrt()
    torch.testing.assert_close(free_norm, root_t, rtol={torch.float64: 1e-6, torch.float32: 1e-5}[dtype], atol=0)
    clipped = nash_mtl_weights(*inputs(gram, dtype), max_norm=0.25 * float(free_norm)).double()
    torch.testing.assert_close(clipped, free / 4, rtol=10 * EPS[dtype], atol=0)
    roomy = nash_mtl_weights(*inputs(gram, dtype), max_norm=2 * float(free_norm)).double()
    assert torch.equal(roomy, free)
    # The default, 1.0 as the peers': the update has norm 1.
    default = nash_mtl_weights(*inputs(gram, dtype)).double()
    torch.testing.assert_close(default, free / free_norm, rtol=10 * EPS[dtype], atol=0)


def test_nash_mtl_update_direction_ignores_the_scale_of_one_gradient():
    """Scaling g_0 by 10 scales α_0 by 1/10 and keeps the update's direction (up to O(reg_eps))."""
    # Norms of one order, so that reg_eps is small against every G_ii / ‖G‖_F.
    rows = torch.randn(5, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scaled = rows * torch.tensor([10.0, 1, 1, 1, 1], dtype=torch.float64)[:, None]
    before = nash_mtl_weights(*inputs(rows @ rows.T, torch.float64)) @ rows
    after = nash_mtl_weights(*inputs(scaled @ scaled.T, torch.float64)) @ scaled
    torch.testing.assert_close(after / after.norm(), before / before.norm(), rtol=0, atol=1e-5)


# --- Every weighting: documented degenerate inputs, options ---------------------------------------

ZOO = {
    "imtl_g": (IMTLG, imtl_g_weights),
    "mgda": (MGDA, mgda_weights),
    "pcgrad": (PCGrad, pcgrad_weights),
    "cagrad": (CAGrad, cagrad_weights),
    "aligned_mtl": (AlignedMTL, aligned_mtl_weights),
    "upgrad": (UPGrad, upgrad_weights),
    "dualproj": (DualProj, dualproj_weights),
    "nash_mtl": (NashMTL, nash_mtl_weights),
}
ZOO_FUNCTIONS = [pytest.param(function, id=name) for name, (_, function) in ZOO.items()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "function,options,expected",
    [
        (imtl_g_weights, {}, 1.0),
        (mgda_weights, {}, 1.0),
        (pcgrad_weights, {}, 1.0),
        (cagrad_weights, {"c": 0.4}, 1.4),
        (aligned_mtl_weights, {}, 1.0),
        (upgrad_weights, {}, 1.0),
        (dualproj_weights, {}, 1.0),
        # α(1 + reg_eps)G_11 α = 1; the update √G_11·α = 1/√1.25 needs no clipping.
        (nash_mtl_weights, {"reg_eps": 0.25}, 1 / math.sqrt(1.25)),
    ],
    ids=list(ZOO),
)
def test_single_task_weight(function, options, expected, dtype):
    for square_norm in (3.7, 1e-20):
        weights = function(*inputs(torch.tensor([[square_norm]], dtype=torch.float64), dtype), **options)
        weight = expected / math.sqrt(square_norm) if function is nash_mtl_weights else expected
        torch.testing.assert_close(weights, torch.tensor([weight], dtype=dtype), rtol=10 * EPS[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "function,expected",
    [
        (imtl_g_weights, 1 / 5),
        (mgda_weights, 1 / 5),
        (pcgrad_weights, 1.0),
        (cagrad_weights, 1 / 5),
        (aligned_mtl_weights, 1 / 5),
        (upgrad_weights, 1 / 5),
        (dualproj_weights, 1 / 5),
        (nash_mtl_weights, 1.0),
    ],
    ids=list(ZOO),
)
def test_zero_gram_gives_the_neutral_weights(function, expected, dtype):
    """With every gradient zero the update is 0 whatever the weights: the heads train with the
    method's neutral weight (1/T, or 1 for the methods whose weights are not normalised)."""
    weights = function(*inputs(torch.zeros(5, 5, dtype=torch.float64), dtype))
    rtol = 10 * EPS[dtype]
    if function is upgrad_weights:
        # UPGrad's rows e_i/T meet bounds that are active with a zero multiplier here; the interior
        # point leaves each at about eps/√reg_eps (measured here: 1.3e-11 relative in float64,
        # 1.5e-4 in float32).
        rtol = {torch.float64: 1e-10, torch.float32: 3e-4}[dtype]
    torch.testing.assert_close(weights, torch.full((5,), expected, dtype=dtype), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("function", ZOO_FUNCTIONS)
def test_weights_ignore_a_common_scale_of_the_gradients(function, dtype):
    """Every method is free of the gradients' common scale; a tiny or huge one must not under- or
    overflow in float32 either."""
    # Norms of one order: float32 keeps the whole spectrum (Aligned-MTL cuts eigenvalues below
    # T·1.2e-7·λ_max, where the rounding of G decides).
    rows = torch.randn(6, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    gram = rows @ rows.T / (rows @ rows.T).trace()
    options = {"orders": random_orders(6, seed=3)} if function is pcgrad_weights else {}
    expected = function(*inputs(gram, dtype), **options).double()
    for scale in (1e-24, 1e24):
        weights = function(*inputs(gram * scale, dtype), **options).double()
        # Nash-MTL's α_i (Gα)_i = 1: α scales by scale^(-1/2), the update's norm does not change.
        weights = weights * math.sqrt(scale) if function is nash_mtl_weights else weights
        torch.testing.assert_close(weights, expected, rtol={torch.float64: 1e-9, torch.float32: 1e-4}[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ADVERSARIAL)
@pytest.mark.parametrize("function", ZOO_FUNCTIONS)
def test_adversarial_gram_gives_finite_weights(function, kind, dtype):
    assert torch.isfinite(function(*inputs(exact_gram(kind, 8), dtype))).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "function,expected",
    [
        (imtl_g_weights, 1 / 8),
        (mgda_weights, 1 / 8),
        (pcgrad_weights, 1.0),  # identical gradients never conflict
        (aligned_mtl_weights, 1 / 8),
        (upgrad_weights, 1 / 8),
        (dualproj_weights, 1 / 8),
        # α = a·1 with (a·T·‖g‖)² = T before clipping: clipped to ‖Jᵀα‖ = a·T·‖g‖ = 1 (‖g‖² = G_00).
        (nash_mtl_weights, None),
    ],
    ids=[name for name in ZOO if name != "cagrad"],
)
def test_identical_gradients_share_the_weight_evenly(function, expected, dtype):
    """Documented by every method but CAGrad, whose update there fixes only Σα = 1 + c."""
    gram = exact_gram("identical", 8)
    weights = function(*inputs(gram, dtype))
    expected = 1 / (8 * math.sqrt(gram[0, 0])) if function is nash_mtl_weights else expected
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(weights, torch.full((8,), expected, dtype=dtype), rtol=rtol, atol=0)


@pytest.mark.parametrize(
    "kind,num_tasks,dtype",
    [("random", 3, torch.float64), ("random", 8, torch.float64), ("random", 17, torch.float64)]
    # float32: inputs whose kept spectrum is far from Aligned-MTL's cut, which rounding decides.
    + [(kind, 8, dtype) for kind in ("rank_deficient", "zero_gradient", "opposite") for dtype in DTYPES],
)
@pytest.mark.parametrize("function", [imtl_g_weights, aligned_mtl_weights], ids=["imtl_g", "aligned_mtl"])
def test_jacobi_and_lapack_give_the_same_weights(function, kind, num_tasks, dtype):
    gram = exact_gram(kind, num_tasks)
    losses, given = inputs(gram, dtype)
    lapack = function(losses, given, eigen_solver="lapack")
    jacobi = function(losses, given, eigen_solver="jacobi")
    # IMTL-G decomposes the correlation matrix, well conditioned here; Aligned-MTL G itself, whose
    # conditioning bounds both solvers' accuracy.
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]
    if function is aligned_mtl_weights:
        tol = max(tol, alignment_rtol(gram, EPS[dtype], EPS[dtype]))
    torch.testing.assert_close(jacobi, lapack, rtol=tol, atol=tol * lapack.abs().max())


BAD_OPTIONS = [
    pytest.param(weighting, options, match, id=f"{weighting.__name__}-{options}")
    for weighting, options, match in [
        (IMTLG, {"eigen_solver": "qr"}, "eigen_solver"),
        (MGDA, {"iterations": 0}, "iterations"),
        (MGDA, {"iterations": 2.5}, "iterations"),
        (CAGrad, {"c": -0.1}, "c must"),
        (CAGrad, {"c": float("nan")}, "c must"),
        (CAGrad, {"rescale": "2"}, "rescale"),
        (CAGrad, {"iterations": 0}, "iterations"),
        (AlignedMTL, {"scale_mode": "max"}, "scale_mode"),
        (AlignedMTL, {"eigen_solver": "qr"}, "eigen_solver"),
        (UPGrad, {"reg_eps": -1e-4}, "reg_eps"),
        (UPGrad, {"norm_eps": float("inf")}, "norm_eps"),
        (DualProj, {"iterations": 0}, "iterations"),
        (NashMTL, {"reg_eps": 0.0}, "reg_eps"),
        (NashMTL, {"max_norm": 0.0}, "max_norm"),
        (NashMTL, {"iterations": True}, "iterations"),
    ]
]


@pytest.mark.parametrize("weighting,options,match", BAD_OPTIONS)
def test_bad_options_raise(weighting, options, match):
    with pytest.raises(ValueError, match=match):
        weighting(**options)
    with pytest.raises(ValueError, match=match):
        weighting.function(torch.ones(3), torch.eye(3), **options)


@pytest.mark.parametrize("seed", ["1", True, 1.0])
def test_pcgrad_rejects_a_seed_that_is_no_int(seed):
    with pytest.raises(ValueError, match="seed"):
        PCGrad(seed=seed)


@pytest.mark.parametrize(
    "name,options",
    [
        ("imtl_g", {"eigen_solver": "jacobi"}),
        ("mgda", {"iterations": 12}),
        ("cagrad", {"c": 0.3, "rescale": "1+c", "iterations": 30}),
        ("aligned_mtl", {"scale_mode": "median", "eigen_solver": "lapack"}),
        ("upgrad", {"norm_eps": 1e-9, "reg_eps": 1e-3, "iterations": 20}),
        ("dualproj", {"reg_eps": 1e-2}),
        ("nash_mtl", {"reg_eps": 1e-5, "max_norm": 0.5, "iterations": 25}),
    ],
)
def test_make_weighting_by_name_passes_the_options(name, options):
    weighting_class, function = ZOO[name]
    weighting = make_weighting(name, **options)
    assert type(weighting) is weighting_class
    assert {key: weighting.options[key] for key in options} == options
    assert weighting.gram_use == "full"  # every one reads all of G: memory mode streams it
    losses, gram = inputs(exact_gram("random", 5), torch.float64)
    assert torch.equal(weighting(losses, gram), function(losses, gram, **options))


def test_make_weighting_pcgrad_by_name_with_a_seed():
    losses, gram = inputs(exact_gram("random", 8), torch.float64)
    by_name = make_weighting("pcgrad", seed=11)
    assert isinstance(by_name, PCGrad) and by_name.gram_use == "full"
    assert torch.equal(by_name(losses, gram), PCGrad(seed=11)(losses, gram))


# --- Solvers ------------------------------------------------------------------------------------


def symmetric_case(name: str) -> Tensor:
    """Float64 symmetric matrices that are hard for an eigen-solver in different ways."""
    generator = torch.Generator().manual_seed(len(name))

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if name.startswith("random"):
        rows = normal(int(name.split("-")[1]), 50)
        return rows @ rows.T
    if name == "repeated":  # eigenvalues 1, 1, 1, 2, 2, 5, 5 (odd n)
        basis = torch.linalg.qr(normal(7, 7)).Q
        return basis @ torch.diag(torch.tensor([1.0, 5, 1, 2, 5, 1, 2], dtype=torch.float64)) @ basis.T
    if name == "rank_deficient":
        rows = normal(9, 3) @ normal(3, 20)
        return rows @ rows.T
    if name == "scaled":  # row norms 1e-3..1e3
        rows = normal(8, 30) * torch.logspace(-3, 3, 8, dtype=torch.float64)[:, None]
        return rows @ rows.T
    if name == "indefinite":
        square = normal(6, 6)
        return square + square.T
    if name == "diagonal":
        return torch.diag(torch.tensor([3.0, -1, 0, 2, 2, 7], dtype=torch.float64))
    if name == "zero":
        return torch.zeros(4, 4, dtype=torch.float64)
    raise ValueError(name)


SYMMETRIC = ["random-1", "random-2", "random-5", "random-8", "random-17", "random-32"]
SYMMETRIC += ["repeated", "rank_deficient", "scaled", "indefinite", "diagonal", "zero"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SYMMETRIC)
def test_jacobi_eigh_matches_lapack(name, dtype):
    matrix = symmetric_case(name)
    values, vectors = jacobi_eigh(matrix.to(dtype))
    values, vectors = values.double(), vectors.double()
    size = matrix.shape[0]
    scale = max(float(torch.linalg.matrix_norm(matrix)), 1e-300)
    # The docstring: relative residual below 1e-13 in float64 for n ≤ 32, rounding level in float32.
    tol = {torch.float64: 1e-13, torch.float32: 1e-5}[dtype]
    assert torch.all(values[1:] >= values[:-1])
    torch.testing.assert_close(values, torch.linalg.eigvalsh(matrix), rtol=0, atol=tol * scale)
    eye = torch.eye(size, dtype=torch.float64)
    torch.testing.assert_close(vectors.T @ vectors, eye, rtol=0, atol=tol * size)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, matrix, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("method", ["lapack", "jacobi"])
@pytest.mark.parametrize("name", ["random-8", "repeated", "rank_deficient", "scaled", "zero"])
def test_pinv_apply_matches_the_pseudo_inverse(name, method):
    matrix = symmetric_case(name)
    rhs = torch.linspace(-1, 2, matrix.shape[0], dtype=torch.float64)
    expected = torch.linalg.pinv(matrix, hermitian=True) @ rhs
    # An eigenvalue λ is known to about eps·λ_max, so M⁺ to about eps·λ_max/λ_min relative.
    values = torch.linalg.eigvalsh(matrix)
    kept = values[values > len(values) * EPS[torch.float64] * values[-1]]
    condition = float(kept[-1] / kept[0]) if len(kept) else 1.0
    tol = 100 * EPS[torch.float64] * condition * float(expected.norm())
    solution, in_range = pinv_apply(matrix, rhs, method=method)
    torch.testing.assert_close(solution, expected, rtol=0, atol=tol)
    assert bool(in_range) == bool(expected.abs().max() > 0)


def test_pinv_apply_tells_a_right_hand_side_orthogonal_to_the_range():
    vector = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64) / 2
    matrix = torch.outer(vector, vector) * 3.0
    _, in_range = pinv_apply(matrix, torch.ones(4, dtype=torch.float64))
    assert not bool(in_range)
    _, in_range = pinv_apply(matrix, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert bool(in_range)


def test_symmetric_eigh_rejects_unknown_methods():
    with pytest.raises(ValueError, match="eigen_solver"):
        symmetric_eigh(torch.eye(3), "qr")


def quadratic(hessian: Tensor, linear: Tensor):
    """½xᵀQx − bᵀx: (gradient, Hessian) for a batch of x."""
    return lambda x: (x @ hessian - linear, hessian)


def test_minimize_on_orthant_finds_a_known_qp_minimum():
    """b is built from chosen (x*, z*) so that Qx* − b = z*, x* ≥ 0, z* ≥ 0, x*∘z* = 0: x* is the
    minimum over x ≥ 0; with a multiplier y* of Σx = 1 added, the minimum over the simplex."""
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    hessian = factor @ factor.T + torch.eye(6, dtype=torch.float64)
    minima = torch.tensor([[0.5, 0, 1.2, 0, 0.3, 0], [0, 0, 0, 2.0, 0, 0.1]], dtype=torch.float64)
    multipliers = torch.tensor([[0, 0.7, 0, 0.2, 0, 1.1], [0.4, 3.0, 0.1, 0, 0.2, 0]], dtype=torch.float64)
    # A batch of two problems, solved independently.
    found = minimize_on_orthant(
        quadratic(hessian, minima @ hessian - multipliers), (2, 6), dtype=torch.float64, device="cpu"
    )
    torch.testing.assert_close(found, minima, rtol=0, atol=1e-10)
    on_simplex = torch.tensor([0.6, 0, 0.4, 0, 0, 0], dtype=torch.float64)
    linear = hessian @ on_simplex - torch.tensor([0, 0.5, 0, 0.2, 0.9, 0.1], dtype=torch.float64) - 0.3
    found = minimize_on_orthant(
        quadratic(hessian, linear), (6,), dtype=torch.float64, device="cpu", equality=torch.ones(6, dtype=torch.float64)
    )
    torch.testing.assert_close(found, on_simplex, rtol=0, atol=1e-10)


def test_minimize_on_orthant_with_a_curved_objective():
    """Σ exp(x_i) − cᵀx over x ≥ 0 is smallest at x_i = max(log c_i, 0)."""
    target = torch.tensor([3.0, 0.5, 1.0, 2.0], dtype=torch.float64)

    def objective(x: Tensor) -> tuple[Tensor, Tensor]:
        return x.exp() - target, torch.diag_embed(x.exp())

    found = minimize_on_orthant(objective, (4,), dtype=torch.float64, device="cpu")
    torch.testing.assert_close(found, target.log().clamp_min(0), rtol=0, atol=1e-10)


def test_spd_solve_reports_a_failed_factorisation():
    matrix = symmetric_case("random-5")
    rhs = torch.eye(5, dtype=torch.float64)[:, :2]
    solution, ok = spd_solve(matrix, rhs)
    assert ok
    torch.testing.assert_close(matrix @ solution, rhs, rtol=0, atol=1e-10)
    solution, ok = spd_solve(symmetric_case("indefinite"), torch.ones(6, 1, dtype=torch.float64))
    assert not ok and torch.equal(solution, torch.zeros(6, 1, dtype=torch.float64))
