"""The split contract of DESIGN.md §2: marginals, privacy of the message, and sampling steps that are
those of the unsplit chain (checked against a float64 reference written here from scratch)."""

import math

import pytest
import torch

from collafuse.common.config import DiffusionConfig
from collafuse.common.cut import Cut
from collafuse.diffusion.schedule import Scheduler
from collafuse.diffusion.split import ServerMessage, cut_image, recover_cut_image, server_message

S = Scheduler()
NO_CLIP = Scheduler(DiffusionConfig(clip_sample=0.0))


def _alpha_bar_reference() -> list[float]:
    """ᾱ_t of the cosine schedule (Nichol & Dhariwal) with β capped at 0.999, from scratch."""
    f = lambda k: math.cos((k / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    out = [1.0]
    for k in range(1, 101):
        out.append(out[-1] * (1 - min(1 - f(k) / f(k - 1), 0.999)))
    return out


AB = _alpha_bar_reference()


def test_cut_level_is_round_c_times_T():
    d = DiffusionConfig(levels=100)
    assert [d.cut(c).t_c for c in (0, 0.2, 0.6, 0.8, 1.0)] == [0, 20, 60, 80, 100]
    assert DiffusionConfig(levels=10).cut(0.25) == Cut(2, 10)  # round half to even is fine; 2.5 → 2
    assert [(c.local_model, c.uses_server) for c in (d.cut(0), d.cut(0.6), d.cut(1))] == [(False, True), (True, True), (True, False)]


@pytest.mark.parametrize("ratio", [-0.01, 1.01, float("nan"), float("inf"), True, "0.5"])
def test_a_cut_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ValueError, match="cut ratio"):
        DiffusionConfig().cut(ratio)


@pytest.mark.parametrize("t_c,levels", [(-1, 100), (101, 100), (0, 0), (True, 100), (60.0, 100), (60, None)])
def test_a_cut_outside_its_chain_is_refused(t_c, levels):
    with pytest.raises(ValueError):
        Cut(t_c, levels)


def test_cosine_schedule_shape():
    a = S.alpha_bar
    assert a[0] == 1.0 and len(a) == 101
    assert bool((a[1:] < a[:-1]).all())
    assert max(abs(float(a[t]) - AB[t]) for t in range(101)) < 1e-15


def test_two_stage_noising_has_the_marginal_q_xt_given_x0():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 1, 4, 4, generator=g) * 2 - 1
    n, t_c = 40000, 40
    x_tc = cut_image(S, x0.expand(n, -1, -1, -1).contiguous(), Cut(t_c, 100), torch.randn(n, 1, 4, 4, generator=g))
    msg = server_message(S, x_tc, Cut(t_c, 100), g)
    for level in (45, 70, 100):
        sel = msg.t == level
        a = float(S.alpha_bar[level])
        z = (msg.x_t[sel] - math.sqrt(a) * x0) / math.sqrt(1 - a)  # should be N(0, I), i.i.d.
        m = sel.sum().item()
        se = 1 / math.sqrt(m * 16)
        assert abs(z.mean().item()) < 5 * se
        assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
        assert abs((z**4).mean().item() - 3) < 0.25  # Gaussian kurtosis
        flat = z.reshape(m, 16)
        corr = torch.corrcoef(flat.T) - torch.eye(16)
        assert corr.abs().max().item() < 6 / math.sqrt(m)
    assert int(msg.t.min()) == t_c + 1 and int(msg.t.max()) == 100


