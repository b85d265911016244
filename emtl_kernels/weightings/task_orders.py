"""Random orders in which each task meets the others (PCGrad, GradVac), drawn on the device,
and the seeded generators of the weightings that draw (PCGrad, GradVac, RLW)."""

from __future__ import annotations

import torch
from torch import Tensor


def other_tasks_in_order(
    num_tasks: int,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
    orders: Tensor | None = None,
) -> Tensor:
    """``[T, T − 1]`` integer tensor, row i the other tasks in the order task i meets them, from
    :func:`order_keys`. Each row's own entry is dropped, which spares the methods one of T batched
    steps; their rows never read one another, so where a row's skip fell changes nothing."""
    keys = order_keys(num_tasks, device, dtype, generator, orders)
    # Each row's own key, raised above every other (draws are below 1, places below T), ranks
    # last; the others keep their ranks.
    own_last = keys + num_tasks * torch.eye(num_tasks, dtype=dtype, device=device)
    return own_last.argsort(dim=1)[:, :-1]


def order_keys(
    num_tasks: int,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
    orders: Tensor | None = None,
) -> Tensor:
    """``[T, T]`` keys of ``dtype``: row i meets the other tasks in increasing key (its own entry
    skipped). Drawn as ``torch.rand(T, T)`` from ``generator`` (the device's default when None):
    no host round trip. From ``orders`` when given: ``[T, T]``, row i a permutation of 0..T−1 whose
    entry i the methods skip (checked: shape, dtype and device only, since checking that rows are
    permutations would read the device), each task's key its place in the row."""
    if orders is None:
        return torch.rand(num_tasks, num_tasks, generator=generator, device=device, dtype=dtype)
    return checked_orders(orders, num_tasks, device).argsort(dim=1).to(dtype)


def checked_orders(orders: Tensor, num_tasks: int, device: torch.device) -> Tensor:
    if orders.shape != (num_tasks, num_tasks) or orders.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"orders must be an integer [T, T] = [{num_tasks}, {num_tasks}] tensor, "
            f"got {orders.dtype} {tuple(orders.shape)}"
        )
    if orders.device != device:
        raise ValueError(f"orders are on {orders.device}, the losses on {device}")
    return orders


def check_seed(seed: object) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")


class SeededGenerators:
    """One ``torch.Generator`` per device, each seeded with ``seed`` when first asked for; None
    (the device's default generator, ``torch.manual_seed``) when ``seed`` is None. To capture a
    step with a seeded generator in a CUDA graph, register the generator with the graph
    (``CUDAGraph.register_generator_state``)."""

    def __init__(self, seed: int | None):
        check_seed(seed)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def adopt(self, seed: int) -> None:
        """Draw from generators seeded with ``seed`` from now on (the seed the ranks share)."""
        check_seed(seed)
        self.seed = seed
        self._generators.clear()

    def __call__(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
