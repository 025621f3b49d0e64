"""The secret, keyed cut noise ε₁ (DESIGN.md §2): one x_{t_c} per image, unpredictable to a server
that knows the code and the node's seed."""

import math
import os
import stat
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from collafuse.common.config import DataConfig, NodeConfig, TrainConfig
from collafuse.common.cut import Cut
from collafuse.diffusion.cutnoise import CutNoise, image_ids, keyed_normal, load_secret, views, views_path
from collafuse.engine.checkpoint import save_checkpoint
from collafuse.node.join import checkpoint_path, open_secret
from collafuse.diffusion.schedule import Scheduler
from collafuse.diffusion.split import recover_cut_image
from collafuse.engine.client import ClientParty, _message_seed, client_seed

S = Scheduler()
SECRET = bytes(range(32))


def test_keyed_normal_is_standard_normal_deterministic_and_key_separated():
    z = keyed_normal(b"k1", 200_001)
    assert len(z) == 200_001
    assert abs(z.mean()) < 5 / math.sqrt(len(z)) and abs(z.var() - 1) < 0.01
    assert abs((z**4).mean() - 3) < 0.05
    assert (keyed_normal(b"k1", 1000) == z[:1000]).all()
    other = keyed_normal(b"k2", 200_001)
    assert abs(float((z * other).mean())) < 5 / math.sqrt(len(z))


def test_each_image_has_one_cut_noise_and_fresh_mode_draws_per_message():
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    ids = image_ids(images)
    assert ids == image_ids(images.clone()) and len(set(ids)) == 3
    keyed, fresh = CutNoise(SECRET), CutNoise(SECRET, "fresh")
    a, b = keyed(ids, [0, 1, 2], (1, 8, 8)), keyed(ids, [7, 8, 9], (1, 8, 8))
    assert torch.equal(a, b)  # the row number does not matter
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(fresh(ids, [0, 1, 2], (1, 8, 8)), fresh(ids, [3, 4, 5], (1, 8, 8)))
    assert not torch.allclose(a, CutNoise(bytes(32))(ids, [0, 1, 2], (1, 8, 8)))  # another node's secret
    assert "SECRET" not in repr(keyed) and SECRET.hex() not in repr(keyed)


def _party(mode: str, seed: int = 5) -> ClientParty:
    data = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # 2 images, batches of 8: repeats
    return ClientParty("c", 0.4, data, train=TrainConfig(batch_size=8), seed=seed, cut_noise=CutNoise(SECRET, mode))


def test_messages_of_one_image_carry_one_x_tc_by_default_and_many_when_fresh():
    for mode, same in (("keyed", True), ("fresh", False)):
        party = _party(mode)
        views, rows = [], []
        for _ in range(3):
            batch = party.batch()
            msg = party.server_message(batch)
            views.append(recover_cut_image(S, msg))
            rows.append(batch.index)
        views, rows = torch.cat(views), torch.cat(rows)
        first = views[rows == 0]
        assert first.shape[0] > 2
        spread = (first - first[0]).abs().max().item()
        if same:
            assert spread < 5e-3  # float32 recovery error at high t
        else:
            assert spread > 0.5


def test_replaying_the_nodes_seed_does_not_reproduce_eps1():
    """The seed-replay attack of the privacy review: a server that knows the code and guesses the
    node's seed replays its generators. It gets t and ε₂ bit for bit (they are sent anyway), but not
    ε₁: its reconstruction of x₀ is no better than dividing x_{t_c} by √ᾱ."""
    seed = client_seed(0, 0)
    party = _party("keyed", seed)
    batch = party.batch()
    msg = party.server_message(batch)
    t_c, a = party.cut.t_c, float(S.alpha_bar[party.cut.t_c])
    # replay: the batch generator, then the message generator, exactly as the node uses them
    batches, messages = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(_message_seed(seed))
    index = torch.randint(0, 2, (8,), generator=batches)
    assert torch.equal(index, batch.index)
    t = torch.randint(t_c + 1, 101, (8,), generator=messages)
    eps2 = torch.randn((8, 1, 8, 8), generator=messages)
    assert torch.equal(t, msg.t) and torch.equal(eps2, msg.eps)  # the replay works
    x_tc = recover_cut_image(S, msg)
    x0 = batch.x0
    guesses = [torch.randn((8, 1, 8, 8), generator=g) for g in (batches, messages)] + [torch.zeros(8, 1, 8, 8)]
    naive = ((x_tc / math.sqrt(a) - x0) ** 2).mean().item()
    for guess in guesses:
        error = (((x_tc - math.sqrt(1 - a) * guess) / math.sqrt(a) - x0) ** 2).mean().item()
        assert error > 0.5 * naive, error
    # with the secret it would be exact: the attack fails for want of ε₁ alone
    eps1 = CutNoise(SECRET)([party.ids[i] for i in batch.index.tolist()], range(8), (1, 8, 8))
    exact = ((x_tc - math.sqrt(1 - a) * eps1) / math.sqrt(a) - x0).abs().max().item()
    assert exact < 1e-2


