"""``head_gradients``: the heads get the gradient of Σ_i w_i L_i ("weighted", the specification's
default) or their task's plain gradient ∇L_i ("unweighted", as LibMTL's gradient methods and
TorchJD's ``mtl_backward`` give it); the shared parameters get Jᵀw either way."""

from __future__ import annotations

import pytest
import torch
from multitask_models import ToyMultiTask, float64_twin, toy_batch

from emtl_kernels import MTLStep

OPTIONS = {
    "speed": {},
    "memory": {"mode": "memory"},
    "batched": {"batched_backward": True},
    "norm_params": "norm_params",
}


def expected64(model, weights, head_gradients):
    """Float64 autograd: ∇ Σ_i w_i L_i on the trunk; on the heads the same, or ∇ Σ_i L_i."""
    model64 = float64_twin(model)
    losses = model64.losses(*toy_batch(3, dtype=torch.float64))
    weighted = sum(w * loss for w, loss in zip(weights.double(), losses, strict=True))
    trunk = torch.autograd.grad(weighted, list(model64.trunk.parameters()), retain_graph=True)
    heads = torch.autograd.grad(
        sum(losses) if head_gradients == "unweighted" else weighted, list(model64.heads.parameters())
    )
    return [*trunk, *heads]


@pytest.mark.parametrize("head_gradients", ["weighted", "unweighted"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=list(OPTIONS))
def test_heads_get_the_chosen_gradient_and_the_trunk_the_weighted_one(options, head_gradients):
    model = ToyMultiTask()
    if options == "norm_params":
        options = {"norm_params": list(model.trunk[2].parameters())}
    step = MTLStep(model.trunk.parameters(), "gradnorm_scaling", head_gradients=head_gradients, **options)
    weights = step.backward(model.losses(*toy_batch()))
    assert not torch.allclose(weights, torch.ones(3))  # the two choices differ
    params = [*model.trunk.parameters(), *model.heads.parameters()]
    for param, want in zip(params, expected64(model, weights, head_gradients), strict=True):
        torch.testing.assert_close(param.grad.double(), want, rtol=2e-4, atol=1e-6)


def test_head_gradients_must_be_a_known_choice():
    with pytest.raises(ValueError, match="head_gradients must be 'weighted' or 'unweighted'"):
        MTLStep([torch.nn.Parameter(torch.ones(2))], head_gradients="plain")
