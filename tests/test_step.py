"""MTLStep end to end: the gradients it writes against float64 autograd of the objective."""

from __future__ import annotations

import warnings

import pytest
import torch
from multitask_models import (
    ToyMultiTask,
    float64_twin,
    shared_gradients64,
    toy_batch,
    weighted_sum_gradients64,
)

from emtl_kernels import MTLStep, Weighting

GRAD_TOL = dict(rtol=2e-4, atol=1e-6)


def run_step(model, step, batch=None, **backward_options):
    inputs, targets = batch or toy_batch(len(model.heads))
    weights = step.backward(model.losses(inputs, targets), **backward_options)
    return weights, [p.grad for p in model.parameters()]


def assert_grads_close(actual, expected, **tol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e, **(tol or GRAD_TOL))


def assert_float32_close(actual, expected, tol=1e-5):
    """Tensor by tensor, ‖a − e‖ ≤ tol·‖e‖: float32 rounding of sums with cancellation is
    relative to the scale of the whole gradient, not to each element."""
    for a, e in zip(actual, expected, strict=True):
        assert (a.double() - e.double()).norm() <= tol * e.double().norm() + 1e-12


def emtl_objective_gradients64(model, lam):
    """∇[Σ L_i + λ Var(L_i / c_i)] with c_i = ‖∇_θ L_i‖ held constant, by autograd in float64."""
    model64 = float64_twin(model)
    inputs, targets = toy_batch(len(model.heads), dtype=torch.float64)
    losses = model64.losses(inputs, targets)
    norms = shared_gradients64(model64, losses).norm(dim=1).detach()
    ratios = torch.stack(losses) / (norms + 1e-8)
    objective = sum(losses) + lam * ratios.var(unbiased=False)
    return list(torch.autograd.grad(objective, list(model64.parameters())))


@pytest.mark.parametrize("mode,batched_backward", [("speed", False), ("speed", True), ("memory", False)])
def test_emtl_step_writes_the_gradient_of_the_regularised_objective(mode, batched_backward):
    model = ToyMultiTask()
    step = MTLStep(
        model.trunk.parameters(), "emtl", lam=0.5, min_weight=None, mode=mode, batched_backward=batched_backward
    )
    _, grads = run_step(model, step)
    assert_grads_close(grads, emtl_objective_gradients64(model, lam=0.5))
    assert not step.last.skipped


@pytest.mark.parametrize(
    "weighting,options",
    [("emtl", {"lam": 2.0}), ("gradnorm_scaling", {}), ("gradnorm_scaling", {"target": "sum_norm"}), ("equal", {})],
)
def test_step_gradient_is_the_weighted_sum_with_float64_weights(weighting, options):
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), weighting, **options)
    weights, grads = run_step(model, step)
    model64 = float64_twin(model)
    losses64 = model64.losses(*toy_batch(3, dtype=torch.float64))
    jacobian = shared_gradients64(model64, losses64)
    norms = jacobian.norm(dim=1)
    loss_values = torch.stack(losses64).detach()
    if weighting == "emtl":
        ratios = loss_values / norms
        expected_weights = (1 + (2 * options["lam"] / 3) * (ratios - ratios.mean()) / norms).clamp_min(0)
    elif weighting == "gradnorm_scaling":
        common = norms.mean() if not options else jacobian.sum(dim=0).norm()
        expected_weights = common / norms
    else:
        expected_weights = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-4, atol=1e-6)
    assert_grads_close(grads, weighted_sum_gradients64(model64, losses64, expected_weights))
    if weighting == "equal":  # one backward of the sum: no task gradient is measured
        assert step.last.gram is None and bool(step.last.relative_contributions.isnan().all())
        return
    torch.testing.assert_close(step.last.gram.double(), jacobian @ jacobian.T, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(step.last.relative_contributions.double(), loss_values / norms, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "weighting,options",
    [("emtl", {"lam": 1.0}), ("gradnorm_scaling", {}), ("gradnorm_scaling", {"target": "sum_norm"})],
)
def test_memory_mode_matches_speed_mode(weighting, options):
    results = []
    for mode in ("speed", "memory"):
        model = ToyMultiTask()
        step = MTLStep(model.trunk.parameters(), weighting, mode=mode, **options)
        results.append(run_step(model, step))
        assert (step.last.gram is None) == (mode == "memory")
    (speed_weights, speed_grads), (memory_weights, memory_grads) = results
    torch.testing.assert_close(memory_weights, speed_weights, rtol=1e-5, atol=1e-7)
    assert_float32_close(memory_grads, speed_grads)


def test_batched_backward_matches_task_by_task():
    results = []
    for batched in (False, True):
        model = ToyMultiTask()
        results.append(run_step(model, MTLStep(model.trunk.parameters(), "emtl", batched_backward=batched)))
    assert_float32_close(results[1][1], results[0][1])


def test_norm_params_take_the_norms_on_a_subset_and_update_everything():
    model = ToyMultiTask()
    last_layer = list(model.trunk[2].parameters())
    step = MTLStep(model.trunk.parameters(), "gradnorm_scaling", norm_params=last_layer)
    weights, grads = run_step(model, step)
    model64 = float64_twin(model)
    losses64 = model64.losses(*toy_batch(3, dtype=torch.float64))
    subset = list(model64.trunk[2].parameters())
    norms = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, subset, retain_graph=True)]).norm()
            for loss in losses64
        ]
    )
    expected_weights = norms.mean() / norms
    torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-4, atol=0)
    assert_grads_close(grads, weighted_sum_gradients64(model64, losses64, expected_weights))