def test_message_depends_on_x0_only_through_x_tc():
    g = torch.Generator().manual_seed(2)
    t_c = 30
    cut = Cut(t_c, 100)
    a_c = S.alpha_bar[t_c].item()
    x0_a = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    x0_b = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    x_tc = cut_image(S, x0_a, cut, torch.randn(2, 1, 8, 8, generator=g))
    eps1_b = (x_tc - math.sqrt(a_c) * x0_b) / math.sqrt(1 - a_c)  # reaches the same x_{t_c} from x0_b
    assert torch.allclose(x_tc, cut_image(S, x0_b, cut, eps1_b), atol=1e-5)
    m_a = server_message(S, x_tc, cut, torch.Generator().manual_seed(9))
    m_b = server_message(S, cut_image(S, x0_b, cut, eps1_b), cut, torch.Generator().manual_seed(9))
    assert torch.allclose(m_a.x_t, m_b.x_t, atol=1e-5)
    assert torch.equal(m_a.eps, m_b.eps) and torch.equal(m_a.t, m_b.t) and torch.equal(m_a.t_c, m_b.t_c)
    # The server recovers x_{t_c}, and that is all: x0_a and x0_b are indistinguishable.
    assert torch.allclose(recover_cut_image(S, m_a), x_tc, atol=1e-3)
    assert set(ServerMessage.__dataclass_fields__) == {"x_t", "t", "t_c", "eps"}


def test_eps2_is_not_the_noise_relative_to_x0():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    msg = server_message(S, cut_image(S, x0, Cut(50, 100), torch.randn(64, 1, 8, 8, generator=g)), Cut(50, 100), g)
    a = S.alpha_bar[msg.t].float().view(-1, 1, 1, 1)
    naive = (msg.x_t - (1 - a).sqrt() * msg.eps) / a.sqrt()  # the paper's Figure 2 attack
    assert (naive - x0).pow(2).mean().item() > 0.05


# ---- sampling across the cut: the unsplit chain, from scratch in float64 ---------------------------
MU, SD = -0.2, 0.3  # Gaussian data x₀ ~ N(MU, SD²) per pixel: the exact denoiser is known


def _exact_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """E[ε | x_t] of the unsplit chain for Gaussian data (float64)."""
    a = AB[t]
    return math.sqrt(1 - a) * (x - math.sqrt(a) * MU) / (a * SD**2 + 1 - a)


def _exact_eps_b(x: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """E[ε_b | x_t], what a perfect server model predicts: the noise relative to x_b. From the
    split's own definition x_t = √(ᾱ_t/ᾱ_b)·x_b + √(1−ᾱ_t/ᾱ_b)·ε_b with x_b ~ N(√ᾱ_b·MU, ᾱ_b·SD² + 1 − ᾱ_b):
    E[ε_b | x_t] = √(1−ᾱ')·(x_t − E x_t)/Var x_t, written without any reference to ε."""
    out = torch.empty_like(x)
    for i, (ti, bi) in enumerate(zip(t.tolist(), base.tolist())):
        a_b, a_t = AB[bi], AB[ti]
        rebased = a_t / a_b
        var_b = a_b * SD**2 + 1 - a_b
        var_t = rebased * var_b + 1 - rebased
        out[i] = math.sqrt(1 - rebased) * (x[i] - math.sqrt(rebased) * math.sqrt(a_b) * MU) / var_t
    return out


def _unsplit_ddim_step(x: torch.Tensor, t: int, s: int, eta: float, z: torch.Tensor) -> torch.Tensor:
    """Song et al.'s DDIM step t → s of the unsplit chain, with the exact ε (no clipping)."""
    a_t, a_s = AB[t], AB[s]
    eps = _exact_eps(x, t)
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
    return math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma**2) * eps + sigma * z


def test_split_ddim_equals_unsplit_ddim_for_every_eta():
    """The server (base t_c) and the unsplit chain walk the same levels from the same x_T with the
    same noise: equal to float64 precision for η = 0, 0.5 and 1."""
    g = torch.Generator().manual_seed(4)
    for t_c in (20, 60, 80):
        path = S.timesteps(100, t_c, 7)
        for eta in (0.0, 0.5, 1.0):
            x_split = x_ref = torch.randn(64, 1, 4, 4, dtype=torch.float64, generator=g)
            for t, s in zip(path, path[1:]):
                z = torch.randn(x_ref.shape, dtype=torch.float64, generator=g)
                tt, ss, bb = (torch.full((64,), v) for v in (t, s, t_c))
                x_split = NO_CLIP.step(_exact_eps_b(x_split, tt, bb), tt, ss, x_split, bb, eta, z)
                x_ref = _unsplit_ddim_step(x_ref, t, s, eta, z)
            assert (x_split - x_ref).abs().max().item() < 1e-11, (t_c, eta)


