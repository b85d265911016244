"""Closeness of the ops' results to float64, within the bounds their float32 accumulation allows.

The inputs of the parity tests are exact in float64 (bfloat16 and float16 widen without
rounding), so a backend's only error is its float32 accumulation, and for the combined gradient
one rounding to the storage dtype. The bounds:

- Gram entry (i, j): relative to sqrt(G_ii G_jj), its scale by Cauchy-Schwarz;
- squared norms: relative to the norm itself;
- combined gradient: relative to Σ_i |w_i g_i| at each element, plus the spacing of the storage
  dtype's subnormal numbers (below the smallest normal number, float16's spacing is fixed at 2⁻²⁴).

A failure names how many elements miss their bound and the worst one (by error over bound): its
index, the value computed, the float64 value and the bound.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from emtl_kernels import task_gram, task_sq_norms, weighted_combine

GRAM_RTOL = 1e-5
COMBINE_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}
# Keeps a bound positive where the exact value is 0.
_TINY = 1e-30


def subnormal_spacing(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def gram64(exact: Tensor) -> Tensor:
    """G = J Jᵀ of the float64 J."""
    return exact @ exact.T


def combine64(exact: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(Jᵀw, Σ_i |w_i g_i|): the value and the scale its rounding error is measured against."""
    weights = weights.double().cpu()
    return weights @ exact, weights.abs() @ exact.abs()


def flat_output(result: Tensor | list[Tensor]) -> Tensor:
    """A combine's destination (one tensor, or one per shared tensor) as one float64 vector."""
    parts = [result] if isinstance(result, Tensor) else result
    return torch.cat([part.reshape(-1).double().cpu() for part in parts])


def assert_within(actual: Tensor, expected: Tensor, bound: Tensor, what: str, *, where=None) -> None:
    """``|actual - expected| <= bound`` at every element (a NaN anywhere fails). ``where(flat
    index)`` names an element in the message; by default its index in ``actual``'s shape."""
    actual = actual.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    error = (actual - expected).abs()
    misses = ~(error <= bound)
    if not bool(misses.any()):
        return
    ratio = torch.where(misses, (error / bound).nan_to_num(nan=float("inf")), 0.0).flatten()
    worst = int(ratio.argmax())
    position = where(worst) if where is not None else f"index {_unravel(worst, actual.shape)}"
    raise AssertionError(
        f"{what}: {int(misses.sum())} of {misses.numel()} elements off their bound; worst at {position}: "
        f"got {actual.flatten()[worst].item():.9g}, float64 {expected.flatten()[worst].item():.9g}, "
        f"error {error.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
        f"({ratio[worst].item():.3g}× the bound)"
    )


def assert_gram_close(gram: Tensor, exact: Tensor) -> None:
    """G (float32) against J Jᵀ of the float64 ``exact`` J."""
    assert gram.dtype == torch.float32, f"G has dtype {gram.dtype}, expected float32"
    expected = gram64(exact)
    scale = expected.diagonal().sqrt()
    assert_within(gram, expected, GRAM_RTOL * torch.outer(scale, scale) + _TINY, "Gram matrix")


def assert_sq_norms_close(sq_norms: Tensor, exact: Tensor) -> None:
    """The squared norms (float32) against those of the float64 ``exact`` J's rows."""
    assert sq_norms.dtype == torch.float32, f"squared norms have dtype {sq_norms.dtype}, expected float32"
    expected = exact.square().sum(dim=1)
    assert_within(sq_norms, expected, GRAM_RTOL * expected.abs() + _TINY, "squared norms")


def assert_combine_close(result: Tensor | list[Tensor], expected: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
    """A combined gradient in ``dtype`` (one tensor, or one per shared tensor) against the float64
    ``expected``, within its float32 accumulation and one rounding to ``dtype``."""
    bound = COMBINE_RTOL[dtype] * scale + subnormal_spacing(dtype)
    sizes = [result.numel()] if isinstance(result, Tensor) else [part.numel() for part in result]
    assert_within(flat_output(result), expected, bound, "combined gradient", where=lambda flat: _piece_of(flat, sizes))


def assert_passes_close(grads, exact: Tensor, weights: Tensor, dtype: torch.dtype, backend: str) -> None:
    """The three passes of ``backend`` on ``grads`` against the float64 ``exact`` J: the Gram
    matrix (also exactly symmetric), the squared norms and the combination with ``weights``."""
    gram = task_gram(grads, backend=backend)
    assert_gram_close(gram, exact)
    assert torch.equal(gram, gram.T)
    assert_sq_norms_close(task_sq_norms(grads, backend=backend), exact)
    expected, scale = combine64(exact, weights)
    assert_combine_close(weighted_combine(grads, weights, backend=backend), expected, scale, dtype)


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


def _piece_of(flat: int, sizes: list[int]) -> str:
    """Element ``flat`` of the concatenated outputs, as its output and index in that output."""
    starts = [0, *itertools.accumulate(sizes)]
    k = next(k for k in range(len(sizes)) if flat < starts[k + 1])
    return f"element {flat - starts[k]} of output {k}" if len(sizes) > 1 else f"element {flat}"
