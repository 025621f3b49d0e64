"""The cosine noise schedule and its rebased views (DESIGN.md §2).

Levels are integers t = 0..T with ᾱ_0 = 1 (the clean image). A party whose "data" are the images
at level b (the server: b = t_c; a client: b = 0) sees the rebased schedule ᾱ'_t = ᾱ_t / ᾱ_b. Every
coefficient a sampler needs is a function of (t, s, b), so the tables below are indexed per row:
rows of different clients, steps and cut ratios share one batch.
"""

from __future__ import annotations

import math

import torch

from collafuse.config import DiffusionConfig


class CosineSchedule:
    """ᾱ_t of Nichol & Dhariwal (2021), kept in float64; gathers return float32 per row."""

    def __init__(self, config: DiffusionConfig = DiffusionConfig()) -> None:
        self.config = config
        T, s = config.levels, config.cosine_offset
        f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
        betas = [min(1 - f[t] / f[t - 1], config.max_beta) for t in range(1, T + 1)]
        alpha_bar = [1.0]
        for beta in betas:
            alpha_bar.append(alpha_bar[-1] * (1 - beta))
        self.alpha_bar = torch.tensor(alpha_bar, dtype=torch.float64)  # [T+1], index = level
        self._tables: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device | str) -> torch.Tensor:
        """ᾱ on `device` (cached), so per-row gathers happen where the rows are."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.alpha_bar.to(device)
        return self._tables[device]

    @property
    def levels(self) -> int:
        return self.config.levels

    def rebased(self, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """ᾱ'_t = ᾱ_t / ᾱ_base, float64, per row, on the rows' device."""
        table = self.table(t.device)
        return table[t] / table[base]

    def check_levels(self, t: torch.Tensor, base: torch.Tensor) -> None:
        if bool(((t < 0) | (t > self.levels) | (base < 0) | (base > t)).any()):
            raise ValueError(f"levels must satisfy 0 <= base <= t <= {self.levels}")

    def step_coefficients(
        self, t: torch.Tensor, s: torch.Tensor, base: torch.Tensor, eta: float | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Coefficients of one step t → s for a party whose data are the images at level `base`.

        x_s = A·x̂_b + B·x_t + σ·z. The mean (A, B) is the generalised DDIM step under the rebased
        schedule ᾱ' = ᾱ/ᾱ_b with σ'= η·√((1−ᾱ'_s)/(1−ᾱ'_t))·√(1−ᾱ'_t/ᾱ'_s); with η = 1 and s = t − 1
        it is exactly the posterior mean of q(x_{t−1} | x_t, x_b) with x̂_b in place of x_b.
        The added noise σ is that of the original chain (the same formula with ᾱ in place of ᾱ'):
        x_b is not clean data but a noisy state of the original chain, and the rebased posterior
        variance would leave out its noise (samples at t_c would come out too smooth). For b = 0 the
        two coincide. Returned in float64, one value per row.
        """
        a_t, a_s = self.rebased(t, base), self.rebased(s, base)
        eta = torch.as_tensor(eta, dtype=torch.float64, device=t.device)
        sigma_rebased = eta * torch.sqrt((1 - a_s) / (1 - a_t)) * torch.sqrt(1 - a_t / a_s)
        dir_eps = (1 - a_s - sigma_rebased**2).clamp(min=0).sqrt()
        table = self.table(t.device)
        g_t, g_s = table[t], table[s]
        sigma = eta * torch.sqrt((1 - g_s) / (1 - g_t)) * torch.sqrt(1 - g_t / g_s)
        return {
            "sqrt_a_t": a_t.sqrt(),
            "sqrt_1m_a_t": (1 - a_t).sqrt(),
            "A": a_s.sqrt() - dir_eps * a_t.sqrt() / (1 - a_t).sqrt(),
            "B": dir_eps / (1 - a_t).sqrt(),
            "sigma": sigma,
        }


def level_path(start: int, base: int, steps: int | None) -> list[int]:
    """The levels a sampler visits from `start` down to `base` inclusive.

    `steps=None` is ancestral: every level. Otherwise about `steps` evenly spaced DDIM jumps.
    """
    if start < base:
        raise ValueError(f"start level {start} below base {base}")
    if steps is None or steps >= start - base:
        return list(range(start, base - 1, -1))
    steps = max(1, steps)
    path = [round(start - i * (start - base) / steps) for i in range(steps + 1)]
    return sorted(set(path), reverse=True)
