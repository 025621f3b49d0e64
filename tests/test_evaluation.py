"""KID equal to clean-fid's, the privacy audit's attacks on known answers, energy, and a resumable sweep."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.evaluation.attacks import (
    auc,
    linear_attack,
    multiview_attack,
    nearest_mse,
    reconstruction_scores,
    reidentification,
    tpr_at_fpr,
)
from collafuse.common.energy import PhaseEnergy
from collafuse.evaluation.kid import CLEANFID_CACHE, EvaluationError, InceptionFeatures, inception_weights, kernel_distance, verify_weights


@pytest.fixture(scope="module")
def features():
    return InceptionFeatures()


@pytest.fixture
def cleanfid_weights():
    """clean-fid loads /tmp/inception-2015-12-05.pt and downloads it when missing; offline we give it
    the network of our pinned file, so that the test compares the two pipelines (resizing, feature
    layers, subset draws, kernel), and take it away again if we made it."""
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


def test_our_kid_equals_clean_fids_on_two_folders_of_unequal_size(tmp_path, features, cleanfid_weights):
    from cleanfid import fid

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(13, 1, 32, 32, generator=g) * 2 - 1, (torch.rand(9, 1, 32, 32, generator=g) * 2 - 1) * 0.3
    for name, x in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(InceptionFeatures.to_uint8_rgb(x)):
            Image.fromarray(img).save(tmp_path / name / f"{i:03d}.png")  # clean-fid reads files in name order
    np.random.seed(0)
    theirs = fid.compute_kid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", device=torch.device("cpu"),
                             num_workers=0, use_dataparallel=False, verbose=False)
    np.random.seed(0)
    ours, _ = kernel_distance(features(a), features(b), seed=None)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours > 0.01  # different image sets


def test_kernel_distance_draws_subsets_as_clean_fid_does_on_sets_larger_than_a_subset():
    from cleanfid.fid import kernel_distance as theirs

    rng = np.random.default_rng(5)
    f1, f2 = np.maximum(rng.standard_normal((151, 2048)), 0), np.maximum(rng.standard_normal((127, 2048)) + 0.05, 0)
    for size in (40, 100):  # both sets larger than the subset: every subset is a fresh draw
        np.random.seed(3)
        expected = theirs(f1, f2, num_subsets=50, max_subset_size=size)
        np.random.seed(3)
        ours, std = kernel_distance(f1, f2, num_subsets=50, max_subset_size=size, seed=None)
        assert ours == pytest.approx(expected, rel=1e-9) and std > 0


def test_inception_weights_are_pinned(tmp_path):
    assert verify_weights(inception_weights()).name == "default_1.pt"
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    with pytest.raises(EvaluationError, match="SHA-256") as info:
        verify_weights(fake)
    assert "\n" not in str(info.value)


def test_kid_of_a_set_with_itself_is_near_zero_and_reports_spread(features):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 32, 32, generator=g) * 2 - 1
    fx = features(x)
    same, _ = kernel_distance(fx[:12], fx[12:])
    other, std = kernel_distance(fx, features(-x.abs()), max_subset_size=16)
    assert abs(same) < other and std > 0


# ---- the audit's attacks on known answers ---------------------------------------------------------
def _gaussian_images(n: int, dim: int, rank: int, seed: int, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x₀ = μ + W·z: Gaussian images with a known low-rank covariance W·Wᵀ (returns x₀, μ, W)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(dim, generator=g) - 0.5
    w = torch.randn(dim, rank, generator=g) * scale
    return (mu + torch.randn(n, rank, generator=g) @ w.T).float(), mu, w


def test_cut_zero_discloses_everything():
    x0 = torch.rand(40, 1, 8, 8) * 2 - 1
    truth = torch.arange(40)
    flat = x0.flatten(1)
    assert reconstruction_scores(linear_attack(flat, 1.0), truth, x0)["mse"] < 1e-12
    assert reidentification(flat, 1.0, truth, x0) == 1.0
    assert multiview_attack(flat, 1.0, truth).estimate.equal(flat)


def test_linear_attack_is_the_exact_wiener_estimate_on_gaussian_data():
    """Many views of Gaussian images: the attack's error equals the linear MMSE error that the true
    covariance gives, tr(Σ − a·Σ(aΣ + (1−a)I)⁻¹Σ)/D, and is far below guessing the mean."""
    dim, a = 24, 0.35
    x0, _, w = _gaussian_images(20_000, dim, 3, seed=0)
    g = torch.Generator().manual_seed(1)
    views = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g)
    est = linear_attack(views, a)
    sigma = (w @ w.T).double()
    exact = float(torch.trace(sigma - a * sigma @ torch.linalg.solve(a * sigma + (1 - a) * torch.eye(dim, dtype=torch.float64), sigma))) / dim
    mse = float(((est - x0) ** 2).mean())
    assert mse == pytest.approx(exact, rel=0.05)
    assert mse < 0.5 * float(x0.var(0).mean())


def test_multiview_attack_links_fresh_views_and_beats_one_view_but_gains_nothing_from_keyed_repeats():
    dim, a, images, copies = 64, 0.5, 200, 8
    x0, _, _ = _gaussian_images(images, dim, 6, seed=2, scale=1.0)  # images far apart compared with the noise
    truth = torch.arange(images).repeat_interleave(copies)
    g = torch.Generator().manual_seed(3)
    fresh = math.sqrt(a) * x0[truth] + math.sqrt(1 - a) * torch.randn(images * copies, dim, generator=g)
    linked = multiview_attack(fresh, a, truth)
    one = reconstruction_scores(linear_attack(fresh, a), truth, x0.view(images, 1, 8, 8))["mse"]
    many = reconstruction_scores(linked.estimate, truth, x0.view(images, 1, 8, 8))["mse"]
    assert linked.twins_found > 0.9 and many < 0.6 * one
    keyed_noise = torch.randn(images, dim, generator=g)[truth.div(1, rounding_mode="floor")]  # one draw per image
    keyed = math.sqrt(a) * x0[truth] + math.sqrt(1 - a) * keyed_noise
    keyed_one = reconstruction_scores(linear_attack(keyed, a), truth, x0.view(images, 1, 8, 8))["mse"]
    keyed_many = reconstruction_scores(multiview_attack(keyed, a, truth).estimate, truth, x0.view(images, 1, 8, 8))["mse"]
    assert keyed_many > 0.8 * keyed_one and keyed_many > 2 * many  # identical repeats add nothing


def test_membership_scores_known_answers():
    members, others = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    assert auc(members, others) == 1.0 and auc(others, members) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    assert abs(auc(rng.standard_normal(4000), rng.standard_normal(4000)) - 0.5) < 0.03
    assert tpr_at_fpr(members, np.linspace(0, 2, 200), 0.01) == 1.0
    assert tpr_at_fpr(members, others, 0.01) is None  # 3 non-members cannot show a 1 % rate
    candidates = torch.tensor([[3.0] * 4, [4.0] * 4, [5.0] * 4])
    assert nearest_mse(candidates, torch.tensor([[3.0] * 4, [9.0] * 4])) == pytest.approx((0 + 1 + 4) / 3)


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


def test_sweep_trains_c0_and_c1_once_per_seed():
    """At c = 0 no cut noise is drawn (x_{t_c} = x₀) and at c = 1 nothing is sent: one run each per
    seed serves every cut-noise mode."""
    from pathlib import Path

    from collafuse.tools.sweep import SweepConfig, runs

    cfg = SweepConfig(out=Path("out"), cut_ratios=(0.0, 0.6, 1.0), seeds=(0, 1), cut_noise=("keyed", "fresh"))
    folders = [r.folder(cfg) for r in runs(cfg)]
    assert len(folders) == len(set(folders)) == 2 * 4
    assert sorted({f.parts[1] for f in folders}) == ["fresh", "keyed", "local", "server"]


def test_sweep_writes_tables_and_figure_and_resumes(tmp_path):
    """Two seeds, both cut-noise modes: runs in MODE/seedS/cC, c = 1 shared by the modes, the audit in
    each run, mean ± std over seeds in the table, and a second call recomputes nothing."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "collafuse.cli", "sweep", "--out", str(out), "--cut-ratios", "0.6,1", "--clients", "2",
           "--seeds", "0,1", "--cut-noise", "keyed,fresh", "--steps", "2", "--batch-size", "4", "--samples", "4",
           "--real-images", "8", "--nonmembers", "16", "--in-process", "--device", "cpu"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "CODECARBON_LOG_LEVEL": "error"})
    assert first.returncode == 0, first.stderr
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2 * 3 and rows[0].startswith("cut_noise,seed,cut_ratio,t_c,client,kid_client")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fresh", "keyed", "local"]
    table = (out / "results.md").read_text()
    assert "| keyed | 0.6 | 60 | 2 |" in table and "| local | 1.0 | 100 | 2 |" in table and " ± " in table
    assert (out / "figure.png").stat().st_size > 10_000
    done = json.loads((out / "keyed" / "seed1" / "c0.60" / "evaluation.json").read_text())
    assert done[0]["linear_mse"] > 0 and 0 <= done[0]["multiview_reid_top1"] <= 1 and 0 <= done[0]["mi_loss_auc"] <= 1
    audit = json.loads((out / "fresh" / "seed0" / "c0.60" / "audit.json").read_text())
    assert audit["cut_noise"] == "fresh" and audit["clients"][0]["views"] == 2 * 4
    assert math.isnan(json.loads((out / "local" / "seed0" / "c1.00" / "evaluation.json").read_text())[0]["kid_produced"])
    before = (out / "keyed" / "seed0" / "c0.60" / "evaluation.json").stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "keyed seed 0 c=0.60: already evaluated, not recomputed" in second.stderr
    assert (out / "keyed" / "seed0" / "c0.60" / "evaluation.json").stat().st_mtime_ns == before


