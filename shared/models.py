"""The paper's two CNNs (black box and surrogate), built from a small, serialisable config.

Black box (Haffar et al., Fig. 1): 4 conv blocks of depth 64/128/256/512, each two 3x3 convs and a
2x2 max-pool, then fully connected 2048/1024/512/128/32/K. Surrogate: 3 blocks 64/256/512, then
1024/256/32/K. `width` scales every layer (1.0 = the paper), with a floor of MIN_FC_UNITS on the
hidden FC layers because a narrow six-layer head tends to collapse to a constant predictor.
BatchNorm follows every conv (the paper does not say; it makes training reliable).

Normalisation lives inside the model: `forward` takes plain [0,1] images.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

Architecture = Literal["blackbox", "surrogate"]

PAPER_LAYERS: dict[str, dict[str, tuple[int, ...]]] = {
    "blackbox": {"conv": (64, 128, 256, 512), "fc": (2048, 1024, 512, 128, 32)},
    "surrogate": {"conv": (64, 256, 512), "fc": (1024, 256, 32)},
}
MIN_CONV_CHANNELS = 4
MIN_FC_UNITS = 32
PAPER_IMAGE_SIZE = 100


class ModelConfig(BaseModel):
    """Everything needed to rebuild a network's shape; stored in every checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: Architecture
    image_size: int = Field(PAPER_IMAGE_SIZE, ge=16, le=512)
    in_channels: int = Field(3, ge=1, le=4)
    num_classes: int = Field(2, ge=2, le=1000)
    width: float = Field(1.0, gt=0.0, le=4.0)
    # Per-channel statistics of the training images, applied inside the model.
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    @property
    def conv_channels(self) -> tuple[int, ...]:
        return tuple(max(MIN_CONV_CHANNELS, round(c * self.width)) for c in PAPER_LAYERS[self.architecture]["conv"])

    @property
    def fc_units(self) -> tuple[int, ...]:
        return tuple(max(MIN_FC_UNITS, round(u * self.width)) for u in PAPER_LAYERS[self.architecture]["fc"])

    @property
    def feature_size(self) -> int:
        size = self.image_size
        for _ in self.conv_channels:
            size //= 2
        if size < 1:
            raise ValueError(f"image_size {self.image_size} is too small for {len(self.conv_channels)} pooling steps")
        return size


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class PaperCNN(nn.Module):
    """Conv blocks then a fully connected head; input (N, C, S, S) in [0,1], output logits (N, K)."""

    mean: torch.Tensor  # (1, C, 1, 1) buffers: the normalisation lives inside the model
    std: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        channels = (config.in_channels, *config.conv_channels)
        self.features = nn.Sequential(*(conv_block(a, b) for a, b in zip(channels, channels[1:])))
        units = (channels[-1] * config.feature_size**2, *config.fc_units)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(units, units[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(units[-1], config.num_classes))
        self.classifier = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features((x - self.mean) / self.std))
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm2d that directly follows a Conv2d in a
    Sequential folded into that conv (torch's `fuse_conv_bn_eval`; the BatchNorm becomes Identity).

    In eval mode a BatchNorm is a fixed per-channel affine map, so the folded network computes the
    same function (up to float rounding: logits within 3e-6 on the default checkpoints,
    bench/results/frozen_network.json) with one layer fewer per conv, forward and backward. For
    served, frozen networks only: the copy cannot be trained as before. `model` itself is left as it
    was (other wrappers may share it)."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return folded
