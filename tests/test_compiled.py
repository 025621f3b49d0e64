"""The compiled server model (torch.compile, inductor) on the CPU: the same ε̂ and the same training
step as eager, weights changed in place seen at the next call, no compilation once warmed up, and a
worker started with --compile that serves the reference result and starts warm from its cache.
(Compiling is slow on a small CPU: minutes cold. The GPU variants are in test_graphs.py.)"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from collafuse.common.config import SamplerConfig
from collafuse.common.cut import Cut
from collafuse.diffusion.split import ServerMessage
from collafuse.engine.server import ServerParty
from collafuse.protocol import tensors
from tests.netclient import RawClient
from tests.test_system import fleet, start_broker, start_worker  # noqa: F401 - fleet is a fixture

pytestmark = pytest.mark.slow
needs_a_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                      reason="inductor compiles CPU kernels with a C++ compiler (g++ or $CXX), not found")


def _message(rows: int, seed: int) -> ServerMessage:
    g = torch.Generator().manual_seed(seed)
    return ServerMessage(torch.randn(rows, 1, 32, 32, generator=g), torch.randint(41, 101, (rows,), generator=g), torch.full((rows,), 40),
                         torch.randn(rows, 1, 32, 32, generator=g))


@needs_a_compiler
def test_compiled_server_model_equals_eager_follows_the_weights_and_never_compiles_once_warm():
    eager = ServerParty((1, 32, 32), "tiny")
    compiled = ServerParty((1, 32, 32), "tiny", compile=True, compile_train=True)  # same seed: same weights
    reports = compiled.warm_up(8, train_rows=8)
    assert [r.what.split(",")[0] for r in reports] == ["denoising forward compiled", "training forward and backward compiled"]
    parts = (compiled._compiled_eps, compiled._compiled_model)
    for part in parts:  # every call below must run compiled code: a shape the warm-up missed raises instead of running eagerly
        part.stance = "fail_on_recompile"
    forward = compiled.denoiser(8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in (1, 3, 8):  # batch 1 runs eagerly
            x, t = torch.randn(n, 1, 32, 32, generator=g), torch.randint(41, 101, (n,), generator=g)
            assert torch.allclose(forward(x, t, torch.full((n,), 40)), eager.eps(x, t, torch.full((n,), 40)), atol=1e-4, rtol=1e-4)
    for step in range(2):  # the training forward and backward, compiled, give eager's loss and update
        a, b = eager.train_step([_message(6, step)]), compiled.train_step([_message(6, step)])
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert max(float((p - q).detach().abs().max()) for p, q in zip(eager.model.parameters(), compiled.model.parameters())) < 1e-3
    x, t, tc = torch.randn(5, 1, 32, 32, generator=g), torch.randint(41, 101, (5,), generator=g), torch.full((5,), 40)
    with torch.no_grad():
        assert torch.allclose(forward(x, t, tc), compiled.eps(x, t, tc), atol=1e-4, rtol=1e-4)  # after the optimiser's steps
        compiled.model.load_state_dict({k: v * 0.5 for k, v in compiled.model.state_dict().items()})  # as a relay loads weights
        assert torch.allclose(forward(x, t, tc), compiled.eps(x, t, tc), atol=1e-4, rtol=1e-4)
    for part in parts:
        part.settle()
    graphs = counters["stats"]["unique_graphs"]
    out = forward(x, t, tc)  # with gradients (the warm-up compiled without): runs eagerly, no compilation in serving
    assert out.requires_grad and counters["stats"]["unique_graphs"] == graphs


@needs_a_compiler
def test_a_compiled_worker_serves_the_reference_result_and_starts_warm_from_its_cache(fleet, tmp_path):  # noqa: F811
    cache = tmp_path / "compile-cache"
    front, back = start_broker(fleet)
    reference = ServerParty((1, 32, 32), "tiny", seed=0)
    sampler = SamplerConfig(kind="ddim", ddim_steps=10, eta=0.0)
    expected = reference.sampler(8).run([reference.denoise_job("j", 3, Cut(60, 100), 7, sampler)])["j"].numpy()
    logs = []
    for run in ("cold", "warm"):
        start_worker(fleet, back, front, run, "--no-train", "--compile", "--compile-cache", str(cache), "--max-batch", "8", timeout=600)
        client = RawClient(front, f"client-{run}")
        try:
            client.hello()
            client.denoise(f"job-{run}", count=3, t_c=60, steps=10, seed=7)
            env, frames = client.recv(timeout=60)
        finally:
            client.close()
        assert env["type"] == "result", env
        got = tensors.decode(frames[0], None, 1 << 26)["x"]
        assert np.abs(got - expected).max() < 5e-3 and np.abs(got - expected).mean() < 1e-4  # fused kernels round differently
        assert fleet.stop(run) == 0
        logs.append((fleet.logs / f"{run}.log").read_text())
    cold, warm = logs
    assert f"artifacts in {cache}" in cold
    assert "denoising forward compiled:" in cold and "(cold: 0 graphs from the cache" in cold
    assert "denoising forward compiled:" in warm and "compiled now" in warm and "(warm:" in warm and ", 0 compiled now)" in warm
    assert any(cache.rglob("*")), "the cache folder holds the artifacts"


def test_a_worker_whose_model_fails_to_compile_serves_it_eagerly(fleet, tmp_path, monkeypatch):  # noqa: F811
    """No C++ compiler for inductor's CPU kernels: the worker says so and serves the eager model."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)  # or inductor would install one
    front, back = start_broker(fleet)
    start_worker(fleet, back, front, "w", "--no-train", "--compile", "--compile-cache", str(tmp_path / "cache"), "--max-batch", "8",
                 timeout=600)
    client = RawClient(front, "client")
    try:
        client.hello()
        client.denoise("job", count=2, t_c=60, steps=10, seed=7)
        env, _ = client.recv(timeout=60)
    finally:
        client.close()
    assert env["type"] == "result", env
    log = (fleet.logs / "w.log").read_text()
    assert "warming up the compiled model failed" in log and "serving the eager model" in log and "Traceback" not in log
    assert "(cold:" not in log  # nothing was compiled after all
