"""The fastest of a few ways to make one kind of call, measured once per key and kept.

Two choices are made this way: the launch configuration of a Triton pass
(:mod:`emtl_kernels.triton_kernels.tuning`) and the backend "auto" runs a pass with
(:mod:`emtl_kernels.backends.auto`). A key names the kind of call and the shape of its input
(:func:`call_key`). The first call of a key that may be timed runs every candidate and keeps the
fastest for the process; a call that may not (it adds into its output, or runs inside a CUDA graph
capture) takes the kept choice, or the first candidate without keeping it. A kept choice costs a
dict lookup: no wait for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from ..task_gradients import TaskGradients

#: What is chosen: a launch configuration, a backend (a dict key: hashable).
Candidate = TypeVar("Candidate")


def size_class(numel: int) -> int:
    """0 to 3 for P below 2¹⁸, 2²², 2²⁶ and above: the bucket a measured choice is kept for."""
    return min(3, max(0, (numel.bit_length() - 15) // 4))


def call_key(kind: str, grads: TaskGradients) -> tuple:
    """The key of a ``kind`` of call on ``grads``: T, dtype, size class and device."""
    return kind, grads.num_tasks, grads.dtype, size_class(grads.numel), grads.device


class Fastest(Generic[Candidate]):
    """The candidate kept per key."""

    def __init__(self) -> None:
        self._chosen: dict[Hashable, Candidate] = {}

    def choose(
        self,
        key: Hashable,
        candidates: Callable[[], Sequence[Candidate]],
        seconds: Callable[[Candidate], float],
        *,
        may_time: bool,
    ) -> Candidate:
        """The kept candidate for ``key``; on the first call that ``may_time``, the one of
        ``candidates()`` (made only then) whose ``seconds(candidate)`` is least. A single
        candidate is kept untimed."""
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen
        options = candidates()
        if len(options) == 1:
            self._chosen[key] = options[0]
            return options[0]
        if not may_time:
            return options[0]
        timings = {option: seconds(option) for option in options}
        chosen = min(timings, key=timings.__getitem__)
        self._chosen[key] = chosen
        return chosen

    def kept(self, key: Hashable) -> Candidate | None:
        """The candidate kept for ``key``, if any."""
        return self._chosen.get(key)

    def clear(self) -> None:
        """Forget every choice."""
        self._chosen.clear()
