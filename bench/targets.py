"""The issue's performance targets, judged on a results document (measured, never asserted in
tests). Every figure comes from the rows; nothing is re-measured.

- Post-backward part of the step (:mod:`bench.steps`): MTLStep in speed mode at least 3× faster
  than the library path and 2× faster than TorchJD on a GPU; ahead of both on a CPU. Judged per
  backend on the worst case over trunks and weightings, against the faster of TorchJD's two forms.
- Peak memory: memory mode ≤ 1.1× the floor's; speed mode ≤ floor + T·P·s + O(P), with the O(P)
  allowance taken as 2·P·s (the combined gradient and one temporary of its size).
- Kernels on a GPU: each pass of each compiled backend ≥ 90 % of the copy bandwidth measured in
  the same run at P ≥ 2²⁴, and ahead of every torch baseline of its pass there. (The reference
  backend is plain PyTorch, like the baselines: it is not judged.)
- Native kernels on a CPU: in one run, at T = 8 and the largest P of the quick preset, float32
  and bfloat16: the Gram pass ≥ 3× ``J @ J.T`` and within 80 % of the read bandwidth that
  ``torch._foreach_norm`` over the rows reaches on the same buffer; the combine ≥ 1.5× ``w @ J``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .kernel_cases import FOREACH_NORM, MATMUL_COMBINE, MATMUL_GRAM
from .presets import QUICK

KERNEL_TARGET_NUMEL = 2**24
SPEED_MODE_ALLOWANCE = 2.0  # the O(P) term of the speed-mode bound, in units of P·s
NATIVE_CPU_TASKS = 8
NATIVE_CPU_NUMEL = 2 ** max(QUICK.kernels.log2_sizes)
NATIVE_CPU_DTYPES = ("float32", "bfloat16")
#: (pass, torch baseline, what is compared, threshold) of the native CPU target.
NATIVE_CPU_CRITERIA = (
    ("gram", MATMUL_GRAM, "speed-up", 3.0),
    ("gram", FOREACH_NORM, "read bandwidth", 0.8),
    ("combine", MATMUL_COMBINE, "speed-up", 1.5),
)


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
            judged.append(
                {
                    "target": f"post-backward part faster than {name} ({backend})",
                    "threshold": f"≥ {threshold:g}× (GPU)" if on_gpu else "> 1× (CPU: ahead)",
                    "measured": f"{worst:.2f}× (worst of {len(ratios)})",
                    "verdict": _judge(worst, worst >= threshold if on_gpu else worst > threshold),
                }
            )
        memory_ratios = [row["peak_bytes"] / floor_peak(step_rows, row) for row in memory if row.get("peak_bytes")]
        worst_memory = max(memory_ratios, default=math.nan)
        judged.append(
            {
                "target": f"memory mode peak memory ({backend})",
                "threshold": "≤ 1.1× the floor's",
                "measured": f"{worst_memory:.2f}× (worst of {len(memory_ratios)})",
                "verdict": _judge(worst_memory, worst_memory <= 1.1),
            }
        )
        excess = [extra_memory_units(step_rows, row) - row["tasks"] for row in speed]
        worst_excess = max((e for e in excess if math.isfinite(e)), default=math.nan)
        judged.append(
            {
                "target": f"speed mode peak memory ({backend})",
                "threshold": f"≤ floor + T·P·s + {SPEED_MODE_ALLOWANCE:g}·P·s",
                "measured": (
                    f"floor + T·P·s {'+' if worst_excess >= 0 else '−'} {abs(worst_excess):.2f}·P·s "
                    f"(worst of {len(excess)})"
                ),
                "verdict": _judge(worst_excess, worst_excess <= SPEED_MODE_ALLOWANCE),
            }
        )
        if backend != "reference":
            judged += _kernel_targets(results, backend, on_gpu)
    judged += _native_cpu_targets(results)
    return judged


def _case_of(row: dict) -> str:
    where = (
        f"P=2^{row['numel'].bit_length() - 1}" if row["layout"] == "matrix" else f"{row['layout']}, P={row['numel']:,}"
    )
    return f"{row['pass']}, {row['dtype']}, T={row['tasks']}, {where}"


def torch_baselines(rows: list[dict], row: dict) -> list[dict]:
    """The torch baselines of ``row``'s pass measured in its job (same layout, dtype, T and P)."""
    case = find(rows, layout=row["layout"], dtype=row["dtype"], tasks=row["tasks"], numel=row["numel"])
    return [other for other in case if other["pass"] == row["pass"] and other["baseline"]]


