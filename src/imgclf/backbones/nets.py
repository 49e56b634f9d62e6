"""Torch modules around a backbone (imported only when a network is actually run or exported)."""

from __future__ import annotations

import torch
from torch import nn


class UInt8FeatureNet(nn.Module):
    """uint8 NHWC images -> normalised float NCHW -> backbone features."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() * self.scale - self.shift
        return self.model(x)


class MirrorAveraged(nn.Module):
    """uint8 NHWC images -> the mean of the features of each image and its mirror image (test-time flip)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.features(x) + self.features(x.flip(2)))
