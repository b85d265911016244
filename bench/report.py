"""The report: ``report.md`` and its PNG plots, built from a results document alone.

``python -m bench.report bench/results/<device>/results.json`` (or ``python -m bench
--report-only <results.json>``) rebuilds it. Every figure carries, in its footer and in the
caption under it, and every table under it, the device, torch and Triton versions and the commit.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .environment import caption
from .scaling import loglog_slope
from .targets import (
    baseline,
    distance_table,
    evaluate,
    extra_memory_units,
    floor_peak,
    measured,
    median,
    pass_rows,
    torch_baselines,
)

REPORT_FILE = "report.md"
HEADLINE_PLOT = "steps_overhead.png"


def _figure(value: float | None, thousands_separator: str = "") -> str:
    """``value`` to three significant digits, or as a whole number when that has four digits or
    more (never with an exponent); "—" when it is missing or not finite."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.3g}" if abs(value) < 999.5 else f"{value:{thousands_separator}.0f}"


def _ms(seconds: float | None) -> str:
    return _figure(None if seconds is None else seconds * 1e3)


def _ratio(value: float | None, digits: str = ".2f") -> str:
    """``value`` as a ratio (``digits`` its format spec); "—" when it is missing or not finite."""
    return "—" if value is None or not math.isfinite(value) else f"{value:{digits}}×"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _log2(numel: int) -> str:
    return f"2^{numel.bit_length() - 1}" if numel & (numel - 1) == 0 else f"{numel:,}"


def _count(number: int) -> str:
    for divisor, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= divisor:
            return f"{number / divisor:.3g} {unit}"
    return str(number)


def _path_label(row: dict) -> str:
    names = {"floor": "equal weighting (floor)", "library": "library path", "torchjd": "TorchJD", "mtlstep": "MTLStep"}
    parts = [names.get(row["path"], row["path"])]
    parts += [part for part in (row.get("variant"), row.get("weighting"), row.get("backend")) if part]
    return " · ".join(parts)