def test_a_party_that_talks_to_the_server_needs_its_secret():
    party = ClientParty("c", 0.4, torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="secret cut noise"):
        party.server_message(party.batch())


def test_secret_file_is_created_private_kept_and_checked(tmp_path):
    path = tmp_path / "state" / "secret.key"
    first = load_secret(path)
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(path) == first  # resume keeps it
    assert load_secret(tmp_path / "other.key") != first  # from the OS's entropy
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_secret(path)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 5)
    os.chmod(short, 0o600)
    with pytest.raises(ValueError, match="not a node secret"):
        load_secret(short)
    with pytest.raises(FileNotFoundError):
        load_secret(tmp_path / "missing.key", create=False)


def test_two_views_of_one_secret_at_two_cuts_give_the_server_the_clean_image():
    """Why a secret is bound to its cut (the next test): ε₁ does not depend on the cut, so the
    server solves the two views' linear equations for x₀ exactly."""
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    eps1 = CutNoise(SECRET)(image_ids(x0), [0, 1], (1, 8, 8))
    (pa, qa), (pb, qb) = [(S.alpha_bar[t].sqrt().float(), (1 - S.alpha_bar[t]).sqrt().float()) for t in (40, 60)]
    xa, xb = pa * x0 + qa * eps1, pb * x0 + qb * eps1
    solved = (qb * xa - qa * xb) / (qb * pa - qa * pb)
    assert (solved - x0).abs().max() < 1e-4 and (xa - x0).abs().max() > 0.1


def test_a_secret_is_bound_to_the_views_it_made_and_refuses_others(tmp_path):
    cut, data = Cut(40, 100), DataConfig()
    bound = views(cut, "keyed", data, 0)
    path = tmp_path / "state" / "secret.key"
    first = load_secret(path, bound)
    assert views_path(path).is_file() and load_secret(path, bound) == first
    for other, named in ((views(Cut(40, 200), "keyed", data, 0), "levels=100"), (views(Cut(60, 100), "keyed", data, 0), "t_c=40"),
                         (views(cut, "keyed", replace(data, image_size=64), 0), "data.image_size=32"),
                         (views(cut, "keyed", replace(data, seed=1), 0), "data.seed=0"),
                         (views(cut, "fresh", data, 0), "cut_noise=keyed"), (views(cut, "keyed", data, 1), "shard=0")):
        with pytest.raises(ValueError, match=f"with {named}; this run asks for"):
            load_secret(path, other)
    assert load_secret(path, bound) == first  # a refusal rewrites nothing
    path.unlink()  # lost: a new secret would be a second view of every image
    with pytest.raises(ValueError, match="second, independent view"):
        load_secret(path, bound)
    assert not path.exists()
    path.touch(mode=0o600)  # an earlier version killed between creating the file and writing it
    with pytest.raises(ValueError, match="is empty: .* never used. Delete it"):
        load_secret(path, bound)
    path.unlink()
    unlinked = path.with_name(f"{path.name}.123.abcd.tmp")  # killed between writing the secret beside it and linking it in
    unlinked.write_bytes(bytes(range(32)))
    os.chmod(unlinked, 0o600)
    assert load_secret(path, bound) == bytes(range(32)) and not unlinked.exists()
    legacy = tmp_path / "legacy.key"
    load_secret(legacy)  # made without views: nothing says what it was used for
    with pytest.raises(ValueError, match="no record"):
        load_secret(legacy, bound)


