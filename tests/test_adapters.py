"""The TorchJD and LibMTL adapters: our weightings against TorchJD's on shared float64 Gram
matrices, each adapter in the training loop it is made for against MTLStep, and the error
raised without TorchJD."""

from __future__ import annotations

import copy
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from _weighting_cases import fresh_weighting
from multitask_models import ToyMultiTask, toy_batch
from packaging.requirements import Requirement
from torch import nn

from emtl_kernels import EMTL, WEIGHTINGS, MTLStep, PCGrad
from emtl_kernels.weightings import (
    aligned_mtl_weights,
    cagrad_weights,
    dualproj_weights,
    emtl_weights,
    imtl_g_weights,
    mgda_weights,
    pcgrad_weights,
    upgrad_weights,
)

pytest.importorskip("torchjd")
pytest.importorskip("quadprog")  # TorchJD's default dual-cone projector

from torchjd import aggregation
from torchjd.autojac import backward, jac_to_grad, mtl_backward

from emtl_kernels.adapters.libmtl import libmtl_weighting
from emtl_kernels.adapters.torchjd import (
    DeviceDualConeProjector,
    TorchJDWeighting,
    as_torchjd_aggregator,
    as_torchjd_weighting,
    from_torchjd,
)

NUM_TASKS = [2, 3, 8, 17]
REPOSITORY = Path(__file__).resolve().parents[1]


