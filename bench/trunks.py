"""Multi-task models on realistic shared trunks, for the step benchmarks.

A model is a shared trunk (an MLP, a small convnet or a transformer encoder) followed by T linear
regression heads, one per task. Its forward pass returns the trunk's output (the features every
head reads; TorchJD's ``mtl_backward`` needs them) and the T task losses, whose scales differ by
orders of magnitude so that every weighting has real work to do.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from .presets import TrunkSpec

#: Loss scales of the tasks, in turn: balancing them is what the weightings are for.
LOSS_SCALES = (1.0, 10.0, 0.1, 100.0)


def mlp_trunk(in_features: int, width: int, depth: int) -> tuple[nn.Module, int]:
    """``depth`` linear layers of ``width``, each followed by a GELU; returns the trunk and its
    feature width (as every trunk builder does)."""
    layers: list[nn.Module] = []
    for layer in range(depth):
        layers += [nn.Linear(in_features if layer == 0 else width, width), nn.GELU()]
    return nn.Sequential(*layers), width


def convnet_trunk(channels: tuple[int, ...], image_size: int) -> tuple[nn.Module, int]:
    """3×3 convolutions with batch norm and ReLU, halving the resolution from the second layer
    on, then a global average pool."""
    layers: list[nn.Module] = []
    for index, (inputs, outputs) in enumerate(itertools.pairwise((3, *channels))):
        layers += [
            nn.Conv2d(inputs, outputs, 3, stride=1 if index == 0 else 2, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels[-1]


class _EncoderTrunk(nn.Module):
    """A pre-norm transformer encoder over token embeddings, mean-pooled over the sequence."""

    def __init__(self, d_model: int, layers: int, heads: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.encoder(tokens).mean(dim=1)


def transformer_trunk(d_model: int, layers: int, heads: int, seq_len: int) -> tuple[nn.Module, int]:
    """``layers`` pre-norm encoder layers of width ``d_model`` (feed-forward 4·d_model); inputs are
    ``[batch, seq_len, d_model]`` token embeddings (``seq_len`` shapes the batch only)."""
    return _EncoderTrunk(d_model, layers, heads), d_model


_TRUNKS = {"mlp": mlp_trunk, "convnet": convnet_trunk, "transformer": transformer_trunk}


def _input_shape(spec: TrunkSpec) -> tuple[int, ...]:
    options = spec.options
    if spec.kind == "mlp":
        return (spec.batch, options["in_features"])
    if spec.kind == "convnet":
        return (spec.batch, 3, options["image_size"], options["image_size"])
    return (spec.batch, options["seq_len"], options["d_model"])


class MultiTaskModel(nn.Module):
    """A shared trunk and ``num_tasks`` linear heads; ``forward(batch) -> (features, losses)``."""

    def __init__(self, spec: TrunkSpec, num_tasks: int):
        super().__init__()
        if spec.kind not in _TRUNKS:
            raise ValueError(f"unknown trunk kind {spec.kind!r}; known: {', '.join(_TRUNKS)}")
        self.spec = spec
        self.trunk, features = _TRUNKS[spec.kind](**spec.options)
        self.heads = nn.ModuleList(nn.Linear(features, 1) for _ in range(num_tasks))
        #: The dtype the forward runs in under ``torch.autocast`` (None: the parameters' dtype).
        self.autocast_dtype: torch.dtype | None = None

    def last_shared_layer(self) -> nn.Module:
        """The trunk's last layer with parameters (an encoder layer, a linear or a convolution):
        the ``norm_params`` of the cheap approximation."""
        layers = self.trunk.encoder.layers if isinstance(self.trunk, _EncoderTrunk) else self.trunk
        return [layer for layer in layers if any(True for _ in layer.parameters())][-1]

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    @property
    def shared_numel(self) -> int:
        """P, the number of trainable shared-parameter elements."""
        return sum(p.numel() for p in self.trunk.parameters() if p.requires_grad)

    def make_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random inputs and ``[batch, T]`` regression targets, on the model's device and dtype."""
        parameter = next(self.parameters())
        inputs = torch.randn(_input_shape(self.spec), generator=generator)
        targets = torch.randn(self.spec.batch, self.num_tasks, generator=generator)
        return inputs.to(parameter), targets.to(parameter)

    def forward(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, list[Tensor]]:
        inputs, targets = batch
        enabled = self.autocast_dtype is not None
        with torch.autocast(inputs.device.type, self.autocast_dtype or torch.bfloat16, enabled=enabled):
            features = self.trunk(inputs)
            losses = [
                LOSS_SCALES[i % len(LOSS_SCALES)] * (head(features).squeeze(-1) - targets[:, i]).square().mean()
                for i, head in enumerate(self.heads)
            ]
        return features, losses


def build_model(
    spec: TrunkSpec, num_tasks: int, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[MultiTaskModel, tuple[Tensor, Tensor]]:
    """A seeded model on ``device`` and a batch for it."""
    torch.manual_seed(seed)
    model = MultiTaskModel(spec, num_tasks).to(device=device, dtype=dtype)
    batch = model.make_batch(torch.Generator().manual_seed(seed + 1))
    return model, batch
