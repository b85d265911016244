"""How ``backend="auto"`` picks a backend per pass, and the measured choice it shares with the
Triton tuner: the selection logic, on the host, with stand-in backends and timings."""

from __future__ import annotations

import pytest
import torch
from task_gradient_cases import make_task_gradients

from emtl_kernels import TaskGradients, backends, task_gram, weighted_combine
from emtl_kernels.backends.auto import Auto
from emtl_kernels.backends.fastest import Fastest, call_key, size_class


class StandIn:
    """A backend that records its calls and computes like the reference backend."""

    def __init__(self, name: str, seconds: float):
        self.name, self.seconds, self.calls = name, seconds, []

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def gram(self, grads):
        self.calls.append("gram")
        return REFERENCE.gram(grads)

    def sq_norms(self, grads):
        self.calls.append("sq_norms")
        return REFERENCE.sq_norms(grads)

    def combine(self, grads, weights, outs, accumulate):
        self.calls.append(("combine", accumulate))
        REFERENCE.combine(grads, weights, outs, accumulate)


def timed_by_seconds(timings: list[str]):
    """A timer that runs the call once and reports the seconds its stand-in claims."""

    def timer(call, device):
        before = {backend.name: len(backend.calls) for backend in STAND_INS}
        call()
        ran = [backend for backend in STAND_INS if len(backend.calls) > before[backend.name]]
        timings.append(ran[0].name)
        return ran[0].seconds

    return timer


STAND_INS: list[StandIn] = []
REFERENCE = backends.resolve("reference", torch.device("cpu"))


@pytest.fixture
def stand_ins():
    """Two stand-ins, the second the faster (until a test says otherwise)."""
    STAND_INS[:] = [StandIn("first", 2.0), StandIn("second", 1.0)]
    yield STAND_INS
    STAND_INS.clear()


def grads_of(num_tasks: int = 3, numel: int = 100, dtype=torch.float32) -> TaskGradients:
    return TaskGradients.from_matrix(torch.randn(num_tasks, numel).to(dtype))


def test_first_call_of_a_key_times_the_candidates_and_keeps_the_fastest(stand_ins):
    first, second = stand_ins
    timings: list[str] = []
    auto = Auto(lambda device, kernel_pass: [first, second], REFERENCE, timed_by_seconds(timings))
    grads = grads_of()
    exact = torch.stack([row[0].double() for row in grads.rows])
    gram = auto.gram(grads)
    assert timings == ["first", "second"]
    torch.testing.assert_close(gram.double(), exact @ exact.T, rtol=1e-5, atol=1e-9)
    assert second.calls == ["gram", "gram"] and first.calls == ["gram"]
    # Kept: a later call of the same key is a lookup, whatever the tensors.
    auto.gram(grads_of())
    assert timings == ["first", "second"] and second.calls == ["gram"] * 3
    # Each pass and each key is measured on its own.
    first.seconds = 0.5
    auto.sq_norms(grads)
    auto.gram(grads_of(num_tasks=4))
    auto.gram(grads_of(dtype=torch.bfloat16))
    auto.gram(grads_of(numel=2**18))
    assert timings == ["first", "second"] * 5
    assert auto.choose("sq_norms", grads, run=None) is first
    assert auto.choose("gram", grads, run=None) is second
    assert auto.choose("gram", grads_of(num_tasks=4), run=None) is first


def test_an_accumulating_combine_is_never_timed(stand_ins):
    first, second = stand_ins
    timings: list[str] = []
    auto = Auto(lambda device, kernel_pass: [first, second], REFERENCE, timed_by_seconds(timings))
    grads, weights = grads_of(), torch.tensor([1.0, -2.0, 0.5])
    outs = [torch.ones(100)]
    auto.combine(grads, weights, outs, accumulate=True)
    # The first candidate ran once, adding once; nothing was kept.
    assert timings == [] and first.calls == [("combine", True)] and second.calls == []
    expected = 1.0 + weights.double() @ torch.stack([row[0].double() for row in grads.rows])
    torch.testing.assert_close(outs[0].double(), expected, rtol=1e-6, atol=1e-6)
    assert auto._choices.kept(call_key("combine", grads)) is None
    auto.combine(grads, weights, [torch.empty(100)], accumulate=False)
    assert timings == ["first", "second"]
    auto.combine(grads, weights, outs, accumulate=True)
    assert second.calls[-1] == ("combine", True)


def test_no_candidate_falls_back_and_a_single_one_is_not_timed(stand_ins):
    first, _ = stand_ins
    timings: list[str] = []
    nothing = Auto(lambda device, kernel_pass: [], REFERENCE, timed_by_seconds(timings))
    assert nothing.choose("gram", grads_of(), run=None) is REFERENCE
    single = Auto(lambda device, kernel_pass: [first], REFERENCE, timed_by_seconds(timings))
    single.gram(grads_of())
    assert timings == [] and first.calls == ["gram"]


def test_candidates_follow_the_pass_order_on_gpus(monkeypatch):
    """Without a GPU: every backend made available, the order auto starts from on CUDA."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: None)
    cuda = torch.device("cuda")
    names = {p: [b.name for b in backends.auto_candidates(cuda, p)] for p in ("gram", "sq_norms", "combine")}
    assert names == {"gram": ["triton", "native"], "sq_norms": ["triton", "native"], "combine": ["native", "triton"]}
    assert [b.name for b in backends.auto_candidates(torch.device("cpu"), "gram")] == ["native"]
    assert backends.auto_candidates(torch.device("meta"), "gram") == []


def test_auto_picks_a_backend_that_runs_on_each_device():
    grads = grads_of()
    assert backends.AUTO.choose("gram", grads, run=None).name in backends.available_backends("cpu")
    meta = TaskGradients.from_matrix(torch.empty(3, 10, device="meta"))
    assert backends.AUTO.choose("combine", meta, run=None).name == "reference"


def post_backward(rows, outs):
    grads = TaskGradients(rows)
    gram = task_gram(grads, backend="auto")
    weighted_combine(grads, gram.diagonal().rsqrt(), out=outs, accumulate=True, backend="auto")
    return gram


def test_auto_traces_in_one_graph():
    grads, _ = make_task_gradients(3, 300, torch.float32, "rows", seed=1)
    eager_outs = [torch.ones(size) for size in grads.sizes]
    compiled_outs = [torch.ones(size) for size in grads.sizes]
    expected = post_backward(grads.rows, eager_outs)
    compiled = torch.compile(post_backward, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(grads.rows, compiled_outs), expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(compiled_outs, eager_outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fastest_keeps_the_least_time_per_key():
    timed: list[int] = []
    seconds = {256: 3.0, 512: 1.0, 1024: 2.0}

    def measure(block: int) -> float:
        timed.append(block)
        return seconds[block]

    fastest: Fastest[int] = Fastest()
    candidates = [256, 512, 1024]
    # A call that may not run twice gets the first candidate, and nothing is kept.
    assert fastest.choose("key", lambda: candidates, measure, may_time=False) == 256
    assert timed == [] and fastest.kept("key") is None
    assert fastest.choose("key", lambda: candidates, measure, may_time=True) == 512
    assert timed == candidates
    assert fastest.choose("key", lambda: pytest.fail("candidates made again"), measure, may_time=True) == 512
    assert fastest.choose("single", lambda: [1024], measure, may_time=True) == 1024
    assert len(timed) == 3
    fastest.clear()
    assert fastest.kept("key") is None


def test_size_classes():
    assert [size_class(n) for n in (1, 2**18 - 1, 2**18, 2**22, 2**26, 2**40)] == [0, 0, 1, 2, 3, 3]
