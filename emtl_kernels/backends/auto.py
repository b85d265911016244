"""The backend "auto": each pass on the backend that measures fastest on the device.

The candidates of a pass on a device type are the backends fast there that can run
(:data:`~emtl_kernels.backends.AUTO_ORDER`; the reference backend is the fallback, never a
candidate), in the order of :data:`PASS_ORDER` where it names one, else of ``AUTO_ORDER``. On a
CPU that leaves the native kernels alone (Triton runs there only in its interpreter); on a GPU the
Triton and native kernels, whose lead changes with the pass, the dtype, T and P. In the committed
reports (bench/results/, ``gram`` and ``combine`` at 88 sizes):

- H200, P = 2²⁴ and 2²⁷ and GPT-2 small: Triton's Gram pass is faster at 20 of 22 sizes (up to
  3.7×); the native combine at 17 of 22 (Triton's lead elsewhere is at most 11 %);
- H100, P = 2¹⁶ to 2²², where the host's launch work weighs: the native passes at every size.

So neither a fixed backend nor a fixed order per pass is fastest everywhere: the first call of a
pass on a key (:func:`~emtl_kernels.backends.fastest.call_key`: pass, T, dtype, size class,
device) that may be timed runs each candidate once to warm it up (Triton compiles and tunes
there), times a few runs on the device and keeps the fastest for the process. Later calls look
the choice up: no wait for the device. A call that may not be timed (a combine that adds into
its outputs, a call inside a CUDA graph capture) takes the kept choice, or the first candidate
without keeping it; under ``torch.compile`` the first candidate decides, so that a traced graph
does not depend on what was measured before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..task_gradients import TaskGradients
from .contract import Backend
from .fastest import Fastest, call_key

#: Per (device type, pass), the order of the candidates where it is not AUTO_ORDER's: the
#: native combine leads on both GPUs measured (see above).
PASS_ORDER: dict[tuple[str, str], tuple[str, ...]] = {("cuda", "combine"): ("native", "triton")}

#: Runs a candidate's pass is timed over, after one warm-up run.
TIMED_RUNS = 5

#: Seconds one run of a call takes on a device.
Timer = Callable[[Callable[[], object], torch.device], float]


def device_seconds(call: Callable[[], object], device: torch.device) -> float:
    """Seconds ``call`` takes on ``device``: the mean of :data:`TIMED_RUNS` runs after one
    warm-up, timed by CUDA events on a GPU (waiting for it once)."""
    call()
    if device.type != "cuda":
        began = time.perf_counter()
        for _ in range(TIMED_RUNS):
            call()
        return (time.perf_counter() - began) / TIMED_RUNS
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMED_RUNS):
            call()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / 1e3 / TIMED_RUNS


class Auto:
    """Per pass, the candidate that measured fastest (see the module's docstring).

    ``candidates(device, kernel_pass)`` lists the backends that can run the pass there, in
    order; ``fallback`` runs where none can; ``timer`` times a call on a device.
    """

    name = "auto"

    def __init__(
        self,
        candidates: Callable[[torch.device, str], Sequence[Backend]],
        fallback: Backend,
        timer: Timer = device_seconds,
    ):
        self._candidates = candidates
        self._fallback = fallback
        self._timer = timer
        self._choices: Fastest[Backend] = Fastest()

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None: the fallback runs everywhere."""
        return None

    def gram(self, grads: TaskGradients) -> Tensor:
        return self.choose("gram", grads, lambda backend: backend.gram(grads)).gram(grads)

    def sq_norms(self, grads: TaskGradients) -> Tensor:
        return self.choose("sq_norms", grads, lambda backend: backend.sq_norms(grads)).sq_norms(grads)

    def combine(self, grads: TaskGradients, weights: Tensor, outs: list[Tensor], accumulate: bool) -> None:
        def run(backend: Backend) -> None:
            backend.combine(grads, weights, outs, False)

        # Timing runs the pass several times: harmless when it overwrites, wrong when it adds.
        self.choose("combine", grads, run, may_time=not accumulate).combine(grads, weights, outs, accumulate)

    def choose(
        self, kernel_pass: str, grads: TaskGradients, run: Callable[[Backend], object], *, may_time: bool = True
    ) -> Backend:
        """The backend for ``kernel_pass`` on ``grads``; ``run(backend)`` runs the pass, for timing."""
        if torch.compiler.is_compiling():
            return self._ordered(grads.device, kernel_pass)[0]
        capturing = grads.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return self._choices.choose(
            call_key(kernel_pass, grads),
            lambda: self._ordered(grads.device, kernel_pass),
            lambda backend: self._timer(lambda: run(backend), grads.device),
            may_time=may_time and not capturing,
        )

    def clear(self) -> None:
        """Forget every choice (the next call of each key measures again)."""
        self._choices.clear()

    def _ordered(self, device: torch.device, kernel_pass: str) -> Sequence[Backend]:
        return self._candidates(device, kernel_pass) or (self._fallback,)