def random_jacobian(num_tasks: int, seed: int) -> torch.Tensor:
    """Full-rank J, [T, 2T + 3] float64, rows with norms spread over two orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(num_tasks, 2 * num_tasks + 3, generator=generator, dtype=torch.float64)
    return jacobian * 10 ** torch.empty(num_tasks, 1, dtype=torch.float64).uniform_(-1, 1, generator=generator)


def rank_deficient_jacobian(num_tasks: int, seed: int) -> torch.Tensor:
    """J of rank max(1, T // 2): its rows are random mixtures of that many gradients."""
    generator = torch.Generator().manual_seed(seed)
    rank = max(1, num_tasks // 2)
    basis = torch.randn(rank, 2 * num_tasks + 3, generator=generator, dtype=torch.float64)
    return torch.randn(num_tasks, rank, generator=generator, dtype=torch.float64) @ basis


def parity_grams():
    for num_tasks in NUM_TASKS:
        for kind, make in (("random", random_jacobian), ("rank_deficient", rank_deficient_jacobian)):
            jacobian = make(num_tasks, seed=num_tasks)
            yield pytest.param(jacobian @ jacobian.T, id=f"{kind}-T{num_tasks}")


def zero_losses(gram: torch.Tensor) -> torch.Tensor:
    return torch.zeros(gram.shape[0], dtype=gram.dtype)


def worst_improvement(gram: torch.Tensor, weights: torch.Tensor) -> float:
    """min_i g_i·(Jᵀw) relative to tr(G)."""
    return float((gram @ weights).min() / gram.trace())


# Our weightings against TorchJD's, on one float64 Gram matrix ------------------------------


@pytest.mark.parametrize("gram", parity_grams())
@pytest.mark.parametrize(
    "ours,theirs",
    [(upgrad_weights, aggregation.UPGradWeighting), (dualproj_weights, aggregation.DualProjWeighting)],
    ids=["upgrad", "dualproj"],
)
def test_dual_cone_weightings_match_torchjd_quadprog(gram, ours, theirs):
    """Same QP (G/tr(G) + 1e-4 I, norm_eps = 1e-4), solved by our interior point and by quadprog;
    both are exact to about 1e-10 relative in float64."""
    weights = ours(zero_losses(gram), gram, norm_eps=1e-4)
    torch.testing.assert_close(weights, theirs()(gram), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("gram", parity_grams())
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_matches_torchjd(gram, scale_mode):
    weights = aligned_mtl_weights(zero_losses(gram), gram, scale_mode=scale_mode)
    expected = aggregation.AlignedMTLWeighting(scale_mode=scale_mode)(gram)
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("num_tasks", NUM_TASKS)
def test_imtl_g_matches_torchjd_on_independent_gradients(num_tasks):
    jacobian = random_jacobian(num_tasks, seed=num_tasks)
    gram = jacobian @ jacobian.T
    expected = aggregation.IMTLGWeighting()(gram)
    torch.testing.assert_close(imtl_g_weights(zero_losses(gram), gram), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("num_tasks", NUM_TASKS)
def test_imtl_g_update_has_torchjd_direction_when_gradients_repeat(num_tasks):
    """With repeated directions (g_j a positive multiple of g_i) G is singular but equal projections
    exist, and both C⁺1 (ours) and G⁺c (TorchJD) give the minimum-norm update with equal
    projections. The weights differ in the null space of Jᵀ and so does Σ_i α_i, the length
    IMTL-G divides by: the updates agree in direction, not in length."""
    generator = torch.Generator().manual_seed(num_tasks)
    distinct = max(1, num_tasks // 2)
    directions = torch.randn(distinct, 2 * num_tasks, generator=generator, dtype=torch.float64)
    lengths = torch.empty(num_tasks, 1, dtype=torch.float64).uniform_(0.5, 3, generator=generator)
    jacobian = directions[torch.arange(num_tasks) % distinct] * lengths
    gram = jacobian @ jacobian.T
    update = jacobian.T @ imtl_g_weights(zero_losses(gram), gram)
    expected = jacobian.T @ aggregation.IMTLGWeighting()(gram)
    cosine = update @ expected / (update.norm() * expected.norm())
    assert 1 - cosine <= 1e-12
    unit_rows = jacobian / jacobian.norm(dim=1, keepdim=True)
    projections = unit_rows @ update
    torch.testing.assert_close(projections, projections.mean().expand_as(projections), rtol=1e-9, atol=0)


@pytest.mark.parametrize("gram", parity_grams())
def test_mgda_norm_is_at_most_torchjd_frank_wolfe(gram):
    """TorchJD's Frank-Wolfe stops at a step below 1e-3 or after 100 iterations: its point of the
    hull is an upper bound on the minimum norm, which ours must reach."""
    weights = mgda_weights(zero_losses(gram), gram)
    theirs = aggregation.MGDAWeighting()(gram)
    assert weights @ gram @ weights <= theirs @ gram @ theirs + 1e-12 * gram.trace()


@pytest.mark.parametrize("num_tasks,seed", [(2, 1), (2, 2), (3, 0), (3, 1), (3, 2)])
def test_mgda_matches_converged_frank_wolfe(num_tasks, seed):
    """Where the minimum-norm point is inside the hull (all weights > 0) Frank-Wolfe converges
    linearly, and 1000 iterations with no early stop pin the weights to about 1e-10."""
    jacobian = random_jacobian(num_tasks, seed)
    gram = jacobian @ jacobian.T
    converged = aggregation.MGDAWeighting(epsilon=1e-15, max_iters=1000)(gram)
    assert (converged > 1e-3).all()
    torch.testing.assert_close(mgda_weights(zero_losses(gram), gram), converged, rtol=0, atol=1e-9)


@pytest.mark.parametrize("gram", parity_grams())
@pytest.mark.parametrize("c", [0.4, 1.5])
def test_cagrad_matches_torchjd_cvxpy(gram, c):
    """TorchJD solves CAGrad's dual with cvxpy (Clarabel, tolerances about 1e-8 on the objective).
    Its worst task improvement cannot beat ours, the maximum, by more than that; the weights,
    unique when G is, agree to the solver's accuracy in them."""
    pytest.importorskip("cvxpy")
    weights = cagrad_weights(zero_losses(gram), gram, c=c)
    theirs = aggregation.CAGradWeighting(c=c)(gram)
    assert worst_improvement(gram, weights) >= worst_improvement(gram, theirs) - 1e-8
    if torch.linalg.matrix_rank(gram) == gram.shape[0]:
        torch.testing.assert_close(weights, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))


@pytest.mark.parametrize("num_tasks", NUM_TASKS)
def test_pcgrad_matches_torchjd_with_the_same_orders(num_tasks):
    """TorchJD draws task i's order as torch.randperm(T), i = 0..T−1, from the default generator:
    replaying those draws as ``orders`` must give its weights."""
    jacobian = rank_deficient_jacobian(num_tasks, seed=num_tasks)
    gram = jacobian @ jacobian.T
    torch.manual_seed(7)
    orders = torch.stack([torch.randperm(num_tasks) for _ in range(num_tasks)])
    torch.manual_seed(7)
    expected = aggregation.PCGradWeighting()(gram)
    torch.testing.assert_close(pcgrad_weights(zero_losses(gram), gram, orders=orders), expected, rtol=1e-12, atol=1e-12)


# Our weightings inside TorchJD's training loop ----------------------------------------------


def trunk_output_and_losses(model: ToyMultiTask):
    """The task losses of a toy batch and the trunk's output they were computed from (TorchJD's
    ``mtl_backward`` needs that shared representation)."""
    captured = []
    handle = model.trunk.register_forward_hook(lambda module, inputs, output: captured.append(output))
    losses = model.losses(*toy_batch(len(model.heads)))
    handle.remove()
    return captured[0], losses


def torchjd_for(name: str):
    """Our weighting ``name`` twice, fresh: one for TorchJD's loop, one for MTLStep (PCGrad and
    GradVac with the same seed, so that both draw the same orders)."""
    return fresh_weighting(name), fresh_weighting(name)


@pytest.mark.parametrize("entry", ["backward", "mtl_backward", "summed_gramians"])
@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_torchjd_aggregator_of_ours_gives_the_mtl_step_gradient(name, entry):
    """torchjd.autojac (float32 Jacobian, its own Gram matrix: of the whole Jacobian, or summed over
    the parameters with ``optimize_gramian_computation``) then jac_to_grad with our weighting:
    the shared gradient is the one MTLStep writes with the same weighting. The two float32 Gram
    matrices differ by rounding, which the solvers carry into the weights at float32 accuracy.
    Aligned-MTL's update is B-whitened: the toy's gradient norms differ by 1e4, its smallest kept
    eigenvalue is 1e-4 of the largest, and rounding moves the update by eps32 · 1e4 (7e-4 seen)."""
    for_torchjd, for_step = torchjd_for(name)
    model = ToyMultiTask()
    reference = copy.deepcopy(model)
    aggregator = as_torchjd_aggregator(for_torchjd)
    features, losses = trunk_output_and_losses(model)
    aggregator.gramian_weighting.losses = torch.stack(losses).detach()
    shared = list(model.trunk.parameters())
    if entry == "mtl_backward":
        mtl_backward(losses, features=features)
    else:
        backward(losses, inputs=shared)
    weights = jac_to_grad(shared, aggregator, optimize_gramian_computation=entry == "summed_gramians")

    step = MTLStep(reference.trunk.parameters(), for_step)
    step_weights = step.backward(reference.losses(*toy_batch(3)))
    torch.testing.assert_close(weights, step_weights, rtol=1e-4, atol=1e-5 * float(step_weights.abs().max()))
    tol = 2e-3 if name == "aligned_mtl" else 1e-5
    for ours, theirs in zip(reference.trunk.parameters(), shared, strict=True):
        assert (ours.grad - theirs.grad).norm() <= tol * ours.grad.norm()


def test_torchjd_weighting_of_emtl_needs_the_losses():
    jacobian = random_jacobian(3, seed=0)
    gram = jacobian @ jacobian.T
    weighting = as_torchjd_weighting("emtl", lam=0.5)
    with pytest.raises(ValueError, match=r"\.losses"):
        weighting(gram)
    losses = torch.tensor([0.3, 20.0, 1.5], dtype=torch.float64)
    weighting.losses = losses
    torch.testing.assert_close(weighting(gram), emtl_weights(losses, gram, lam=0.5), rtol=0, atol=0)
    assert isinstance(weighting, TorchJDWeighting) and isinstance(weighting.weighting, EMTL)


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_torchjd_aggregator_of_ours_leaves_no_autograd_history(name):
    """Our weights are held constant, so a graph through Jᵀw would differentiate the aggregation
    as if they did not depend on J. TorchJD's aggregators whose weights leave autograd (UPGrad
    among them) run under no_grad; ours too."""
    jacobian = random_jacobian(3, seed=4).requires_grad_()
    aggregator = as_torchjd_aggregator(torchjd_for(name)[0])
    aggregator.gramian_weighting.losses = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    assert not aggregation.UPGrad()(jacobian).requires_grad
    aggregated = aggregator(jacobian)
    assert not aggregated.requires_grad and aggregated.grad_fn is None
    expected_weights = torchjd_for(name)[1](aggregator.gramian_weighting.losses, (jacobian @ jacobian.T).detach())
    torch.testing.assert_close(aggregated, jacobian.detach().T @ expected_weights, rtol=1e-12, atol=1e-12)


def test_torchjd_weighting_returns_the_gramian_dtype():
    jacobian = random_jacobian(4, seed=3)
    gram = (jacobian @ jacobian.T).float()
    weights = as_torchjd_weighting("upgrad")(gram)
    assert weights.dtype == torch.float32
    expected = upgrad_weights(zero_losses(gram.double()), gram.double())
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)


# TorchJD's weightings inside MTLStep ---------------------------------------------------------


@pytest.mark.parametrize(
    "torchjd_weighting",
    [aggregation.UPGradWeighting(), aggregation.UPGrad()],
    ids=["UPGradWeighting", "UPGrad"],
)
def test_torchjd_upgrad_in_mtl_step_matches_ours(torchjd_weighting):
    """TorchJD's UPGrad, run by MTLStep on its float32 Gram matrix, against ours with TorchJD's
    norm_eps. quadprog solves in float64, ours in float32, accurate to about 1e-7 · κ with κ the
    condition number of G/tr(G) + 1e-4 I: 1e4 for the toy (gradient norms 1e4 apart), so 1e-3."""
    results = []
    for weighting, options in ((from_torchjd(torchjd_weighting), {}), ("upgrad", {"norm_eps": 1e-4})):
        model = ToyMultiTask()
        weights = MTLStep(model.trunk.parameters(), weighting, **options).backward(model.losses(*toy_batch(3)))
        results.append((weights, [p.grad for p in model.parameters()]))
    (theirs, their_grads), (ours, our_grads) = results
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3 * float(ours.abs().max()))
    for a, b in zip(their_grads, our_grads, strict=True):
        assert (a - b).norm() <= 1e-3 * b.norm()


@pytest.mark.parametrize(
    "not_a_gramian_weighting",
    [aggregation.MeanWeighting(), aggregation.Mean(), "upgrad"],
    ids=["MeanWeighting", "Mean", "name"],
)
def test_from_torchjd_refuses_what_is_not_a_gramian_weighting(not_a_gramian_weighting):
    with pytest.raises(TypeError):
        from_torchjd(not_a_gramian_weighting)


# The device-side dual-cone projector ---------------------------------------------------------


@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("aggregator", [aggregation.UPGrad, aggregation.DualProj], ids=lambda a: a.__name__)
def test_device_projector_matches_quadprog(aggregator, num_tasks):
    jacobian = rank_deficient_jacobian(num_tasks, seed=num_tasks + 1)
    ours = aggregator(projector=DeviceDualConeProjector())(jacobian)
    torch.testing.assert_close(ours, aggregator()(jacobian), rtol=1e-8, atol=1e-10 * float(jacobian.norm()))


def test_device_projector_solves_every_row_of_u_in_its_shape_and_dtype():
    """TorchJD hands a projector U of any shape [..., T]; each row is projected on its own."""
    generator = torch.Generator().manual_seed(2)
    jacobian = torch.randn(5, 13, generator=generator, dtype=torch.float64)
    gram = jacobian @ jacobian.T
    rows = torch.rand(2, 3, 5, generator=generator, dtype=torch.float64)
    expected = torch.stack([aggregation.DualProjWeighting(pref_vector=row)(gram) for row in rows.reshape(-1, 5)])
    weights = DeviceDualConeProjector()(rows, gram)
    assert weights.shape == rows.shape
    torch.testing.assert_close(weights.reshape(-1, 5), expected, rtol=1e-8, atol=1e-10)
    # Gaussian rows of one scale: κ ≈ 10, so float32 solves to about 1e-6.
    single = DeviceDualConeProjector()(rows.float(), gram.float())
    assert single.dtype == torch.float32 and single.shape == rows.shape
    torch.testing.assert_close(single.reshape(-1, 5).double(), expected, rtol=1e-5, atol=1e-6)


# LibMTL --------------------------------------------------------------------------------------


class ToyArchitecture(nn.Module):
    """LibMTL's architecture protocol (``AbsArchitecture``): the constructor the Trainer calls,
    ``get_share_params()``, ``zero_grad_share_params()``, ``task_num`` and ``rep_grad``. The encoder
    is ToyMultiTask's trunk and the decoders its heads, so that its losses are ToyMultiTask's."""

    losses = ToyMultiTask.losses
    features_and_losses = ToyMultiTask.features_and_losses

    def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs):
        super().__init__()
        self.task_name = task_name
        self.task_num = len(task_name)
        self.trunk = encoder_class()
        self.heads = nn.ModuleList(decoders[task] for task in task_name)
        self.rep_grad = rep_grad
        self.multi_input = multi_input
        self.device = device

    def get_share_params(self):
        return self.trunk.parameters()

    def zero_grad_share_params(self):
        self.trunk.zero_grad(set_to_none=False)


def libmtl_model(weighting_class, rep_grad: bool = False):
    """The model LibMTL's ``Trainer._prepare_model`` builds: the architecture and the weighting
    mixed into one class, its constructor followed by ``init_param()``. Its parameters are
    ToyMultiTask()'s, so that a ToyMultiTask() is its reference."""
    toy = ToyMultiTask()

    class MTLmodel(ToyArchitecture, weighting_class):
        def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, kwargs):
            super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
            self.init_param()

    names = [f"task{i}" for i in range(len(toy.heads))]
    return MTLmodel(
        names, lambda: toy.trunk, dict(zip(names, toy.heads, strict=True)), rep_grad, False, torch.device("cpu"), {}
    )


