"""Short training runs lower both parties' losses; checkpoints round-trip; simulate end to end."""

import json
import subprocess
import sys

import torch
from safetensors import safe_open

from collafuse.common.config import TrainConfig
from collafuse.diffusion.cutnoise import CutNoise
from collafuse.engine.checkpoint import load_checkpoint, save_checkpoint
from collafuse.diffusion.models import build_unet, parameter_count
from collafuse.engine.client import ClientParty
from collafuse.engine.server import ServerParty


def test_paper_preset_has_about_3_9_million_parameters():
    n = parameter_count(build_unet("paper", 128, conditioned_on_cut=True))
    assert 3.7e6 < n < 4.1e6


def test_short_run_lowers_client_and_server_loss(mni_data):
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=16)
    clients = [ClientParty(f"c{i}", 0.5, mni_data.clients[i], train=cfg, seed=i, cut_noise=CutNoise(bytes([i]) * 32)) for i in range(2)]
    server = ServerParty((1, 32, 32), train=cfg)
    client_losses, server_losses = [], []
    for _ in range(40):
        msgs = []
        for c in clients:
            batch = c.batch()
            client_losses.append(c.train_local(batch.x0))
            msgs.append(c.server_message(batch))
        server_losses.append(server.train_step(msgs))
    first, last = sum(client_losses[:10]) / 10, sum(client_losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert sum(server_losses[-5:]) / 5 < 0.6 * sum(server_losses[:5]) / 5


def test_checkpoint_round_trip_is_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_unet("tiny", 32, conditioned_on_cut=True)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 32, 32), torch.tensor([3, 4]), class_labels=torch.tensor([1, 2])).sample.mean().backward()
    opt.step()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, opt, {"step": 7})
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file, no pickle
        assert any(k.startswith("optim.") for k in f.keys())
    torch.manual_seed(1)
    other = build_unet("tiny", 32, conditioned_on_cut=True)
    other_opt = torch.optim.Adam(other.parameters())
    assert load_checkpoint(path, other, other_opt)["step"] == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert not (tmp_path / "ck.safetensors.tmp").exists()


def test_simulate_cli_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "collafuse.cli", "simulate", "--out", str(out), "--clients", "2", "--cut-ratio", "0.6,1.0",
            "--images-per-client", "16", "--batch-size", "4", "--samples", "2", "--sampler", "ddim", "--ddim-steps", "6"]
    proc = subprocess.run([*base, "--steps", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[simulate] 4/4" in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert [c["t_c"] for c in m["clients"]] == [60, 100]
    assert set(m["losses"]) == {"client0", "client1", "server"}
    assert (out / "samples.png").stat().st_size > 0
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"client0.safetensors", "client1.safetensors", "server.safetensors",
                                                                "sent_rows.safetensors"}
    assert [p.name for p in (out / "secrets").iterdir()] == ["client0.key"]  # client1 (c = 1) never talks to the server
    secret = (out / "secrets" / "client0.key").read_bytes()
    proc = subprocess.run([*base, "--steps", "6", "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 4
    assert (out / "secrets" / "client0.key").read_bytes() == secret  # resume keeps the secret
