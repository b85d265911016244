"""The report: ``report.md`` and its PNG plots, built from a results document alone.

``python -m bench.report bench/results/<device>/results.json`` rebuilds it. Every figure carries,
in its footer and in the caption under it, the device, torch and Triton versions and the commit.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from .environment import caption  # noqa: E402
from .scaling import loglog_slope  # noqa: E402
from .targets import baseline, evaluate, extra_memory_units, floor_peak, measured, median  # noqa: E402

REPORT_FILE = "report.md"
HEADLINE_PLOT = "steps_overhead.png"


def _ms(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    milliseconds = seconds * 1e3
    return f"{milliseconds:.3g}" if milliseconds < 1000 else f"{milliseconds:.0f}"


def _ratio(value: float) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.2f}×"


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


class _Figures:
    """Saves figures into the output folder with the run's caption as footer."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir, self.caption = out_dir, caption(meta)

    def save(self, figure, name: str) -> str:
        figure.text(0.01, 0.005, self.caption, fontsize=7, color="0.35", ha="left", va="bottom")
        figure.tight_layout(rect=(0, 0.03, 1, 1))
        figure.savefig(self.out_dir / name, dpi=110)
        plt.close(figure)
        return f"![{name}]({name})\n\n*{self.caption}*"


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
        f"torch {meta['torch']}, Triton {meta.get('triton') or 'not installed'}, TorchJD {meta.get('torchjd') or 'not installed'}, "
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
    lines.append(f"Backends measured: {', '.join(meta.get('backends', [])) or 'none'}.")
    for name, reason in meta.get("backends_left_out", {}).items():
        lines.append(f"Left out: `{name}`: {reason}.")
    if meta.get("triton_interpret"):
        lines.append("TRITON_INTERPRET was set: Triton ran in its interpreter; its times are not kernel times.")
    for name, items in meta.get("notes", {}).items():
        lines.append(f"{name.capitalize()}: {'; '.join(items)}.")
    return "\n".join(lines) + "\n"


def _targets_section(results: dict) -> str:
    judged = evaluate(results)
    if not judged:
        return ""
    rows = [[t["target"], t["threshold"], t["measured"], t["verdict"]] for t in judged]
    return "## Targets\n\n" + _table(["target", "threshold", "measured", "verdict"], rows) + "\n"


# ---------------------------------------------------------------- steps


def _step_rows_table(trunk_rows: list[dict], all_rows: list[dict]) -> str:
    header = [
        "path", "step ms", "× floor", "task gradients ms", "post-backward ms",
        "post-backward speed-up vs library", "vs TorchJD", "step speed-up vs library", "vs TorchJD",
        "peak MiB", "peak × floor", "extra / (P·s)",
    ]
    table = []
    for row in trunk_rows:
        if "times" not in row:
            table.append([_path_label(row), "error: " + (row.get("error") or "?").replace("|", "/")] + [""] * (len(header) - 2))
            continue
        step, post = median(row, "step"), median(row, "post_backward")
        peak = row.get("peak_bytes")
        weighted = row["path"] != "floor"
        table.append([
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
        ])
    return _table(header, table)


def _overhead_plot(rows: list[dict], figures: _Figures, weighting: str) -> str:
    trunks = list(dict.fromkeys(row["trunk"] for row in rows))
    figure, axes = plt.subplots(1, len(trunks), figsize=(5.2 * len(trunks), 4.2), squeeze=False)
    for axis, trunk in zip(axes[0], trunks):
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
    return figures.save(figure, HEADLINE_PLOT if weighting == "emtl" else f"steps_overhead_{weighting}.png")


def _memory_plot(rows: list[dict], figures: _Figures) -> str:
    trunks = list(dict.fromkeys(row["trunk"] for row in rows))
    figure, axes = plt.subplots(1, len(trunks), figsize=(5.2 * len(trunks), 4.2), squeeze=False)
    for axis, trunk in zip(axes[0], trunks):
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
    return figures.save(figure, "steps_memory.png")


def _steps_section(results: dict, figures: _Figures) -> str:
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
        parts += [_overhead_plot(good, figures, "emtl"), "", _memory_plot(good, figures), ""]
    for trunk in dict.fromkeys(row.get("trunk") for row in rows if "trunk" in row):
        trunk_rows = [row for row in rows if row.get("trunk") == trunk]
        first = trunk_rows[0]
        parts += [
            f"### {trunk}: P = {first['shared_numel']:,} shared parameters ({first['dtype']}), T = {first['tasks']}, "
            f"batch {first['batch']}",
            "",
            f"Options: `{json.dumps(first['trunk_options'])}`.",
            "",
            _step_rows_table(trunk_rows, good),
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


def _kernel_plots(rows: list[dict], figures: _Figures) -> list[str]:
    images = []
    for dtype in dict.fromkeys(row["dtype"] for row in rows):
        for kernel_pass in ("gram", "combine"):
            chosen = [row for row in rows if row["dtype"] == dtype]
            tasks = sorted({row["tasks"] for row in chosen})
            figure, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False, sharey=True)
            for axis, num_tasks in zip(axes[0], tasks):
                lines = defaultdict(list)
                for row in chosen:
                    if row["tasks"] == num_tasks and row["pass"] in (kernel_pass, "copy"):
                        name = "copy (same bytes read)" if row["pass"] == "copy" else row["backend"]
                        lines[name].append((row["numel"], row["gbps"]))
                for name, points in lines.items():
                    points.sort()
                    style = {"linestyle": "--", "color": "black"} if name.startswith("copy") else {"marker": "o"}
                    axis.plot([p for p, _ in points], [g for _, g in points], label=name, **style)
                axis.set_xscale("log", base=2)
                axis.set_title(f"T = {num_tasks}", fontsize=10)
                axis.set_xlabel("P (elements)")
                axis.grid(alpha=0.3)
            axes[0][0].set_ylabel("GB/s (reads + writes)")
            axes[0][-1].legend(fontsize=7)
            figure.suptitle(f"{kernel_pass} pass, {dtype}: bandwidth against P", fontsize=11)
            images.append(figures.save(figure, f"kernels_{kernel_pass}_{dtype}.png"))
    return images