class _Exhibits:
    """Figures (saved into the output folder) and tables, each carrying the run's caption: the
    figures in their footer and under them, the tables under them."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir, self.caption = out_dir, caption(meta)

    def figure(self, figure, name: str) -> str:
        figure.text(0.01, 0.005, self.caption, fontsize=7, color="0.35", ha="left", va="bottom")
        figure.tight_layout(rect=(0, 0.03, 1, 1))
        figure.savefig(self.out_dir / name, dpi=110)
        plt.close(figure)
        return f"![{name}]({name})\n\n*{self.caption}*"

    def table(self, header: list[str], rows: list[list[str]]) -> str:
        return f"{_table(header, rows)}\n\n*{self.caption}*"


# ---------------------------------------------------------------- header and targets


def _header(meta: dict) -> str:
    load_start, load_end = meta.get("load_average_start"), meta.get("load_average_end")
    lines = [
        f"# emtl-kernels benchmarks: {meta['device']}",
        "",
        f"*{caption(meta)}*",
        "",
        f"Preset `{meta['preset']}` ({meta.get('preset_description', '')}), measured {meta['date']} in "
        f"{meta.get('seconds', '?')} s with {meta['threads']} torch threads on {meta.get('cpu_count')} logical CPUs. "
        f"Commit `{meta.get('commit')}`{' with uncommitted changes' if meta.get('dirty') else ''}; "
        f"torch {meta['torch']}, Triton {meta.get('triton') or 'not installed'}, "
        f"TorchJD {meta.get('torchjd') or 'not installed'}, "
        f"Python {meta.get('python')}.",
        "",
    ]
    if load_start:
        busy = max(load_start[0], (load_end or load_start)[0]) > 0.5 * (meta.get("cpu_count") or 1)
        lines.append(
            f"Load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end"
            + (
                ": the machine was shared with other work, so absolute times are noisy. Candidates of one "
                "comparison were timed interleaved, so their ratios are the figures to read."
                if busy
                else "."
            )
        )
        lines.append("")
    cpu = meta.get("cpu")
    if cpu:
        lines.append(
            f"CPU: family {cpu['family']}, model {cpu['model']}, stepping {cpu['stepping']}, cache {cpu['cache']}, "
            f"vector extensions {', '.join(cpu['vector_extensions']) or 'none'}; native CPU kernels: "
            f"{meta.get('native_cpu_isa') or 'not built'}."
        )
        lines.append("")
    lines.append(f"Backends measured: {', '.join(meta.get('backends', [])) or 'none'}.")
    for name, reason in meta.get("backends_left_out", {}).items():
        lines.append(f"Left out: `{name}`: {reason}.")
    if meta.get("triton_interpret"):
        lines.append("TRITON_INTERPRET was set: Triton ran in its interpreter; its times are not kernel times.")
    for name, items in meta.get("notes", {}).items():
        lines.append(f"{name.capitalize()}: {'; '.join(items)}.")
    return "\n".join(lines) + "\n"


def _targets_section(results: dict, exhibits: _Exhibits) -> str:
    judged = evaluate(results)
    if not judged:
        return ""
    rows = [[t["target"], t["threshold"], t["measured"], t["verdict"]] for t in judged]
    table = exhibits.table(["target", "threshold", "measured", "verdict"], rows)
    note = (
        "The CPU ratios to a limit (the rows naming torch.mv, the roofline or float32) pair the candidates "
        "round by round: each is the median (and quartiles) of the ratios of the rounds of one interleaved job, "
        "so that both sides of a ratio see the same state of the machine.\n\n"
        if any("(CPU," in t["target"] and "worst" in t["measured"] for t in judged)
        else ""
    )
    return "## Targets\n\n" + note + table + "\n" + _distance_section(results, exhibits)


GPU_REPORTS = ("bench/results/nvidia-h200/report.md", "bench/results/nvidia-h100/report.md")


def _distance_section(results: dict, exhibits: _Exhibits) -> str:
    """Each native CPU pass's GB/s over its limit's, one row per pass, dtype and T, one column per P."""
    entries = distance_table(results)
    if not entries:
        return ""
    sizes = sorted({entry["numel"] for entry in entries})
    cells: dict[tuple, dict[int, str]] = defaultdict(dict)
    for entry in entries:
        bound = "FMA" if entry["bound"] == "FMA" else "mem"
        cells[(entry["pass"], entry["dtype"], entry["tasks"])][entry["numel"]] = (
            f"{entry['distance']:.2f}× ({entry['gbps']:.1f} / {entry['limit_gbps']:.1f}, {bound})"
        )
    rows = [[*key, *(found.get(size, "—") for size in sizes)] for key, found in sorted(cells.items())]
    header = ["pass", "dtype", "T", *(f"P = {_log2(size)}" for size in sizes)]
    return (
        "\n### Distance to the limit (native CPU passes)\n\n"
        "Each cell: the pass's GB/s over its limit's (GB/s of the pass / of the limit, which limit). The memory "
        "limit (mem) is `torch.mv(J.T, w, out=g)` on float32 J in the same job, in bytes a second (over the "
        "combine's bytes for the combine, over J for the Gram pass: its read rate), the same bytes a second for "
        "16-bit J; the Gram pass's compute limit (FMA) is the FMA roofline measured in the same job, "
        "F / (T(T+1)/2) columns a second, where it is the lower. GPU: the copy-bandwidth ratios of "
        + " and ".join(f"`{path}`" for path in GPU_REPORTS)
        + ".\n\n"
        + exhibits.table(header, rows)
        + "\n"
    )


# ---------------------------------------------------------------- steps


def _step_rows_table(trunk_rows: list[dict], all_rows: list[dict], exhibits: _Exhibits) -> str:
    header = [
        "path",
        "step ms",
        "× floor",
        "task gradients ms",
        "post-backward ms",
        "post-backward speed-up vs library",
        "vs TorchJD",
        "step speed-up vs library",
        "vs TorchJD",
        "peak MiB",
        "peak × floor",
        "extra / (P·s)",
    ]
    table = []
    for row in trunk_rows:
        if "times" not in row:
            table.append(
                [_path_label(row), "error: " + (row.get("error") or "?").replace("|", "/")] + [""] * (len(header) - 2)
            )
            continue
        step, post = median(row, "step"), median(row, "post_backward")
        peak = row.get("peak_bytes")
        weighted = row["path"] != "floor"
        table.append(
            [
                _path_label(row),
                _ms(step),
                _ratio(step / baseline(all_rows, row, "floor", "step")),
                _ms(median(row, "task_gradients")),
                _ms(post),
                _ratio(baseline(all_rows, row, "library", "post_backward") / post) if weighted else "—",
                _ratio(baseline(all_rows, row, "torchjd", "post_backward") / post) if weighted else "—",
                _ratio(baseline(all_rows, row, "library", "step") / step) if weighted else "—",
                _ratio(baseline(all_rows, row, "torchjd", "step") / step) if weighted else "—",
                "—" if peak is None else f"{peak / 2**20:.3g}",
                "—" if peak is None else _ratio(peak / floor_peak(all_rows, row)),
                "—" if peak is None else f"{extra_memory_units(all_rows, row):.2f}",
            ]
        )
    return exhibits.table(header, table)


def _overhead_plot(rows: list[dict], exhibits: _Exhibits, weighting: str) -> str:
    trunks = list(dict.fromkeys(row["trunk"] for row in rows))
    figure, axes = plt.subplots(1, len(trunks), figsize=(5.2 * len(trunks), 4.2), squeeze=False)
    for axis, trunk in zip(axes[0], trunks, strict=True):
        chosen = [row for row in rows if row["trunk"] == trunk and row.get("weighting") == weighting]
        floor = baseline(rows, {"trunk": trunk, "tasks": chosen[0]["tasks"] if chosen else 0}, "floor", "step")
        labels, before, after, whole = [], [], [], []
        for row in chosen:
            step, post = median(row, "step"), median(row, "post_backward")
            labels.append(_path_label(row).replace(f" · {weighting}", ""))
            if math.isfinite(post):
                before.append((step - post) / floor)
                after.append(post / floor)
                whole.append(0.0)
            else:
                before.append(0.0)
                after.append(0.0)
                whole.append(step / floor)
        positions = range(len(labels))
        axis.barh(positions, before, color="#4c72b0", label="forward + task gradients")
        axis.barh(positions, after, left=before, color="#dd8452", label="post-backward part")
        axis.barh(positions, whole, color="#8c8c8c", label="whole step (not separable)")
        axis.axvline(1.0, color="black", linewidth=1, linestyle="--")
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.invert_yaxis()
        if chosen:
            axis.set_title(f"{trunk} (P = {_count(chosen[0]['shared_numel'])}, T = {chosen[0]['tasks']})", fontsize=10)
        axis.set_xlabel("step time / equal-weighting step time")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="upper right", ncol=3, frameon=False)
    figure.suptitle(f"Step time relative to the floor (dashed line), {weighting}", fontsize=11, x=0.01, ha="left")
    return exhibits.figure(figure, HEADLINE_PLOT if weighting == "emtl" else f"steps_overhead_{weighting}.png")


def _memory_plot(rows: list[dict], exhibits: _Exhibits) -> str:
    trunks = list(dict.fromkeys(row["trunk"] for row in rows))
    figure, axes = plt.subplots(1, len(trunks), figsize=(5.2 * len(trunks), 4.2), squeeze=False)
    for axis, trunk in zip(axes[0], trunks, strict=True):
        chosen = [row for row in rows if row["trunk"] == trunk and row.get("peak_bytes") and row["path"] != "floor"]
        ratios = [row["peak_bytes"] / floor_peak(rows, row) for row in chosen]
        positions = range(len(chosen))
        axis.barh(positions, ratios, color="#55a868")
        axis.axvline(1.0, color="black", linewidth=1, linestyle="--")
        axis.axvline(1.1, color="#c44e52", linewidth=1, linestyle=":")
        axis.set_yticks(list(positions), [_path_label(row) for row in chosen], fontsize=7)
        axis.invert_yaxis()
        axis.set_title(trunk, fontsize=10)
        axis.set_xlabel("peak memory / floor's peak memory")
    figure.suptitle("Peak memory relative to the floor (dashed: 1, dotted: 1.1)", fontsize=11)
    return exhibits.figure(figure, "steps_memory.png")


def _steps_section(results: dict, exhibits: _Exhibits) -> str:
    rows = results.get("steps", [])
    good = measured(rows)
    if not rows:
        return ""
    parts = [
        "## Steps",
        "",
        "One training step (forward, backward, update written into `.grad`; no optimiser) on each trunk. "
        "`× floor`: step time over equal weighting's. Speed-ups are the baseline's time over the row's "
        "(TorchJD: the faster of its two forms). `post-backward`: everything after the T task gradients exist. "
        "`extra / (P·s)`: peak memory above the floor's, in units of one gradient of the shared parameters.",
        "",
    ]
    if good:
        parts += [_overhead_plot(good, exhibits, "emtl"), "", _memory_plot(good, exhibits), ""]
    for trunk in dict.fromkeys(row.get("trunk") for row in rows if "trunk" in row):
        trunk_rows = [row for row in rows if row.get("trunk") == trunk]
        first = trunk_rows[0]
        parts += [
            f"### {trunk}: P = {first['shared_numel']:,} shared parameters ({first['dtype']}), T = {first['tasks']}, "
            f"batch {first['batch']}",
            "",
            f"Options: `{json.dumps(first['trunk_options'])}`.",
            "",
            _step_rows_table(trunk_rows, good, exhibits),
            "",
        ]
        warned = defaultdict(list)
        for row in trunk_rows:
            for warning in row.get("warnings", []):
                warned[warning].append(_path_label(row))
        parts += [f"- {', '.join(labels)} warned: {warning}" for warning, labels in warned.items()]
        parts += [""] if warned else []
    parts += [f"- job failed: {row['job']}: {row['error']}" for row in rows if "job" in row]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- kernels


_PASS_ORDER = {"copy": 0, "gram": 1, "combine": 2}


def _candidate(row: dict) -> str:
    if row["backend"]:
        return row["backend"]
    return f"`{row['baseline']}`" if row["baseline"] else "copy"


def _case_order(row: dict) -> tuple:
    """Rows of one case together: the copy, then each pass's backends before its baselines."""
    return (row["layout"], row["dtype"], row["tasks"], row["numel"], _PASS_ORDER[row["pass"]], bool(row["baseline"]))


