"""Backend registry: which implementations of the ops exist, which can run where, and "auto".

A backend implements :class:`~emtl_kernels.backends.contract.Backend` (``name``,
``unavailable_reason(device)`` and the passes ``gram``, ``sq_norms`` and ``combine`` over a
:class:`~emtl_kernels.task_gradients.TaskGradients`); each backend module exports its own as
``BACKEND``. The package works without Triton or the compiled extension: a backend that cannot
load is reported, never fatal. ``"auto"`` (:mod:`emtl_kernels.backends.auto`) picks a backend per
pass, the one that measures fastest on the device.
"""

from __future__ import annotations

import importlib

import torch

from .auto import PASS_ORDER, Auto
from .contract import Backend

#: Backend names in the order "auto" takes them, with the device types where each is a fast
#: choice (Triton on a CPU runs only in its interpreter: correct, never fast). The last is the
#: fallback that runs everywhere.
AUTO_ORDER: tuple[tuple[str, frozenset[str]], ...] = (
    ("triton", frozenset({"cuda"})),
    ("native", frozenset({"cpu", "cuda"})),
    ("reference", frozenset({"cpu", "cuda"})),
)
_FALLBACK = AUTO_ORDER[-1][0]


def _import_backends() -> tuple[dict[str, Backend], dict[str, str]]:
    """Import every backend module once, recording why one that fails could not load.

    Backend modules are cheap to import (each loads its heavy dependency, Triton or the compiled
    extension, only when first used), and after this the registry is plain dict lookups, which
    torch.compile traces as constants.
    """
    loaded, import_errors = {}, {}
    for name, _ in AUTO_ORDER:
        try:
            loaded[name] = importlib.import_module(f"{__name__}.{name}").BACKEND
        except ImportError as error:
            import_errors[name] = f"it failed to import ({error})"
    return loaded, import_errors


_BACKENDS, _IMPORT_ERRORS = _import_backends()


def backend_names() -> tuple[str, ...]:
    """Every backend this package knows, whether or not it can run here ("auto" aside)."""
    return tuple(name for name, _ in AUTO_ORDER)


def check_backend_name(name: str) -> None:
    """Raise a ValueError unless ``name`` is "auto" or one of :func:`backend_names`."""
    if name != "auto" and name not in backend_names():
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(('auto', *backend_names()))}")


def _load(name: str) -> Backend:
    check_backend_name(name)
    if name == "auto":
        return AUTO
    if name in _IMPORT_ERRORS:
        raise RuntimeError(f"backend {name!r} cannot run: {_IMPORT_ERRORS[name]}")
    return _BACKENDS[name]


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here, or None when it can."""
    if name in _IMPORT_ERRORS:
        return _IMPORT_ERRORS[name]
    return _load(name).unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` on this machine."""
    return [name for name in backend_names() if unavailable_reason(name, device) is None]


def auto_candidates(device: torch.device, kernel_pass: str) -> list[Backend]:
    """The backends "auto" chooses among for ``kernel_pass`` on ``device``, in order: those
    fast on its type that can run (the fallback aside)."""
    fast = [name for name, device_types in AUTO_ORDER[:-1] if device.type in device_types]
    order = PASS_ORDER.get((device.type, kernel_pass), fast)
    return [_BACKENDS[name] for name in order if name in fast and unavailable_reason(name, device) is None]


#: The backend "auto".
AUTO = Auto(auto_candidates, _BACKENDS[_FALLBACK])


# (name, device) -> backend, for those found able to run: every op call resolves its backend.
_RUNNABLE: dict[tuple[str, torch.device], Backend] = {}


def resolve(name: str, device: torch.device) -> Backend:
    """The backend for ``name`` ("auto" or a backend name) on ``device``; a backend that cannot
    run there raises with the reason."""
    if name == "auto":
        return AUTO
    backend = _RUNNABLE.get((name, device))
    if backend is None:
        backend = _load(name)
        reason = backend.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
        _RUNNABLE[(name, device)] = backend
    return backend
