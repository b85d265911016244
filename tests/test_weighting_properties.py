"""Properties every Gram-matrix weighting must have, on Hypothesis-drawn task gradients:
relabelling the tasks relabels the weights, a common scale of the gradients changes nothing,
the per-task scale behaviour each paper states, no conflict with any task for the methods that
promise it, and finite weights for any finite PSD Gram matrix, degenerate ones included.

G = J Jᵀ is formed in float64 from a drawn J, so the float64 weights are compared with each other
at solver accuracy (the docstrings' figures), not at float32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from _weighting_cases import update_gap
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from emtl_kernels.weightings import (
    WEIGHTINGS,
    cagrad_weights,
    dualproj_weights,
    emtl_weights,
    gradnorm_scaling_weights,
    imtl_g_weights,
    make_weighting,
    mgda_weights,
    nash_mtl_weights,
    pcgrad_weights,
    upgrad_weights,
)

#: Each example runs interior-point solvers of 30 to 40 iterations (about 20 ms each on a CPU):
#: a modest number keeps the file within a minute; every run draws new examples.
PROPERTY_SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Weightings whose weights are unique for every G (a strictly convex problem, a closed form or a
#: minimum-norm solution): relabelling or rescaling must give back the same weights.
UNIQUE_WEIGHTS = [
    "emtl",
    "gradnorm_scaling",
    "equal",
    "aligned_mtl",
    "upgrad",
    "dualproj",
    "nash_mtl",
    "fairgrad",
    "db_mtl",
]
#: Weightings whose weights are not unique when G is singular (a face of the simplex, or CAGrad's
#: multipliers, may hold many optimal weight vectors); only their update Jᵀw is.
UNIQUE_UPDATE = ["mgda", "cagrad"]
#: Weightings the papers state are unchanged when every task gradient is multiplied by one factor.
#: Not Nash-MTL: α_i (Gα)_i = 1 scales its weights inversely (its update is what stays).
SCALE_FREE = ["imtl_g", "mgda", "cagrad", "aligned_mtl", "upgrad", "dualproj", "equal"]


@st.composite
def task_jacobians(draw, max_tasks: int = 8, max_params: int = 6) -> torch.Tensor:
    """J, [T, P] float64. Half the draws have small integer entries, which give exact degeneracies
    (zero, equal, opposite and orthogonal rows, rank below T); the others seeded Gaussian rows.
    Each row is then scaled by 10^k, k in -3..3, so that the norms differ by up to six orders."""
    num_tasks = draw(st.integers(1, max_tasks))
    num_params = draw(st.integers(1, max_params))
    if draw(st.booleans()):
        entries = draw(st.lists(st.integers(-3, 3), min_size=num_tasks * num_params, max_size=num_tasks * num_params))
        jacobian = torch.tensor(entries, dtype=torch.float64).reshape(num_tasks, num_params)
    else:
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        jacobian = torch.randn(num_tasks, num_params, generator=generator, dtype=torch.float64)
    exponents = draw(st.lists(st.integers(-3, 3), min_size=num_tasks, max_size=num_tasks))
    return jacobian * 10.0 ** torch.tensor(exponents, dtype=torch.float64)[:, None]


@st.composite
def independent_jacobians(draw) -> torch.Tensor:
    """J with T ≤ 6 linearly independent, well-conditioned rows of norms spread over two orders
    (Gaussian rows, P ≥ T + 4): the setting of the papers' per-task scaling statements."""
    num_tasks = draw(st.integers(1, 6))
    num_params = num_tasks + draw(st.integers(4, 8))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    jacobian = torch.randn(num_tasks, num_params, generator=generator, dtype=torch.float64)
    return jacobian * 10 ** torch.empty(num_tasks, 1, dtype=torch.float64).uniform_(-1, 1, generator=generator)


def losses_for(num_tasks: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_tasks, generator=generator, dtype=torch.float64) * 10 + 0.1


