"""The issue's performance targets, judged on a results document (measured, never asserted in
tests). Every figure comes from the rows; nothing is re-measured.

- Post-backward part of the step (:mod:`bench.steps`): MTLStep in speed mode at least 3× faster
  than the library path and 2× faster than TorchJD on a GPU; ahead of both on a CPU. Judged per
  backend on the worst case over trunks and weightings, against the faster of TorchJD's two forms.
- Peak memory: memory mode ≤ 1.1× the floor's; speed mode ≤ floor + T·P·s + O(P), with the O(P)
  allowance taken as 2·P·s (the combined gradient and one temporary of its size).
- Kernels on a GPU: each pass ≥ 90 % of the copy bandwidth at P ≥ 2²⁴.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

KERNEL_TARGET_NUMEL = 2**24
SPEED_MODE_ALLOWANCE = 2.0  # the O(P) term of the speed-mode bound, in units of P·s


def median(row: dict, duration: str) -> float:
    """A row's median time of ``duration`` in seconds, NaN when absent."""
    value = row.get("times", {}).get(duration, {}).get("median")
    return math.nan if value is None else value


def measured(rows: Iterable[dict]) -> list[dict]:
    """Rows that carry measurements (not errors nor notes)."""
    return [row for row in rows if "times" in row]


def find(rows: list[dict], **match) -> list[dict]:
    return [row for row in rows if all(row.get(key) == value for key, value in match.items())]


def baseline(rows: list[dict], row: dict, family: str, duration: str) -> float:
    """The fastest ``duration`` of the ``family`` rows of ``row``'s trunk and weighting (any
    variant): the baseline a speed-up is taken against. The floor has no weighting."""
    match = {"trunk": row["trunk"], "tasks": row["tasks"], "path": family}
    if family != "floor":
        match["weighting"] = row["weighting"]
    times = [median(other, duration) for other in find(rows, **match)]
    times = [t for t in times if math.isfinite(t)]
    return min(times) if times else math.nan


def floor_peak(rows: list[dict], row: dict) -> float:
    floors = find(rows, trunk=row["trunk"], tasks=row["tasks"], path="floor")
    peaks = [floor.get("peak_bytes") for floor in floors if floor.get("peak_bytes")]
    return peaks[0] if peaks else math.nan


def extra_memory_units(rows: list[dict], row: dict) -> float:
    """(peak − floor's peak) in units of P·s, the size of one gradient of the shared parameters."""
    peak = row.get("peak_bytes")
    if peak is None:
        return math.nan
    return (peak - floor_peak(rows, row)) / (row["shared_numel"] * row["element_size"])


def _judge(value: float, ok: bool | None) -> str:
    if ok is None or not math.isfinite(value):
        return "not judged"
    return "met" if ok else "missed"


def evaluate(results: dict) -> list[dict]:
    """One dict per target and backend: ``target``, ``threshold``, ``measured``, ``verdict``."""
    device_type = results["meta"]["device_type"]
    on_gpu = device_type == "cuda"
    step_rows = measured(results.get("steps", []))
    judged = []
    for backend in results["meta"].get("backends", []):
        speed = find(step_rows, path="mtlstep", variant="speed", backend=backend)
        memory = find(step_rows, path="mtlstep", variant="memory", backend=backend)
        for family, gpu_factor, name in (("library", 3.0, "the library path"), ("torchjd", 2.0, "TorchJD")):
            ratios = [baseline(step_rows, row, family, "post_backward") / median(row, "post_backward") for row in speed]
            worst = min((r for r in ratios if math.isfinite(r)), default=math.nan)
            threshold = gpu_factor if on_gpu else 1.0
            judged.append({
                "target": f"post-backward part faster than {name} ({backend})",
                "threshold": f"≥ {threshold:g}× (GPU)" if on_gpu else "> 1× (CPU: ahead)",
                "measured": f"{worst:.2f}× (worst of {len(ratios)})",
                "verdict": _judge(worst, worst >= threshold if on_gpu else worst > threshold),
            })
        memory_ratios = [row["peak_bytes"] / floor_peak(step_rows, row) for row in memory if row.get("peak_bytes")]
        worst_memory = max(memory_ratios, default=math.nan)
        judged.append({
            "target": f"memory mode peak memory ({backend})",
            "threshold": "≤ 1.1× the floor's",
            "measured": f"{worst_memory:.2f}× (worst of {len(memory_ratios)})",
            "verdict": _judge(worst_memory, worst_memory <= 1.1),
        })
        excess = [extra_memory_units(step_rows, row) - row["tasks"] for row in speed]
        worst_excess = max((e for e in excess if math.isfinite(e)), default=math.nan)
        judged.append({
            "target": f"speed mode peak memory ({backend})",
            "threshold": f"≤ floor + T·P·s + {SPEED_MODE_ALLOWANCE:g}·P·s",
            "measured": f"floor + T·P·s {'+' if worst_excess >= 0 else '−'} {abs(worst_excess):.2f}·P·s (worst of {len(excess)})",
            "verdict": _judge(worst_excess, worst_excess <= SPEED_MODE_ALLOWANCE),
        })
        judged.append(_kernel_target(results, backend, on_gpu))
    return judged


def _kernel_target(results: dict, backend: str, on_gpu: bool) -> dict:
    rows = [row for row in measured(results.get("kernels", [])) if row["backend"] == backend]
    large = [row for row in rows if row["numel"] >= KERNEL_TARGET_NUMEL]
    target = {"target": f"kernel passes at P ≥ 2^24 ({backend})", "threshold": "≥ 90 % of copy bandwidth (GPU)"}
    if not large:
        largest = max((row["numel"] for row in rows), default=0)
        where = f"largest P measured 2^{largest.bit_length() - 1}" if largest else "no kernel rows"
        return {**target, "measured": f"not measured ({where})", "verdict": "not judged"}
    worst = min(large, key=lambda row: row["copy_ratio"])
    measured_text = (
        f"{100 * worst['copy_ratio']:.0f} % (worst: {worst['pass']}, {worst['dtype']}, T={worst['tasks']}, "
        f"P=2^{worst['numel'].bit_length() - 1})"
    )
    return {**target, "measured": measured_text, "verdict": _judge(worst["copy_ratio"], worst["copy_ratio"] >= 0.9 if on_gpu else None)}
