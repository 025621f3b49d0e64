"""The split contract of DESIGN.md §2: marginals, privacy, rebased coefficients."""

import math

import torch

from collafuse.config import DiffusionConfig
from collafuse.core.schedule import CosineSchedule, level_path
from collafuse.core.split import ServerMessage, make_server_message, noise_to_level, recover_cut_image, server_message

S = CosineSchedule()


def test_cut_level_is_round_c_times_T():
    d = DiffusionConfig(levels=100)
    assert [d.cut_level(c) for c in (0, 0.2, 0.6, 0.8, 1.0)] == [0, 20, 60, 80, 100]
    assert DiffusionConfig(levels=10).cut_level(0.25) == 2  # round half to even is fine; 2.5 → 2


def test_cosine_schedule_shape():
    a = S.alpha_bar
    assert a[0] == 1.0 and len(a) == 101
    assert bool((a[1:] < a[:-1]).all())
    # Nichol & Dhariwal: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T+s)/(1+s)·π/2), until β hits its cap
    f = lambda t: math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(a[50]) - f(50) / f(0)) < 1e-12


def test_two_stage_noising_has_the_marginal_q_xt_given_x0():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 1, 4, 4) * 2 - 1
    n, t_c = 40000, 40
    msg = make_server_message(S, x0.expand(n, -1, -1, -1).contiguous(), t_c, g)
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
    a_c = S.alpha_bar[t_c].item()
    x0_a = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    x0_b = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    eps1_a = torch.randn(2, 1, 8, 8, generator=g)
    tc = torch.full((2,), t_c)
    x_tc = noise_to_level(S, x0_a, tc, torch.zeros_like(tc), eps1_a)
    eps1_b = (x_tc - math.sqrt(a_c) * x0_b) / math.sqrt(1 - a_c)  # reaches the same x_{t_c} from x0_b
    x_tc_b = noise_to_level(S, x0_b, tc, torch.zeros_like(tc), eps1_b)
    assert torch.allclose(x_tc, x_tc_b, atol=1e-5)
    t = torch.tensor([31, 90])
    eps2 = torch.randn(2, 1, 8, 8, generator=g)
    m_a, m_b = server_message(S, x_tc, tc, t, eps2), server_message(S, x_tc_b, tc, t, eps2)
    assert torch.allclose(m_a.x_t, m_b.x_t, atol=1e-5)
    assert torch.equal(m_a.eps, m_b.eps) and torch.equal(m_a.t, m_b.t) and torch.equal(m_a.t_c, m_b.t_c)
    # The server recovers x_{t_c} exactly, and that is all: x0_a and x0_b are indistinguishable.
    assert torch.allclose(recover_cut_image(S, m_a), x_tc, atol=1e-4)
    assert set(ServerMessage.__dataclass_fields__) == {"x_t", "t", "t_c", "eps"}


def test_eps2_is_not_the_noise_relative_to_x0():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
    msg = make_server_message(S, x0, 50, g)
    a = S.alpha_bar[msg.t].float().view(-1, 1, 1, 1)
    naive = (msg.x_t - (1 - a).sqrt() * msg.eps) / a.sqrt()  # the paper's Figure 2 attack
    assert (naive - x0).pow(2).mean().item() > 0.05


def _reference_posterior(t: int, b: int):
    """Float64, from scratch: the DDPM posterior q(x_{t-1} | x_t, x_b) under ᾱ' = ᾱ/ᾱ_b, and the
    original chain's posterior variance (the noise the sampler adds)."""
    f = lambda k: math.cos((k / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [None] + [min(1 - f(k) / f(k - 1), 0.999) for k in range(1, 101)]
    ab = lambda k, base: math.prod(1 - betas[j] for j in range(base + 1, k + 1))  # noqa: E731
    a_t, a_tm1, beta = ab(t, b), ab(t - 1, b), betas[t]
    coef_x_b = math.sqrt(a_tm1) * beta / (1 - a_t)
    coef_x_t = math.sqrt(1 - beta) * (1 - a_tm1) / (1 - a_t)
    var_original = (1 - ab(t - 1, 0)) / (1 - ab(t, 0)) * beta
    return var_original, coef_x_b, coef_x_t


def test_rebased_posterior_matches_float64_reference():
    for b in (0, 20, 60, 99):
        ts = torch.arange(b + 1, 101)
        c = S.step_coefficients(ts, ts - 1, torch.full_like(ts, b), 1.0)
        for i, t in enumerate(ts.tolist()):
            var, coef_b, coef_t = _reference_posterior(t, b)
            assert math.isclose(c["sigma"][i].item() ** 2, var, rel_tol=1e-9, abs_tol=1e-15)
            assert math.isclose(c["A"][i].item(), coef_b, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(c["B"][i].item(), coef_t, rel_tol=1e-9, abs_tol=1e-12)


def test_server_sampler_reaches_the_true_marginal_at_the_cut():
    """With the exact denoiser for Gaussian data, the server's ancestral chain T → t_c produces x_{t_c}
    with the forward marginal's mean and spread (not the too-smooth posterior mean)."""
    from collafuse.core.sampler import BatchedSampler, SampleJob

    mu0, s0, b = -0.5, 0.4, 60
    ab = S.alpha_bar

    def exact_eps2(x, t, base):  # E[ε₂ | x_t] for x₀ ~ N(mu0, s0²) i.i.d.
        a_t, a_b = ab[t].float().view(-1, 1, 1, 1), ab[base].float().view(-1, 1, 1, 1)
        noise = (1 - a_t) / (a_t * s0**2 + 1 - a_t) * (x - a_t.sqrt() * mu0)
        return (1 - a_t / a_b).sqrt() / (1 - a_t) * noise

    out = BatchedSampler(exact_eps2, S, (1, 32, 32), 256).run([SampleJob("j", 256, 100, b, seed=0)])["j"]
    a_b = ab[b].item()
    assert abs(out.mean().item() - math.sqrt(a_b) * mu0) < 0.01
    assert abs(out.std().item() - math.sqrt(a_b * s0**2 + 1 - a_b)) < 0.01


def test_level_paths():
    assert level_path(100, 60, None) == list(range(100, 59, -1))
    p = level_path(100, 60, 4)
    assert p[0] == 100 and p[-1] == 60 and len(p) == 5 and p == sorted(p, reverse=True)
    assert level_path(60, 60, None) == [60]