def libmtl_training_losses(model) -> torch.Tensor:
    """The loss vector LibMTL's Trainer builds: a zeros tensor filled task by task."""
    losses = torch.zeros(model.task_num)
    for i, loss in enumerate(model.losses(*toy_batch(model.task_num))):
        losses[i] = loss
    return losses


@pytest.mark.parametrize("heads", ["unweighted", "weighted"])
@pytest.mark.parametrize("name,options", [("upgrad", {}), ("emtl", {"lam": 0.5}), ("cagrad", {"c": 0.4})])
def test_libmtl_weighting_gives_the_mtl_step_gradients_and_weights(name, options, heads):
    # LibMTL's own gradient-based weightings give the heads their plain task gradients: the default.
    chosen = {} if heads == "unweighted" else {"head_gradients": heads}
    model = libmtl_model(libmtl_weighting(name, **chosen, **options))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad(set_to_none=False)  # as LibMTL's Trainer does: .grad holds zeros
    weights = model.backward(libmtl_training_losses(model))

    reference = ToyMultiTask()
    step = MTLStep(reference.trunk.parameters(), name, head_gradients=heads, **options)
    expected = step.backward(reference.losses(*toy_batch(3)))
    assert isinstance(weights, np.ndarray) and weights.shape == (3,)
    np.testing.assert_allclose(weights, expected.numpy(), rtol=1e-5, atol=1e-7)
    for actual, wanted in zip(model.parameters(), reference.parameters(), strict=True):
        assert (actual.grad - wanted.grad).norm() <= 1e-5 * wanted.grad.norm() + 1e-9