@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_step_adds_to_existing_gradients_like_backward(mode):
    model = ToyMultiTask()
    before = [torch.randn_like(p) for p in model.parameters()]
    for p, b in zip(model.parameters(), before, strict=True):
        p.grad = b.clone()
    step = MTLStep(model.trunk.parameters(), "emtl", mode=mode)
    weights, grads = run_step(model, step)
    model64 = float64_twin(model)
    losses64 = model64.losses(*toy_batch(3, dtype=torch.float64))
    expected = weighted_sum_gradients64(model64, losses64, weights.double())
    assert_grads_close(grads, [e + b.double() for e, b in zip(expected, before, strict=True)])


def test_shared_parameter_no_loss_reaches_keeps_no_gradient():
    model = ToyMultiTask()
    unused = torch.nn.Parameter(torch.randn(4))
    step = MTLStep([*model.trunk.parameters(), unused], "emtl")
    run_step(model, step)
    assert unused.grad is None
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_frozen_shared_parameters_are_left_out():
    model = ToyMultiTask()
    model.trunk[0].weight.requires_grad_(False)
    step = MTLStep(model.trunk.parameters(), "emtl")
    assert len(step.shared_params) == 3
    run_step(model, step)
    assert model.trunk[0].weight.grad is None


def test_single_task_gets_the_plain_gradient():
    model = ToyMultiTask(num_tasks=1)
    weights, grads = run_step(model, MTLStep(model.trunk.parameters(), "emtl"), toy_batch(1))
    assert torch.equal(weights, torch.ones(1))
    reference = ToyMultiTask(num_tasks=1)
    reference.losses(*toy_batch(1))[0].backward()
    for g, r in zip(grads, (p.grad for p in reference.parameters()), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


def test_loss_without_path_to_shared_parameters_keeps_weight_one_and_is_reported():
    model = ToyMultiTask()
    stray = torch.nn.Parameter(torch.tensor(2.0))
    inputs, targets = toy_batch()
    losses = [*model.losses(inputs, targets)[:2], stray.square()]
    step = MTLStep(model.trunk.parameters(), "emtl", lam=1.0)
    with pytest.warns(UserWarning, match="loss 2 has no path"):
        weights = step.backward(losses)
    assert weights[2] == 1
    assert step.last.zero_gradient.tolist() == [False, False, True]
    assert torch.isnan(step.last.relative_contributions[2])
    torch.testing.assert_close(stray.grad, torch.tensor(4.0))


def test_no_loss_reaching_the_shared_parameters_raises():
    stray = torch.nn.Parameter(torch.tensor(2.0))
    shared = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="no loss reaches"):
        MTLStep([shared], "emtl").backward([stray.square(), stray * 3])


def nan_gradient_losses(model):
    """Three losses; the last is finite (0) but its gradient is NaN (sqrt at 0)."""
    losses = model.losses(*toy_batch())
    features = model.trunk(toy_batch()[0])
    return [*losses[:2], (features.sum() * 0).sqrt()]


@pytest.mark.parametrize("mode", ["speed", "memory"])
@pytest.mark.parametrize("make_losses", ["nan_loss", "nan_gradient", "inf_loss"])
def test_non_finite_loss_or_gradient_skips_the_step(mode, make_losses):
    model = ToyMultiTask()
    before = [torch.randn_like(p) for p in model.parameters()]
    for p, b in zip(model.parameters(), before, strict=True):
        p.grad = b.clone()
    if make_losses == "nan_gradient":
        losses = nan_gradient_losses(model)
    else:
        losses = model.losses(*toy_batch())
        losses[1] = losses[1] * (float("nan") if make_losses == "nan_loss" else float("inf"))
    step = MTLStep(model.trunk.parameters(), "emtl", mode=mode)
    weights = step.backward(losses)
    assert step.last.skipped
    assert torch.equal(weights, torch.zeros(3))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, b)


def test_skipped_step_without_gradients_leaves_zeros_and_optimizer_untouched():
    model = ToyMultiTask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    start = [p.detach().clone() for p in model.parameters()]
    step = MTLStep(model.trunk.parameters(), "emtl")
    step.backward(nan_gradient_losses(model))
    assert step.optimizer_step(optimizer) is False
    for p, s in zip(model.parameters(), start, strict=True):
        assert torch.equal(p.detach(), s)
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    model.zero_grad()
    run_step(model, step)
    assert step.optimizer_step(optimizer) is True
    assert not torch.equal(model.trunk[0].weight.detach(), start[0])


