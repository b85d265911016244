"""EMTL, gradient-norm scaling and equal weighting against float64 formulas written here."""

from __future__ import annotations

import math

import pytest
import torch
from _weighting_cases import NUM_TASKS, RANDOM_DRAWS, fresh_weighting, random_problem

from emtl_kernels import (
    CRMOGM,
    EMTL,
    WEIGHTINGS,
    Equal,
    GradNormScaling,
    emtl_weights,
    equal_weights,
    gradnorm_scaling_weights,
    make_weighting,
    relative_contributions,
)


def emtl64(losses, jacobian, lam, eps, min_weight):
    """EMTL.md, term by term, in float64 (every task has a gradient here)."""
    norms = jacobian.norm(dim=1)
    ratios = losses / (norms + eps)
    weights = 1 + (2 * lam / len(losses)) * (ratios - ratios.mean()) / (norms + eps)
    return weights if min_weight is None else weights.clamp_min(min_weight)


@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("lam", [0.0, 0.1, 3.0])
@pytest.mark.parametrize("min_weight", [None, 0.0, 0.5])
def test_emtl_matches_formula(num_tasks, lam, min_weight):
    losses, jacobian, gram = random_problem(num_tasks, seed=num_tasks)
    weights = emtl_weights(losses.float(), gram, lam=lam, eps=1e-8, min_weight=min_weight)
    expected = emtl64(losses, jacobian, lam, 1e-8, min_weight)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)


def test_emtl_weights_are_the_derivative_of_the_regularised_objective():
    losses, jacobian, _ = random_problem(5, seed=11)
    norms = jacobian.norm(dim=1)
    lam = 0.7
    leaf = losses.clone().requires_grad_()
    ratios = leaf / norms
    objective = leaf.sum() + lam * ratios.var(unbiased=False)
    (derivative,) = torch.autograd.grad(objective, leaf)
    weights = emtl_weights(losses, jacobian @ jacobian.T, lam=lam, eps=0.0, min_weight=None)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, derivative, rtol=1e-12, atol=1e-12)


def test_emtl_clamps_negative_weights_at_min_weight():
    losses = torch.tensor([0.001, 100.0])
    gram = torch.diag(torch.tensor([1.0, 1e-4]))
    exact = emtl_weights(losses, gram, lam=1.0, min_weight=None)
    assert exact[0] < 0
    clamped = emtl_weights(losses, gram, lam=1.0)
    assert clamped[0] == 0 and clamped[1] == exact[1]


def test_emtl_lam_zero_is_equal_weighting():
    losses, _, gram = random_problem(6, seed=3)
    assert torch.equal(emtl_weights(losses, gram, lam=0.0), torch.ones(6, dtype=torch.float64))


def test_emtl_leaves_zero_gradient_tasks_out():
    losses, jacobian, _ = random_problem(4, seed=5)
    jacobian[2] = 0
    gram = (jacobian @ jacobian.T).float()
    weights = emtl_weights(losses, gram, lam=0.5, min_weight=None)
    kept = [0, 1, 3]
    expected = emtl64(losses[kept], jacobian[kept], 0.5, 1e-8, None)
    assert weights[2] == 1
    torch.testing.assert_close(weights[kept].double(), expected, rtol=1e-5, atol=1e-6)
    ratios = relative_contributions(losses, gram)
    assert math.isnan(ratios[2])
    torch.testing.assert_close(
        ratios[kept].double(), losses[kept] / (jacobian[kept].norm(dim=1) + 1e-8), rtol=1e-6, atol=0
    )


def test_emtl_with_every_gradient_zero_is_equal_weighting():
    weights = emtl_weights(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 3), lam=1.0)
    assert torch.equal(weights, torch.ones(3))


@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("target", ["mean_norm", "sum_norm"])
def test_gradnorm_scaling_gives_every_task_the_target_norm(num_tasks, target):
    losses, jacobian, gram = random_problem(num_tasks, seed=20 + num_tasks)
    weights = gradnorm_scaling_weights(losses.float(), gram, target=target, eps=1e-8)
    norms = jacobian.norm(dim=1)
    common = norms.mean() if target == "mean_norm" else jacobian.sum(dim=0).norm()
    torch.testing.assert_close(weights.double(), common / (norms + 1e-8), rtol=1e-5, atol=0)
    scaled_norms = (weights.double()[:, None] * jacobian).norm(dim=1)
    torch.testing.assert_close(scaled_norms, torch.full_like(scaled_norms, common.item()), rtol=1e-5, atol=0)


