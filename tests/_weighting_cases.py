"""Weighting problems shared by the weighting tests: task losses, their gradients and Gram matrix,
and how far apart two of their updates are."""

from __future__ import annotations

import torch

from emtl_kernels import make_weighting

NUM_TASKS = [1, 2, 3, 8, 17]


def random_problem(num_tasks: int, seed: int, numel: int = 50):
    """Losses spread over orders of magnitude, a task-gradient matrix and its float32 Gram."""
    generator = torch.Generator().manual_seed(seed)
    losses = torch.rand(num_tasks, generator=generator, dtype=torch.float64) * 10 ** torch.randint(
        -2, 3, (num_tasks,), generator=generator
    )
    scales = 10 ** torch.randint(-3, 3, (num_tasks, 1), generator=generator).double()
    jacobian = torch.randn(num_tasks, numel, generator=generator, dtype=torch.float64) * scales
    return losses, jacobian, (jacobian @ jacobian.T).float()


#: The weightings that draw at random (task orders, weights): seeded in :func:`fresh_weighting`.
RANDOM_DRAWS = ("pcgrad", "gradvac", "rlw")


def fresh_weighting(name: str):
    """A new instance of ``name`` with its default options; PCGrad, GradVac and RLW seeded, so that
    two fresh ones draw the same."""
    return make_weighting(name, seed=0) if name in RANDOM_DRAWS else make_weighting(name)


def random_orders(num_tasks: int, seed: int) -> torch.Tensor:
    """``[T, T]``: each row a random permutation of the tasks (the orders PCGrad and GradVac take)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_tasks, generator=generator) for _ in range(num_tasks)])


def update_gap(weights: torch.Tensor, expected: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """‖Jᵀ(w − w')‖, read from G: how far apart the two updates are."""
    difference = weights - expected
    return (difference @ gram @ difference).clamp_min(0).sqrt()
