"""Weightings that read no gradients (equal weighting) run one backward of Σ_i w_i L_i, whatever
the mode: counted here on the trunk's backward, checked against float64 autograd."""

from __future__ import annotations

import pytest
import torch
from multitask_models import CountedTrunk, ToyMultiTask, float64_twin, toy_batch, weighted_sum_gradients64
from torch import nn

from emtl_kernels import MTLStep

MODES = {
    "speed": {},
    "memory": {"mode": "memory"},
    "norm_params": {"norm_params": "last layer"},
    "batched": {"batched_backward": True},
    "unweighted_heads": {"head_gradients": "unweighted"},
    "features": {},
}


def step_for(model: ToyMultiTask, name: str) -> MTLStep:
    options = dict(MODES[name])
    if options.get("norm_params") == "last layer":
        options["norm_params"] = model.trunk[2].parameters()
    return MTLStep(model.trunk.parameters(), "equal", **options)


@pytest.mark.parametrize("name", list(MODES))
def test_equal_weighting_runs_one_backward_of_the_sum_in_every_mode(name):
    model = CountedTrunk()
    step = step_for(model, name)
    features, losses = model.features_and_losses(*toy_batch())
    weights = step.backward(losses, features=features if name == "features" else None)
    assert model.calls == [1]
    assert torch.equal(weights, torch.ones(3))
    model64 = float64_twin(model)
    expected = weighted_sum_gradients64(model64, model64.losses(*toy_batch(dtype=torch.float64)), weights)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad.double(), e, rtol=2e-4, atol=1e-6)
    record = step.last
    assert record.gram is None and bool(record.sq_norms.isnan().all())
    assert bool(record.relative_contributions.isnan().all()) and not bool(record.skipped)


def test_a_finite_gradient_beyond_float32_norms_does_not_skip():
    """Each element of the gradient is finite, its squared norm is not (beyond ~1.8e19 in norm)."""
    shared = nn.Parameter(torch.ones(4096))
    losses = [(shared * 1e17).sum(), (shared * 2).sum()]
    step = MTLStep([shared], "equal")
    step.backward(losses)
    assert not bool(step.last.skipped)
    torch.testing.assert_close(shared.grad, torch.full((4096,), 1e17 + 2))


def test_a_non_finite_gradient_skips_and_leaves_every_grad_as_it_was():
    shared = nn.Parameter(torch.zeros(3))
    head = nn.Parameter(torch.ones(()))
    shared.grad, head.grad = torch.full((3,), 7.0), torch.full((), 7.0)
    losses = [torch.sqrt(shared).sum() * head, shared.sum() * head]
    step = MTLStep([shared], "equal")
    weights = step.backward(losses)
    assert step.last.why_skipped() == ["update"] and torch.equal(weights, torch.zeros(2))
    assert bool((shared.grad == 7.0).all()) and head.grad == 7.0


def test_no_loss_reaching_the_shared_parameters_raises():
    shared, head = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match="no loss reaches any of the shared parameters"):
        MTLStep([shared], "equal").backward([head * 2, head * 3])
    assert shared.grad is None and head.grad is None
