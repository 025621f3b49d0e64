"""What a client discloses to the server (the paper's Figure 3, right).

Two views per client:
- *seen*: what the server can compute from the client's training messages: x_{t_c} exactly
  (core.split.recover_cut_image), paired with the clean image it came from, and the server's best
  one-shot reconstruction of x₀ from it;
- *produced*: what the server's sampler returns at t_c for that client's generations.
Each is compared with the client's real images by pixel MSE (to the paired original where a
pairing exists, else to the nearest real image) and KID.
"""

from __future__ import annotations

import torch

from collafuse.core.schedule import CosineSchedule
from collafuse.core.split import make_server_message, recover_cut_image


def seen_by_server(schedule: CosineSchedule, x0: torch.Tensor, t_c: int, seed: int = 0) -> torch.Tensor:
    """x_{t_c} of each clean image, as the server recovers it from a real training message."""
    if t_c >= schedule.levels:
        raise ValueError("a client with cut ratio 1 sends the server nothing")
    return recover_cut_image(schedule, make_server_message(schedule, x0, t_c, torch.Generator().manual_seed(seed)))


def one_shot_reconstruction(schedule: CosineSchedule, x_tc: torch.Tensor, t_c: int) -> torch.Tensor:
    """The server's best linear estimate of x₀ from x_{t_c} alone (per-pixel Wiener shrinkage).

    x_{t_c} = √ᾱ·x₀ + √(1−ᾱ)·ε. With the mean μ and variance s² of x₀ per pixel — which the server
    can estimate from the x_{t_c} it sees, as E[x] = √ᾱ·μ and Var[x] = ᾱ·s² + 1 − ᾱ — the linear
    MMSE estimate is μ + √ᾱ·s²/(ᾱ·s² + 1 − ᾱ)·(x_{t_c} − √ᾱ·μ). For t_c = 0 it is x_{t_c} itself.
    """
    a = float(schedule.alpha_bar[t_c])
    if t_c == 0:
        return x_tc.clone()
    mean, var = x_tc.mean(0, keepdim=True), x_tc.var(0, keepdim=True)
    mu = mean / a**0.5
    s2 = ((var - (1 - a)) / a).clamp(min=0)
    return (mu + a**0.5 * s2 / (a * s2 + 1 - a) * (x_tc - a**0.5 * mu)).clamp(-1, 1)


def paired_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def nearest_mse(candidates: torch.Tensor, real: torch.Tensor, chunk: int = 256) -> float:
    """Mean over candidates of the pixel MSE to the nearest real image."""
    flat_real = real.flatten(1)
    best = []
    for start in range(0, candidates.shape[0], chunk):
        c = candidates[start : start + chunk].flatten(1)
        best.append(torch.cdist(c, flat_real).pow(2).min(1).values / c.shape[1])
    return float(torch.cat(best).mean())