def relative_update_gap(gram: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> float:
    """‖Jᵀ(first − second)‖ relative to ‖J‖_F · ‖first‖₁: how far apart two updates are, from G."""
    distance = update_gap(first, second, gram)
    scale = gram.trace().clamp_min(0).sqrt() * first.abs().sum()
    return float(distance / scale) if scale > 0 else float(distance)


def assert_same_weights(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    gap = (actual - expected).abs().max()
    assert gap <= tol * max(1.0, float(expected.abs().max())), (actual, expected)


def assert_same_weighting(name: str, gram: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The same update to 1e-9 of its scale, and the same weights where they are unique: to 1e-7,
    or 1e-4 for Aligned-MTL, whose weights carry Λ^(-1/2) of the kept eigenvalues. Row norms
    1e-3..1e3 make κ(G) up to 1e12, so rounding of the smallest kept eigenvalue moves them by
    eps · κ (about 1e-6 seen); the update, which multiplies them by J, does not move. Nash-MTL's
    weights, where no bargaining solution exists without its ridge, solve a system of condition
    number about 1/reg_eps = 1e9: to eps/reg_eps, 1e-6."""
    assert relative_update_gap(gram, actual, expected) <= 1e-9
    if name not in UNIQUE_UPDATE:
        assert_same_weights(actual, expected, tol={"aligned_mtl": 1e-4, "nash_mtl": 1e-6}.get(name, 1e-7))


def imtl_g_is_well_posed(jacobian: torch.Tensor) -> bool:
    """Whether IMTL-G's weights are a well-conditioned function of G: some combination has equal,
    non-zero projections on the unit gradients (Σ_i u_i ≠ 0, else C⁺1 = 0), and the normalisation
    Σ_i α_i is away from 0. Near either the weights blow up or are rounding noise."""
    norms = jacobian.norm(dim=1)
    rows = jacobian[norms > 0] / norms[norms > 0, None]
    if rows.shape[0] == 0 or rows.sum(0).norm() < 1e-6 * math.sqrt(rows.shape[0]):
        return False
    unnormalized = torch.linalg.pinv(rows @ rows.T, hermitian=True) @ torch.ones(rows.shape[0], dtype=torch.float64)
    unnormalized = unnormalized / norms[norms > 0]
    return bool(unnormalized.sum().abs() > 1e-6 * unnormalized.abs().sum())


def permuted_orders(orders: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """PCGrad's orders for the tasks relabelled by ``perm`` (new task k is old task perm[k])."""
    return perm.argsort()[orders[perm]]


# Relabelling the tasks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNIQUE_WEIGHTS + UNIQUE_UPDATE)
@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), data=st.data())
def test_relabelling_the_tasks_relabels_the_weights(name, jacobian, data):
    num_tasks = jacobian.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(num_tasks))))
    gram, losses = jacobian @ jacobian.T, losses_for(num_tasks)
    weighting = make_weighting(name)
    weights = weighting(losses, gram)
    relabelled = weighting(losses[perm], gram[perm][:, perm])
    assert_same_weighting(name, gram, relabelled[perm.argsort()], weights)


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), data=st.data())
def test_relabelling_the_tasks_relabels_imtl_g_weights(jacobian, data):
    assume(imtl_g_is_well_posed(jacobian))
    num_tasks = jacobian.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(num_tasks))))
    gram, losses = jacobian @ jacobian.T, losses_for(num_tasks)
    relabelled = imtl_g_weights(losses[perm], gram[perm][:, perm])
    assert_same_weighting("imtl_g", gram, relabelled[perm.argsort()], imtl_g_weights(losses, gram))


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), data=st.data())
def test_pcgrad_with_relabelled_orders_relabels_the_weights(jacobian, data):
    num_tasks = jacobian.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(num_tasks))))
    orders = torch.tensor([data.draw(st.permutations(range(num_tasks))) for _ in range(num_tasks)])
    gram, losses = jacobian @ jacobian.T, losses_for(num_tasks)
    weights = pcgrad_weights(losses, gram, orders=orders)
    relabelled = pcgrad_weights(losses[perm], gram[perm][:, perm], orders=permuted_orders(orders, perm))
    assert_same_weights(relabelled, weights[perm], tol=1e-12)


def test_imtl_g_gives_zero_weights_when_the_unit_gradients_cancel():
    """Parallel gradients of alternating signs: C = ssᵀ with s = (1, −1, 1, −1) and Σ_i s_i = 0, so
    C⁺1 = 0 exactly and no combination has equal non-zero projections; the docstring's answer is
    every weight 0."""
    jacobian = torch.tensor([[3.0], [-1.0], [2.0], [-5.0]], dtype=torch.float64)
    weights = imtl_g_weights(losses_for(4), jacobian @ jacobian.T)
    assert_same_weights(weights, torch.zeros(4, dtype=torch.float64), tol=1e-12)


# A common scale of all task gradients ---------------------------------------------------------


