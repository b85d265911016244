"""A small multi-task model whose task losses differ by orders of magnitude, for step tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

LOSS_SCALES = (1.0, 100.0, 0.01)


class ToyMultiTask(nn.Module):
    """A shared tanh MLP trunk and one linear regression head per task."""

    def __init__(self, num_tasks: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(num_tasks))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """The task losses: the forward that DDP and FSDP wrap."""
        return self.losses(inputs, targets)

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        return self.features_and_losses(inputs, targets)[1]

    def features_and_losses(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The trunk's output the heads read, and the task losses."""
        features = self.trunk(inputs)
        return features, [
            LOSS_SCALES[i % len(LOSS_SCALES)] * (head(features).squeeze(-1) - targets[:, i]).square().mean()
            for i, head in enumerate(self.heads)
        ]


class CountedTrunk(ToyMultiTask):
    """ToyMultiTask that counts, in ``calls[0]``, the backward passes that go through its trunk
    (those that compute the gradient on the trunk's output)."""

    def __init__(self):
        super().__init__()
        self.calls = [0]

    def features_and_losses(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features, losses = super().features_and_losses(inputs, targets)
        features.register_hook(self._count)
        return features, losses

    def _count(self, grad: torch.Tensor) -> None:
        self.calls[0] += 1


class FeaturesToy(ToyMultiTask):
    """ToyMultiTask whose forward (the one DDP wraps) returns the features with the losses."""

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.features_and_losses(inputs, targets)


def toy_batch(num_tasks: int = 3, seed: int = 1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(32, 6, generator=generator, dtype=torch.float64)
    targets = torch.randn(32, num_tasks, generator=generator, dtype=torch.float64)
    return inputs.to(dtype), targets.to(dtype)


def float64_twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def shared_gradients64(model64: ToyMultiTask, losses: list[torch.Tensor]) -> torch.Tensor:
    """The task-gradient matrix J on the trunk, [T, P], float64."""
    shared = list(model64.trunk.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    return torch.stack(rows)


def weighted_sum_gradients64(
    model64: nn.Module, losses: list[torch.Tensor], weights: torch.Tensor
) -> list[torch.Tensor]:
    """∇ Σ_i w_i L_i on every parameter of the model, float64, w held constant."""
    total = sum(w * loss for w, loss in zip(weights.tolist(), losses, strict=True))
    return list(torch.autograd.grad(total, list(model64.parameters())))
