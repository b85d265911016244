"""Backend registry: which implementations of the ops exist, which can run where, and "auto".

A backend is a module with ``NAME``, ``unavailable_reason(device) -> str | None``, and the three
kernels ``gram(grads)``, ``sq_norms(grads)`` and ``combine(grads, weights, outs, accumulate)`` over
a :class:`~emtl_kernels.task_gradients.TaskGradients` (``outs``: K contiguous tensors of any shape,
tensor k with ``grads.sizes[k]`` elements; ``weights``: float32 ``[T]``). The package works without Triton or the
compiled extension: a backend that cannot load is reported, never fatal.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

#: Backend names in the order "auto" tries them, with the device types where each is the fast
#: choice (Triton on a CPU runs only in its interpreter: correct, never fast).
AUTO_ORDER: tuple[tuple[str, frozenset[str]], ...] = (
    ("triton", frozenset({"cuda"})),
    ("native", frozenset({"cpu", "cuda"})),
    ("reference", frozenset({"cpu", "cuda"})),
)


def _import_backends() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """Import every backend module once, recording why one that fails could not load.

    Backend modules are cheap to import (each loads its heavy dependency, Triton or the compiled
    extension, only when first used), and after this the registry is plain dict lookups, which
    torch.compile traces as constants.
    """
    modules, import_errors = {}, {}
    for name, _ in AUTO_ORDER:
        try:
            modules[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError as error:
            import_errors[name] = f"it failed to import ({error})"
    return modules, import_errors


_MODULES, _IMPORT_ERRORS = _import_backends()


def backend_names() -> tuple[str, ...]:
    """Every backend this package knows, whether or not it can run here."""
    return tuple(name for name, _ in AUTO_ORDER)


def _load(name: str) -> ModuleType:
    if name not in _MODULES:
        if name in _IMPORT_ERRORS:
            raise RuntimeError(f"backend {name!r} cannot run: {_IMPORT_ERRORS[name]}")
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(('auto', *backend_names()))}")
    return _MODULES[name]


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here, or None when it can."""
    if name in _IMPORT_ERRORS:
        return _IMPORT_ERRORS[name]
    return _load(name).unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` on this machine."""
    return [name for name in backend_names() if unavailable_reason(name, device) is None]


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` ("auto" or a backend name) on ``device``.

    "auto" takes the first backend of :data:`AUTO_ORDER` that is fast on the device type and can
    run; a forced backend that cannot run raises with the reason.
    """
    if name == "auto":
        for candidate, device_types in AUTO_ORDER:
            if device.type in device_types and unavailable_reason(candidate, device) is None:
                return _load(candidate)
        name = "reference"
    module = _load(name)
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    return module