@pytest.mark.parametrize("name", SCALE_FREE)
@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), exponent=st.integers(-6, 6))
def test_common_scale_of_the_gradients_leaves_the_weights_unchanged(name, jacobian, exponent):
    if name == "imtl_g":
        assume(imtl_g_is_well_posed(jacobian))
    gram, losses = jacobian @ jacobian.T, losses_for(jacobian.shape[0])
    weighting = make_weighting(name)
    weights = weighting(losses, gram)
    # Scaling the gradients by 10^e scales G by 10^(2e).
    scaled = weighting(losses, gram * 10.0 ** (2 * exponent))
    assert_same_weighting(name, gram, scaled, weights)


@pytest.mark.parametrize("name", SCALE_FREE)
@PROPERTY_SETTINGS
@given(jacobian=independent_jacobians(), exponent=st.integers(-15, 15))
def test_common_scale_holds_in_float32_over_its_whole_range(name, jacobian, exponent):
    """A float32 step hands over G scaled by up to 1e±30 (still finite and normal): nothing inside
    a weighting may square or multiply G's entries before normalising them. The weights move only
    by the float32 rounding of G carried through the solve: 1e-4 on these κ(G) ≤ 1e6 inputs, and
    2e-3 for Aligned-MTL's Λ^(-1/2) (2.5e-4 seen)."""
    losses = losses_for(jacobian.shape[0]).float()
    gram = jacobian @ jacobian.T
    weighting = make_weighting(name)
    weights = weighting(losses, gram.float())
    scaled = weighting(losses, (gram * 10.0 ** (2 * exponent)).float())
    assert_same_weights(scaled, weights, tol=2e-3 if name == "aligned_mtl" else 1e-4)


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), exponent=st.integers(-6, 6))
def test_common_scale_of_the_gradients_scales_nash_mtl_weights_inversely(jacobian, exponent):
    """Gradients times s: α_i (Gα)_i = 1 gives weights α/s, so the update Jᵀα, clipped or not, stays.
    Not when no task has a gradient: every weight is then the neutral 1 at any scale."""
    gram, losses = jacobian @ jacobian.T, losses_for(jacobian.shape[0])
    assume(bool(gram.diagonal().any()))
    for weighting in (make_weighting("nash_mtl"), make_weighting("nash_mtl", max_norm=None)):
        weights = weighting(losses, gram)
        scaled = weighting(losses, gram * 10.0 ** (2 * exponent)) * 10.0**exponent
        assert_same_weighting("nash_mtl", gram, scaled, weights)


@pytest.mark.parametrize("dual_cone", [upgrad_weights, dualproj_weights], ids=lambda f: f.__name__)
@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), exponent=st.integers(-3, 3))
def test_dual_cone_norm_eps_turns_small_gradients_into_the_mean(dual_cone, jacobian, exponent):
    """norm_eps > 0 (TorchJD's 1e-4) gives up scale invariance: below it the weights are 1/T."""
    gram = jacobian @ jacobian.T * 10.0 ** (2 * exponent)
    losses = losses_for(jacobian.shape[0])
    weights = dual_cone(losses, gram, norm_eps=1e-4)
    if gram.trace() < 1e-4:
        # The QP on reg_eps · I alone has the solution v = u; the interior point stops with its
        # shifts v − u > 0 at about 1e-12.
        assert_same_weights(weights, torch.full_like(weights, 1 / jacobian.shape[0]), tol=1e-10)
    else:
        assert_same_weights(weights, dual_cone(losses, gram), tol=1e-7)


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), data=st.data())
def test_pcgrad_is_unchanged_by_a_common_scale(jacobian, data):
    num_tasks = jacobian.shape[0]
    orders = torch.tensor([data.draw(st.permutations(range(num_tasks))) for _ in range(num_tasks)])
    gram, losses = jacobian @ jacobian.T, losses_for(num_tasks)
    scaled = pcgrad_weights(losses, gram * 1e6, orders=orders)
    assert_same_weights(scaled, pcgrad_weights(losses, gram, orders=orders), tol=1e-10)


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), exponent=st.integers(-6, 6))
def test_gradnorm_scaling_without_eps_is_unchanged_by_a_common_scale(jacobian, exponent):
    gram, losses = jacobian @ jacobian.T, losses_for(jacobian.shape[0])
    norms = gram.diagonal().sqrt()
    assume((norms > 0).any())
    # ‖Σ_i g_i‖ = sqrt(1ᵀG1) is a sum that cancels when the gradients do: its rounding,
    # eps · Σ|G_ij|, is under the square root, and each weight divides it by c_i.
    cancellation = math.sqrt(torch.finfo(torch.float64).eps * float(gram.abs().sum())) / float(norms[norms > 0].min())
    for target, slack in (("mean_norm", 0.0), ("sum_norm", 2 * cancellation)):
        weights = gradnorm_scaling_weights(losses, gram, target=target, eps=0.0)
        scaled = gradnorm_scaling_weights(losses, gram * 10.0 ** (2 * exponent), target=target, eps=0.0)
        assert (scaled - weights).abs().max() <= 1e-12 * max(1.0, float(weights.abs().max())) + slack


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), loss_exponent=st.integers(-3, 3), grad_exponent=st.integers(-3, 3))
def test_emtl_depends_on_lambda_times_loss_over_squared_norm_only(jacobian, loss_exponent, grad_exponent):
    """w_i − 1 = (2λ/T)(r_i − r̄)/c_i is λ·L/c² in units: scaling the losses by a and the gradients
    by b is undone by scaling λ by b²/a (with eps = 0)."""
    gram, losses = jacobian @ jacobian.T, losses_for(jacobian.shape[0])
    loss_scale, grad_scale = 10.0**loss_exponent, 10.0**grad_exponent
    weights = emtl_weights(losses, gram, lam=0.3, eps=0.0, min_weight=None)
    rescaled = emtl_weights(
        losses * loss_scale, gram * grad_scale**2, lam=0.3 * grad_scale**2 / loss_scale, eps=0.0, min_weight=None
    )
    assert_same_weights(rescaled, weights, tol=1e-9)


