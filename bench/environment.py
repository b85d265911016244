"""What a result was measured on: device, versions, commit, threads, load, and the CPU's
identity. Every figure and table of the report carries it."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from emtl_kernels import _extension

REPO_ROOT = Path(__file__).resolve().parent.parent


#: The vector extensions the CPU kernels (and torch's) care about.
VECTOR_EXTENSIONS = frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"})


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        if not line.strip():
            break
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_details() -> dict:
    """What identifies the CPU where a virtual machine shows a vague model name: family, model,
    stepping, cache and the vector extensions it has."""
    info = cpu_info()
    return {
        "family": info.get("cpu family"),
        "model": info.get("model"),
        "stepping": info.get("stepping"),
        "cache": info.get("cache size"),
        "vector_extensions": sorted(VECTOR_EXTENSIONS & set(info.get("flags", "").split())),
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info().get("model name") or platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    """A folder name from a device name: lower case, runs of other characters turned into '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the system tells them."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def describe(device: torch.device) -> dict:
    """Metadata of a run on ``device``; the load is sampled again at the end of the run."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": slug(device_name(device)),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchjd": _version("torchjd"),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_details(),
        "native_cpu_isa": _extension.CPU_ISA,
        "load_average_start": load_average(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "") not in ("", "0"),
    }


def caption(meta: dict) -> str:
    """One line naming what a figure was measured on."""
    commit = meta.get("commit") or "unknown commit"
    if meta.get("dirty"):
        commit += " (uncommitted changes)"
    return (
        f"{meta['device']} · torch {meta['torch']} · Triton {meta.get('triton') or 'not installed'} · "
        f"commit {commit} · {meta.get('threads')} threads · preset {meta.get('preset')}"
    )
