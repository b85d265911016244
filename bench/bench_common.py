"""What the benchmark scripts share: the machine's description, interleaved timing, result files."""

from __future__ import annotations

import json
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name (or the platform's processor string)."""
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def cpu_details() -> dict[str, object]:
    """What identifies the CPU where a VM shows a vague model name: family, model, stepping, cache
    and the vector extensions the kernels care about."""
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    return {
        "family": info.get("cpu family"),
        "model": info.get("model"),
        "stepping": info.get("stepping"),
        "cache": info.get("cache size"),
        "vector_extensions": sorted(flags & {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"}),
    }


def git_commit() -> str | None:
    """The checkout's short commit hash, or None outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], rounds: int, synchronize: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds per call of each candidate. The candidates run in turn, round after round
    (after one warm-up call each), so that load from other processes falls on all of them alike;
    ``synchronize`` waits for the device before a clock is read."""
    for fn in candidates.values():
        fn()
    synchronize()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_report(report: dict, machine_dir: str, name: str) -> Path:
    """Writes ``report`` as JSON to bench/results/<machine_dir>/<name>.json; returns the path."""
    path = RESULTS_DIR / machine_dir / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def pass_record(num_tasks: int, numel: int, element_size: int, dtype_name: str,
                gram: dict[str, float], combine: dict[str, float]) -> dict:
    """Median seconds of the Gram and combine candidates with their bandwidths: T·P·s bytes
    read by a Gram pass, (T + 1)·P·s moved by a combine."""
    read = num_tasks * numel * element_size
    return {
        "num_tasks": num_tasks,
        "numel": numel,
        "dtype": dtype_name,
        "gram_seconds": gram,
        "combine_seconds": combine,
        "gram_read_gbps": {name: read / seconds / 1e9 for name, seconds in gram.items()},
        "combine_gbps": {name: (read + numel * element_size) / seconds / 1e9 for name, seconds in combine.items()},
    }
