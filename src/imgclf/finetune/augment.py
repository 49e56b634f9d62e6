"""Batched augmentation of uint8 image tensors, on whatever device they live on.

Random resized crop, horizontal flip and rotation are one affine warp per sample (``affine_grid`` +
``grid_sample``); colour jitter scales brightness, contrast and saturation. Random numbers come from a
CPU ``torch.Generator``, so runs are reproducible on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Which augmentations are on, and how strong."""

    crop: bool = True
    flip: bool = True
    color: bool = True
    rotate_deg: float = 0.0
    crop_scale: tuple[float, float] = (0.35, 1.0)  # crop area as a share of the cached image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.3  # brightness, contrast and saturation factors drawn from 1 +- jitter


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; to a GPU through pinned memory, without waiting for it
    (a copy from pageable memory would first wait for every queued kernel)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class Normalizer:
    """uint8 NHWC -> normalised float NCHW (channels_last) crops of ``resolution`` pixels."""

    def __init__(self, resolution: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        self.resolution = resolution
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def center(self, batch: torch.Tensor) -> torch.Tensor:
        """The eval view: centre crop (the cache holds the backbone's resize_to side)."""
        side, r = batch.shape[1], self.resolution
        o = (side - r) // 2
        x = batch[:, o : o + r, o : o + r].permute(0, 3, 1, 2).float() / 255.0
        return self._finish(x)

    def random(self, batch: torch.Tensor, aug: Augment, gen: torch.Generator, size: int) -> torch.Tensor:
        """A random training view, ``size`` pixels square, of every image in ``batch``."""
        n, side = batch.shape[0], batch.shape[1]
        u = torch.rand(n, 6, generator=gen)
        base = self.resolution / side
        if aug.crop:
            lo, hi = aug.crop_scale
            area = lo + (hi - lo) * u[:, 0]
            r_lo, r_hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
            log_r = r_lo + (r_hi - r_lo) * u[:, 1]
            w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
            h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
            cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)
        else:
            w = h = torch.full((n,), base)
            cx = cy = torch.zeros(n)
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if aug.flip else torch.ones(n)
        angle = (2 * u[:, 5] - 1) * math.radians(aug.rotate_deg)
        c, s = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([c * w * flip, -s * h, cx], 1), torch.stack([s * w * flip, c * h, cy], 1)], 1)
        x = batch.permute(0, 3, 1, 2).float() / 255.0
        grid = F.affine_grid(to_device(theta, x.device), [n, 3, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if aug.color:
            f = to_device(1 + aug.jitter * (2 * torch.rand(n, 3, generator=gen) - 1), x.device).view(n, 3, 1, 1, 1)
            x = x * f[:, 0]
            x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * f[:, 1] + x.mean(dim=(1, 2, 3), keepdim=True)
            gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            x = ((x - gray) * f[:, 2] + gray).clamp(0.0, 1.0)
        return self._finish(x)