def test_a_node_refuses_clean_images_and_a_new_secret_after_sending(tmp_path):
    clean = NodeConfig(name="n", cut_ratio=0.004, state=str(tmp_path / "clean"))  # rounds to t_c = 0 of 100
    with pytest.raises(ValueError, match="t_c = 0 of T = 100: the server would receive the clean images"):
        open_secret(clean)
    assert len(open_secret(replace(clean, share_clean_images=True))) == 32
    node = NodeConfig(name="n", cut_ratio=0.4, state=str(tmp_path / "n"))
    os.makedirs(node.state)
    save_checkpoint(checkpoint_path(node), torch.nn.Linear(1, 1), None, {"rows_sent": 0})  # a node that never sent (c = 1 before)
    first = open_secret(node)
    os.unlink(os.path.join(node.state, "secret.key"))
    os.unlink(views_path(os.path.join(node.state, "secret.key")))
    save_checkpoint(checkpoint_path(node), torch.nn.Linear(1, 1), None, {"rows_sent": 32})
    with pytest.raises(ValueError, match="has sent images under a secret"):
        open_secret(node)
    assert not os.path.exists(os.path.join(node.state, "secret.key")) and first


def test_a_node_finds_its_secret_in_the_old_default_folder_and_warns_of_near_clean_cuts(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "collafuse-node-n"
    old.mkdir()
    load_secret(old / "secret.key")  # made by an earlier version in ./collafuse-node-NAME
    with pytest.raises(ValueError, match="default state folder of earlier versions"):
        open_secret(NodeConfig(name="n"))
    assert not (tmp_path / "home" / ".collafuse" / "node-n" / "secret.key").exists()
    with caplog.at_level("WARNING", logger="collafuse.node"):
        open_secret(NodeConfig(name="m", cut_ratio=0.01))  # t_c = 1 of 100: noise 0.025
    assert "nearly clean" in caplog.text and (tmp_path / "home" / ".collafuse" / "node-m" / "secret.key").exists()


def test_the_node_command_refuses_a_cut_that_sends_clean_images(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli.node", "join", "--name", "n", "--cut-ratio", "0.004", "--steps", "1",
                           "--state", str(tmp_path / "n"), "--broker", "tcp://127.0.0.1:1", "--insecure", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "the server would receive the clean images" in proc.stderr and "--share-clean-images" in proc.stderr
    assert not (tmp_path / "n" / "secret.key").exists()


def test_a_party_restored_from_its_random_state_continues_the_streams_instead_of_replaying_them():
    """Exact resume: batches, local noise, t and ε₂ after a restore are those an uninterrupted
    party would have drawn, not those of the first steps again."""
    def step(party):
        batch = party.batch()
        msg = party.server_message(batch)
        return batch.index, msg.t, msg.eps

    whole, first = _party("keyed"), _party("keyed")
    for _ in range(3):
        step(whole), step(first)
    resumed = _party("keyed")
    resumed.load_rng_state({k: v.clone() for k, v in first.rng_state().items()})
    resumed.rows_sent = first.rows_sent
    for _ in range(2):
        expected, got, replayed = step(whole), step(resumed), step(_party("keyed"))
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
        assert not torch.equal(expected[2], replayed[2])
    assert CutNoise(SECRET).stream_id() == CutNoise(SECRET, "fresh").stream_id() != CutNoise(bytes(32)).stream_id()
    assert SECRET.hex()[:12] not in CutNoise(SECRET).stream_id()


def test_nodes_racing_on_one_fresh_folder_all_get_one_secret(tmp_path):
    """Sixteen at once (threads: the file operations race as processes' would): every one reads the
    secret that was linked into place first, with its record; none is ever seen empty."""
    import threading

    bound = views(Cut(40, 100), "keyed", DataConfig(), 0)
    path = tmp_path / "state" / "secret.key"
    start, got = threading.Barrier(16), []

    def one() -> None:
        start.wait()
        got.append(load_secret(path, bound))

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 16 and len(set(got)) == 1 and load_secret(path, bound) == got[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key", "secret.views.json"]
