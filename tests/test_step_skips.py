"""When a step is skipped: everything it would add to a ``.grad`` is checked, with no host sync.

Each case builds a value that is not finite (or would overflow) where only some part of the step
sees it: a head's gradient, a shared parameter outside ``norm_params``, the float16 combination
of finite task gradients, the sum with what ``.grad`` held. A skipped step leaves every ``.grad``
as it was and ``optimizer_step`` does not step; a step that must not skip (equal weighting on a
finite gradient beyond float32's squared range) writes float64 autograd's gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from emtl_kernels import SKIP_REASONS, MTLStep, Weighting
from emtl_kernels.skip_check import all_finite, largest_magnitudes, min_and_max

MODES = [
    {"mode": "speed"},
    {"mode": "memory"},
    {"mode": "speed", "batched_backward": True},
    {"mode": "memory", "batched_backward": True},
]
MODE_IDS = ["speed", "memory", "batched", "memory+batched"]


def snapshot(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_unchanged(params, before):
    """Every ``.grad`` as before: bit for bit where there was one, None or zeros where there was none."""
    for p, b in zip(params, before, strict=True):
        if b is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
        else:
            assert torch.equal(p.grad, b)


def run_and_check_skip(step, losses, params, reason):
    before = snapshot(params)
    start = [p.detach().clone() for p in params]
    weights = step.backward(losses)
    assert bool(step.last.skipped)
    assert reason in step.last.why_skipped()
    assert torch.equal(weights, torch.zeros_like(weights))
    assert_unchanged(params, before)
    assert step.optimizer_step(torch.optim.SGD(params, lr=0.1)) is False
    for p, s in zip(params, start, strict=True):
        assert torch.equal(p.detach(), s)


@pytest.mark.parametrize("head_gradients", ["weighted", "unweighted"])
@pytest.mark.parametrize("options", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("existing", [False, True])
def test_inf_head_gradient_with_finite_losses_skips(options, existing, head_gradients):
    trunk = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    head = torch.nn.Parameter(torch.zeros(2))
    if existing:
        trunk.grad, head.grad = torch.full((3,), 0.25), torch.full((2,), -1.5)
    step = MTLStep([trunk], "emtl", head_gradients=head_gradients, **options)
    losses = [(trunk**2).sum() + torch.sqrt(head).sum(), trunk.sum()]  # sqrt at 0: the loss is finite, ∇ is inf
    run_and_check_skip(step, losses, [trunk, head], "update")


@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_inf_gradient_on_a_shared_parameter_outside_norm_params_skips(mode):
    measured = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    other = torch.nn.Parameter(torch.zeros(3))
    other.grad = torch.full((3,), 3.0)
    step = MTLStep([measured, other], "gradnorm_scaling", norm_params=[measured], mode=mode)
    losses = [(measured**2).sum() + torch.sqrt(other).sum(), measured.sum()]
    run_and_check_skip(step, losses, [measured, other], "update")


@pytest.mark.parametrize("weighting", ["emtl", "equal", "gradnorm_scaling"])
@pytest.mark.parametrize("existing", [False, True])
def test_float16_overflow_of_the_combination_of_finite_gradients_skips(weighting, existing):
    shared = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    if existing:
        shared.grad = torch.full((4,), 2.0, dtype=torch.float16)
    losses = [(shared.float() * 4e4).sum(), (shared.float() * 4e4).sum()]  # 4e4 each, finite in float16
    run_and_check_skip(MTLStep([shared], weighting), losses, [shared], "update")


@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_float16_sum_with_the_existing_gradient_overflowing_skips(mode):
    shared = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    shared.grad = torch.full((4,), 6e4, dtype=torch.float16)
    losses = [(shared.float() * 5e3).sum(), (shared.float() * 1e3).sum()]  # 6e4 + 6e3 > 65504
    run_and_check_skip(MTLStep([shared], "equal", mode=mode), losses, [shared], "update")


class HugeWeights(Weighting):
    """Finite weights whose combination overflows float32 although G is finite."""

    gram_use = "diagonal"

    def weights(self, losses, gram):
        return torch.full_like(losses, 1e30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combination_beyond_the_dtype_range_is_certified_away(dtype):
    shared = torch.nn.Parameter(torch.ones(3, dtype=dtype))
    losses = [(shared.float() * 1e9).sum(), (shared.float() * 2e9).sum()]
    step = MTLStep([shared], HugeWeights())
    run_and_check_skip(step, losses, [shared], "update")
    assert step.last.why_skipped() == ["update"]  # G and the weights are finite: only the bound fails


def test_skip_reasons_name_each_cause():
    shared = torch.nn.Parameter(torch.ones(3))
    step = MTLStep([shared], "gradnorm_scaling")
    step.backward([shared.sum() * float("nan"), shared.sum()])
    assert step.last.skip_reasons.shape == (len(SKIP_REASONS),)
    assert "loss" in step.last.why_skipped()
    step.backward([shared.sum(), shared.sum() * 2])
    assert step.last.why_skipped() == []
    assert not step.last.skip_reasons.any()


def finite_beyond_float32_squares(shared):
    """Two losses whose gradients are finite but whose squared norm (~1e40) overflows float32."""
    return [(shared * 1e20).sum(), (shared * torch.tensor([1.0, -2.0, 3.0])).sum()]


@pytest.mark.parametrize("options", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("existing", [False, True])
def test_equal_weighting_never_skips_on_finite_gradients(options, existing):
    shared = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    if existing:
        shared.grad = torch.tensor([0.5, 0.5, 0.5])
    step = MTLStep([shared], "equal", **options)
    weights = step.backward(finite_beyond_float32_squares(shared))
    assert not bool(step.last.skipped)
    assert torch.equal(weights, torch.ones(2))
    assert bool(step.last.sq_norms.isnan().all())  # one backward of the sum: no norm is measured
    shared64 = shared.detach().double().requires_grad_()
    expected = torch.autograd.grad(sum(finite_beyond_float32_squares(shared64)), shared64)[0]
    if existing:
        expected = expected + 0.5
    torch.testing.assert_close(shared.grad.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighting", ["emtl", "gradnorm_scaling", "upgrad"])
def test_weightings_that_read_g_report_its_overflow(weighting):
    shared = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    step = MTLStep([shared], weighting)
    run_and_check_skip(step, finite_beyond_float32_squares(shared), [shared], "sq_norm")


@pytest.mark.parametrize("weighting", ["equal", "emtl"])
@pytest.mark.parametrize("existing", [False, True])
def test_checked_writes_leave_the_exact_gradient_when_nothing_overflows(weighting, existing):
    """Float16 and equal weighting check the written values: a step that passes keeps them."""
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(64).to(torch.float16))
    head = torch.nn.Parameter(torch.randn(64).to(torch.float16))
    before = torch.randn(64).to(torch.float16) if existing else None
    shared.grad = None if before is None else before.clone()
    inputs = torch.randn(64, dtype=torch.float16)

    def losses_of(s, h):
        return [(s * inputs).sum() * 3, ((s * h).float() ** 2).sum() / 64]

    step = MTLStep([shared], weighting)
    weights = step.backward(losses_of(shared, head))
    assert not bool(step.last.skipped)
    s64, h64 = (t.detach().double().requires_grad_() for t in (shared, head))
    expected = torch.autograd.grad(
        sum(w * loss for w, loss in zip(weights.double(), losses_of(s64, h64), strict=True)), s64
    )[0]
    if before is not None:
        expected = expected + before.double()
    torch.testing.assert_close(shared.grad.double(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("extremes", [min_and_max, largest_magnitudes])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_both_ways_of_reading_extremes_see_every_non_finite_value(extremes, dtype):
    big = torch.finfo(dtype).max
    finite = [torch.tensor([big, -big, 0.0], dtype=dtype), torch.tensor([-1.0], dtype=dtype)]
    assert all(bool(torch.isfinite(e)) for e in extremes(finite)) and bool(all_finite(finite))
    for bad in (math.inf, -math.inf, math.nan):
        for position in range(3):
            values = [finite[0].clone(), finite[1]]
            values[0][position] = bad
            assert not all(bool(torch.isfinite(e)) for e in extremes(values))
    assert not bool(all_finite([finite[0], torch.tensor([math.nan])]))  # two dtypes at once
