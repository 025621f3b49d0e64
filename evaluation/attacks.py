"""Attacks of an honest-but-curious server, and how to score them.

Reconstruction: from the x_{t_c} views it recovered from a client's training messages, the server
estimates each clean image x₀.
- `linear`: the best linear (Wiener) estimate with the full covariance of the views, fitted on the
  views themselves: x_{t_c} = √a·x₀ + √(1−a)·ε₁ with a = ᾱ_{t_c} known, so Cov(x₀) follows from
  Cov(x) once the noise is taken out (`fit_prior`, robust when views are few for their size).
- `multiview`: link views that are closer than two independent noisy views of one image would be
  (by nearest-neighbour distance), average each view with the views linked to it, and apply the
  same estimate with the noise of the average. Exact duplicates (keyed cut noise) count once:
  they carry one noise draw.
Membership inference: does an image belong to the clients' training data? Scores from the server
model's loss at its lowest levels, and a PIA-style score (Kong et al., 2023): the model's own
prediction at the cut taken as the noise, compared with its prediction after noising with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from collafuse.common.cut import Cut
from collafuse.engine.graphs import Forward
from collafuse.diffusion.schedule import Scheduler


@dataclass
class Prior:
    """The server's Gaussian model of a client's x₀, fitted on views of x_{t_c}: the mean, and per
    principal direction of the views its variance λ in x₀ and its alignment c² with the true direction."""

    a: float  # ᾱ_{t_c}
    mean: torch.Tensor  # [D] of x₀
    values: torch.Tensor  # [r] λ: variance of x₀ along each direction
    alignment: torch.Tensor  # [r] c²: squared cosine between each sample direction and the population's
    vectors: torch.Tensor  # [D, r]


def fit_prior(views: torch.Tensor, a: float) -> Prior:
    """Moments of x₀ from views [N, D] = √a·x₀ + noise of known variance σ² = 1−a.

    With N not far above D the sample covariance is biased (its eigenvalues spread as Marchenko and
    Pastur describe, and its eigenvectors tilt), and a Wiener filter built on it amplifies noise. So
    the fit follows the spiked covariance model (Baik and Silverstein; Donoho, Gavish and Johnstone,
    2018): a sample eigenvalue λ̂ above the noise bulk edge σ²(1+√γ)², γ = D/N, comes from a
    population eigenvalue ℓ = [(λ̂+σ²−γσ²) + √((λ̂+σ²−γσ²)² − 4λ̂σ²)]/2, with cos² to the true
    direction (1 − γσ⁴/(ℓ−σ²)²)/(1 + γσ²/(ℓ−σ²)); directions inside the bulk carry no signal."""
    x = views.double()
    n, dim = x.shape
    mean = x.mean(0)
    _, sv, vh = torch.linalg.svd(x - mean, full_matrices=False)
    sample = sv**2 / max(1, n - 1)
    noise, gamma = 1 - a, dim / max(1, n - 1)
    b = sample + noise - gamma * noise
    ell = (b + (b**2 - 4 * sample * noise).clamp(min=0).sqrt()) / 2
    spike = (sample > noise * (1 + math.sqrt(gamma)) ** 2) & (ell > noise)
    excess = (ell - noise).clamp(min=1e-12)
    alignment = torch.where(spike, (1 - gamma * noise**2 / excess**2).clamp(min=0) / (1 + gamma * noise / excess), torch.zeros_like(ell))
    values = torch.where(spike, excess / a, torch.zeros_like(ell))
    return Prior(a, mean / math.sqrt(a), values, alignment, vh.T)


def wiener(prior: Prior, x: torch.Tensor, noise_var: torch.Tensor | float) -> torch.Tensor:
    """The best linear estimate of x₀ from x = √a·x₀ + noise of variance `noise_var` per element (one
    value per row or one for all), x not among the views the prior was fitted on: per direction the
    gain c²·√a·λ / (c²·a·λ + noise_var); across the rest of the space the prior's mean."""
    a = prior.a
    coords = (x.double() - math.sqrt(a) * prior.mean) @ prior.vectors  # [N, r]
    var = torch.as_tensor(noise_var, dtype=torch.float64).reshape(-1, 1)
    signal = prior.alignment * prior.values
    gain = math.sqrt(a) * signal / (a * signal + var)
    return (prior.mean + (coords * gain) @ prior.vectors.T).float()


def _cross_fitted(views: torch.Tensor, a: float, estimate, folds: int = 5, seed: int = 0) -> torch.Tensor:
    """`estimate(prior, rows)` for every row with a prior fitted on the other folds, so that no view is
    judged by a fit that has seen its own noise."""
    order = torch.randperm(views.shape[0], generator=torch.Generator().manual_seed(seed))
    out = torch.empty(views.shape[0], views.shape[1])
    for k in range(folds):
        held = order[k::folds]
        rest = torch.ones(views.shape[0], dtype=torch.bool)
        rest[held] = False
        out[held] = estimate(fit_prior(views[rest], a), held)
    return out


