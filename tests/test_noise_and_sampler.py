"""Counter-based noise and the continuous-batching sampler."""

import math

import torch

from collafuse.common.config import SamplerConfig
from collafuse.common.cut import Cut
from collafuse.diffusion.models import build_unet
from collafuse.diffusion.noise import row_keys, row_noise
from collafuse.engine.sampler import BatchedSampler, SampleJob
from collafuse.diffusion.schedule import Scheduler
from collafuse.engine.client import ClientParty
from collafuse.engine.server import ServerParty

S = Scheduler()
SHAPE = (1, 32, 32)


def test_row_noise_is_standard_normal_and_deterministic():
    keys = row_keys(7, 0, 256)
    z = row_noise(keys, torch.full((256,), 50), (1, 16, 16))
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 0.02
    assert torch.equal(z, row_noise(keys, torch.full((256,), 50), (1, 16, 16)))
    assert not torch.allclose(z, row_noise(keys, torch.full((256,), 49), (1, 16, 16)))
    assert torch.equal(z[10:20], row_noise(row_keys(7, 10, 10), torch.full((10,), 50), (1, 16, 16)))
    assert torch.corrcoef(torch.stack([z[0].flatten(), z[1].flatten()]))[0, 1].abs() < 0.25


def _server():
    torch.manual_seed(0)
    return ServerParty(SHAPE, "tiny")


def test_results_do_not_depend_on_batch_composition():
    server = _server()
    cfg = SamplerConfig()
    alone = server.sampler(64).run([server.denoise_job("a", 5, Cut(60, 100), seed=11, sampler=cfg)])["a"]
    crowd = server.sampler(3).run(  # rows split across iterations, mixed with other jobs and cut ratios
        [
            server.denoise_job("x", 4, Cut(20, 100), seed=3, sampler=cfg),
            server.denoise_job("a", 5, Cut(60, 100), seed=11, sampler=cfg),
            server.denoise_job("y", 2, Cut(0, 100), seed=4, sampler=cfg),
        ]
    )
    assert torch.allclose(alone, crowd["a"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(crowd["a"][0], crowd["a"][1])


def test_continuous_batching_admits_and_retires_between_iterations():
    server = _server()
    engine = server.sampler(4)
    cfg = SamplerConfig()
    engine.submit(server.denoise_job("short", 2, Cut(95, 100), seed=1, sampler=cfg))  # 5 steps
    engine.submit(server.denoise_job("long", 4, Cut(50, 100), seed=2, sampler=cfg))  # 50 steps
    order = []
    while not engine.idle():
        batch = engine.active_rows
        for job in engine.iterate():
            order.append((job.job_id, engine.iterations))
        assert batch <= 4
    assert order[0] == ("short", 5)
    assert order[1][0] == "long"
    assert engine.rows_processed == 2 * 5 + 4 * 50


def test_samplers_keep_shapes_stay_finite_and_honour_the_cut():
    server = _server()
    data = torch.rand(8, *SHAPE) * 2 - 1
    for kind in ("ancestral", "ddim"):
        cfg = SamplerConfig(kind=kind, ddim_steps=10)
        for c in (0.0, 0.4, 1.0):
            client = ClientParty("c", c, data)
            x_tc = None
            if client.cut.uses_server:
                x_tc = server.sampler(16).run([server.denoise_job("j", 3, client.cut, 5, cfg)])["j"]
                assert x_tc.shape == (3, *SHAPE) and torch.isfinite(x_tc).all()
            out = client.finish(x_tc, 3, 5, cfg)
            assert out.shape == (3, *SHAPE) and torch.isfinite(out).all()
            assert out.abs().max() <= 1.0
            if c == 0.0:
                assert client.model is None and torch.equal(out, x_tc.clamp(-1, 1))
            if c == 1.0:
                assert not client.cut.uses_server and client.cut.t_c == 100


def test_client_with_cut_one_never_needs_the_server_and_zero_needs_no_model():
    data = torch.rand(4, *SHAPE)
    assert ClientParty("local", 1.0, data).model is not None
    assert ClientParty("server-only", 0.0, data).model is None


def test_server_last_step_lands_on_the_cut_level_with_the_chains_noise():
    """The final step 61 → 60 is the unsplit DDPM step: x̂₀ from the server's ε̂₂ scaled to the
    original chain's ε̂, clipped to the data range, the posterior mean, and its noise."""
    server = _server()
    engine = server.sampler(8)
    x = torch.randn(2, *SHAPE)
    job = SampleJob("j", 2, 61, 60, seed=0, x_start=x)
    eps2 = server.eps(x, torch.tensor([61, 61]), torch.tensor([60, 60])).float()
    g61, g60 = float(S.alpha_bar[61]), float(S.alpha_bar[60])
    eps = math.sqrt((1 - g61) / (1 - g61 / g60)) * eps2
    x0 = ((x - math.sqrt(1 - g61) * eps) / math.sqrt(g61)).clamp(-1, 1)
    beta = 1 - g61 / g60
    expected = math.sqrt(g60) * beta / (1 - g61) * x0 + math.sqrt(1 - beta) * (1 - g60) / (1 - g61) * x
    sigma = math.sqrt((1 - g60) / (1 - g61) * beta)
    residual = engine.run([job])["j"] - expected
    assert abs(residual.std().item() - sigma) < 0.1 * sigma
    assert abs(residual.mean().item()) < 0.1 * sigma


def test_sampler_rejects_wrong_start_shape():
    model = build_unet("tiny", 32, conditioned_on_cut=False)
    engine = BatchedSampler(lambda x, t, b: model(x, t).sample, S, SHAPE, 4)
    try:
        engine.submit(SampleJob("j", 2, 10, 0, 0, x_start=torch.zeros(2, 1, 16, 16)))
    except ValueError as exc:
        assert "shape" in str(exc)
    else:
        raise AssertionError("wrong shape accepted")
