"""Suite modules joined to a run: each module ``bench/<name>.py`` of :data:`SUITES` exposes

    results(preset: str, device: torch.device) -> list[dict]

which measures what the module is about at the sizes of ``preset`` (a name of
:data:`bench.presets.PRESETS`) on ``device`` and returns its result rows, one flat dict a
measurement (JSON-ready values). The runner adds ``"suite": <name>`` to each row. A module that is
not there, that lacks ``results``, or whose ``results`` raises leaves a note in the report
instead of rows; the other suites and sections are still measured.
"""

from __future__ import annotations

import importlib
import importlib.util
import traceback

import torch

from .plan import Job
from .presets import Preset

#: Module names under ``bench/``, with what they measure.
SUITES = {
    "bench_distributed": "the distributed step over gloo ranks",
    "bench_weightings": "weighting solver times",
    "large_model_steps": "every step path on a model of real size, × the plain backward",
    "cheap_modes_accuracy": "features mode and norm_params against the exact step, over training",
}

ENTRY_POINT = "results"


def _suite_job(module_name: str, preset: Preset, device: torch.device) -> Job:
    def run() -> list[dict]:
        module = importlib.import_module(f"{__package__}.{module_name}")
        results = getattr(module, ENTRY_POINT, None)
        if not callable(results):
            return [{"suite": module_name, "note": f"exposes no {ENTRY_POINT}(preset, device)"}]
        try:
            rows = results(preset.name, device)
        except Exception as error:  # another suite's failure must not lose this run's results
            return [
                {"suite": module_name, "note": "failed: " + "".join(traceback.format_exception_only(error)).strip()}
            ]
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