def _vs_torch(rows: list[dict], row: dict) -> str:
    """A backend's speed over the fastest torch baseline of its pass in the same job."""
    if not row["backend"]:
        return "—"
    baselines = [other["gbps"] for other in torch_baselines(rows, row)]
    return _ratio(row["gbps"] / max(baselines)) if baselines else "—"


def _kernel_table(rows: list[dict], all_rows: list[dict], exhibits: _Exhibits, spread: bool = False) -> str:
    header = ["pass", "candidate", "dtype", "T", "P", "median ms"] + (["p25–p75 ms"] if spread else [])
    header += ["GB/s", "× copy", "× fastest torch"]
    table = []
    for row in sorted(rows, key=_case_order):
        times = row["times"]
        cells = [row["pass"], _candidate(row), row["dtype"], row["tasks"], _log2(row["numel"]), _ms(times["median"])]
        cells += [f"{_ms(times['p25'])}–{_ms(times['p75'])}"] if spread else []
        cells += [f"{row['gbps']:.2f}", _ratio(row["copy_ratio"]), _vs_torch(all_rows, row)]
        table.append(cells)
    return exhibits.table(header, table)


def _kernel_plots(rows: list[dict], exhibits: _Exhibits) -> list[str]:
    images = []
    for dtype in dict.fromkeys(row["dtype"] for row in rows):
        for kernel_pass in ("gram", "combine"):
            chosen = [row for row in rows if row["dtype"] == dtype]
            tasks = sorted({row["tasks"] for row in chosen})
            figure, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.8), squeeze=False, sharey=True)
            for axis, num_tasks in zip(axes[0], tasks, strict=True):
                lines = defaultdict(list)
                for row in sorted(chosen, key=_case_order):
                    if row["tasks"] == num_tasks and row["pass"] in (kernel_pass, "copy"):
                        lines[(row["backend"], row["baseline"])].append((row["numel"], row["gbps"]))
                for (backend, baseline_name), points in lines.items():
                    if backend:
                        style = {"marker": "o", "label": backend}
                    elif baseline_name:
                        style = {"marker": "x", "linestyle": ":", "label": baseline_name}
                    else:
                        style = {"linestyle": "--", "color": "black", "label": "copy"}
                    axis.plot([p for p, _ in sorted(points)], [g for _, g in sorted(points)], **style)
                axis.set_xscale("log", base=2)
                axis.set_title(f"T = {num_tasks}", fontsize=10)
                axis.set_xlabel("P (elements)")
                axis.grid(alpha=0.3)
            axes[0][0].set_ylabel("GB/s (bytes the pass must move)")
            axes[0][-1].legend(fontsize=6)
            figure.suptitle(f"{kernel_pass} pass, {dtype}: bandwidth against P", fontsize=11)
            images.append(exhibits.figure(figure, f"kernels_{kernel_pass}_{dtype}.png"))
    return images


