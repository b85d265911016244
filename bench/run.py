"""The benchmark runner: ``python -m bench --quick`` (CPU, minutes) or ``--full`` (GPU).

Runs the preset's jobs (kernel passes, steps, scaling, the suites of :mod:`bench.extras`) under
one progress bar, then writes ``results.json`` (every measurement and what it was measured on)
and the report (``report.md`` and PNG plots, see :mod:`bench.report`) into
``bench/results/<device>/``, one folder per device.
``--report-only results.json`` rebuilds the report from a results file alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from . import extras, kernels, scaling, steps
from .backends import measured_backends
from .environment import REPO_ROOT, describe, load_average
from .presets import PRESETS, Preset
from .report import write_report

SECTIONS = ("kernels", "steps", "scaling", "extras")
RESULTS_FILE = "results.json"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--quick", dest="preset", action="store_const", const="quick", help="CPU preset, minutes")
    chosen.add_argument("--full", dest="preset", action="store_const", const="full", help="GPU preset")
    chosen.add_argument("--preset", choices=sorted(PRESETS), help="a preset by name (tiny: seconds, a smoke run)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--kernel-sizes",
        type=_log2_sizes,
        metavar="K,K,...",
        help="the kernel section's P = 2^K instead of the preset's (e.g. 20,24,27: the GPU targets' sizes)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<device>)")
    parser.add_argument("--report-only", type=Path, metavar="RESULTS_JSON", help="rebuild the report of a results file")
    return parser.parse_args(argv)


def _log2_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or not all(1 <= size <= 40 for size in sizes):
        raise argparse.ArgumentTypeError(f"each K must be within 1..40 (P = 2^K), got {text!r}")
    return sizes


def _plan(preset: Preset, device: torch.device, backends: list[str], sections: list[str]):
    jobs, notes = [], {}
    if "kernels" in sections:
        kernel_jobs, notes["kernel sizes left out"] = kernels.plan(preset, device, backends)
        jobs += kernel_jobs
    if "steps" in sections:
        jobs += steps.plan(preset, device, backends)
    if "scaling" in sections:
        jobs += scaling.plan(preset, device, backends)
    if "extras" in sections:
        extra_jobs, notes["extra suites left out"] = extras.plan(preset, device)
        jobs += extra_jobs
    return jobs, notes


def run(preset: Preset, device: torch.device, sections: list[str]) -> dict:
    """Measure ``sections`` of ``preset`` on ``device``; returns the results document."""
    backends, left_out = measured_backends(device)
    meta = describe(device)
    meta.update(
        preset=preset.name,
        preset_description=preset.description,
        sections=sections,
        backends=backends,
        backends_left_out=left_out,
    )
    jobs, notes = _plan(preset, device, backends, sections)
    meta["notes"] = {name: items for name, items in notes.items() if items}
    results = {"meta": meta, **{section: [] for section in sections}}
    started = time.perf_counter()
    with tqdm(jobs, desc=f"bench {preset.name}", unit="job", dynamic_ncols=True) as bar:
        for job in bar:
            bar.set_postfix_str(job.label)
            try:
                results[job.section] += job.run()
            except Exception as error:  # keep what the other jobs measured
                message = "".join(traceback.format_exception_only(error)).strip()
                results[job.section].append({"job": job.label, "error": message})
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = load_average()
    return results


def _json_ready(value):
    """NaN and infinities become null: the results file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def save(results: dict, out_dir: Path) -> Path:
    """Write ``results.json`` and the report into ``out_dir``; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(json.dumps(_json_ready(results), indent=1, allow_nan=False) + "\n")
    return write_report(json.loads((out_dir / RESULTS_FILE).read_text()), out_dir)


def main(argv: list[str] | None = None) -> Path:
    """The command line; returns the report's path."""
    args = _arguments(argv)
    if args.report_only is not None:
        report = write_report(json.loads(args.report_only.read_text()), args.report_only.parent)
        print(f"report: {report}")
        return report
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset or ("full" if device.type == "cuda" else "quick")]
    if args.kernel_sizes is not None:
        preset = dataclasses.replace(preset, kernels=dataclasses.replace(preset.kernels, log2_sizes=args.kernel_sizes))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sections = [section.strip() for section in args.sections.split(",") if section.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    results = run(preset, device, sections)
    out_dir = args.out or REPO_ROOT / "bench" / "results" / results["meta"]["device_slug"]
    report = save(results, out_dir)
    print(f"results: {out_dir / RESULTS_FILE}\nreport:  {report}")
    return report


if __name__ == "__main__":
    main()
