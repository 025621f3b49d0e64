"""The split contract (DESIGN.md §2): two-stage noising, the two losses, one sampler step.

The client noises its clean image x₀ to x_{t_c} with noise ε₁ that never leaves the device, then
from x_{t_c} to a server level t with fresh noise ε₂, and sends (x_t, t, t_c, ε₂). From such a
message the server can compute x_{t_c} and nothing closer to x₀.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from collafuse.core.schedule import CosineSchedule


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row float64 coefficients → float32 tensor broadcastable against `like`."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn on the generator's own device and moved to x's, so that a CPU-seeded party
    draws the same numbers whether its model runs on the CPU or on a GPU."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def noise_to_level(
    schedule: CosineSchedule, x_base: torch.Tensor, t: torch.Tensor, base: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ'_t·x_base + √(1−ᾱ'_t)·ε under the schedule rebased at `base` (base = 0: plain DDPM)."""
    a = schedule.rebased(t.to(x_base.device), base.to(x_base.device))
    return _bcast(a.sqrt(), x_base) * x_base + _bcast((1 - a).sqrt(), x_base) * eps


@dataclass
class ServerMessage:
    """What a client sends for server training: never ε₁, never x₀."""

    x_t: torch.Tensor  # [B, C, H, W] float32
    t: torch.Tensor  # [B] int64, t_c < t <= T
    t_c: torch.Tensor  # [B] int64
    eps: torch.Tensor  # [B, C, H, W] float32, ε₂ relative to x_{t_c}


def server_message(
    schedule: CosineSchedule,
    x_tc: torch.Tensor,
    t_c: torch.Tensor,
    t: torch.Tensor,
    eps2: torch.Tensor,
) -> ServerMessage:
    """Stage 2: noise x_{t_c} up to server level t. A function of x_{t_c}, not of x₀."""
    if bool((t <= t_c).any()) or bool((t > schedule.levels).any()):
        raise ValueError("server levels must satisfy t_c < t <= T")
    return ServerMessage(noise_to_level(schedule, x_tc, t, t_c, eps2), t, t_c, eps2)


def make_server_message(
    schedule: CosineSchedule, x0: torch.Tensor, t_c: int, generator: torch.Generator | None = None
) -> ServerMessage:
    """Both stages for a batch of clean images: x₀ → x_{t_c} (ε₁ stays here) → x_t, t ~ U{t_c+1..T}."""
    if t_c >= schedule.levels:
        raise ValueError("a client with t_c = T (cut ratio 1) sends nothing to the server")
    b = x0.shape[0]
    tc = torch.full((b,), t_c, dtype=torch.int64)
    eps1 = _randn_like(x0, generator)
    x_tc = noise_to_level(schedule, x0, tc, torch.zeros_like(tc), eps1)
    t = torch.randint(t_c + 1, schedule.levels + 1, (b,), generator=generator)
    eps2 = _randn_like(x0, generator)
    return server_message(schedule, x_tc, tc, t, eps2)


def recover_cut_image(schedule: CosineSchedule, message: ServerMessage) -> torch.Tensor:
    """The most the server can compute from a message: x_{t_c} = (x_t − √(1−ᾱ'_t)·ε₂)/√ᾱ'_t."""
    a = schedule.rebased(message.t.to(message.x_t.device), message.t_c.to(message.x_t.device))
    return (message.x_t - _bcast((1 - a).sqrt(), message.x_t) * message.eps) / _bcast(a.sqrt(), message.x_t)


def server_loss(model: torch.nn.Module, message: ServerMessage) -> torch.Tensor:
    """ε₂-prediction MSE; the server model is conditioned on t and on t_c."""
    pred = model(message.x_t, message.t.to(message.x_t.device), class_labels=message.t_c.to(message.x_t.device)).sample
    return F.mse_loss(pred, message.eps)


def client_loss(
    model: torch.nn.Module, schedule: CosineSchedule, x0: torch.Tensor, t_c: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Ordinary DDPM ε-prediction loss on the client's own levels 1..t_c."""
    if t_c < 1:
        raise ValueError("a client with t_c = 0 (cut ratio 0) keeps no local model")
    b = x0.shape[0]
    t = torch.randint(1, t_c + 1, (b,), generator=generator)
    eps = _randn_like(x0, generator)
    x_t = noise_to_level(schedule, x0, t, torch.zeros_like(t), eps)
    return F.mse_loss(model(x_t, t.to(x0.device)).sample, eps)


def sampler_step(
    schedule: CosineSchedule,
    x_t: torch.Tensor,
    eps_hat: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    base: torch.Tensor,
    eta: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One step t → s per row, rebased at `base`.

    x̂_base is clipped to the range its level can hold: |x_b| ≤ √ᾱ_b + 5·√(1−ᾱ_b) (the data range
    [-1, 1] plus five noise standard deviations). For a client (b = 0) that is the usual clip to
    [-1, 1]; for the server it only catches a diverging prediction.
    """
    c = {k: _bcast(v, x_t) for k, v in schedule.step_coefficients(t, s, base, eta).items()}
    a_b = schedule.table(base.device)[base]
    bound = _bcast(a_b.sqrt() + 5 * (1 - a_b).sqrt(), x_t)
    x_hat = torch.maximum(torch.minimum((x_t - c["sqrt_1m_a_t"] * eps_hat) / c["sqrt_a_t"], bound), -bound)
    return c["A"] * x_hat + c["B"] * x_t + c["sigma"] * noise
