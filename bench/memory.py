"""Peak memory of one call, on a GPU and on a CPU.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the most bytes the
  caching allocator had handed out to live tensors at once during the call, everything resident on
  the device included (parameters, inputs, what other code keeps alive).
- CPU: torch keeps no allocator statistics for the CPU, so the profiler's memory events are
  summed instead. With ``profile_memory=True`` every allocation and free through c10's CPU
  allocator (the storage of every CPU tensor) is reported with its size; their running sum in
  time order is the live tensor memory relative to the start of the call, and its maximum the
  peak increase. The bytes of the tensors the caller names as resident at the start (the model's
  parameters and buffers, the batch) are added, so the figure means the same as on a GPU.

What the CPU figure does not see: memory that does not pass through c10's allocator (scratch
buffers that oneDNN, MKL or OpenMP allocate themselves, Python objects, the allocator's own
caching and fragmentation), and tensors alive at the start that the caller did not name. It is
the peak of live tensor bytes, not the process's resident set size. The profiler slows the call
down, so peaks are measured in runs of their own, never in timed ones.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable

import torch


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by the storages of ``tensors``, each storage counted once."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_bytes(fn: Callable[[], object], device: torch.device, resident: Iterable[torch.Tensor] = ()) -> int:
    """The peak of live tensor bytes on ``device`` while ``fn()`` runs (see the module's notes).

    ``resident``: the tensors alive before the call that count towards the peak on a CPU (on a
    GPU the allocator counts everything resident by itself).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cuda and cpu devices, not {device.type}")
    return tensor_bytes(resident) + cpu_peak_increase(fn)


def cpu_peak_increase(fn: Callable[[], object]) -> int:
    """The largest increase of live CPU tensor bytes over their amount at the start of ``fn()``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _profiler_lines_silenced(), torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        fn()
    events = [
        event
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda event: event.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _profiler_lines_silenced():
    """Kineto writes a line to the process's stderr at every profiler start and stop, which would
    tear the progress bar; no setting turns it off, so file descriptor 2 is pointed at the null
    device meanwhile (Python's own ``sys.stderr`` writes are flushed first)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