def test_ancestral_step_is_the_unsplit_ddpm_step():
    """η = 1, s = t − 1: the mean is the DDPM posterior mean of the original chain (whatever the
    base) and the noise is its posterior variance (Ho et al., eq. 6–7)."""
    for b in (0, 20, 60, 99):
        ts = torch.arange(b + 1, 101)
        c = S.step_coefficients(ts, ts - 1, torch.full_like(ts, b), 1.0)
        for i, t in enumerate(ts.tolist()):
            beta = 1 - AB[t] / AB[t - 1]
            assert math.isclose(c["A"][i].item(), math.sqrt(AB[t - 1]) * beta / (1 - AB[t]), rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(c["B"][i].item(), math.sqrt(1 - beta) * (1 - AB[t - 1]) / (1 - AB[t]), rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(c["sigma"][i].item() ** 2, (1 - AB[t - 1]) / (1 - AB[t]) * beta, rel_tol=1e-9, abs_tol=1e-15)
            # x̂₀ from the server's ε̂_b: √(1−ᾱ_t)·ε̂ with ε̂ = √((1−ᾱ_t)/(1−ᾱ_t/ᾱ_b))·ε̂_b
            assert math.isclose(c["eps_scale"][i].item(), (1 - AB[t]) / math.sqrt(1 - AB[t] / AB[b]), rel_tol=1e-9)


def test_server_ancestral_chain_matches_unsplit_ddpm_at_the_cut():
    """The server's chain T → t_c through the batched sampler (float32, its counter noise) has the
    spread of unsplit DDPM over the same levels, computed exactly in float64 for Gaussian data:
    DDPM's own discretisation error (a few % below the forward marginal) included, not hidden."""
    from collafuse.engine.sampler import BatchedSampler, SampleJob

    for t_c in (20, 60):
        out = BatchedSampler(_exact_eps_b_float, NO_CLIP, (1, 32, 32), 256).run([SampleJob("j", 256, 100, t_c, seed=t_c)])["j"]
        mean, var = 0.0, 1.0  # x_T ~ N(0, 1); each DDPM step is linear in x plus Gaussian noise
        for t in range(100, t_c, -1):
            a_t, a_s = AB[t], AB[t - 1]
            beta = 1 - a_t / a_s
            # x̂₀ is linear in x_t for the exact Gaussian denoiser: x̂₀ = p·x_t + q
            p = math.sqrt(a_t) * SD**2 / (a_t * SD**2 + 1 - a_t)
            q = MU * (1 - a_t) / (a_t * SD**2 + 1 - a_t)
            A, B = math.sqrt(a_s) * beta / (1 - a_t), math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)
            mean, var = (A * p + B) * mean + A * q, (A * p + B) ** 2 * var + (1 - a_s) / (1 - a_t) * beta
        marginal_sd = math.sqrt(AB[t_c] * SD**2 + 1 - AB[t_c])
        assert abs(out.mean().item() - mean) < 0.01
        assert abs(out.std().item() - math.sqrt(var)) < 0.006, (t_c, out.std().item(), math.sqrt(var))
        assert math.sqrt(var) < marginal_sd  # DDPM's discretisation error, which the old test's tolerance hid


def _exact_eps_b_float(x, t, base):
    return _exact_eps_b(x.double(), t, base).float()


def test_timesteps():
    assert S.timesteps(100, 60, None) == list(range(100, 59, -1))
    p = S.timesteps(100, 60, 4)
    assert p[0] == 100 and p[-1] == 60 and len(p) == 5 and p == sorted(p, reverse=True)
    assert S.timesteps(60, 60, None) == [60]