def test_libmtl_weighting_keeps_one_step_across_calls():
    model = libmtl_model(libmtl_weighting("emtl"))
    model.backward(libmtl_training_losses(model))
    first = model._mtl_step
    model.backward(libmtl_training_losses(model))
    assert model._mtl_step is first and first.num_tasks == 3


def test_libmtl_weighting_without_return_weights_returns_none():
    model = libmtl_model(libmtl_weighting("upgrad", return_weights=False))
    assert model.backward(libmtl_training_losses(model)) is None
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_libmtl_weighting_refuses_rep_grad_and_says_what_to_use():
    model = libmtl_model(libmtl_weighting("upgrad"), rep_grad=True)
    with pytest.raises(ValueError, match=r"rep_grad=True .* not supported.*rep_grad=False.*features=representation"):
        model.backward(libmtl_training_losses(model))


@pytest.mark.parametrize(
    "name,weight_args,options",
    [
        ("cagrad", {"calpha": 0.1, "rescale": 1}, {"c": 0.1, "rescale": "1+c^2"}),
        ("cagrad", {"calpha": 0.9, "rescale": 0}, {"c": 0.9, "rescale": "none"}),
        ("cagrad", {"calpha": 0.4, "rescale": 2}, {"c": 0.4, "rescale": "1+c"}),
        ("upgrad", {"UPGrad_norm_eps": 1e-4, "UPGrad_reg_eps": 1e-2}, {"norm_eps": 1e-4, "reg_eps": 1e-2}),
        ("nash_mtl", {"max_norm": 0.5, "update_weights_every": 1, "optim_niter": 20}, {"max_norm": 0.5}),
        ("nash_mtl", {"max_norm": 0.0, "update_weights_every": 1, "optim_niter": 20}, {"max_norm": None}),
        ("mgda", {"mgda_gn": "none"}, {}),
        ("fairgrad", {"FairGrad_alpha": 2.0}, {"p": 2.0}),
        ("gradnorm", {"alpha": 0.5}, {"alpha": 0.5}),
        ("db_mtl", {"DB_beta": 0.0, "DB_beta_sigma": 0.0}, {}),
        ("gradvac", {"GradVac_beta": 0.2, "GradVac_group_type": 0}, {"beta": 0.2}),
    ],
)
def test_libmtl_weight_args_become_our_options(name, weight_args, options):
    """LibMTL's Trainer calls model.backward(losses, **weight_args) with the names of its config:
    the step they give is MTLStep's with the options they map to."""
    model = libmtl_model(libmtl_weighting(name))
    weights = model.backward(libmtl_training_losses(model), **weight_args)
    reference = ToyMultiTask()
    step = MTLStep(reference.trunk.parameters(), name, head_gradients="unweighted", **options)
    expected = step.backward(reference.losses(*toy_batch(3)))
    np.testing.assert_allclose(weights, expected.numpy(), rtol=1e-6, atol=1e-8)
    for actual, wanted in zip(model.parameters(), reference.parameters(), strict=True):
        assert (actual.grad - wanted.grad).norm() <= 1e-5 * wanted.grad.norm() + 1e-9


