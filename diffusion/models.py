"""The U-Nets: diffusers' UNet2DModel with ResNet blocks and self-attention at the innermost level.

A client model predicts ε from (x_t, t). The server model also takes t_c, embedded like a timestep
(`class_embed_type="timestep"`), so clients with different cut ratios share one model and one batch.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402

from collafuse.common.config import ModelPreset, preset  # noqa: E402


def build_unet(preset_name: str, image_size: int, conditioned_on_cut: bool, channels: int = 1) -> UNet2DModel:
    """A fresh, randomly initialised U-Net (no pretrained weights are ever downloaded)."""
    p: ModelPreset = preset(preset_name)
    n = len(p.multipliers)
    if image_size % (2 ** (n - 1)):
        raise ValueError(f"image size {image_size} is not divisible by {2 ** (n - 1)} (preset {p.name})")
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=p.block_channels,
        layers_per_block=p.layers_per_block,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=p.norm_groups,
        attention_head_dim=p.attention_head_dim,
        class_embed_type="timestep" if conditioned_on_cut else None,
    )


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available")
    return device