def _kernels_section(results: dict, exhibits: _Exhibits) -> str:
    rows = results.get("kernels", [])
    if not rows:
        return ""
    good = pass_rows(rows)
    matrix = [row for row in good if row["layout"] == "matrix"]
    parts = [
        "## Kernels",
        "",
        "Each backend's Gram pass (reads T·P·s bytes) and combine pass (reads T·P·s, writes P·s into a "
        "preallocated output), the torch baselines of each pass on the same buffer (Gram: `J @ J.T`; "
        "`torch._foreach_norm` over the rows, the read-bandwidth reference; `(J * J).sum(1)`; combine: "
        "`w @ J`, which allocates its result; `torch.mv(J.T, w, out=g)` into the same output), and a copy of "
        "the same buffer (reads and writes T·P·s), all timed interleaved in one job per case. GB/s counts "
        "the bytes the pass must move (10⁹ bytes), for the baselines too, whatever temporaries they make; "
        "`× copy` is a line's GB/s over the copy's; `× fastest torch` a backend's speed over the fastest "
        "torch baseline of its pass.",
        "",
    ]
    if matrix:
        parts += [image + "\n" for image in _kernel_plots(matrix, exhibits)]
        largest = {}
        for row in matrix:
            key = (row["dtype"], row["tasks"])
            largest[key] = max(largest.get(key, 0), row["numel"])
        parts += [
            "At the largest P measured for each dtype and T:",
            "",
            _kernel_table(
                [row for row in matrix if row["numel"] == largest[(row["dtype"], row["tasks"])]], good, exhibits
            ),
            "",
            "<details><summary>Every size</summary>",
            "",
            _kernel_table(matrix, good, exhibits, spread=True),
            "",
            "</details>",
            "",
        ]
    for layout in dict.fromkeys(row["layout"] for row in good if row["layout"] != "matrix"):
        chosen = [row for row in good if row["layout"] == layout]
        parts += [
            f"### Multi-tensor: {layout}, {chosen[0]['tensors']} tensors, P = {chosen[0]['numel']:,}",
            "",
            "The task gradients as `TaskGradients` rows, one `[T, n]` block per parameter tensor. The torch "
            "baselines loop over the tensors as a torch user would (one call per tensor, Gram and norms "
            "summed); `torch._foreach_norm` takes every row in one call; the copy is one contiguous copy of the "
            "buffer the blocks lie in.",
            "",
            _kernel_table(chosen, good, exhibits, spread=True),
            "",
        ]
    errors = [row for row in rows if row.get("error")]
    parts += [
        f"- {row['job']}: {row['error']}"
        if "job" in row
        else f"- {row['pass']}, {_candidate(row)}, {row['dtype']}, T={row['tasks']}, {row['layout']}, "
        f"P={row['numel']:,}: {row['error']}"
        for row in errors
    ]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- scaling