def test_libmtl_calpha_changes_the_weights_and_a_change_between_steps_takes_effect():
    model = libmtl_model(libmtl_weighting("cagrad"))
    weights = {c: model.backward(libmtl_training_losses(model), calpha=c, rescale=0) for c in (0.1, 0.9, 0.1)}
    assert np.abs(weights[0.1] - weights[0.9]).max() > 0.1
    reference = ToyMultiTask()
    expected = MTLStep(reference.trunk.parameters(), "cagrad", c=0.1).backward(reference.losses(*toy_batch(3)))
    np.testing.assert_allclose(weights[0.1], expected.numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "weighting,options,weight_args,error,match",
    [
        ("upgrad", {}, {"calpha": 0.5}, TypeError, r"\['calpha'\] are not LibMTL options of 'upgrad'"),
        ("emtl", {}, {"lam": 0.5}, TypeError, r"\['lam'\].*libmtl_weighting"),
        ("mgda", {}, {"mgda_gn": "l2"}, ValueError, "mgda_gn='l2' is not supported"),
        ("nash_mtl", {}, {"update_weights_every": 2}, ValueError, "update_weights_every=2"),
        ("nash_mtl", {}, {"optim_niter": 5}, ValueError, "optim_niter=5"),
        ("cagrad", {}, {"calpha": 0.5, "rescale": 3}, ValueError, "rescale 0, 1 or 2"),
        ("db_mtl", {}, {"DB_beta": 0.9, "DB_beta_sigma": 0.0}, ValueError, "DB_beta=0.9 is not supported"),
        ("cagrad", {"c": 0.4}, {"calpha": 0.5}, ValueError, r"calpha=0.5 asks for c=0.5.*c=0.4"),
        (PCGrad(seed=0), {}, {"calpha": 0.5}, TypeError, "weighting given by name"),
    ],
)
def test_libmtl_weight_args_without_a_counterpart_are_refused_by_name(weighting, options, weight_args, error, match):
    """Before anything is written: the model's gradients are as they were."""
    model = libmtl_model(libmtl_weighting(weighting, **options))
    with pytest.raises(error, match=match):
        model.backward(libmtl_training_losses(model), **weight_args)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "arguments,error,match",
    [
        ({"weighting": "nope"}, ValueError, "unknown weighting"),
        ({"weighting": "cagrad", "radius": 0.5}, TypeError, "radius"),
        ({"weighting": "emtl", "backend": "nope"}, ValueError, "unknown backend"),
    ],
)
def test_libmtl_weighting_checks_its_arguments_when_made(arguments, error, match):
    """Before the Trainer builds the model, not at its first training step."""
    with pytest.raises(error, match=match):
        libmtl_weighting(**arguments)


