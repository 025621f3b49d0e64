"""Seeded augmentation standing in for patient variety on the one embedded template."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small rotation and scale, a smooth elastic warp, gamma and noise on [N,1,H,W] in [0, 1]."""
    n, _, h, w = images.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(8)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.05
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.03
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warp = torch.randn(n, 2, 4, 4, generator=generator) * 0.025
    grid = grid + F.interpolate(warp, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * 0.2)
    out = out.clamp_min(1e-6) ** gamma * (out > 0)
    sigma = 0.01 + torch.rand(n, 1, 1, 1, generator=generator) * 0.02
    return (out + sigma * torch.randn(out.shape, generator=generator)).clamp(0, 1)