# One task's gradient scaled -------------------------------------------------------------------


def cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    return float(first @ second / (first.norm() * second.norm()))


@PROPERTY_SETTINGS
@given(jacobian=independent_jacobians(), data=st.data())
def test_nash_mtl_direction_ignores_the_scale_of_one_task(jacobian, data):
    """Navon et al.: scaling g_k by s scales α_k by 1/s (and every α by one common factor, from the
    normalisation by ‖G‖_F), so the update keeps its direction. reg_eps breaks this by about
    reg_eps · ‖G‖_F / min_i G_ii (0.1 to 0.5 of it measured, the Newton residual being 1e-16),
    which per-task scales of 1e±2 make up to 1e9: the bargaining property itself is checked with
    reg_eps = 1e-15, on independent gradients, whose solution exists without it."""
    reg_eps = 1e-15
    task = data.draw(st.integers(0, jacobian.shape[0] - 1))
    scale = 10.0 ** data.draw(st.floats(-2, 2))
    factors = torch.ones(jacobian.shape[0], dtype=torch.float64)
    factors[task] = scale
    scaled_jacobian = jacobian * factors[:, None]
    grams = [jacobian @ jacobian.T, scaled_jacobian @ scaled_jacobian.T]
    losses = losses_for(jacobian.shape[0])
    weights, scaled = (nash_mtl_weights(losses, gram, reg_eps=reg_eps) for gram in grams)
    assert 1 - cosine(jacobian.T @ weights, scaled_jacobian.T @ scaled) <= 1e-12
    rescaled = scaled * factors
    spread = max(float(gram.norm() / gram.diagonal().min()) for gram in grams)
    assert_same_weights(rescaled / rescaled.sum(), weights / weights.sum(), tol=1e-9 + reg_eps * spread)


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), data=st.data())
def test_imtl_g_direction_ignores_the_scale_of_each_task(jacobian, data):
    """Liu et al.: the update has equal projections on the unit task gradients, which per-task
    scales leave alone; only its length and sign (Σ_i α_i = 1) follow the scales."""
    assume(imtl_g_is_well_posed(jacobian))
    num_tasks = jacobian.shape[0]
    exponents = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=num_tasks, max_size=num_tasks)))
    scaled_jacobian = jacobian * 10.0 ** exponents.double()[:, None]
    assume(imtl_g_is_well_posed(scaled_jacobian))
    losses = losses_for(num_tasks)
    update = jacobian.T @ imtl_g_weights(losses, jacobian @ jacobian.T)
    scaled_update = scaled_jacobian.T @ imtl_g_weights(losses, scaled_jacobian @ scaled_jacobian.T)
    assert 1 - abs(cosine(update, scaled_update)) <= 1e-9


# No conflict with any task -------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians())
def test_mgda_is_the_minimum_norm_point_of_the_hull(jacobian):
    """KKT of min_{α ∈ Δ} αᵀGα: α on the simplex and (Gα)_i ≥ αᵀGα ≥ 0 for every task, so the
    update conflicts with none (tasks with a zero gradient are outside the simplex)."""
    gram = jacobian @ jacobian.T
    weights = mgda_weights(losses_for(jacobian.shape[0]), gram)
    has_gradient = gram.diagonal() > 0
    assume(has_gradient.any())
    tol = 1e-9 * float(gram.trace())
    assert (weights[has_gradient] >= 0).all()
    assert abs(float(weights[has_gradient].sum()) - 1) <= 1e-12
    improvements = (gram @ weights)[has_gradient]
    assert (improvements >= weights @ gram @ weights - tol).all()


