"""The split contract (DESIGN.md §2): the server-training message and the two losses.

The client noises its clean image x₀ to x_{t_c} with its secret cut noise ε₁ (core.cutnoise), then
from x_{t_c} to a server level t with noise ε₂, and sends (x_t, t, t_c, ε₂). From such a message
the server can compute x_{t_c} and nothing closer to x₀.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from collafuse.common.cut import Cut
from collafuse.diffusion.schedule import Scheduler


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn on the generator's own device and moved to x's, so that a CPU-seeded party
    draws the same numbers whether its model runs on the CPU or on a GPU."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


@dataclass
class ServerMessage:
    """What a client sends for server training: never ε₁, never x₀."""

    x_t: torch.Tensor  # [B, C, H, W] float32
    t: torch.Tensor  # [B] int64, t_c < t <= T
    t_c: torch.Tensor  # [B] int64
    eps: torch.Tensor  # [B, C, H, W] float32, ε₂ relative to x_{t_c}


def cut_image(scheduler: Scheduler, x0: torch.Tensor, cut: Cut, eps1: torch.Tensor) -> torch.Tensor:
    """Stage 1, on the client: x_{t_c} = √ᾱ_{t_c}·x₀ + √(1−ᾱ_{t_c})·ε₁."""
    tc = torch.full((x0.shape[0],), cut.t_c, dtype=torch.int64)
    return scheduler.add_noise(x0, eps1.to(x0.device), tc, torch.zeros_like(tc))


def server_message(scheduler: Scheduler, x_tc: torch.Tensor, cut: Cut, generator: torch.Generator | None) -> ServerMessage:
    """Stage 2: x_{t_c} noised up to server levels t ~ U{t_c+1..T} with ε₂ from `generator`.
    A function of x_{t_c}, not of x₀."""
    if not cut.uses_server:
        raise ValueError("a client with t_c = T (cut ratio 1) sends nothing to the server")
    b = x_tc.shape[0]
    tc = torch.full((b,), cut.t_c, dtype=torch.int64)
    t = torch.randint(cut.t_c + 1, scheduler.levels + 1, (b,), generator=generator)
    eps2 = randn_like(x_tc, generator)
    return ServerMessage(scheduler.add_noise(x_tc, eps2, t, tc), t, tc, eps2)


def recover_cut_image(scheduler: Scheduler, message: ServerMessage) -> torch.Tensor:
    """The most the server can compute from a message: x_{t_c} = (x_t − √(1−ᾱ'_t)·ε₂)/√ᾱ'_t."""
    return scheduler.remove_noise(message.x_t, message.eps, message.t, message.t_c)


def row_losses(model: torch.nn.Module, message: ServerMessage) -> torch.Tensor:
    """ε₂-prediction MSE of each row [B]; the server model is conditioned on t and on t_c."""
    pred = model(message.x_t, message.t.to(message.x_t.device), class_labels=message.t_c.to(message.x_t.device)).sample
    return F.mse_loss(pred, message.eps, reduction="none").flatten(1).mean(dim=1)


def client_loss(
    model: torch.nn.Module, scheduler: Scheduler, x0: torch.Tensor, cut: Cut, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Ordinary DDPM ε-prediction loss on the client's own levels 1..t_c."""
    if not cut.local_model:
        raise ValueError("a client with t_c = 0 (cut ratio 0) keeps no local model")
    b = x0.shape[0]
    t = torch.randint(1, cut.t_c + 1, (b,), generator=generator)
    eps = randn_like(x0, generator)
    x_t = scheduler.add_noise(x0, eps, t, torch.zeros_like(t))
    return F.mse_loss(model(x_t, t.to(x0.device)).sample, eps)
