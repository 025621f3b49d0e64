"""Short training runs lower both parties' losses; checkpoints round-trip; simulate end to end."""

import json
import subprocess
import sys

import msgpack
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
        server_losses.append(server.train_step(msgs).loss)
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
    # client1 (c = 1) never talks to the server; client0's secret is bound to its cut and data
    assert sorted(p.name for p in (out / "secrets").iterdir()) == ["client0.key", "client0.views.json"]
    secret = (out / "secrets" / "client0.key").read_bytes()
    proc = subprocess.run([*base, "--steps", "6", "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 4
    assert (out / "secrets" / "client0.key").read_bytes() == secret  # resume keeps the secret
    other_cut = [a if a != "0.6,1.0" else "0.4,1.0" for a in base]  # the same secret at another cut: two solvable views
    proc = subprocess.run([*other_cut, "--steps", "8", "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "with t_c=60; this run asks for t_c=40" in proc.stderr, proc.stderr


def test_capped_shares_bound_every_owner_and_keep_proportions_otherwise():
    from collafuse.engine.server import capped_shares

    assert capped_shares({"a": 10, "b": 10, "c": 20}, 0.5) == {"a": 0.25, "b": 0.25, "c": 0.5}
    shares = capped_shares({"flood": 90, "a": 5, "b": 5}, 0.5)
    assert shares["flood"] == 0.5 and abs(shares["a"] - 0.25) < 1e-12 and abs(sum(shares.values()) - 1) < 1e-12
    shares = capped_shares({"flood": 97, "a": 1, "b": 2}, 0.4)  # a second owner is capped once the first is
    assert max(shares.values()) <= 0.4 + 1e-12 and abs(sum(shares.values()) - 1) < 1e-12
    assert capped_shares({"alone": 7}, 0.5) == {"alone": 1.0}  # too few owners for the cap: proportional


def _message(rows, t_c=40, seed=0, eps_scale=1.0):
    from collafuse.diffusion.split import ServerMessage

    g = torch.Generator().manual_seed(seed)
    t = torch.randint(t_c + 1, 101, (rows,), generator=g)
    return ServerMessage(torch.randn(rows, 1, 32, 32, generator=g), t, torch.full((rows,), t_c), torch.randn(rows, 1, 32, 32, generator=g) * eps_scale)


def test_guarded_step_refuses_hostile_rows_and_applies_the_rest():
    """Rows that slipped past the wire's checks (here: ε₂ of scale 50, NaN) are refused by the trainer's
    own loss bound; the honest message's step is exactly the step it would get alone."""
    honest = _message(8)
    alone, guarded = ServerParty((1, 32, 32), seed=3), ServerParty((1, 32, 32), seed=3)
    expected = alone.train_step([honest], ["h"])
    nan = _message(4, seed=2)
    nan.x_t[0, 0, 0, 0] = float("nan")
    outcome = guarded.train_step([_message(4, seed=1, eps_scale=50.0), honest, nan], ["m", "h", "m"])
    assert set(outcome.refused) == {0, 2} and "bound" in outcome.refused[0] and "not finite" in outcome.refused[2]
    assert outcome.loss is not None and abs(outcome.loss - expected.loss) < 1e-6 and guarded.step == alone.step == 1
    for a, b in zip(alone.model.parameters(), guarded.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    only_hostile = guarded.train_step([_message(4, seed=1, eps_scale=50.0)], ["m"])
    assert only_hostile.loss is None and guarded.step == 1  # nothing applied, nothing counted
    assert all(torch.isfinite(p).all() for p in guarded.model.parameters())


def test_one_client_weighs_at_most_its_share_of_a_step():
    """Two honest clients and a flooding one: the step equals one where the flood's rows carry half."""
    a, b, flood = _message(4, seed=1), _message(4, seed=2), _message(24, seed=3)
    capped, manual = ServerParty((1, 32, 32), seed=5), ServerParty((1, 32, 32), seed=5)
    capped.train_step([a, b, flood], ["a", "b", "flood"])
    from collafuse.diffusion.split import ServerMessage, row_losses

    merged = ServerMessage(*(torch.cat([getattr(m, f) for m in (a, b, flood)]) for f in ("x_t", "t", "t_c", "eps")))
    weights = torch.cat([torch.full((4,), 0.25 / 4), torch.full((4,), 0.25 / 4), torch.full((24,), 0.5 / 24)])
    manual.model.train()
    loss = (row_losses(manual.model, merged) * weights).sum()
    manual.optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(manual.model.parameters(), manual.train_config.grad_clip)
    manual.optimizer.step()
    for p, q in zip(capped.model.parameters(), manual.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_the_trainers_memory_of_applied_jobs_is_per_client(monkeypatch):
    """A durability attack: 40 acknowledged jobs of one node, then 4,100 of 41 busy nodes (about one
    checkpoint interval of theirs), then the first node replays after a crash. With one memory of
    4,096 jobs for all clients its jobs were forgotten and applied twice; per client they are kept,
    with the same ack. A client's own later jobs push its oldest out (ACKS_PER_CLIENT); beyond
    ACKS_TOTAL whole clients go, least recently applied first, never one with a held ack; a
    checkpoint's copy restores the same memory, also from the older format that kept the acks."""
    from collafuse.protocol import wire
    from collafuse.worker import training
    from collafuse.worker.training import ACKS_PER_CLIENT, TrainBatcher

    def ack(client, job, step=1):
        return wire.encode("ack", job=job, client=client, step=step, loss=0.25)

    batcher = TrainBatcher(64, 0.0)
    for i in range(40):
        batcher.remember({"client": "victim", "job": f"v{i:02d}"}, ack("victim", f"v{i:02d}", i), hold=False)
    for i in range(4100):
        batcher.remember({"client": f"busy{i % 41}", "job": f"b{i}"}, ack(f"busy{i % 41}", f"b{i}"), hold=False)
    assert all(batcher.ack_of({"client": "victim", "job": f"v{i:02d}"}) == ack("victim", f"v{i:02d}", i) for i in range(40))
    batcher.remember({"client": "victim", "job": "held"}, ack("victim", "held"), hold=True)
    for i in range(40, 40 + ACKS_PER_CLIENT):
        batcher.remember({"client": "victim", "job": f"v{i:02d}"}, ack("victim", f"v{i:02d}"), hold=False)
    kept = batcher.applied["victim"]
    assert "held" in kept and "v00" not in kept and len(kept) == ACKS_PER_CLIENT
    assert batcher.total == sum(len(j) for j in batcher.applied.values())
    restored = TrainBatcher(64, 0.0)
    restored.restore(batcher.applied_tensor())
    assert restored.applied == batcher.applied and restored.total == batcher.total
    old_format = msgpack.packb([[c, j, ack(c, j, s)] for c, jobs in batcher.applied.items() for j, (s, _) in jobs.items()], use_bin_type=True)
    older = TrainBatcher(64, 0.0)
    older.restore(torch.frombuffer(bytearray(old_format), dtype=torch.uint8))
    assert older.applied == batcher.applied
    monkeypatch.setattr(training, "ACKS_TOTAL", 1000)
    for i in range(100):
        batcher.remember({"client": f"other{i}", "job": "x"}, ack(f"other{i}", "x"), hold=False)
    assert batcher.total <= 1000 and "busy0" not in batcher.applied and "victim" in batcher.applied and "other99" in batcher.applied
    assert batcher.total == sum(len(j) for j in batcher.applied.values())
    monkeypatch.setattr(training, "ACK_CLIENTS", 50)
    batcher.remember({"client": "last", "job": "x"}, ack("last", "x"), hold=False)
    assert len(batcher.applied) == 50 and "victim" in batcher.applied  # clients capped too (a checkpoint packs a row each)
    held = TrainBatcher(64, 0.0)
    for i in range(ACKS_PER_CLIENT + 10):  # more held acks than a client keeps: none is dropped, nor by a restore (a group's sync)
        held.remember({"client": "h", "job": f"h{i}"}, ack("h", f"h{i}"), hold=True)
    held.restore(held.applied_tensor())
    assert all(held.ack_of({"client": "h", "job": f"h{i}"}) for i in range(ACKS_PER_CLIENT + 10))


def test_a_node_refuses_a_replay_longer_than_the_trainer_remembers(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli.node", "join", "--name", "n", "--cut-ratio", "0.6", "--steps", "1",
                           "--checkpoint-every", "300", "--state", str(tmp_path / "n"), "--broker", "tcp://127.0.0.1:1", "--insecure",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--checkpoint-every 300 plus --window 4 is above the 256 train jobs" in proc.stderr