@pytest.mark.parametrize("dual_cone", [upgrad_weights, dualproj_weights], ids=lambda f: f.__name__)
@pytest.mark.parametrize("reg_eps", [0.0, 1e-4])
@PROPERTY_SETTINGS
@given(jacobian=task_jacobians())
def test_dual_cone_projections_conflict_with_no_task(dual_cone, reg_eps, jacobian):
    """(Gα)_i ≥ −ε · tr(G) · α_i: the QP is solved on G/tr(G) + ε · I, ε = reg_eps + T · eps (the
    rounding ridge). The ridge is not negligible for a task whose share G_ii/tr(G) is near T · eps
    (gradient norms 1e7 apart, opposite: the projection is then cut short by T·eps·tr(G)/G_ii)."""
    num_tasks = jacobian.shape[0]
    gram = jacobian @ jacobian.T
    weights = dual_cone(losses_for(num_tasks), gram, reg_eps=reg_eps)
    ridge = reg_eps + num_tasks * torch.finfo(torch.float64).eps
    trace = float(gram.trace())
    assert (gram @ weights >= -(ridge * weights.abs() + 1e-9) * trace).all()


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), c=st.sampled_from([1.0, 3.0]))
def test_cagrad_with_radius_at_least_the_mean_conflicts_with_no_task(jacobian, c):
    """With c ≥ 1 the ball ‖d − g_0‖ ≤ c‖g_0‖ holds d = 0, so the best worst improvement is ≥ 0
    (within the solver's 1e-8 · tr(G) in float64)."""
    gram = jacobian @ jacobian.T
    weights = cagrad_weights(losses_for(jacobian.shape[0]), gram, c=c)
    assert (gram @ weights >= -1e-7 * float(gram.trace())).all()


@PROPERTY_SETTINGS
@given(jacobian=task_jacobians(), c=st.sampled_from([0.2, 0.5, 0.9]))
def test_cagrad_improves_the_worst_task_within_its_ball(jacobian, c):
    """For any c the update d lies in the ball around the mean gradient g_0, and its worst task
    improvement is at least that of g_0 itself (a point of the ball)."""
    num_tasks = jacobian.shape[0]
    gram = jacobian @ jacobian.T
    weights = cagrad_weights(losses_for(num_tasks), gram, c=c)
    mean = torch.full((num_tasks,), 1 / num_tasks, dtype=torch.float64)
    has_gradient = gram.diagonal() > 0
    assume(has_gradient.any())
    tol = 1e-7 * float(gram.trace())
    assert (gram @ weights)[has_gradient].min() >= (gram @ mean)[has_gradient].min() - tol
    offset = weights - mean
    assert offset @ gram @ offset <= c**2 * (mean @ gram @ mean) * (1 + 1e-7) + tol


# Finite weights for any finite PSD G --------------------------------------------------------


@st.composite
def extreme_grams(draw) -> tuple[torch.Tensor, torch.dtype]:
    """A Gram matrix of drawn task gradients with norms from 1e-30 to 1e30 (float64) or 1e-8 to 1e8
    (float32, formed in float64 and rounded, as a float32 step hands it over: slightly indefinite)."""
    jacobian = draw(task_jacobians())
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    reach = 27 if dtype == torch.float64 else 5
    exponents = draw(st.lists(st.integers(-reach, reach), min_size=jacobian.shape[0], max_size=jacobian.shape[0]))
    jacobian = jacobian * 10.0 ** torch.tensor(exponents, dtype=torch.float64)[:, None]
    return (jacobian @ jacobian.T).to(dtype), dtype


@pytest.mark.parametrize("name", list(WEIGHTINGS))
@PROPERTY_SETTINGS
@given(gram_and_dtype=extreme_grams())
def test_weights_are_finite_for_any_finite_gram(name, gram_and_dtype):
    gram, dtype = gram_and_dtype
    assume(torch.isfinite(gram).all())
    assume(name != "krum" or gram.shape[0] >= 3)
    weights = make_weighting(name)(losses_for(gram.shape[0]).to(dtype), gram)
    assert weights.shape == (gram.shape[0],) and weights.dtype == dtype
    assert torch.isfinite(weights).all(), weights
