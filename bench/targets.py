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
- Native CPU passes at their limits, over T ∈ {2, 4, 8, 16, 32}, P ∈ {2²⁰, 2²², 2²⁴} and the three
  dtypes, each ratio from one interleaved job (:mod:`bench.kernel_limits`): the float32 combine
  ≥ 1.0× ``torch.mv(J.T, w, out=g)``, the same g = Jᵀw; the float32 Gram pass ≥ 0.9× torch.mv's
  read rate over J for T ≤ 8; for T ≥ 16, where its T(T+1)/2 FMAs a column make it compute-bound,
  the Gram pass of every dtype ≥ 0.7× its roofline, min(FMA peak / (T(T+1)/2), torch.mv's float32
  read rate / (T·s)) columns a second; 16-bit passes (the Gram pass for T ≤ 8, the combine for
  every T) ≥ 0.9× the bytes a second of the same pass on the float32 twin of J.
  :func:`distance_table` gives every pass's distance to its limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .kernel_cases import FOREACH_NORM, MATMUL_COMBINE, MATMUL_GRAM, MV_INTO_OUT
from .kernel_limits import ROOFLINE_REFERENCE, TWIN_DTYPE
from .presets import QUICK
from .timing import Summary

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


def pass_rows(rows: Iterable[dict]) -> list[dict]:
    """Measured kernel rows of the passes themselves, without the limits timed beside them."""
    return [row for row in measured(rows) if not row.get("reference")]


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
    judged += cpu_limit_targets(results)
    return judged


def _case_of(row: dict) -> str:
    where = (
        f"P=2^{row['numel'].bit_length() - 1}" if row["layout"] == "matrix" else f"{row['layout']}, P={row['numel']:,}"
    )
    return f"{row['pass']}, {row['dtype']}, T={row['tasks']}, {where}"


def torch_baselines(rows: list[dict], row: dict) -> list[dict]:
    """The torch baselines of ``row``'s pass measured in its job (same layout, dtype, T and P)."""
    case = find(rows, layout=row["layout"], dtype=row["dtype"], tasks=row["tasks"], numel=row["numel"])
    return [
        other for other in case if other["pass"] == row["pass"] and other["baseline"] and not other.get("reference")
    ]


def _kernel_targets(results: dict, backend: str, on_gpu: bool) -> list[dict]:
    rows = pass_rows(results.get("kernels", []))
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
    rows = find(pass_rows(results.get("kernels", [])), layout="matrix", tasks=NATIVE_CPU_TASKS, numel=NATIVE_CPU_NUMEL)
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


# ---- the native CPU passes at their limits

CPU_LIMIT_TASKS = (2, 4, 8, 16, 32)
CPU_LIMIT_SIZES = (2**20, 2**22, 2**24)
CPU_LIMIT_DTYPES = ("float32", "bfloat16", "float16")
#: From this T on the Gram pass is judged against its roofline rather than torch.mv's read rate.
COMPUTE_BOUND_TASKS = 16
COMBINE_VS_MV = 1.0
GRAM_VS_MV = 0.9
GRAM_VS_ROOFLINE = 0.7
HALF_VS_FLOAT = 0.9


@dataclass(frozen=True)
class Ratio:
    """A figure over its limit: the median and quartiles of its ratios round by round, where the
    candidates were timed in the same rounds (:class:`bench.timing.Summary`'s ``rounds``), else
    from their medians, with the range their quartiles allow (results without rounds).

    Paired by round, a ratio sees both candidates in the same state of a shared machine, whose
    memory rate can change by half from one second to the next."""

    value: float
    low: float
    high: float

    @classmethod
    def of_rounds(cls, ratios: Iterable[float]) -> Ratio | None:
        """The median and quartiles of per-round ratios; None without a finite one."""
        summary = Summary.of(list(ratios))
        return cls(summary.median, summary.p25, summary.p75) if summary.samples else None

    @classmethod
    def of_times(cls, limit: dict, achieved: dict, scale: float = 1.0) -> Ratio:
        """``scale`` × limit time / achieved time (a speed ratio), from their ``times`` summaries."""
        paired = rounds_of(limit, achieved)
        if paired is not None:
            ratio = cls.of_rounds(
                scale * _over(limit_t, achieved_t) for limit_t, achieved_t in zip(*paired, strict=True)
            )
            if ratio is not None:
                return ratio
        return cls(
            scale * limit["median"] / achieved["median"],
            scale * limit["p25"] / achieved["p75"],
            scale * limit["p75"] / achieved["p25"],
        )