def _scaling_section(results: dict, exhibits: _Exhibits) -> str:
    rows = measured(results.get("scaling", []))
    if not rows:
        return ""
    parts = [
        "## Scaling",
        "",
        "Step time and its post-backward part against the number of tasks T (fixed trunk) and against the "
        "number of shared parameters P (MLP trunks of growing width, fixed T), EMTL. The slope is the "
        "least-squares slope of log(time) against log(T) or log(P): 1 is linear growth.",
        "",
    ]
    slopes = []
    for sweep, axis_name, x_of in (
        ("tasks", "T", lambda row: row["tasks"]),
        ("size", "P", lambda row: row["shared_numel"]),
    ):
        chosen = [row for row in rows if row["sweep"] == sweep]
        if not chosen:
            continue
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for key in dict.fromkeys(row["key"] for row in chosen):
            points = sorted((x_of(row), row) for row in chosen if row["key"] == key)
            xs = [x for x, _ in points]
            label = _path_label(points[0][1]).replace(" · emtl", "")
            for axis, duration in zip(axes, ("step", "post_backward"), strict=True):
                ys = [median(row, duration) for _, row in points]
                slope = loglog_slope(xs, ys)
                if math.isfinite(slope):
                    axis.plot(xs, [y * 1e3 for y in ys], marker="o", label=f"{label} (slope {slope:.2f})")
                    slopes.append(
                        [axis_name, label, duration.replace("_", "-"), f"{slope:.2f}", f"{min(xs):,}–{max(xs):,}"]
                    )
        for axis, duration in zip(axes, ("step time", "post-backward part"), strict=True):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel(axis_name)
            axis.set_ylabel(f"{duration} (ms)")
            axis.grid(alpha=0.3, which="both")
            axis.legend(fontsize=7)
        figure.suptitle(f"Cost against {axis_name}", fontsize=11)
        parts += [exhibits.figure(figure, f"scaling_{axis_name}.png"), ""]
    parts += [exhibits.table(["against", "path", "time", "slope", "range"], slopes), ""]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- distributed, other suites, method

