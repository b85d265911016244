"""The post-backward part of the step traces into one graph with every backend: no host sync,
no graph break, so it can run under torch.compile and inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch
from multitask_models import ToyMultiTask, toy_batch
from task_gradient_cases import make_task_gradients

from emtl_kernels import MTLStep, TaskGradients, available_backends, emtl_weights, task_gram, weighted_combine
from emtl_kernels.features import feature_jacobian, weighted_cotangents
from emtl_kernels.grad_writes import undo_if
from emtl_kernels.skip_check import SkipCheck, combination_bounded


def post_backward(rows, losses, outs, backend):
    grads = TaskGradients(rows)
    gram = task_gram(grads, backend=backend)
    weights = emtl_weights(losses, gram, lam=0.5)
    weighted_combine(grads, weights, out=outs, accumulate=True, backend=backend)
    return gram, weights


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_gram_weights_and_combine_trace_in_one_graph(backend):
    grads, _ = make_task_gradients(3, 300, torch.float32, "rows", seed=1)
    losses = torch.tensor([0.5, 2.0, 30.0])
    eager_outs = [torch.ones(size) for size in grads.sizes]
    compiled_outs = [torch.ones(size) for size in grads.sizes]
    expected = post_backward(grads.rows, losses, eager_outs, backend)
    compiled = torch.compile(post_backward, fullgraph=True, backend="aot_eager")
    result = compiled(grads.rows, losses, compiled_outs, backend)
    for got, want in zip((*result, *compiled_outs), (*expected, *eager_outs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def decide_and_write(rows, losses, outs, backups, backend):
    """The step's skip decision around the combine, both ways: certified, and checked after writing."""
    grads = TaskGradients(rows)
    gram = task_gram(grads, backend=backend)
    weights = emtl_weights(losses, gram, lam=0.5)
    check = SkipCheck(losses, gram.diagonal(), weights, reads_gram=True)
    check.require(combination_bounded(weights, gram.diagonal(), torch.float32))
    weighted_combine(grads, torch.where(check.skipped, 0.0, weights), out=outs, accumulate=True, backend=backend)
    check.require_finite(outs)
    undo_if(check.skipped, outs, backups)
    return check.reasons


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("finite", [True, False])
def test_the_skip_decision_traces_in_one_graph(backend, finite):
    grads, _ = make_task_gradients(3, 300, torch.float32, "rows", seed=1)
    losses = torch.tensor([0.5, 2.0 if finite else float("nan"), 30.0])
    results = []
    for function in (decide_and_write, torch.compile(decide_and_write, fullgraph=True, backend="aot_eager")):
        outs = [torch.ones(size) for size in grads.sizes]
        backups = [out.clone() for out in outs]
        results.append((function(grads.rows, losses, outs, backups, backend), outs))
    (eager_reasons, eager_outs), (compiled_reasons, compiled_outs) = results
    assert torch.equal(compiled_reasons, eager_reasons) and bool(eager_reasons.any()) != finite
    for got, want in zip(compiled_outs, eager_outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def features_post_heads(feature_grads, losses, features, backend):
    """Features mode between the passes through the heads and the trunk's backward: G_z, the
    weights, the skip flags and the cotangents."""
    jacobian = feature_jacobian([[grad] for grad in feature_grads], features)
    gram = task_gram(jacobian, backend=backend)
    weights = emtl_weights(losses, gram, lam=0.5)
    check = SkipCheck(losses, gram.diagonal(), weights, reads_gram=True)
    cotangents = weighted_cotangents(jacobian, torch.where(check.skipped, 0.0, weights), features, backend)
    check.require_finite(cotangents)
    return gram, weights, check.reasons, cotangents[0]


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_features_mode_traces_in_one_graph(backend):
    generator = torch.Generator().manual_seed(3)
    features = [torch.randn(16, 24, generator=generator)]
    feature_grads = [torch.randn(16, 24, generator=generator) * scale for scale in (1.0, 30.0, 0.01)]
    losses = torch.tensor([0.5, 2.0, 30.0])
    expected = features_post_heads(feature_grads, losses, features, backend)
    compiled = torch.compile(features_post_heads, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(feature_grads, losses, features, backend), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def features_mode_step(model, trunk, heads):
    inputs, targets = toy_batch()
    features = trunk(inputs)
    losses = [(head(features).squeeze(-1) - targets[:, i]).square().mean() for i, head in enumerate(heads)]
    return MTLStep(model.trunk.parameters(), "emtl").backward(losses, features=features)


def test_features_mode_runs_on_a_compiled_trunk_and_compiled_heads():
    model = ToyMultiTask()
    compiled = [torch.compile(module, backend="aot_eager") for module in (model.trunk, *model.heads)]
    weights = features_mode_step(model, compiled[0], compiled[1:])
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(features_mode_step(model, model.trunk, model.heads), weights, rtol=1e-6, atol=0)
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_features_inside_one_compiled_region_are_refused_by_name():
    """One compiled region spanning trunk and heads is one autograd node: the losses reach the
    trunk through it, not through the features, and the step says so."""
    model = ToyMultiTask()
    compiled = torch.compile(model.features_and_losses, backend="aot_eager")
    features, losses = compiled(*toy_batch())
    with pytest.raises(ValueError, match="loss 0 reaches the shared parameter"):
        MTLStep(model.trunk.parameters(), "emtl").backward(losses, features=features)
