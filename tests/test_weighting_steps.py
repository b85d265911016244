"""Every weighting of WEIGHTINGS through MTLStep end to end, against float64 autograd; and every
weighting function traced by torch.compile in one graph (no host sync, no graph break)."""

from __future__ import annotations

import pytest
import torch
from _weighting_cases import fresh_weighting
from multitask_models import ToyMultiTask, float64_twin, shared_gradients64, toy_batch

from emtl_kernels import CRMOGM, PCD, WEIGHTINGS, GradNorm, GradVac, MTLStep, make_weighting
from emtl_kernels.weightings import (
    aligned_mtl_weights,
    cagrad_weights,
    config_weights,
    cosmos_weights,
    db_mtl_weights,
    dualproj_weights,
    dwa_weights,
    emtl_weights,
    equal_weights,
    fairgrad_weights,
    famo_weights,
    gls_weights,
    gradnorm_scaling_weights,
    imtl_g_weights,
    imtl_l_weights,
    krum_weights,
    mgda_weights,
    nash_mtl_weights,
    pbi_weights,
    pcgrad_weights,
    rlw_weights,
    stch_weights,
    upgrad_weights,
    uw_weights,
)

#: The weightings that read all of G, which memory mode never forms.
FULL_GRAM = {
    "imtl_g",
    "mgda",
    "pcgrad",
    "cagrad",
    "aligned_mtl",
    "upgrad",
    "dualproj",
    "nash_mtl",
    "fairgrad",
    "krum",
    "pcd",
    "gradvac",
    "cr_mogm",
    "config",
}


def per_task_gradients64(model64: ToyMultiTask, losses: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """∇L_i on every parameter of the float64 twin (zeros where L_i does not reach one)."""
    params = list(model64.parameters())
    per_task = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    return [[torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)] for grads in per_task]


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_step_writes_the_weighted_sum_of_float64_task_gradients(name):
    """.grad is Σ_i w_i ∇L_i with the step's weights: Jᵀw on the trunk, w_i ∇L_i on head i."""
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), fresh_weighting(name))
    weights = step.backward(model.losses(*toy_batch(3)))
    assert not step.last.skipped and torch.isfinite(weights).all()

    model64 = float64_twin(model)
    gradients = per_task_gradients64(model64, model64.losses(*toy_batch(3, dtype=torch.float64)))
    weights64 = weights.double()
    for k, param in enumerate(model.parameters()):
        terms = [w * task[k] for w, task in zip(weights64, gradients, strict=True)]
        expected = sum(terms)
        # float32 rounding is relative to the terms summed, not to a sum that may cancel.
        scale = sum(term.norm() for term in terms)
        assert (param.grad.double() - expected).norm() <= 1e-5 * scale + 1e-12


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_step_weights_are_the_weighting_of_the_float64_gram(name):
    """The step hands the weighting its float32 Gram matrix and float32 losses; called directly on
    the float64 Gram matrix with the same losses it must give the same weights. Computed in
    float32 both (the losses' dtype sets it): the only difference is the rounding of G, which
    the solvers carry into the weights. Aligned-MTL whitens G, so the toy's κ(G) ≈ 1e4 on its
    kept eigenvalues turns that rounding (1e-7) into about 1e-5 of its weights."""
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), fresh_weighting(name))
    weights = step.backward(model.losses(*toy_batch(3)))

    model64 = float64_twin(model)
    losses64 = model64.losses(*toy_batch(3, dtype=torch.float64))
    jacobian = shared_gradients64(model64, losses64)
    gram64 = jacobian @ jacobian.T
    if make_weighting(name).reads_gram:  # one that does not runs one backward of the sum: no G
        torch.testing.assert_close(
            step.last.gram.double(), gram64, rtol=1e-5, atol=1e-6 * float(gram64.diagonal().max())
        )
    expected = fresh_weighting(name)(step.last.losses, gram64)
    assert expected.dtype == weights.dtype == torch.float32
    rtol = 1e-4 if name == "aligned_mtl" else 1e-5
    torch.testing.assert_close(weights, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_memory_mode_gives_every_weighting_the_weights_of_speed_mode(name):
    """Those that read all of G get it exactly from the vectorised backward, the others their norms."""
    assert (make_weighting(name).gram_use == "full") == (name in FULL_GRAM)
    results = []
    for mode in ("speed", "memory"):
        model = ToyMultiTask()
        step = MTLStep(model.trunk.parameters(), name, mode=mode)
        results.append((step.backward(model.losses(*toy_batch(3))), step.last.gram))
    (speed_weights, speed_gram), (memory_weights, memory_gram) = results
    assert (memory_gram is not None) == (name in FULL_GRAM)
    if memory_gram is not None:
        torch.testing.assert_close(memory_gram, speed_gram, rtol=1e-5, atol=1e-5 * float(speed_gram.abs().max()))
    scale = float(speed_weights.abs().max())
    torch.testing.assert_close(memory_weights, speed_weights, rtol=1e-4, atol=1e-4 * scale)


ORDERS = torch.tensor([[1, 0, 3, 2], [2, 3, 0, 1], [3, 1, 2, 0], [0, 2, 1, 3]])

#: Each weighting function with options for tracing. The solvers repeat one loop body a fixed
#: number of times, so two iterations prove that body free of host syncs at a fraction of the
#: tracing time of the default 30 to 40.
TRACED = {
    "emtl": (emtl_weights, {"lam": 0.5}),
    "gradnorm_scaling": (gradnorm_scaling_weights, {"target": "sum_norm"}),
    "equal": (equal_weights, {}),
    "imtl_g": (imtl_g_weights, {}),
    "mgda": (mgda_weights, {"iterations": 2}),
    "pcgrad": (pcgrad_weights, {"orders": ORDERS}),
    "cagrad": (cagrad_weights, {"iterations": 2}),
    "aligned_mtl": (aligned_mtl_weights, {"scale_mode": "median"}),
    "upgrad": (upgrad_weights, {"iterations": 2}),
    "dualproj": (dualproj_weights, {"iterations": 2}),
    "nash_mtl": (nash_mtl_weights, {"iterations": 2, "max_norm": 1.0}),
    "fairgrad": (fairgrad_weights, {"iterations": 2, "p": 2.0}),
    "krum": (krum_weights, {"n_selected": 2}),
    "db_mtl": (db_mtl_weights, {}),
    "config": (config_weights, {"preference": torch.tensor([0.5, 1.0, 2.0, 1.0])}),
    "uw": (uw_weights, {"log_vars": torch.tensor([0.5, -1.0, 0.0, 2.0])}),
    "dwa": (dwa_weights, {"history": torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 2.5, 3.0, 1.0]])}),
    "famo": (famo_weights, {"logits": torch.tensor([0.5, -1.0, 0.0, 2.0])}),
    "gls": (gls_weights, {}),
    "imtl_l": (imtl_l_weights, {"log_scales": torch.tensor([0.5, -1.0, 0.0, 2.0])}),
    "rlw": (rlw_weights, {"draws": torch.tensor([0.5, -1.0, 0.0, 2.0])}),
    "stch": (stch_weights, {"mu": 0.1, "reference": torch.tensor([0.1, 0.0, 0.2, 0.0])}),
    "cosmos": (cosmos_weights, {"lam": 2.0, "preference": torch.tensor([0.1, 0.2, 0.3, 0.4])}),
    "pbi": (pbi_weights, {"preference": torch.tensor([0.1, 0.2, 0.3, 0.4]), "reference": torch.zeros(4)}),
}