def linear_attack(views: torch.Tensor, a: float) -> torch.Tensor:
    """One-view estimate of x₀ for every view [N, D]. Identical views (keyed cut noise: one draw per
    image) count once."""
    if a >= 1.0:  # t_c = 0: the view is the image
        return views.clone()
    unique, inverse = torch.unique(views, dim=0, return_inverse=True)
    return _cross_fitted(unique, a, lambda prior, rows: wiener(prior, unique[rows], 1 - a))[inverse]


LINK_SPREADS = (0.0, 0.5, 1.0, 2.0, 3.0)  # candidate link thresholds, in spreads above the mean twin distance


def _pair_threshold(a: float, dim: int, spreads: float) -> float:
    """Squared distance below which two views are linked: two independent noise draws of one image
    differ by 2(1−a)·χ²_D, whose mean is 2(1−a)·D and spread 2(1−a)·√(2D)."""
    return 2 * (1 - a) * (dim + spreads * math.sqrt(2 * dim))


@dataclass
class Linked:
    estimate: torch.Tensor  # [N, D] per view
    average: torch.Tensor  # [N, D] the average of the views linked to each view
    twins_found: float  # share of views (with a twin among the views) whose nearest other view is a twin; nan without twins
    group_size: float  # mean number of distinct views averaged per view
    spreads: float  # the link threshold the attack chose


def multiview_attack(views: torch.Tensor, a: float, truth: torch.Tensor | None = None, chunk: int = 512) -> Linked:
    """Link, average, estimate (see the module docstring). The link threshold is chosen without the
    truth, by the leave-one-out risk: a view's noise is independent of the average of the others
    linked to it, so ‖x_i − √a·x̂₀(others)‖²/D − (1−a) estimates a·MSE. `truth` (the clean image of
    each view) only scores the linking."""
    if a >= 1.0:
        return Linked(views.clone(), views.clone(), float("nan"), 1.0, 0.0)
    unique, inverse = torch.unique(views, dim=0, return_inverse=True)  # keyed duplicates: one noise draw
    n, dim = unique.shape
    u = unique.double()
    norms = (u * u).sum(1)
    thresholds = [_pair_threshold(a, dim, k) for k in LINK_SPREADS]
    sums = torch.zeros(len(thresholds), n, dim, dtype=torch.float64)
    counts = torch.zeros(len(thresholds), n, dtype=torch.float64)
    nearest = torch.empty(n, dtype=torch.int64)
    for start in range(0, n, chunk):
        block = u[start : start + chunk]
        d2 = (norms[start : start + chunk, None] + norms[None, :] - 2 * block @ u.T).clamp(min=0)
        for i, threshold in enumerate(thresholds):
            linked = (d2 <= threshold).double()  # includes the view itself
            sums[i, start : start + chunk] = linked @ u
            counts[i, start : start + chunk] = linked.sum(1)
        d2[torch.arange(block.shape[0]), torch.arange(start, start + block.shape[0])] = float("inf")
        nearest[start : start + chunk] = d2.argmin(1)
    prior = fit_prior(unique, a)
    risks = []
    for i in range(len(thresholds)):
        others = (counts[i] - 1).clamp(min=1)
        loo = wiener(prior, (sums[i] - u) / others[:, None], (1 - a) / others).double()
        loo[counts[i] == 1] = prior.mean  # nothing else linked: the prior's mean
        risks.append(float(((u - math.sqrt(a) * loo) ** 2).mean()))
    best = int(torch.tensor(risks).argmin())
    means = sums[best] / counts[best][:, None]
    estimate = _cross_fitted(unique, a, lambda p, rows: wiener(p, means[rows], (1 - a) / counts[best][rows]))[inverse]
    twins = float("nan")
    if truth is not None:
        first = torch.empty(n, dtype=torch.int64)
        first[inverse] = torch.arange(views.shape[0])
        owner = truth[first]  # the image of each distinct view
        has_twin = torch.bincount(owner)[owner] > 1
        if has_twin.any():
            twins = float((owner[nearest] == owner)[has_twin].double().mean())
    return Linked(estimate, means.float()[inverse], twins, float(counts[best][inverse].mean()), LINK_SPREADS[best])