DISTRIBUTED_SUITE = "bench_distributed"


def _suite_section(
    results: dict,
    exhibits: _Exhibits,
    suite: str,
    title: str,
    measured_key: str,
    body: Callable[[list[dict], _Exhibits], list[str]],
) -> str:
    """The section of an extra suite: ``body`` of its measured rows (those with ``measured_key``),
    then its notes; nothing when the suite has no row."""
    rows = [row for row in results.get("extras", []) if row.get("suite") == suite]
    if not rows:
        return ""
    measured = [row for row in rows if measured_key in row]
    parts = [f"## {title}", "", *(body(measured, exhibits) if measured else [])]
    parts += [f"- {row['note']}" for row in rows if "note" in row]
    return "\n".join(parts) + "\n"


def _distributed_body(good: list[dict], exhibits: _Exhibits) -> list[str]:
    first = good[0]
    ddp = {
        (row["world_size"], key): row[key]
        for row in good
        if row["method"] == "ddp"
        for key in ("step_ms", "fastest_ms")
    }

    def vs_ddp(row: dict, key: str) -> str:
        return _ratio(row[key] / ddp.get((row["world_size"], key), math.nan))

    header = ["ranks", "method", "step, median ms", "vs plain DDP", "fastest ms", "vs plain DDP"]
    header += ["payload MB", "sent per rank MB"]
    table = [
        [
            row["world_size"],
            row["method"],
            _figure(row["step_ms"]),
            vs_ddp(row, "step_ms"),
            _figure(row["fastest_ms"]),
            vs_ddp(row, "fastest_ms"),
            f"{row['payload_bytes'] / 1e6:.3f}",
            f"{row['sent_bytes'] / 1e6:.3f}",
        ]
        for row in good
    ]
    return [
        f"One training step of a multi-task MLP (T = {first['tasks']} tasks, P = {first['shared_numel']:,} shared "
        f"and H = {first['head_numel']:,} head parameters, float32, {first['batch_per_rank']} samples a rank) on "
        "gloo ranks of this CPU, one torch thread a rank, by plain DDP (`sum(losses).backward()`), "
        "`DistributedMTLStep` in exact and local mode, and `MTLStep` alone on one rank. Times: median and "
        f"fastest of {first['steps']} steps on rank 0; the ranks share the machine's cores, so read them as "
        "ratios to plain DDP of the same world size. Bytes are counted from the collectives issued (DDP's "
        "all-reduce from the sizes of the parameters it reduces); sent per rank under ring algorithms.",
        "",
        exhibits.table(header, table),
        "",
    ]