def _kernels_section(results: dict, figures: _Figures) -> str:
    rows = results.get("kernels", [])
    good = measured(rows)
    if not rows:
        return ""
    parts = [
        "## Kernels",
        "",
        "Each backend's Gram pass (reads T·P·s bytes) and combine pass (reads T·P·s, writes P·s) over a "
        "`[T, P]` matrix, against `dst.copy_(J)` of the same matrix (reads T·P·s, writes T·P·s) timed in "
        "the same job. GB/s counts reads plus writes (10⁹ bytes); `× copy` is the pass's GB/s over the copy's.",
        "",
    ]
    if good:
        parts += [image + "\n" for image in _kernel_plots(good, figures)]
        largest = {}
        for row in good:
            key = (row["dtype"], row["tasks"])
            largest[key] = max(largest.get(key, 0), row["numel"])
        table = [
            [row["pass"], row["backend"] or "—", row["dtype"], row["tasks"], _log2(row["numel"]), _ms(row["times"]["median"]),
             f"{row['gbps']:.2f}", _ratio(row["copy_ratio"])]
            for row in good
            if row["numel"] == largest[(row["dtype"], row["tasks"])]
        ]
        parts += [
            "At the largest P measured for each dtype and T:",
            "",
            _table(["pass", "backend", "dtype", "T", "P", "median ms", "GB/s", "× copy"], table),
            "",
            "<details><summary>Every size</summary>",
            "",
            _table(
                ["pass", "backend", "dtype", "T", "P", "median ms", "p25–p75 ms", "GB/s", "× copy"],
                [
                    [row["pass"], row["backend"] or "—", row["dtype"], row["tasks"], _log2(row["numel"]),
                     _ms(row["times"]["median"]), f"{_ms(row['times']['p25'])}–{_ms(row['times']['p75'])}",
                     f"{row['gbps']:.2f}", _ratio(row["copy_ratio"])]
                    for row in good
                ],
            ),
            "",
            "</details>",
            "",
        ]
    errors = [row for row in rows if row.get("error")]
    parts += [f"- {row.get('job') or row['pass']} {row.get('backend') or ''}: {row['error']}" for row in errors]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- scaling


def _scaling_section(results: dict, figures: _Figures) -> str:
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
    for sweep, axis_name, x_of in (("tasks", "T", lambda row: row["tasks"]), ("size", "P", lambda row: row["shared_numel"])):
        chosen = [row for row in rows if row["sweep"] == sweep]
        if not chosen:
            continue
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for key in dict.fromkeys(row["key"] for row in chosen):
            points = sorted((x_of(row), row) for row in chosen if row["key"] == key)
            xs = [x for x, _ in points]
            label = _path_label(points[0][1]).replace(" · emtl", "")
            for axis, duration in zip(axes, ("step", "post_backward")):
                ys = [median(row, duration) for _, row in points]
                slope = loglog_slope(xs, ys)
                if math.isfinite(slope):
                    axis.plot(xs, [y * 1e3 for y in ys], marker="o", label=f"{label} (slope {slope:.2f})")
                    slopes.append([axis_name, label, duration.replace("_", "-"), f"{slope:.2f}", f"{min(xs):,}–{max(xs):,}"])
        for axis, duration in zip(axes, ("step time", "post-backward part")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel(axis_name)
            axis.set_ylabel(f"{duration} (ms)")
            axis.grid(alpha=0.3, which="both")
            axis.legend(fontsize=7)
        figure.suptitle(f"Cost against {axis_name}", fontsize=11)
        parts += [figures.save(figure, f"scaling_{axis_name}.png"), ""]
    parts += [_table(["against", "path", "time", "slope", "range"], slopes), ""]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- other suites and method


def _extras_section(results: dict) -> str:
    rows = results.get("extras", [])
    if not rows:
        return ""
    parts = ["## Other suites", ""]
    for suite in dict.fromkeys(row.get("suite", row.get("job")) for row in rows):
        suite_rows = [row for row in rows if row.get("suite", row.get("job")) == suite]
        columns = list(dict.fromkeys(key for row in suite_rows for key in row if key != "suite"))
        cells = [[_cell(row.get(column)) for column in columns] for row in suite_rows]
        parts += [f"### {suite}", "", _table(columns, cells), ""]
    return "\n".join(parts) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")


METHOD = """## How it is measured

- Timers: CUDA events on a GPU (the host waits once after each sample); `time.perf_counter` on a CPU.
  Every candidate of a comparison is warmed up, then timed round-robin; figures are medians.
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
    figures = _Figures(out_dir, results["meta"])
    sections = [
        _header(results["meta"]),
        _targets_section(results),
        _steps_section(results, figures),
        _kernels_section(results, figures),
        _scaling_section(results, figures),
        _extras_section(results),
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