# Installing TorchJD ------------------------------------------------------------------------


def test_the_extras_asked_of_torchjd_are_spelt_as_its_metadata_provides_them():
    """pip 23 does not normalise extra names: an extra spelt otherwise than in TorchJD's metadata
    is dropped with a warning, and with it the solvers the tests compare against."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    provided = set(metadata("torchjd").get_all("Provides-Extra") or [])
    extras = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    asked = [Requirement(line) for lines in extras.values() for line in lines]
    torchjd_extras = {extra for requirement in asked if requirement.name == "torchjd" for extra in requirement.extras}
    assert torchjd_extras and torchjd_extras <= provided


# Without TorchJD -----------------------------------------------------------------------------


def test_without_torchjd_the_adapter_says_how_to_install_it_and_the_rest_imports():
    # None in sys.modules makes every import of torchjd fail, as if it were not installed.
    script = "\n".join(
        [
            "import sys",
            "sys.modules['torchjd'] = None",
            "import torch",
            "import emtl_kernels",
            "from emtl_kernels.adapters.libmtl import libmtl_weighting",
            "emtl_kernels.MTLStep([torch.nn.Parameter(torch.ones(2))], 'upgrad')",
            "try:",
            "    import emtl_kernels.adapters.torchjd",
            "except ImportError as error:",
            "    print('ImportError:', error)",
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ImportError:" in result.stdout and "pip install torchjd" in result.stdout