def test_gradnorm_scaling_leaves_zero_gradient_tasks_at_one():
    losses, jacobian, _ = random_problem(3, seed=8)
    jacobian[0] = 0
    gram = (jacobian @ jacobian.T).float()
    weights = gradnorm_scaling_weights(losses, gram)
    norms = jacobian[1:].norm(dim=1)
    assert weights[0] == 1
    torch.testing.assert_close(weights[1:].double(), norms.mean() / (norms + 1e-8), rtol=1e-5, atol=0)


def test_equal_weights_are_ones():
    losses, _, gram = random_problem(4, seed=1)
    assert torch.equal(equal_weights(losses.float(), gram), torch.ones(4))


@pytest.mark.parametrize(
    "weighting,gram_use",
    [
        (EMTL(), "diagonal"),
        (GradNormScaling(), "diagonal"),
        (GradNormScaling("sum_norm"), "diagonal_and_total"),
        (Equal(), "diagonal"),
    ],
    ids=repr,
)
def test_weighting_objects_declare_what_they_read_and_match_their_functions(weighting, gram_use):
    assert weighting.gram_use == gram_use
    losses, _jacobian, gram = random_problem(5, seed=2)
    by_function = {"EMTL": emtl_weights, "GradNormScaling": gradnorm_scaling_weights, "Equal": equal_weights}
    expected = by_function[type(weighting).__name__](losses, gram, **weighting.options)
    assert torch.equal(weighting(losses, gram), expected)


def test_make_weighting_by_name_and_instance():
    assert isinstance(make_weighting("emtl", lam=0.3), EMTL)
    instance = GradNormScaling()
    assert make_weighting(instance) is instance
    with pytest.raises(ValueError, match="unknown weighting"):
        make_weighting("nope")
    with pytest.raises(TypeError, match="options"):
        make_weighting(instance, eps=1.0)


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: emtl_weights(torch.ones(3), torch.eye(2)), "gram must be"),
        (lambda: emtl_weights(torch.ones(3, 1), torch.eye(3)), "losses must be"),
        (lambda: emtl_weights(torch.ones(3), torch.eye(3), lam=-1.0), "lam"),
        (lambda: emtl_weights(torch.ones(3), torch.eye(3), eps=float("nan")), "eps"),
        (lambda: emtl_weights(torch.ones(3), torch.eye(3), min_weight=float("inf")), "min_weight"),
        (lambda: gradnorm_scaling_weights(torch.ones(3), torch.eye(3), target="max"), "target"),
        (lambda: emtl_weights(torch.ones(3, dtype=torch.int64), torch.eye(3)), "floating"),
    ],
)
def test_bad_weighting_input_raises(call, error):
    with pytest.raises((ValueError, TypeError), match=error):
        call()


@pytest.mark.parametrize("function", [emtl_weights, gradnorm_scaling_weights, equal_weights], ids=lambda f: f.__name__)
def test_weightings_trace_in_one_graph(function):
    """fullgraph=True fails on any host sync (.item(), a branch on a value)."""
    losses, _, gram = random_problem(4, seed=9)
    compiled = torch.compile(function, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(losses.float(), gram), function(losses.float(), gram))


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_a_weighting_names_its_random_source_exactly_when_it_draws(name):
    weighting = fresh_weighting(name)
    source = weighting.random_source()
    assert (source is not None) == (name in RANDOM_DRAWS)
    wrapped = CRMOGM(weighting)
    assert wrapped.random_source() is source
    if source is not None:
        losses, _, gram = random_problem(5, seed=0)
        twin = fresh_weighting(name)
        weighting(losses.float(), gram)  # its seed-0 generator exists: adopting replaces it
        if name == "gradvac":
            weighting.reset()
        for w in (weighting, twin):
            w.random_source().adopt(5)
        torch.testing.assert_close(weighting(losses.float(), gram), twin(losses.float(), gram), rtol=0, atol=0)