WEIGHTINGS_SUITE = "bench_weightings"


def _weightings_body(good: list[dict], exhibits: _Exhibits) -> list[str]:
    task_counts = list(dict.fromkeys(row["num_tasks"] for row in good))
    timings = ("", "graph_") if any("graph_median_us" in row for row in good) else ("",)
    versus_torchjd = any("vs_torchjd" in row for row in good)
    header = ["weighting"]
    for num_tasks in task_counts:
        for prefix in timings:
            header += [f"T={num_tasks}{' graph' if prefix else ''} µs", "× Gram pass"]
        header += ["TorchJD µs", "TorchJD / ours"] if versus_torchjd else []
    by_case = {(row["weighting"], row["num_tasks"]): row for row in good}
    table = []
    for weighting in dict.fromkeys(row["weighting"] for row in good):
        cells = [weighting]
        for num_tasks in task_counts:
            row = by_case[(weighting, num_tasks)]
            cells += [
                cell
                for prefix in timings
                # Three significant digits: the solvers' times span orders of magnitude.
                for cell in (_figure(row[f"{prefix}median_us"], ","), _ratio(row[f"{prefix}vs_gram_pass"], ".3g"))
            ]
            if versus_torchjd:
                cells += [_figure(row.get("torchjd_median_us"), ","), _ratio(row.get("vs_torchjd"), ".3g")]
        table.append(cells)
    gram_pass = {row["num_tasks"]: row["gram_pass_us"] for row in good}
    not_captured = ("—", "—") * (len(timings) - 1)
    table.append(
        ["Gram pass"]
        + [
            cell
            for num_tasks in task_counts
            for cell in (_figure(gram_pass[num_tasks], ","), "1×", *not_captured, *("—", "—") * versus_torchjd)
        ]
    )
    first = good[0]
    errors = [
        f"- {row['weighting']}, T={row['num_tasks']}{where}: {row[key]}"
        for row in good
        for key, where in (("error", ""), ("graph_error", ", CUDA graph"))
        if row.get(key)
    ]
    return [
        "One call of each weighting with its default options on losses `[T]` and the float32 Gram matrix of "
        "a random `[T, 256]` J whose tasks conflict, median µs of the timed calls; "
        "`× Gram pass`: that median over the median of "
        f"the Gram pass (`task_gram`, {first['gram_backend']} backend) over a `[T, P]` float32 matrix, "
        f"P = {_log2(first['gram_numel'])}, timed interleaved with the weightings in the same rounds."
        + (" `graph`: the weighting captured once in a CUDA graph, its replay timed." if not_captured else "")
        + (
            " `TorchJD / ours`: TorchJD 0.18's weighting of the same method on the same G (Nash-MTL: its "
            "stateful weighting on J, warm-started by the previous call), median over ours, same rounds."
            if versus_torchjd
            else ""
        ),
        "",
        exhibits.table(header, table),
        "",
        *errors,
    ]