def test_audit_cli_on_a_simulate_run(tmp_path):
    run = tmp_path / "run"
    sim = subprocess.run([sys.executable, "-m", "collafuse.cli", "simulate", "--out", str(run), "--clients", "1", "--cut-ratio", "0.2",
                          "--steps", "3", "--batch-size", "8", "--images-per-client", "16", "--samples", "2", "--device", "cpu",
                          "--cut-noise", "fresh"], capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli", "audit", str(run), "--nonmembers", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "client0" in proc.stdout and "membership (loss): AUC" in proc.stdout
    report = json.loads((run / "audit.json").read_text())
    assert report["clients"][0]["views"] == 24 and report["clients"][0]["distinct_views"] == 24  # fresh: every row a new view
    missing = subprocess.run([sys.executable, "-m", "collafuse.cli", "audit", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [f"error: not a finished run folder (no metrics.json): {tmp_path / 'nothing'}"]


def test_sweep_through_the_real_system_measures_node_and_worker_energy(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli", "sweep", "--out", str(out), "--cut-ratios", "0.6", "--clients", "2",
                           "--steps", "2", "--batch-size", "4", "--samples", "4", "--real-images", "8", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "[demo]" in proc.stderr  # broker, worker and nodes as processes
    rows = json.loads((out / "keyed" / "seed0" / "c0.60" / "evaluation.json").read_text())
    assert all(r["local_kwh"] > 0 and r["server_kwh"] > 0 and r["kid_produced"] > 0 for r in rows)
    server = json.loads((out / "keyed" / "seed0" / "c0.60" / "server_energy.json").read_text())
    assert server["phases"]["server_training"]["seconds"] > 0 and server["stats"]["train_steps"] > 0


def test_packed_runs_travel_and_are_evaluated_from_disk(tmp_path):
    """`sweep --pack` (the GPU machine's half) then runpack + `sweep` (the evaluation here): the sweep
    evaluates and audits the restored run instead of training again, and the images survive within 1/255."""
    from safetensors.torch import load_file

    sweep = [sys.executable, "-m", "collafuse.cli", "sweep", "--in-process", "--cut-ratios", "0.6", "--clients", "2", "--steps", "2",
             "--batch-size", "4", "--samples", "4", "--real-images", "8", "--nonmembers", "8", "--device", "cpu"]
    env = {**os.environ, "CODECARBON_LOG_LEVEL": "error"}
    gen = subprocess.run([*sweep, "--out", str(tmp_path / "gpu"), "--pack", str(tmp_path / "packs")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert gen.returncode == 0, gen.stderr
    assert [p.name for p in (tmp_path / "packs").iterdir()] == ["keyed-seed0-c0.60.safetensors"]
    ran = tmp_path / "gpu" / "keyed" / "seed0" / "c0.60"
    assert not (ran / "evaluation.json").exists()  # nothing evaluated there
    here = tmp_path / "here"
    unpack = subprocess.run([sys.executable, "-m", "collafuse.tools.runpack", str(tmp_path / "packs"), "--out", str(here)],
                            capture_output=True, text=True, timeout=120)
    assert unpack.returncode == 0, unpack.stderr
    back = here / "keyed" / "seed0" / "c0.60"
    original, restored = load_file(str(ran / "samples.safetensors")), load_file(str(back / "samples.safetensors"))
    assert original.keys() == restored.keys()
    for k in original:
        assert (original[k].clamp(-1, 1) - restored[k]).abs().max() <= 1 / 255 + 1e-6
    assert json.loads((back / "metrics.json").read_text()) == json.loads((ran / "metrics.json").read_text())
    assert (back / "secrets" / "client0.key").read_bytes() == (ran / "secrets" / "client0.key").read_bytes()
    assert (back / "secrets" / "client0.key").stat().st_mode & 0o077 == 0
    evaluate = subprocess.run([*sweep, "--out", str(here)], capture_output=True, text=True, timeout=600, env=env)
    assert evaluate.returncode == 0, evaluate.stderr
    assert "c=0.60: training and generation on disk" in evaluate.stderr and "[simulate]" not in evaluate.stderr
    rows = json.loads((back / "evaluation.json").read_text())
    assert len(rows) == 2 and all(r["linear_mse"] > 0 for r in rows)


def test_pack_needs_the_in_process_layout(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli", "sweep", "--out", str(tmp_path / "s"), "--pack", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--pack needs --in-process" in proc.stderr and "Traceback" not in proc.stderr