def reconstruction_scores(estimate: torch.Tensor, truth: torch.Tensor, data: torch.Tensor) -> dict[str, float]:
    """MSE and PSNR (data range 2) of the estimates against the true images, and the share of the
    prior's error removed: 1 − MSE / MSE of guessing the client's mean image (below 0: worse)."""
    flat = data.flatten(1).double()
    target = flat[truth]
    mse = float(((estimate.flatten(1).double() - target) ** 2).mean())
    prior_mse = float(((target - flat.mean(0)) ** 2).mean())
    return {
        "mse": mse,
        "psnr": 10 * math.log10(4.0 / mse) if mse > 0 else float("inf"),
        "prior_error_removed": 1 - mse / prior_mse if prior_mse > 0 else float("nan"),
    }


def reidentification(views: torch.Tensor, a: float, truth: torch.Tensor, data: torch.Tensor, chunk: int = 1024) -> float:
    """Top-1 re-identification: the share of views whose nearest real image, after scaling the view
    by 1/√a, is the image it came from. For x = √a·x₀ + isotropic noise this is the maximum-
    likelihood match among the candidates, so it identifies better than a Wiener estimate, which
    shrinks every image towards the mean."""
    flat = data.flatten(1).double()
    norms = (flat * flat).sum(1)
    hits = 0
    for start in range(0, views.shape[0], chunk):
        block = views[start : start + chunk].flatten(1).double() / math.sqrt(a)
        d2 = norms[None, :] - 2 * block @ flat.T
        hits += int((d2.argmin(1) == truth[start : start + chunk]).sum())
    return hits / max(1, views.shape[0])


def nearest_mse(candidates: torch.Tensor, real: torch.Tensor, chunk: int = 256) -> float:
    """Mean over candidates of the pixel MSE to the nearest real image (what the server produced at
    t_c for a client's generations, against that client's images)."""
    flat_real = real.flatten(1)
    best = []
    for start in range(0, candidates.shape[0], chunk):
        c = candidates[start : start + chunk].flatten(1)
        best.append(torch.cdist(c, flat_real).pow(2).min(1).values / c.shape[1])
    return float(torch.cat(best).mean())


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann–Whitney)."""
    scores = np.concatenate([members, others])
    ranks = _ranks(scores)
    n1, n0 = len(members), len(others)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def tpr_at_fpr(members: np.ndarray, others: np.ndarray, fpr: float) -> float | None:
    """The share of members flagged when at most `fpr` of non-members are (None when the
    non-members are too few to measure that rate: fewer than 1/fpr)."""
    if len(others) * fpr < 1:
        return None
    allowed = int(math.floor(fpr * len(others)))
    threshold = np.sort(others)[::-1][allowed] if allowed < len(others) else -np.inf  # flag scores above it
    return float((members > threshold).mean())


@torch.no_grad()
def membership_scores(
    eps_fn: Forward, scheduler: Scheduler, images: torch.Tensor, cut: Cut, generator: torch.Generator,
    offsets: tuple[int, ...] = (1, 5, 10, 20), batch: int = 256,
) -> dict[str, np.ndarray]:
    """Two scores per image, higher for a likelier member, from the server model `eps_fn`
    ((x_t, t, t_c) → ε̂₂) at the server's levels t_c + offset (those above T are left out):
    - `loss`: minus the ε₂-prediction error, with x_{t_c} drawn as the server must (it does not
      know the client's ε₁: a fresh draw) and fresh ε₂;
    - `pia`: x̂_{t_c} = √ᾱ_{t_c}·x₀ (ε₁'s mean), ε̃ = ε̂₂(x̂_{t_c}, t_c+1), and minus the L1 distance
      between ε̃ and the prediction at x_t = add_noise(x̂_{t_c}, ε̃, t): deterministic, as in PIA."""
    t_c = cut.t_c
    levels = [t_c + k for k in offsets if t_c + k <= scheduler.levels]
    a = float(scheduler.alpha_bar[t_c])
    out: dict[str, list[np.ndarray]] = {"loss": [], "pia": []}
    for start in range(0, images.shape[0], batch):
        x0 = images[start : start + batch].float()
        n = x0.shape[0]
        tc = torch.full((n,), t_c, dtype=torch.int64)
        x_mean = math.sqrt(a) * x0
        eps_tilde = eps_fn(x_mean, tc + 1, tc).float()
        loss, pia = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for level in levels:
            t = torch.full((n,), level, dtype=torch.int64)
            x_tc = x_mean + math.sqrt(1 - a) * torch.randn(x0.shape, generator=generator)
            eps2 = torch.randn(x0.shape, generator=generator)
            pred = eps_fn(scheduler.add_noise(x_tc, eps2, t, tc), t, tc).float()
            loss -= ((pred - eps2) ** 2).flatten(1).mean(1).double()
            pred = eps_fn(scheduler.add_noise(x_mean, eps_tilde, t, tc), t, tc).float()
            pia -= (pred - eps_tilde).abs().flatten(1).mean(1).double()
        out["loss"].append((loss / len(levels)).numpy())
        out["pia"].append((pia / len(levels)).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
