"""Timing on the device's own timeline, and medians over interleaved repeats.

On CUDA a timestamp is a recorded event, so a duration is the GPU time between two points of the
stream, with no host wait inside the measured code; the host waits once after each sample. On a
CPU a timestamp is ``time.perf_counter()``: the ops have finished when the call returns.

A clock made with ``flush_cache=True`` evicts the GPU's L2 cache before each sample, as
``triton.testing.do_bench`` does, so that a pass over a buffer that would fit in L2 reads it from
memory rather than from the previous sample's cache lines. On a CPU nothing is flushed.

The candidates of one comparison are timed round-robin, one sample each per round, starting each
round at a different one: background load on a shared machine then lands on all of them alike,
which keeps their ratios meaningful even when the absolute times drift.
"""

from __future__ import annotations

import math
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

#: Bytes written to evict the L2 cache: more than any GPU's L2 holds (50 MiB on an H100).
L2_FLUSH_BYTES = 256 * 2**20


class Clock:
    """Timestamps and durations on ``device``'s timeline; with ``flush_cache``, the GPU's L2 cache
    is evicted before each sample of :func:`timed`."""

    def __init__(self, device: torch.device, flush_cache: bool = False):
        self.is_cuda = device.type == "cuda"
        self._scratch = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if flush_cache and self.is_cuda else None
        )

    def flush_cache(self) -> None:
        """Overwrite a buffer larger than the GPU's L2 cache (a no-op on a CPU or without
        ``flush_cache``)."""
        if self._scratch is not None:
            self._scratch.zero_()

    def now(self):
        """A timestamp: a recorded CUDA event, or ``time.perf_counter()`` on a CPU."""
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        """Wait until the device has run everything queued so far."""
        if self.is_cuda:
            torch.cuda.synchronize()

    def seconds(self, start, end) -> float:
        """Seconds from ``start`` to ``end`` (after :meth:`sync`, or on a CPU)."""
        if self.is_cuda:
            return start.elapsed_time(end) / 1e3
        return end - start


#: A sampler runs its candidate once and returns named durations in seconds (NaN: not defined).
Sampler = Callable[[], Mapping[str, float]]


def timed(fn: Callable[[], object], clock: Clock) -> Sampler:
    """A sampler of the whole of ``fn``: ``{"time": seconds}``."""

    def sample() -> dict[str, float]:
        clock.flush_cache()
        start = clock.now()
        fn()
        end = clock.now()
        clock.sync()
        return {"time": clock.seconds(start, end)}

    return sample


@dataclass(frozen=True)
class Summary:
    """Robust statistics of one duration's samples, in seconds, and the samples in the order of
    the rounds that took them (``rounds``): sample i of two candidates timed by one
    :func:`measure_interleaved` call came from the same round, which a ratio can pair."""

    median: float
    p25: float
    p75: float
    min: float
    samples: int
    rounds: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        finite = sorted(v for v in values if math.isfinite(v))
        if not finite:
            return cls(math.nan, math.nan, math.nan, math.nan, 0, tuple(values))
        quartiles = [finite[0]] * 3 if len(finite) == 1 else statistics.quantiles(finite, n=4, method="inclusive")
        return cls(statistics.median(finite), quartiles[0], quartiles[2], finite[0], len(finite), tuple(values))

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "median": self.median,
            "p25": self.p25,
            "p75": self.p75,
            "min": self.min,
            "samples": self.samples,
            "rounds": list(self.rounds),
        }


def measure_interleaved(samplers: Mapping[str, Sampler], *, warmup: int, repeats: int) -> dict[str, dict[str, Summary]]:
    """Time every sampler ``warmup`` times unrecorded, then ``repeats`` times round-robin.

    Returns, per sampler, a :class:`Summary` of each duration it reports.
    """
    names = list(samplers)
    for _ in range(warmup):
        for name in names:
            samplers[name]()
    recorded: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for key, value in samplers[name]().items():
                recorded[name].setdefault(key, []).append(value)
    return {
        name: {key: Summary.of(values) for key, values in durations.items()} for name, durations in recorded.items()
    }


def first_run(sample: Sampler) -> tuple[list[str], str | None]:
    """Run a sampler once (its first warm-up), returning the distinct warnings it raised and its
    error, if any: a candidate that fails is reported and the others are still measured."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sample()
        except Exception as error:
            return [], "".join(traceback.format_exception_only(error)).strip()
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught}), None