def test_training_reduces_every_loss():
    model = ToyMultiTask()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = MTLStep(model.trunk.parameters(), "emtl")
    first = torch.stack(model.losses(*toy_batch())).detach()
    for _ in range(100):
        optimizer.zero_grad()
        step.backward(model.losses(*toy_batch()))
        optimizer.step()
    last = torch.stack(model.losses(*toy_batch())).detach()
    assert torch.all(last < first)


def test_losses_as_a_tensor_or_a_sequence_give_the_same_step():
    grads = []
    for as_tensor in (False, True):
        model = ToyMultiTask()
        losses = model.losses(*toy_batch())
        MTLStep(model.trunk.parameters(), "emtl").backward(torch.stack(losses) if as_tensor else losses)
        grads.append([p.grad for p in model.parameters()])
    assert_float32_close(*grads)


def test_retain_graph_allows_a_second_backward():
    model = ToyMultiTask()
    losses = model.losses(*toy_batch())
    step = MTLStep(model.trunk.parameters(), "emtl")
    step.backward(losses, retain_graph=True)
    sum(losses).backward()


def bad_construction_cases():
    param = torch.nn.Parameter(torch.randn(3))
    yield "empty", lambda: MTLStep([]), ValueError, "empty"
    yield "frozen", lambda: MTLStep([torch.randn(3)]), ValueError, "frozen"
    yield "integer", lambda: MTLStep([torch.ones(3, dtype=torch.int64)]), TypeError, "floating point"
    yield "float64", lambda: MTLStep([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]), TypeError, "one dtype"
    yield (
        "mixed dtypes",
        lambda: MTLStep([param, torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]),
        TypeError,
        "one dtype",
    )
    yield (
        "devices",
        lambda: MTLStep([param, torch.nn.Parameter(torch.ones(2, device="meta"))]),
        ValueError,
        "several devices",
    )
    yield "duplicate", lambda: MTLStep([param, param]), ValueError, "twice"
    yield "non-leaf", lambda: MTLStep([param * 2]), ValueError, "leaf"
    yield "mode", lambda: MTLStep([param], mode="fast"), ValueError, "mode"
    yield "backend", lambda: MTLStep([param], backend="cuda"), ValueError, "unknown backend"
    yield "norm subset", lambda: MTLStep([param], norm_params=[torch.nn.Parameter(torch.ones(1))]), ValueError, "subset"
    yield "weighting", lambda: MTLStep([param], "pcgrad-typo"), ValueError, "unknown weighting"


@pytest.mark.parametrize(
    "name,make,error,match", list(bad_construction_cases()), ids=[c[0] for c in bad_construction_cases()]
)
def test_bad_construction_raises(name, make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_losses_raise():
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), "emtl")
    losses = model.losses(*toy_batch())
    with pytest.raises(ValueError, match="empty"):
        step.backward([])
    with pytest.raises(ValueError, match="scalar"):
        step.backward([losses[0].reshape(1), losses[1]])
    with pytest.raises(ValueError, match="1-D"):
        step.backward(torch.stack(losses).reshape(3, 1))
    with pytest.raises(TypeError, match="floating point"):
        step.backward([losses[0], torch.tensor(1)])
    with pytest.raises(ValueError, match="no autograd graph"):
        step.backward([losses[0], torch.tensor(1.0)])
    with pytest.raises(ValueError, match="is on meta"):
        step.backward([losses[0], torch.tensor(1.0, device="meta", requires_grad=True) * 2])
    step.backward(losses)
    with pytest.raises(ValueError, match="first called with T=3"):
        step.backward(model.losses(*toy_batch())[:2])
    with pytest.raises(RuntimeError, match="backward"):
        MTLStep(model.trunk.parameters()).optimizer_step(torch.optim.SGD(model.parameters(), lr=1))


def test_step_warns_when_ranks_would_not_be_reduced(monkeypatch):
    param = torch.nn.Parameter(torch.randn(3))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 2)
    with pytest.warns(UserWarning, match="DistributedMTLStep"):
        MTLStep([param])
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MTLStep([param])


@pytest.mark.parametrize(
    "weighting,options,eps",
    [("emtl", {"eps": 0.5}, 0.5), ("gradnorm_scaling", {"eps": 0.25}, 0.25), ("mgda", {}, Weighting.contribution_eps)],
)
def test_relative_contributions_use_the_weightings_contribution_eps(weighting, options, eps):
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), weighting, **options)
    run_step(model, step)
    assert step.weighting.contribution_eps == eps
    model64 = float64_twin(model)
    losses64 = model64.losses(*toy_batch(3, dtype=torch.float64))
    norms = shared_gradients64(model64, losses64).norm(dim=1)
    expected = torch.stack(losses64).detach() / (norms + eps)
    torch.testing.assert_close(step.last.relative_contributions.double(), expected, rtol=1e-4, atol=0)