#: The stateful weightings, made fresh for tracing (their ``weights`` continue their state), with
#: the options of ``weights``.
STATEFUL_TRACED = {
    "pcd": (lambda: PCD(iterations=2), {}),
    "gradvac": (GradVac, {"orders": ORDERS}),
    "cr_mogm": (lambda: CRMOGM("mgda", iterations=2), {}),
    "gradnorm": (lambda: GradNorm(4), {}),
}


def fixed_problem():
    generator = torch.Generator().manual_seed(4)
    jacobian = torch.randn(4, 9, generator=generator)
    return torch.rand(4, generator=generator) + 0.1, jacobian @ jacobian.T


def test_every_weighting_is_traced():
    assert set(TRACED) | set(STATEFUL_TRACED) == set(WEIGHTINGS)


@pytest.mark.parametrize("name", list(TRACED))
def test_weighting_traces_in_one_graph(name):
    """fullgraph=True fails on a graph break: any host sync (.item(), a branch on a value) in the
    weights. The eager backend runs what Dynamo captured, which must give the eager weights."""
    function, options = TRACED[name]
    losses, gram = fixed_problem()
    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True, backend="eager")
    expected = function(losses, gram, **options)
    torch.testing.assert_close(compiled(losses, gram, **options), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(STATEFUL_TRACED))
def test_stateful_weighting_traces_in_one_graph(name):
    """Two steps of a traced stateful weighting against two eager steps of a fresh one: the state
    update, too, is free of host syncs, and continues the same way."""
    losses, gram = fixed_problem()
    torch._dynamo.reset()
    make, options = STATEFUL_TRACED[name]
    traced, eager = make(), make()
    compiled = torch.compile(traced.weights, fullgraph=True, backend="eager")
    for scale in (1.0, 3.0):
        expected = eager.weights(losses * scale, gram, **options)
        torch.testing.assert_close(compiled(losses * scale, gram, **options), expected, rtol=1e-6, atol=1e-7)
    if isinstance(traced, GradNorm):
        torch.testing.assert_close(traced.logits.grad, eager.logits.grad)


def test_pcgrad_compiles_with_inductor():
    """One weighting through the default backend, generated code included (PCGrad: T batched
    index_put updates, the cheapest to compile of the Gram-matrix solvers)."""
    losses, gram = fixed_problem()
    torch._dynamo.reset()
    compiled = torch.compile(pcgrad_weights, fullgraph=True)
    expected = pcgrad_weights(losses, gram, orders=ORDERS)
    torch.testing.assert_close(compiled(losses, gram, orders=ORDERS), expected, rtol=1e-6, atol=1e-6)