def _over(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN where the denominator is not a positive number."""
    return numerator / denominator if denominator > 0 else math.nan


def rounds_of(*summaries: dict) -> tuple[list[float], ...] | None:
    """The summaries' samples round by round, where all were timed in the same rounds."""
    rounds = [summary.get("rounds") for summary in summaries]
    if not all(rounds) or len({len(r) for r in rounds}) != 1:
        return None
    return tuple(list(r) for r in rounds)


@dataclass(frozen=True)
class CpuJob:
    """The rows of one native CPU matrix job: the passes, torch.mv, the probe and the float32 twin."""

    dtype: str
    tasks: int
    numel: int
    rows: list[dict]

    def _one(self, **match) -> dict | None:
        found = find(self.rows, **match)
        return found[0] if found else None

    def native(self, kernel_pass: str) -> dict | None:
        return self._one(backend="native", dtype=self.dtype, reference=None, **{"pass": kernel_pass})

    def twin(self, kernel_pass: str) -> dict | None:
        """The native pass on the float32 twin (the pass itself in a float32 job)."""
        if self.dtype == TWIN_DTYPE:
            return self.native(kernel_pass)
        return self._one(backend="native", twin_of=self.dtype, **{"pass": kernel_pass})

    @property
    def mv(self) -> dict | None:
        """torch.mv(J.T, w, out=g) on float32 J: this job's, or its twin's."""
        if self.dtype == TWIN_DTYPE:
            return self._one(baseline=MV_INTO_OUT, dtype=TWIN_DTYPE, reference=None)
        return self._one(baseline=MV_INTO_OUT, twin_of=self.dtype)

    @property
    def probe(self) -> dict | None:
        """The FMA probe's row."""
        return self._one(reference=ROOFLINE_REFERENCE)

    @property
    def fma_per_s(self) -> float:
        probe = self.probe
        return probe["fma_per_s"] if probe else math.nan

    @property
    def element_size(self) -> int:
        return 4 if self.dtype == TWIN_DTYPE else 2

    def read_rate(self) -> float:
        """torch.mv's float32 read rate over J, bytes a second: the memory limit."""
        mv = self.mv
        return self.tasks * self.numel * 4 / mv["times"]["median"] if mv else math.nan

    def gram_limits(self) -> tuple[float, float]:
        """(memory, compute) limits of the Gram pass in columns of J a second, from medians."""
        mv = self.mv
        return self.gram_limits_of(mv["times"]["median"] if mv else math.nan, self.fma_per_s)

    def gram_limits_of(self, mv_seconds: float, fma_per_s: float) -> tuple[float, float]:
        """(memory, compute) limits in columns a second, for torch.mv taking ``mv_seconds`` and
        the FMA probe reaching ``fma_per_s``."""
        memory = _over(self.tasks * self.numel * 4, mv_seconds) / (self.tasks * self.element_size)
        compute = fma_per_s / (self.tasks * (self.tasks + 1) / 2)
        return memory, compute


def cpu_jobs(results: dict) -> list[CpuJob]:
    """The native CPU matrix jobs of a run, in (dtype, T, P) order."""
    if results["meta"]["device_type"] != "cpu":
        return []
    rows = [row for row in measured(results.get("kernels", [])) if row["layout"] == "matrix"]
    keys = sorted(
        {
            (row["dtype"], row["tasks"], row["numel"])
            for row in rows
            if row["backend"] == "native" and not row.get("reference")
        }
    )
    jobs = []
    for dtype, tasks, numel in keys:
        members = [
            row for row in find(rows, tasks=tasks, numel=numel) if row["dtype"] == dtype or row.get("twin_of") == dtype
        ]
        jobs.append(CpuJob(dtype, tasks, numel, members))
    return jobs


def _gram_vs_roofline(job: CpuJob) -> Ratio | None:
    gram, mv, probe = job.native("gram"), job.mv, job.probe
    if gram is None or not mv:
        return None
    paired = rounds_of(gram["times"], mv["times"], probe["times"]) if probe else None
    if paired is not None:
        # Per round: columns a second over the lower of the memory and the FMA limits of that round.
        ratio = Ratio.of_rounds(
            _over(_over(job.numel, t_gram), min(job.gram_limits_of(t_mv, _over(probe["fmas"], t_probe))))
            for t_gram, t_mv, t_probe in zip(*paired, strict=True)
        )
        if ratio is not None:
            return ratio
    limit = min(job.gram_limits())
    if not math.isfinite(limit):
        return None
    columns = job.numel / gram["times"]["median"]
    spread = gram["times"]["median"] / gram["times"]["p75"], gram["times"]["median"] / gram["times"]["p25"]
    return Ratio(columns / limit, columns / limit * spread[0], columns / limit * spread[1])


def _criteria() -> list[tuple[str, str, float, Callable[[CpuJob], Ratio | None]]]:
    """(name, dtypes judged, threshold, the job's ratio or None where it does not apply)."""

    def combine_vs_mv(job: CpuJob) -> Ratio | None:
        combine, mv = job.native("combine"), job.mv
        if job.dtype != TWIN_DTYPE or not (combine and mv):
            return None
        return Ratio.of_times(mv["times"], combine["times"])

    def gram_vs_mv(job: CpuJob) -> Ratio | None:
        gram, mv = job.native("gram"), job.mv
        if job.dtype != TWIN_DTYPE or job.tasks >= COMPUTE_BOUND_TASKS or not (gram and mv):
            return None
        return Ratio.of_times(mv["times"], gram["times"])  # the same bytes: T·P·4

    def gram_vs_roofline(job: CpuJob) -> Ratio | None:
        return _gram_vs_roofline(job) if job.tasks >= COMPUTE_BOUND_TASKS else None

    def half_vs_float(kernel_pass: str) -> Callable[[CpuJob], Ratio | None]:
        def ratio(job: CpuJob) -> Ratio | None:
            if job.dtype == TWIN_DTYPE or (kernel_pass == "gram" and job.tasks >= COMPUTE_BOUND_TASKS):
                return None
            half, full = job.native(kernel_pass), job.twin(kernel_pass)
            if not (half and full):
                return None
            return Ratio.of_times(full["times"], half["times"], scale=job.element_size / 4)  # bytes a second

        return ratio

    return [
        ("native combine vs torch.mv(J.T, w, out=g)", "float32", COMBINE_VS_MV, combine_vs_mv),
        (f"native Gram pass vs torch.mv's read rate, T < {COMPUTE_BOUND_TASKS}", "float32", GRAM_VS_MV, gram_vs_mv),
        (f"native Gram pass vs its roofline, T ≥ {COMPUTE_BOUND_TASKS}", "every", GRAM_VS_ROOFLINE, gram_vs_roofline),
        (
            f"16-bit native Gram pass, T < {COMPUTE_BOUND_TASKS}: bytes/s vs float32",
            "16-bit",
            HALF_VS_FLOAT,
            half_vs_float("gram"),
        ),
        ("16-bit native combine: bytes/s vs float32", "16-bit", HALF_VS_FLOAT, half_vs_float("combine")),
    ]


def _where(job: CpuJob) -> str:
    return f"{job.dtype}, T={job.tasks}, P=2^{job.numel.bit_length() - 1}"


def cpu_limit_targets(results: dict) -> list[dict]:
    """One row per criterion and dtype: the worst ratio over the judged (T, P) of the run."""
    on_cpu = results["meta"]["device_type"] == "cpu"
    judged_jobs = [
        job
        for job in cpu_jobs(results)
        if job.tasks in CPU_LIMIT_TASKS and job.numel in CPU_LIMIT_SIZES and job.dtype in CPU_LIMIT_DTYPES
    ]
    targets = []
    for name, dtypes, threshold, ratio_of in _criteria():
        wanted = {"float32": ("float32",), "16-bit": ("bfloat16", "float16"), "every": CPU_LIMIT_DTYPES}[dtypes]
        for dtype in wanted:
            target = {"target": f"{name} (CPU, {dtype})", "threshold": f"≥ {threshold:g}×"}
            ratios = [(ratio_of(job), job) for job in judged_jobs if job.dtype == dtype]
            ratios = [(ratio, job) for ratio, job in ratios if ratio is not None and math.isfinite(ratio.value)]
            if not (on_cpu and ratios):
                why = "a GPU run" if not on_cpu else "no judged case in this run"
                targets.append({**target, "measured": f"not measured ({why})", "verdict": "not judged"})
                continue
            worst, job = min(ratios, key=lambda item: item[0].value)
            met = sum(ratio.value >= threshold for ratio, _ in ratios)
            target["measured"] = (
                f"worst {worst.value:.2f}× (quartiles {worst.low:.2f}–{worst.high:.2f}) at {_where(job)}; "
                f"{met} of {len(ratios)} cases met"
            )
            target["verdict"] = _judge(worst.value, met == len(ratios))
            targets.append(target)
    return targets


def distance_table(results: dict) -> list[dict]:
    """Every native CPU pass's distance to its limit: one entry per (pass, dtype, T, P) job.

    The limit of a pass is the memory limit, torch.mv's float32 bytes a second over its own
    bytes (the combine's (T+1)·P·s, the Gram pass's T·P·s); for the Gram pass, the lower of that
    and the FMA roofline, F / (T(T+1)/2) columns a second."""
    entries = []
    for job in cpu_jobs(results):
        mv = job.mv
        for kernel_pass in ("gram", "combine"):
            row = job.native(kernel_pass)
            if row is None or mv is None:
                continue
            bytes_per_column = row["bytes"] / job.numel
            memory = mv["gbps"] * 1e9 if kernel_pass == "combine" else job.read_rate()
            limit, bound = memory, "memory"
            if kernel_pass == "gram":
                compute = job.gram_limits()[1] * bytes_per_column
                if compute < memory:
                    limit, bound = compute, "FMA"
            entries.append(
                {
                    "pass": kernel_pass,
                    "dtype": job.dtype,
                    "tasks": job.tasks,
                    "numel": job.numel,
                    "gbps": row["gbps"],
                    "limit_gbps": limit / 1e9,
                    "bound": bound,
                    "distance": row["gbps"] * 1e9 / limit,
                }
            )
    return entries
