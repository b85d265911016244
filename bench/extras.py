"""Benchmark modules of the backends and weightings, joined to a run when they are present.

Each module ``bench/<name>.py`` of :data:`SUITES` exposes a function returning its result rows
(a list of flat dicts, one a measurement): ``results`` (or ``run``, ``collect``,
``run_benchmarks``, ``benchmark``, the first found). It is called with ``preset=<preset name>``
and ``device=<torch.device>`` where its signature takes them (``quick=<bool>`` too). A missing
module, or one that fails, leaves a note in the report instead of rows.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import traceback

import torch

from .plan import Job
from .presets import Preset

#: Module names under ``bench/``, with what they measure.
SUITES = {
    "bench_triton_kernels": "Triton kernel passes",
    "bench_native_cpu": "native CPU kernels against torch",
    "bench_weightings": "weighting solver times",
    "bench_distributed": "the distributed step over gloo ranks",
}

_ENTRY_POINTS = ("results", "run", "collect", "run_benchmarks", "benchmark")


def _call(entry, preset: Preset, device: torch.device):
    parameters = inspect.signature(entry).parameters
    offered = {"preset": preset.name, "device": device, "quick": preset.name != "full"}
    return entry(**{name: value for name, value in offered.items() if name in parameters})


def _suite_job(module_name: str, preset: Preset, device: torch.device) -> Job:
    def run() -> list[dict]:
        module = importlib.import_module(f"{__package__}.{module_name}")
        entry = next((getattr(module, name) for name in _ENTRY_POINTS if callable(getattr(module, name, None))), None)
        if entry is None:
            return [{"suite": module_name, "note": f"exposes none of {', '.join(_ENTRY_POINTS)}"}]
        try:
            produced = _call(entry, preset, device)
        except Exception as error:  # another suite's failure must not lose this run's results
            return [{"suite": module_name, "note": "failed: " + "".join(traceback.format_exception_only(error)).strip()}]
        rows = [produced] if isinstance(produced, dict) else list(produced or [])
        return [{"suite": module_name, **row} for row in rows]

    return Job("extras", f"extras: {module_name}", run)


def plan(preset: Preset, device: torch.device) -> tuple[list[Job], list[str]]:
    """A job per suite module that exists, and a note for each one that does not."""
    jobs, notes = [], []
    for module_name, what in SUITES.items():
        if importlib.util.find_spec(f"{__package__}.{module_name}") is None:
            notes.append(f"{module_name} ({what}): not present")
        else:
            jobs.append(_suite_job(module_name, preset, device))
    return jobs, notes
