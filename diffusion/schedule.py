"""The scheduler: the cosine noise schedule and every step a party takes with it (DESIGN.md §2).

In diffusers' manner one object owns the noise process: `timesteps` (the levels a sampler visits),
`add_noise` (forward noising, optionally rebased) and `step` (one denoising step). Levels are
integers t = 0..T with ᾱ_0 = 1 (the clean image). A party whose "data" are the images at level b
(the server: b = t_c; a client: b = 0) is trained under the rebased schedule ᾱ'_t = ᾱ_t / ᾱ_b,
so its model predicts ε_b, the noise relative to x_b. Sampling, however, walks the *unsplit*
chain: ε_b and the original chain's ε are the same score, scaled, so every step converts the
prediction and takes the ordinary DDPM/DDIM step of the original schedule. Coefficients are
functions of (t, s, b) per row, so rows of different clients, steps and cut ratios share a batch.
"""

from __future__ import annotations

import math

import torch

from collafuse.common.config import DiffusionConfig, SamplerConfig


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row float64 coefficients → `like`'s dtype, broadcastable against it."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class Scheduler:
    """ᾱ_t of Nichol & Dhariwal (2021), built once in float64; per-row gathers on the rows' device."""

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

    @property
    def levels(self) -> int:
        return self.config.levels

    def table(self, device: torch.device | str) -> torch.Tensor:
        """ᾱ on `device` (cached), so per-row gathers happen where the rows are."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.alpha_bar.to(device)
        return self._tables[device]

    def rebased(self, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """ᾱ'_t = ᾱ_t / ᾱ_base, float64, per row, on the rows' device."""
        table = self.table(t.device)
        return table[t] / table[base]

    # ---- timesteps ----------------------------------------------------------------------------
    def timesteps(self, start: int, base: int, steps: int | None) -> list[int]:
        """The levels a sampler visits from `start` down to `base` inclusive: every level for
        `steps=None` (ancestral), else about `steps` evenly spaced DDIM jumps."""
        if start < base:
            raise ValueError(f"start level {start} below base {base}")
        if steps is None or steps >= start - base:
            return list(range(start, base - 1, -1))
        steps = max(1, steps)
        path = [round(start - i * (start - base) / steps) for i in range(steps + 1)]
        return sorted(set(path), reverse=True)

    def share(self, sampler: SamplerConfig, start: int, base: int) -> tuple[int | None, float]:
        """(steps, η) of a party that walks `start` → `base`: ancestral walks every level (η = 1);
        DDIM gives each party steps in proportion to the levels it owns, at least one."""
        if sampler.kind == "ancestral":
            return None, 1.0
        return max(1, round(sampler.ddim_steps * (start - base) / self.levels)), sampler.eta

    # ---- add_noise --------------------------------------------------------------------------
    def add_noise(self, x_base: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ'_t·x_base + √(1−ᾱ'_t)·ε under the schedule rebased at `base` (base 0: plain DDPM)."""
        a = self.rebased(t.to(x_base.device), base.to(x_base.device))
        return _bcast(a.sqrt(), x_base) * x_base + _bcast((1 - a).sqrt(), x_base) * eps

    def remove_noise(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The inverse of add_noise: x_base = (x_t − √(1−ᾱ'_t)·ε)/√ᾱ'_t."""
        a = self.rebased(t.to(x_t.device), base.to(x_t.device))
        return (x_t - _bcast((1 - a).sqrt(), x_t) * eps) / _bcast(a.sqrt(), x_t)

    # ---- step -------------------------------------------------------------------------------
    def step_coefficients(
        self, t: torch.Tensor, s: torch.Tensor, base: torch.Tensor, eta: float | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Float64 per-row coefficients of one step t → s of the original chain, for a model that
        predicts ε_b (the noise relative to x_b; b = 0 for an ordinary model).

        ε̂ = k·ε̂_b with k = √((1−ᾱ_t)/(1−ᾱ'_t)) (the same score: ∇log p(x_t) = −ε/√(1−ᾱ_t)
        = −ε_b/√(1−ᾱ'_t)); x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t; then the generalised DDIM step
        x_s = A·x̂₀ + B·x_t + σ·z with σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s). With η = 1 and
        s = t − 1 it is exactly the DDPM posterior mean and variance of the unsplit chain.
        """
        table = self.table(t.device)
        a_t, a_s = table[t], table[s]
        k = torch.sqrt((1 - a_t) / (1 - self.rebased(t, base)))
        eta = torch.as_tensor(eta, dtype=torch.float64, device=t.device)
        sigma = eta * torch.sqrt((1 - a_s) / (1 - a_t)) * torch.sqrt(1 - a_t / a_s)
        direction = (1 - a_s - sigma**2).clamp(min=0).sqrt()
        return {
            "eps_scale": torch.sqrt(1 - a_t) * k,  # x̂₀ = (x_t − eps_scale·ε̂_b) / sqrt_a_t
            "sqrt_a_t": a_t.sqrt(),
            "A": a_s.sqrt() - direction * a_t.sqrt() / (1 - a_t).sqrt(),
            "B": direction / (1 - a_t).sqrt(),
            "sigma": sigma,
        }

    def step(
        self,
        eps_hat: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        x_t: torch.Tensor,
        base: torch.Tensor,
        eta: torch.Tensor | float,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """One step t → s per row from a prediction of ε_b; x̂₀ is clipped to the data range
        (`DiffusionConfig.clip_sample`; 0 turns clipping off), as an unsplit DDPM/DDIM does."""
        c = {k: _bcast(v, x_t) for k, v in self.step_coefficients(t, s, base, eta).items()}
        x0_hat = (x_t - c["eps_scale"] * eps_hat) / c["sqrt_a_t"]
        clip = self.config.clip_sample
        if clip:
            x0_hat = x0_hat.clamp(-clip, clip)
        return c["A"] * x0_hat + c["B"] * x_t + c["sigma"] * noise
