"""MTLStep on unusual input: a custom weighting's bad output, sparse gradients, parameters
without elements, calls that fail. A call that raises raises before anything is written (every
``.grad`` as before, the step's T and ``last`` unchanged); what is supported gives float64
autograd's gradients, as ``backward()`` would."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from multitask_models import ToyMultiTask, toy_batch
from torch import nn

from emtl_kernels import MTLStep, Weighting

MODES = {
    "speed": {},
    "memory": {"mode": "memory"},
    "batched": {"batched_backward": True},
    "memory+batched": {"mode": "memory", "batched_backward": True},
}


def snapshot(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def dense(tensor):
    return tensor.to_dense() if tensor.is_sparse else tensor


def assert_grads_as_before(params, before, *, zeros_allowed=False):
    for p, b in zip(params, before, strict=True):
        if b is None:
            assert p.grad is None or (zeros_allowed and torch.count_nonzero(dense(p.grad)) == 0)
        else:
            assert p.grad.layout == b.layout and torch.equal(dense(p.grad), dense(b))


class ReturnsThis(Weighting):
    """A custom weighting returning ``make(losses)``."""

    gram_use = "diagonal"

    def __init__(self, make):
        self.make = make

    def weights(self, losses, gram):
        return self.make(losses)


def raise_inside(losses):
    raise RuntimeError("the weighting failed")


BAD_WEIGHTS = [
    ("one weight", lambda losses: torch.ones(1), ValueError, r"returned shape \(1,\); a weighting returns"),
    ("a column", lambda losses: torch.ones(losses.numel(), 1), ValueError, r"shape \(3, 1\)"),
    ("integers", lambda losses: torch.ones(losses.numel(), dtype=torch.int64), TypeError, "floating point"),
    ("a list", lambda losses: [1.0] * losses.numel(), ValueError, "returned a list"),
    ("another device", lambda losses: torch.ones(losses.numel(), device="meta"), ValueError, "on meta"),
    ("raises", raise_inside, RuntimeError, "the weighting failed"),
]


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("options", [*MODES.values(), "norm_params"], ids=[*MODES, "norm_params"])
@pytest.mark.parametrize("make,error,match", [case[1:] for case in BAD_WEIGHTS], ids=[c[0] for c in BAD_WEIGHTS])
def test_bad_custom_weights_raise_before_anything_is_written(make, error, match, options, existing):
    model = ToyMultiTask()
    params = list(model.parameters())
    if existing:
        for p in params:
            p.grad = torch.randn_like(p)
    if options == "norm_params":
        options = {"norm_params": list(model.trunk[2].parameters())}
    step = MTLStep(model.trunk.parameters(), ReturnsThis(make), **options)
    before = snapshot(params)
    with pytest.raises(error, match=match):
        step.backward(model.losses(*toy_batch()))
    assert_grads_as_before(params, before)
    assert step.last is None and step.num_tasks is None


class EmbeddingHeads(nn.Module):
    """A dense trunk and, per task, a sparse-gradient embedding head: L_i = mean((f(x)·E_i[ids] − y_i)²)."""

    def __init__(self, num_tasks=3, sparse_trunk=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(12, 5, sparse=sparse_trunk)
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Embedding(10, 6, sparse=True) for _ in range(num_tasks))

    def losses(self, dtype=torch.float32):
        generator = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, 12, (16,), generator=generator)
        ids = torch.randint(0, 10, (16,), generator=generator)
        targets = torch.randn(16, len(self.heads), generator=generator, dtype=torch.float64).to(dtype)
        features = self.trunk(self.embed(tokens))
        return [((features * head(ids)).sum(-1) - targets[:, i]).square().mean() for i, head in enumerate(self.heads)]


def expected_grads64(model, weights, unweighted=False):
    """∇ Σ_i w_i L_i in float64 on the shared parameters, and on the heads (Σ_i L_i if unweighted)."""
    model64 = copy.deepcopy(model).double()
    losses = model64.losses(torch.float64)
    weighted = sum(w * loss for w, loss in zip(weights.double(), losses, strict=True))
    shared = [*model64.embed.parameters(), *model64.trunk.parameters()]
    heads = [h.weight for h in model64.heads]
    expected = list(torch.autograd.grad(weighted, shared, retain_graph=True))
    expected += torch.autograd.grad(sum(losses) if unweighted else weighted, heads)
    return expected


@pytest.mark.parametrize("head_gradients", ["weighted", "unweighted"])
@pytest.mark.parametrize("options", [MODES["speed"], MODES["memory"], "norm_params"], ids=["speed", "memory", "norm"])
@pytest.mark.parametrize("existing", [None, "dense", "sparse"])
def test_sparse_heads_get_their_gradients_as_backward_gives_them(options, head_gradients, existing):
    model = EmbeddingHeads()
    shared = [*model.embed.parameters(), *model.trunk.parameters()]
    if options == "norm_params":
        options = {"norm_params": list(model.trunk.parameters())}
    heads = [h.weight for h in model.heads]
    before = {
        None: None,
        "dense": torch.full((10, 6), 0.5),
        "sparse": torch.sparse_coo_tensor([[1, 4]], torch.ones(2, 6), (10, 6), check_invariants=True),
    }[existing]
    for h in heads:
        h.grad = None if before is None else before.clone()
    step = MTLStep(shared, "emtl", head_gradients=head_gradients, **options)
    weights = step.backward(model.losses())
    assert not bool(step.last.skipped)
    expected = expected_grads64(model, weights, unweighted=head_gradients == "unweighted")
    for k, (param, want) in enumerate(zip(shared + heads, expected, strict=True)):
        if before is not None and k >= len(shared):
            want = dense(want) + dense(before).double()
        if k >= len(shared) and before is None:
            assert param.grad.is_sparse  # as backward() leaves it
        torch.testing.assert_close(dense(param.grad).double(), dense(want), rtol=1e-5, atol=1e-7)


def test_skipped_step_leaves_sparse_heads_untouched():
    model = EmbeddingHeads()
    heads = [h.weight for h in model.heads]
    heads[1].grad = torch.sparse_coo_tensor([[2]], torch.ones(1, 6), (10, 6), check_invariants=True)
    before = snapshot(heads)
    losses = model.losses()
    losses[0] = losses[0] + torch.sqrt(heads[0][0] - heads[0][0].detach()).sum()  # ∇ = inf, loss finite
    step = MTLStep(model.trunk.parameters(), "emtl")
    step.backward(losses)
    assert bool(step.last.skipped)
    assert_grads_as_before(heads, before, zeros_allowed=True)


def test_batched_backward_with_sparse_heads_says_what_to_do():
    model = EmbeddingHeads()
    params = list(model.parameters())
    step = MTLStep(model.trunk.parameters(), "emtl", batched_backward=True)
    with pytest.raises(NotImplementedError, match="batched_backward=False"):
        step.backward(model.losses())
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("options", [MODES["speed"], MODES["memory"], "outside norm_params"])
def test_sparse_shared_parameter_is_refused_before_anything_is_written(options):
    model = EmbeddingHeads(sparse_trunk=True)
    params = list(model.parameters())
    for p in params[1:]:
        p.grad = torch.ones_like(p)
    if options == "outside norm_params":
        options = {"norm_params": list(model.trunk.parameters())}
    shared = [*model.embed.parameters(), *model.trunk.parameters()]
    step = MTLStep(shared, "emtl", **options)
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"shared parameters\[0\] \(shape \(12, 5\)\) gets a sparse gradient"):
        step.backward(model.losses())
    assert_grads_as_before(params, before)


def test_sparse_tensors_and_sparse_grads_on_shared_parameters_are_refused():
    with pytest.raises(ValueError, match="must be dense"):
        MTLStep([torch.zeros(3, 3).to_sparse().requires_grad_()])
    shared = nn.Parameter(torch.ones(4))
    shared.grad = torch.zeros(4).to_sparse()
    head = nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match=r"holds a sparse \.grad"):
        MTLStep([shared]).backward([(shared * head).sum(), shared.sum()])
    assert head.grad is None


@pytest.mark.parametrize("options", [*MODES.values(), "norm_params"], ids=[*MODES, "norm_params"])
def test_a_shared_parameter_without_elements_contributes_nothing(options):
    model = ToyMultiTask()
    empty = nn.Parameter(torch.ones(0, 8))
    shared = [*model.trunk.parameters(), empty]
    if options == "norm_params":
        options = {"norm_params": [model.trunk[2].weight, empty]}

    def losses_of(m, e, dtype):
        losses = m.losses(*toy_batch(dtype=dtype))
        return [loss + (e @ torch.ones(8, dtype=dtype)).sum() for loss in losses]

    step = MTLStep(shared, "gradnorm_scaling", **options)
    weights = step.backward(losses_of(model, empty, torch.float32))
    model64 = copy.deepcopy(model).double()
    empty64 = empty.detach().double().requires_grad_()
    losses64 = losses_of(model64, empty64, torch.float64)
    weighted = sum(w * loss for w, loss in zip(weights.double(), losses64, strict=True))
    expected = torch.autograd.grad(weighted, [*model64.parameters(), empty64])
    for param, want in zip([*model.parameters(), empty], expected, strict=True):
        torch.testing.assert_close(param.grad.double(), want, rtol=1e-5, atol=1e-7)
    assert empty.grad.shape == (0, 8)  # as backward() gives it


def test_only_parameters_without_elements_leave_every_task_unbalanced():
    empty = nn.Parameter(torch.ones(0))
    head = nn.Parameter(torch.tensor([1.0, 2.0]))
    step = MTLStep([empty], "emtl")
    weights = step.backward([(head**2).sum() + empty.sum(), head.sum() + empty.sum()])
    assert torch.equal(weights, torch.ones(2)) and bool(step.last.zero_gradient.all())
    torch.testing.assert_close(head.grad, torch.tensor([3.0, 5.0]))


@pytest.mark.parametrize("options", MODES.values(), ids=list(MODES))
def test_a_failed_call_fixes_nothing(options):
    shared = nn.Parameter(torch.ones(3))
    stray = nn.Parameter(torch.tensor(2.0))
    step = MTLStep([shared], "emtl", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one behaviour in every mode: it raises, nothing warns first
        with pytest.raises(ValueError, match="no loss reaches any of the shared parameters"):
            step.backward([stray * 2, stray * 3])
    assert step.num_tasks is None and step.last is None
    assert shared.grad is None and stray.grad is None
    step.backward([shared.sum(), (shared * 2).sum(), (shared**2).sum()])
    assert step.num_tasks == 3
    record = step.last
    with pytest.raises(ValueError, match="first called with T=3"):
        step.backward([shared.sum(), shared.sum()])
    assert step.last is record


def test_no_loss_reaching_norm_params_names_them():
    shared, measured = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    step = MTLStep([shared, measured], "emtl", norm_params=[measured], mode="memory")
    with pytest.raises(ValueError, match="no loss reaches any of the norm_params"):
        step.backward([shared.sum(), (shared**2).sum()])
    assert shared.grad is None