def _extras_section(results: dict, exhibits: _Exhibits) -> str:
    rows = [row for row in results.get("extras", []) if row.get("suite") not in (DISTRIBUTED_SUITE, WEIGHTINGS_SUITE)]
    if not rows:
        return ""
    parts = ["## Other suites", ""]
    for suite in dict.fromkeys(row.get("suite", row.get("job")) for row in rows):
        suite_rows = [row for row in rows if row.get("suite", row.get("job")) == suite]
        columns = list(dict.fromkeys(key for row in suite_rows for key in row if key != "suite"))
        cells = [[_cell(row.get(column)) for column in columns] for row in suite_rows]
        parts += [f"### {suite}", "", exhibits.table(columns, cells), ""]
    return "\n".join(parts) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")


METHOD = """## How it is measured

- Timers: CUDA events on a GPU (the host waits once after each sample); `time.perf_counter` on a CPU.
  Every candidate of a comparison is warmed up, then timed round-robin; figures are medians.
- Kernels: on a GPU the L2 cache is evicted (a 256 MiB buffer overwritten) before each sample, as
  `triton.testing.do_bench` does; on a CPU nothing is flushed. The backends run on task gradients
  wrapped once in a `TaskGradients` outside the timing, as the step holds them.
- Library path: a faithful re-implementation of LibMTL's `AbsWeighting` (`_get_grads` in `autograd`
  mode, `_backward_new_grads`): a T×P buffer of zeros, a loop of `torch.autograd.grad` per task with
  `torch.cat` into its row, norms, a weighted `einsum`, split, reshape and clone into `.grad`, weights
  copied to the host.
- TorchJD: `torchjd.autojac.mtl_backward`, then `jac_to_grad` with a `GramianWeightedAggregator` around
  the same weighting as MTLStep (so the updates agree), default and `optimize_gramian_computation=True`.
  Its task-gradient time is `mtl_backward`'s, its post-backward part `jac_to_grad`'s.
- Post-backward part: the step's time after the forward pass minus the time inside the calls that
  compute the task gradients; MTLStep's own host work before its backward passes counts in it.
  Memory mode reduces each task's gradient to a norm as it comes, so it has none (—).
- Peak memory: on a GPU `torch.cuda.max_memory_allocated`; on a CPU the resident tensors (parameters,
  buffers, batch) plus the largest rise of live tensor bytes seen by the profiler's allocation events
  during the step. The CPU figure misses memory that bypasses torch's allocator (oneDNN/BLAS scratch,
  Python objects) and is not the process's resident set size.
"""


def write_report(results: dict, out_dir: Path) -> Path:
    """Write ``report.md`` and its plots into ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exhibits = _Exhibits(out_dir, results["meta"])
    sections = [
        _header(results["meta"]),
        _targets_section(results, exhibits),
        _steps_section(results, exhibits),
        _kernels_section(results, exhibits),
        _scaling_section(results, exhibits),
        _suite_section(results, exhibits, DISTRIBUTED_SUITE, "Distributed", "method", _distributed_body),
        _suite_section(results, exhibits, WEIGHTINGS_SUITE, "Weighting solvers", "weighting", _weightings_body),
        _extras_section(results, exhibits),
        METHOD,
    ]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(section for section in sections if section))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.report bench/results/<device>/results.json")
    results_path = Path(sys.argv[1])
    print(write_report(json.loads(results_path.read_text()), results_path.parent))