def _kernel_targets(results: dict, backend: str, on_gpu: bool) -> list[dict]:
    rows = measured(results.get("kernels", []))
    own = [row for row in find(rows, backend=backend) if row["numel"] >= KERNEL_TARGET_NUMEL]
    copy_target = {"target": f"kernel passes at P ≥ 2^24 ({backend})", "threshold": "≥ 90 % of copy bandwidth (GPU)"}
    torch_target = {
        "target": f"kernel passes at P ≥ 2^24 ({backend})",
        "threshold": "ahead of every torch baseline (GPU)",
    }
    if not own:
        largest = max((row["numel"] for row in find(rows, backend=backend)), default=0)
        where = f"largest P measured {largest:,}" if largest else "no kernel rows"
        unmeasured = {"measured": f"not measured ({where})", "verdict": "not judged"}
        return [{**copy_target, **unmeasured}, {**torch_target, **unmeasured}]
    worst = min(own, key=lambda row: row["copy_ratio"])
    copy_target.update(
        measured=f"{100 * worst['copy_ratio']:.0f} % (worst: {_case_of(worst)})",
        verdict=_judge(worst["copy_ratio"], worst["copy_ratio"] >= 0.9 if on_gpu else None),
    )
    lead = []  # (the backend's GB/s over a baseline's, its speed-up as the bytes are the same; baseline, row)
    for row in own:
        lead += [(row["gbps"] / other["gbps"], other["baseline"], row) for other in torch_baselines(rows, row)]
    if not lead:
        torch_target.update(measured="no torch baseline measured", verdict="not judged")
        return [copy_target, torch_target]
    ratio, baseline_name, row = min(lead, key=lambda item: item[0])
    torch_target.update(
        measured=f"{ratio:.2f}× (worst: vs {baseline_name}, {_case_of(row)})",
        verdict=_judge(ratio, ratio > 1.0 if on_gpu else None),
    )
    return [copy_target, torch_target]


def _native_cpu_targets(results: dict) -> list[dict]:
    """The native CPU target, one row per criterion and dtype."""
    on_cpu = results["meta"]["device_type"] == "cpu"
    rows = find(measured(results.get("kernels", [])), layout="matrix", tasks=NATIVE_CPU_TASKS, numel=NATIVE_CPU_NUMEL)
    judged = []
    for dtype in NATIVE_CPU_DTYPES:
        where = f"{dtype}, T={NATIVE_CPU_TASKS}, P=2^{NATIVE_CPU_NUMEL.bit_length() - 1}"
        for kernel_pass, baseline_name, compared, threshold in NATIVE_CPU_CRITERIA:
            target = {
                "target": f"native {kernel_pass} pass: {compared} vs {baseline_name} (CPU, {where})",
                "threshold": f"≥ {100 * threshold:.0f} %" if compared == "read bandwidth" else f"≥ {threshold:g}×",
            }
            native = find(rows, dtype=dtype, backend="native", **{"pass": kernel_pass})
            other = find(rows, dtype=dtype, baseline=baseline_name, **{"pass": kernel_pass})
            if not (on_cpu and native and other):
                why = "a GPU run" if not on_cpu else "not in this run"
                judged.append({**target, "measured": f"not measured ({why})", "verdict": "not judged"})
                continue
            ratio = native[0]["gbps"] / other[0]["gbps"]  # = the time ratio: the same bytes
            if compared == "read bandwidth":
                text = f"{100 * ratio:.0f} % ({native[0]['gbps']:.1f} vs {other[0]['gbps']:.1f} GB/s)"
            else:
                text = f"{ratio:.2f}×"
            judged.append({**target, "measured": text, "verdict": _judge(ratio, ratio >= threshold)})
    return judged
