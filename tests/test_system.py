"""The networked system as real processes on loopback: broker, workers, nodes.

Every process is started through the CLI and stopped by its id at the end of each test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import msgpack
import numpy as np
import pytest
import torch
from safetensors import safe_open

from collafuse.protocol.admin import fetch_status
from collafuse.protocol import tensors, wire
from collafuse.system.launch import Fleet, cli, free_port, wait_for
from collafuse.system.keyring import Keyring
from tests.netclient import KEYRINGS, RawClient, RawWorker

FAST_HB = ["--heartbeat-interval", "0.2", "--heartbeat-liveness", "5"]


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "logs", threads=1)
    yield f
    f.stop_all(timeout=20)


def start_broker(fleet: Fleet, *extra: str, name: str = "broker", ports=None, host: str = "127.0.0.1") -> tuple[str, str]:
    """A broker with CURVE keys (made beside the fleet's logs; a restart on the same ports reuses them)."""
    fp, bp = ports or (free_port(), free_port())
    front, back = f"tcp://{host}:{fp}", f"tcp://{host}:{bp}"
    KEYRINGS[front] = KEYRINGS[back] = ring = Keyring(fleet.logs.parent / "keys")
    fleet.start(name, cli("broker", "--frontend", front, "--backend", back, *ring.broker_args(), *FAST_HB, "--elect-trainer-for", "0.5", *extra))
    wait_for(lambda: _status(front) is not None, 30, what="broker")
    return front, back


def _status(front: str):
    try:
        return fetch_status(front, timeout=0.5, keys=KEYRINGS[front].admin())
    except (TimeoutError, ConnectionError):
        return None


def start_worker(fleet: Fleet, back: str, front: str, name: str, *extra: str, timeout: float = 120, inside: tuple[str, ...] = ()) -> None:
    """A worker with a trainer key of its own name (`timeout`: for it to register; `inside`: a
    command prefix that runs it elsewhere, e.g. in another network namespace)."""
    fleet.start(name, [*inside, *cli("worker", "--broker", back, "--name", name, "--device", "cpu", *KEYRINGS[back].args(name, "trainer"), *FAST_HB, *extra)])
    wait_for(lambda: any(w["name"] == name for w in (_status(front) or {}).get("workers", [])), timeout, what=f"{name} to register")


def applied_jobs(checkpoint) -> list[tuple[str, str, int]]:
    """(client, job, step) of every applied job a trainer's checkpoint remembers."""
    from collafuse.engine.checkpoint import load_extra
    from collafuse.worker.training import TrainBatcher

    batcher = TrainBatcher(1, 0.0)
    batcher.restore(load_extra(checkpoint)["applied"])
    return [(client, job, step) for client, jobs in batcher.applied.items() for job, (step, _) in jobs.items()]


def node(*args: str) -> list[str]:
    """A node command with the node key of its --name (from the keyring of its --broker)."""
    ring = KEYRINGS[args[args.index("--broker") + 1]]
    return cli(*args, *ring.args(args[args.index("--name") + 1], "node"), module="collafuse.cli.node")


def test_malformed_messages_get_errors_and_the_broker_keeps_serving(fleet):
    front, back = start_broker(fleet, "--max-frame-bytes", "200000", "--heartbeat-liveness", "200")
    raw_worker = RawWorker(back, "w")
    raw_worker.ready()  # defines the server's image shape, so that hello is welcomed
    wait_for(lambda: _status(front)["workers"], 10, what="the raw worker")
    bad = RawClient(front, "mallory")
    good = RawClient(front, "alice")
    bad.send(b"\x00garbage")
    assert bad.recv()[0]["code"] == "bad_envelope"
    bad.send(msgpack.packb({"v": 7, "type": "hello"}))
    assert bad.recv()[0]["code"] == "bad_version"
    bad.send(wire.encode("frobnicate"))
    assert bad.recv()[0]["code"] == "unknown_type"
    bad.send(wire.encode("denoise", job="j0", client="mallory", count=2, t_c=60, seed=0, first_row=0, sampler="ddim", steps=4, eta=0.0))
    assert bad.recv()[0]["code"] == "not_joined"
    bad.hello()
    bad.send(wire.encode("train", job="j1", client="mallory", rows="many", t_c=60))
    assert bad.recv()[0]["code"] == "bad_field"
    env = wire.encode("train", job="j2", client="mallory", rows=2, t_c=60)
    bad.send(env)  # no tensor frame
    assert bad.recv()[0]["code"] == "bad_tensor"
    blob = tensors.encode({"x_t": np.zeros((2, 1, 32, 32), np.float32), "t": np.full(2, 70), "eps": np.zeros((2, 1, 32, 32), np.float32)})
    bad.send(env, blob[: len(blob) // 2])  # truncated
    reply = bad.recv()[0]
    assert reply["code"] == "bad_tensor" and reply["job"] == "j2"
    wrong = tensors.encode({"x_t": np.zeros((2, 1, 16, 16), np.float32), "t": np.full(2, 70), "eps": np.zeros((2, 1, 16, 16), np.float32)})
    bad.send(env, wrong)  # wrong shape for this client
    assert "expected F32[2, 1, 32, 32]" in bad.recv()[0]["reason"]
    bad.send(env, b"\0" * 300_000)  # oversized
    assert bad.recv()[0]["code"] == "too_large"
    bad.send(env, blob, b"extra")  # too many frames
    assert bad.recv()[0]["code"] == "bad_envelope"
    good.hello()
    good.send(wire.encode("status"))
    assert good.recv()[0]["code"] == "forbidden"  # status needs an admin key
    admin = RawClient(front, "admin", keys=KEYRINGS[front].admin())
    admin.send(wire.encode("status"))
    st = admin.recv()[0]["status"]
    assert st["clients"]["mallory"]["errors"] >= 4  # the tensor-level refusals, counted per client
    assert fleet.alive("broker")


def test_end_to_end_three_nodes_train_and_generate(fleet, tmp_path):
    front, back = start_broker(fleet)
    start_worker(fleet, back, front, "w0", "--max-train-rows", "24", "--checkpoint", str(tmp_path / "server.safetensors"))
    names = ["n0", "n1", "n2"]
    for i, n in enumerate(names):
        fleet.start(n, node("join", "--broker", front, "--name", n, "--shard", str(i), "--shards", "3", "--cut-ratio", ["0.0", "0.6", "1.0"][i],
                            "--steps", "12", "--batch-size", "8", "--state", str(tmp_path / n), "--device", "cpu", *FAST_HB,
                            *(["--share-clean-images"] if i == 0 else [])))  # c = 0 sends x₀: refused without it
    for n in names:
        assert fleet.wait(n, 300) == 0, fleet.tail(n)
    progress = {n: json.loads((tmp_path / n / "progress.json").read_text()) for n in names}
    for n in ("n0", "n1"):
        assert progress[n]["done"] and progress[n]["acked"] == progress[n]["sent"] > 0
    with safe_open(str(tmp_path / "n0" / "local.safetensors"), framework="pt") as f:  # c = 0 keeps no local model, only its resume state
        assert not [k for k in f.keys() if k.startswith(("model.", "optim."))] and "extra.rng.batch" in f.keys()
    assert progress["n0"]["sent"] == 12  # ... and, having no local work, waits for the window instead of skipping
    assert progress["n2"]["sent"] == 0 and progress["n2"]["t_c"] == 100  # c = 1: no server at all
    for i, n in enumerate(names):
        fleet.start(f"{n}-gen", node("generate", "--broker", front, "--name", n, "--cut-ratio", ["0.0", "0.6", "1.0"][i], "--n", "5",
                                     "--out", str(tmp_path / n / "gen"), "--state", str(tmp_path / n), "--device", "cpu",
                                     "--sampler", "ddim", "--ddim-steps", "10"))
    for n in names:
        assert fleet.wait(f"{n}-gen", 300) == 0, fleet.tail(f"{n}-gen")
        assert len(list((tmp_path / n / "gen").glob("sample_*.png"))) == 5
    st = _status(front)
    assert st["clients"]["n0"]["completed"] > 0 and st["queued"] == 0 and st["in_flight"] == 0
    assert "n2" not in st["clients"]
    fleet.stop("w0")
    assert (tmp_path / "server.safetensors").is_file()


def test_one_node_through_the_network_equals_the_in_process_run(fleet, tmp_path):
    """Lockstep node + a worker taking one job per optimiser step = the simulation, bit for bit-ish,
    when both hold the same node secret (the key of the cut noise)."""
    steps, batch = 6, 4
    sim = tmp_path / "sim"
    from subprocess import run
    import sys

    from collafuse.common.config import DataConfig
    from collafuse.common.cut import Cut
    from collafuse.diffusion.cutnoise import views, views_path

    secret = os.urandom(32)
    for path in (sim / "secrets" / "client0.key", tmp_path / "n0" / "secret.key"):
        path.parent.mkdir(parents=True)
        path.write_bytes(secret)
        path.chmod(0o600)
        views_path(path).write_text(json.dumps(views(Cut(60, 100), "keyed", DataConfig(clients=1), 0)))  # bound as both runs use it

    proc = run([sys.executable, "-m", "collafuse.cli", "simulate", "--out", str(sim), "--clients", "1", "--cut-ratio", "0.6",
                "--steps", str(steps), "--batch-size", str(batch), "--samples", "4", "--sampler", "ddim", "--ddim-steps", "10",
                "--device", "cpu"], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    front, back = start_broker(fleet)
    start_worker(fleet, back, front, "w0", "--max-train-rows", str(batch), "--train-wait", "0", "--checkpoint", str(tmp_path / "server.safetensors"))
    fleet.start("n0", node("join", "--broker", front, "--name", "client0", "--shard", "0", "--shards", "1", "--cut-ratio", "0.6",
                           "--steps", str(steps), "--batch-size", str(batch), "--lockstep", "--window", "1",
                           "--state", str(tmp_path / "n0"), "--device", "cpu"))
    assert fleet.wait("n0", 300) == 0, fleet.tail("n0")
    fleet.start("gen", node("generate", "--broker", front, "--name", "client0", "--cut-ratio", "0.6", "--n", "4", "--seed", "1234",
                            "--out", str(tmp_path / "gen"), "--state", str(tmp_path / "n0"), "--device", "cpu", "--sampler", "ddim", "--ddim-steps", "10"))
    assert fleet.wait("gen", 300) == 0, fleet.tail("gen")
    fleet.stop("w0")

    def weights(path):
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}

    for ours, theirs in [(tmp_path / "server.safetensors", sim / "checkpoints" / "server.safetensors"),
                         (tmp_path / "n0" / "local.safetensors", sim / "checkpoints" / "client0.safetensors")]:
        a, b = weights(ours), weights(theirs)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), ours
    with safe_open(str(tmp_path / "gen" / "samples.safetensors"), framework="pt") as f:
        net = f.get_tensor("images")
    with safe_open(str(sim / "samples.safetensors"), framework="pt") as f:
        local = f.get_tensor("client0.images")
    assert torch.allclose(net, local, atol=1e-3)


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(fleet):
    front, back = start_broker(fleet)
    start_worker(fleet, back, front, "victim", "--max-batch", "8", "--queue-rows", "8")
    start_worker(fleet, back, front, "survivor", "--max-batch", "8", "--queue-rows", "8", "--no-train")
    client = RawClient(front, "c")
    client.hello()
    jobs = {f"job{i}" for i in range(12)}
    for j in sorted(jobs):
        client.denoise(j, count=4, sampler="ancestral")
    victim = next(w for w in _status(front)["workers"] if w["name"] == "victim")
    wait_for(lambda: next(w for w in _status(front)["workers"] if w["name"] == "victim")["in_flight"] > 0, 30, what="victim busy")
    os.kill(fleet.procs["victim"].pid, signal.SIGKILL)
    got = client.collect(jobs, timeout=240)
    assert set(got) == jobs, f"lost: {jobs - set(got)}"
    assert all(len(v) == 1 for v in got.values()), {k: len(v) for k, v in got.items() if len(v) != 1}
    assert all(v[0]["type"] == "result" for v in got.values())
    st = _status(front)
    assert [w["name"] for w in st["workers"]] == ["survivor"] and victim is not None


def test_flooding_client_does_not_starve_a_polite_one(fleet):
    import zmq

    front, back = start_broker(fleet, "--max-queue", "40")
    start_worker(fleet, back, front, "w0", "--max-batch", "4", "--queue-rows", "4")
    flood, polite = RawClient(front, "flood"), RawClient(front, "polite")
    flood.hello(), polite.hello()
    for i in range(50):
        flood.denoise(f"f{i}", count=4, sampler="ancestral")
    time.sleep(0.3)
    polite.denoise("p0", count=4, sampler="ancestral")
    poller = zmq.Poller()
    poller.register(flood.sock, zmq.POLLIN)
    poller.register(polite.sock, zmq.POLLIN)
    order, busy = [], 0
    deadline = time.monotonic() + 180
    while "p0" not in order and time.monotonic() < deadline:
        for sock, _ in poller.poll(500):
            env = msgpack.unpackb(sock.recv_multipart()[0])
            if env.get("code") == "busy":
                busy += 1
            elif env["type"] in ("result", "error"):
                order.append(env["job"])
    assert "p0" in order
    assert busy >= 5  # the queue is bounded: the excess was refused at once
    assert order.index("p0") <= 4, f"the polite job waited behind {order.index('p0')} flood jobs"


def test_broker_restart_nodes_and_workers_resume(fleet, tmp_path):
    ports = (free_port(), free_port())
    front, back = start_broker(fleet, ports=ports)
    start_worker(fleet, back, front, "w0", "--max-train-rows", "8")
    fleet.start("n0", node("join", "--broker", front, "--name", "n0", "--shards", "1", "--steps", "400", "--batch-size", "4",
                           "--window", "2", "--state", str(tmp_path / "n0"), "--device", "cpu", *FAST_HB))
    wait_for(lambda: (_status(front) or {}).get("clients", {}).get("n0", {}).get("completed", 0) >= 3, 120, what="first acks")
    os.kill(fleet.procs["broker"].pid, signal.SIGKILL)
    fleet.procs.pop("broker").wait()
    time.sleep(1.5)
    start_broker(fleet, ports=ports, name="broker2")
    wait_for(lambda: (_status(front) or {}).get("clients", {}).get("n0", {}).get("completed", 0) >= 3, 120, what="acks after restart")
    assert fleet.wait("n0", 600) == 0, fleet.tail("n0")
    progress = json.loads((tmp_path / "n0" / "progress.json").read_text())
    assert progress["reconnects"] >= 1
    assert progress["acked"] == progress["sent"] and progress["in_flight"] == 0


def test_node_resumes_from_its_checkpoint(tmp_path):
    """c = 1 needs no server: train 3 steps, stop, then continue to 5 from the checkpoint."""
    from subprocess import run
    import sys

    base = [sys.executable, "-m", "collafuse.cli.node", "join", "--name", "solo", "--cut-ratio", "1.0", "--shards", "1",
            "--batch-size", "4", "--state", str(tmp_path / "solo"), "--device", "cpu", "--broker", "tcp://127.0.0.1:1", "--insecure"]
    first = run([*base, "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    with safe_open(str(tmp_path / "solo" / "local.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["collafuse"])["metadata"]["step"] == 3
    second = run([*base, "--steps", "5"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "[solo] 4/5" in second.stderr and "[solo] 1/5" not in second.stderr
    with safe_open(str(tmp_path / "solo" / "local.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["collafuse"])["metadata"]["step"] == 5


def test_loadtest_reports_and_loses_nothing(tmp_path):
    from subprocess import run
    import sys

    out = tmp_path / "load.json"
    proc = run([sys.executable, "-m", "collafuse.cli", "loadtest", "--clients", "30", "--duration", "3", "--mode", "mixed",
                "--device", "cpu", "--rows", "2", "--json", str(out)], capture_output=True, text=True, timeout=300,
               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads(out.read_text())
    assert result["lost"] == result["answered_twice"] == 0 and result["completed"] > 0 and result["submitted"] == result["completed"]
    assert result["train_steps"] > 0 and result["image_steps_per_s"] > 0
    assert 0 < result["mean_batch_fill"] <= 1
    assert set(result["latency_ms"]) == {"p50", "p95", "p99"}


def test_trainer_killed_its_train_jobs_go_to_the_next_trainer_from_relayed_weights(fleet, tmp_path):
    """Two --train workers: the first to register trains. It is frozen with jobs in hand and then
    killed; the broker re-queues them to the other, which continues from the relayed weights and
    optimiser moments."""
    front, back = start_broker(fleet)
    train_flags = ("--max-train-rows", "4", "--train-wait", "0", "--sync-every", "2")
    start_worker(fleet, back, front, "first", *train_flags)
    start_worker(fleet, back, front, "second", *train_flags, "--checkpoint", str(tmp_path / "second.safetensors"))
    assert [w["name"] for w in _status(front)["workers"] if w["trainer"]] == ["first"]
    client = RawClient(front, "c")
    client.hello()
    before = {f"a{i}" for i in range(4)}
    got = client.train_all(before, timeout=60)
    assert set(got) == before and sorted(v[0]["step"] for v in got.values()) == [1, 2, 3, 4]
    time.sleep(1.0)  # the relay of version 4
    os.kill(fleet.procs["first"].pid, signal.SIGSTOP)
    after = {f"b{i}" for i in range(6)}
    for i, j in enumerate(sorted(after)):
        client.train(j, seed=10 + i)
    wait_for(lambda: next(w for w in _status(front)["workers"] if w["name"] == "first")["in_flight"] > 0, 30, what="first holding jobs")
    os.kill(fleet.procs["first"].pid, signal.SIGKILL)
    got = client.collect(after, timeout=120)
    assert set(got) == after, f"lost: {after - set(got)}"
    assert all(len(v) == 1 and v[0]["type"] == "ack" for v in got.values()), got
    assert sorted(v[0]["step"] for v in got.values()) == [5, 6, 7, 8, 9, 10]  # continued from version 4
    assert [(w["name"], w["trainer"]) for w in _status(front)["workers"]] == [("second", True)]
    assert fleet.stop("second") == 0
    with safe_open(str(tmp_path / "second.safetensors"), framework="pt") as f:
        adam_steps = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".step")}
    assert adam_steps == {10.0}  # Adam continued the relayed moments of step 4 (afresh it would count 6)


def test_trainer_weights_reach_a_denoising_worker(fleet, tmp_path):
    """The trainer publishes every --sync-every steps; the broker relays the weights to the other
    workers, and the optimiser's moments to the one that may train. The frame limit is set below
    the model's size (1.2 MB), so both must travel in parts."""
    small = ("--max-frame-bytes", "262144")
    front, back = start_broker(fleet, *small)
    start_worker(fleet, back, front, "trainer", "--max-train-rows", "4", "--train-wait", "0", "--sync-every", "2",
                 "--checkpoint", str(tmp_path / "trainer.safetensors"), *small)
    start_worker(fleet, back, front, "denoiser", "--no-train", "--checkpoint", str(tmp_path / "denoiser.safetensors"), "--seed", "7", *small)
    start_worker(fleet, back, front, "standby", "--checkpoint", str(tmp_path / "standby.safetensors"), "--seed", "8", *small)
    fleet.start("n0", node("join", "--broker", front, "--name", "n0", "--shards", "1", "--steps", "8", "--batch-size", "4",
                           "--lockstep", "--window", "1", "--state", str(tmp_path / "n0"), "--device", "cpu"))
    assert fleet.wait("n0", 300) == 0, fleet.tail("n0")
    time.sleep(1.0)  # the last relay
    # a worker that joins now gets the latest version's parts from the broker
    start_worker(fleet, back, front, "late", "--no-train", "--checkpoint", str(tmp_path / "late.safetensors"), "--seed", "9", *small)
    time.sleep(1.0)
    assert all(fleet.stop(n) == 0 for n in ("trainer", "denoiser", "standby", "late"))

    def saved(name, prefix):
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["collafuse"])["metadata"]["step"], {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    (s_t, w_t), (s_d, w_d), (s_l, w_l), (s_s, w_s) = (saved(n, "model.") for n in ("trainer", "denoiser", "late", "standby"))
    assert s_t == s_d == s_l == s_s == 8
    assert all(torch.equal(w_t[k], w_d[k]) and torch.equal(w_t[k], w_l[k]) and torch.equal(w_t[k], w_s[k]) for k in w_t)  # all started elsewhere
    # the optimiser's moments go only to the worker that may take over training
    (_, m_t), (_, m_s), (_, m_d) = (saved(n, "optim.") for n in ("trainer", "standby", "denoiser"))
    assert m_t and m_d == {} and set(m_s) == set(m_t) and all(torch.equal(m_t[k], m_s[k]) for k in m_t)


def test_up_starts_and_stops_the_server_side(tmp_path):
    """`up --workers 3 --trainers 2`: a broker, a trainer group of two and a denoise-only worker."""
    import subprocess
    import sys

    state = tmp_path / "srv"
    proc = subprocess.Popen([sys.executable, "-m", "collafuse.cli", "up", "--workers", "3", "--trainers", "2", "--device", "cpu",
                             "--state", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()
        assert first.startswith("up: broker tcp://127.0.0.1:"), first
        assert "--keys" in "".join(proc.stdout.readline() for _ in range(3))  # how to add a node's key and join with it
        front = first.split()[2]
        admin = Keyring(state / "keys").admin()  # `up` made the broker's and workers' keys, and an admin key
        st = fetch_status(front, keys=admin)
        assert sorted(w["name"] for w in st["workers"]) == ["worker0", "worker1", "worker2"]
        assert [w["rank"] for w in sorted(st["workers"], key=lambda w: w["name"])][2] is None
        assert {w["rank"] for w in st["workers"] if w["name"] != "worker2"} == {0, 1} and st["trainer_group"]["world"] == 2
        assert [w["name"] for w in st["workers"] if w["trainer"]] == [next(w["name"] for w in st["workers"] if w["rank"] == 0)]
        with pytest.raises(TimeoutError):
            fetch_status(front, timeout=1.0)  # plain TCP gets no answer from a broker with keys
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "up: stopped" in out
    with pytest.raises(TimeoutError):
        fetch_status(front, timeout=0.5, keys=admin)  # the broker is gone too


def test_demo_writes_a_report(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "collafuse.cli", "demo", "--out", str(out), "--clients", "2", "--steps", "3",
                           "--batch-size", "4", "--samples", "3", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "[demo]" in proc.stderr and "report:" in proc.stdout
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics["clients"]) == {"client0", "client1"}
    assert all(c["acked"] == c["sent"] == 3 for c in metrics["clients"].values())
    assert (out / "report" / "samples.png").stat().st_size > 0 and (out / "report" / "real.png").stat().st_size > 0


def test_a_killed_node_resumes_exactly_and_nothing_is_applied_twice(fleet, tmp_path):
    """A lockstep node SIGKILLed mid-run restarts from its checkpoint, re-sends what was in flight
    under the same job ids and regenerates the steps after the checkpoint bit for bit (its random
    state is in the checkpoint): the trainer applies each step's rows exactly once."""
    steps, batch = 40, 2
    front, back = start_broker(fleet)
    start_worker(fleet, back, front, "w0", "--max-train-rows", str(batch), "--train-wait", "0")
    args = ("join", "--broker", front, "--name", "n0", "--shards", "1", "--steps", str(steps), "--batch-size", str(batch), "--lockstep",
            "--window", "2", "--checkpoint-every", "10", "--state", str(tmp_path / "n0"), "--device", "cpu", *FAST_HB)
    fleet.start("n0", node(*args))
    progress = tmp_path / "n0" / "progress.json"
    wait_for(lambda: progress.is_file() and json.loads(progress.read_text())["step"] >= 15, 300, what="step 15")
    os.kill(fleet.procs["n0"].pid, signal.SIGKILL)
    fleet.procs.pop("n0").wait()
    assert json.loads(progress.read_text())["step"] < steps
    fleet.start("n0-again", node(*args))
    assert fleet.wait("n0-again", 600) == 0, fleet.tail("n0-again")
    assert "[n0] 1/" not in fleet.tail("n0-again")  # it continued from its checkpoint

    def applied() -> dict:
        return next(w["stats"] for w in (_status(front) or {}).get("workers", []) if w["name"] == "w0")

    time.sleep(1.0)  # the worker's counters reach the broker with its next heartbeat
    stats = applied()
    assert (stats["train_steps"], stats["train_rows"]) == (steps, steps * batch)


def test_a_waiting_client_gets_its_answer_after_a_broker_restart(fleet):
    """A client that only waits (nothing new to send) notices a restarted broker from its own
    heartbeats (answered not_joined, or with a new epoch), says hello again and re-sends its job
    under the same id; the new broker's worker answers it."""
    from collafuse.common.config import HeartbeatConfig, ProtocolLimits
    from collafuse.protocol.link import BrokerLink
    from collafuse.protocol.security import PeerKeys

    ports = (free_port(), free_port())
    front, back = start_broker(fleet, ports=ports)
    holder = RawWorker(back, "holder")  # takes the job and never answers it
    holder.ready()
    wait_for(lambda: len((_status(front) or {}).get("workers", [])) == 1, 30, what="the holder")
    link = BrokerLink(front, {"client": "waiter", "t_c": 60, "image_shape": [1, 32, 32], "levels": 100}, ProtocolLimits(),
                      HeartbeatConfig(0.2, 5), 0.2, keys=PeerKeys.load(KEYRINGS[front].peer("waiter", "node")))
    try:
        link.connect()
        first_epoch = link.epoch
        link.submit("waiter-1", "denoise", [wire.encode("denoise", job="waiter-1", client="waiter", count=1, t_c=60, seed=1, first_row=0,
                                                        sampler="ddim", steps=10, eta=0.0)])
        assert holder.next_job()[0]["job"] == "waiter-1"
        os.kill(fleet.procs["broker"].pid, signal.SIGKILL)
        fleet.procs.pop("broker").wait()
        start_broker(fleet, ports=ports, name="broker2")
        start_worker(fleet, back, front, "w0")
        replies, deadline = [], time.monotonic() + 60
        while not replies and time.monotonic() < deadline:
            replies = link.poll(0.2)
        assert [r.env["type"] for r in replies] == ["result"] and replies[0].env["job"] == "waiter-1"
        assert link.reconnects >= 1 and link.epoch not in ("", first_epoch)
    finally:
        link.close()
        holder.sock.close(0)


def test_acknowledged_updates_survive_the_trainers_death(fleet, tmp_path):
    """A trainer with a checkpoint acknowledges a train job only once a checkpoint contains its step.
    Broker and trainer SIGKILLed and restarted: every acknowledged update is in the model (the step
    count goes on from the last ack, no step number is used twice), and a job sent again after the
    restarts is acknowledged from the checkpoint's memory of applied jobs, not applied again."""
    ports = (free_port(), free_port())
    front, back = start_broker(fleet, ports=ports)
    ckpt = tmp_path / "server.safetensors"
    flags = ("--max-train-rows", "4", "--train-wait", "0", "--checkpoint", str(ckpt))
    start_worker(fleet, back, front, "t", *flags)
    client = RawClient(front, "c")
    client.hello()
    jobs = {f"a{i}" for i in range(12)}
    got = client.train_all(jobs)
    assert sorted(v[0]["step"] for v in got.values()) == list(range(1, 13))  # one job per step, every one acknowledged
    for name in ("t", "broker"):
        os.kill(fleet.procs[name].pid, signal.SIGKILL)
        fleet.procs.pop(name).wait()
    with safe_open(str(ckpt), framework="pt") as f:
        assert json.loads(f.metadata()["collafuse"])["metadata"]["step"] == 12
    start_broker(fleet, ports=ports, name="broker2")
    start_worker(fleet, back, front, "t", *flags)
    client.hello()
    client.train("a3", seed=sorted(jobs).index("a3"))  # the same job again (the new broker has no reply cache)
    client.train("b0", seed=100)
    again = client.collect({"a3", "b0"}, timeout=120)
    assert again["a3"][0]["step"] == got["a3"][0]["step"]  # answered from what the checkpoint remembers
    assert again["b0"][0]["step"] == 13  # the next step after every acknowledged one


def test_loadtest_loses_nothing_across_a_broker_restart(fleet):
    """The load test's clients notice a restarted broker (not_joined to their heartbeats), say hello
    again and re-send their jobs under the same ids: every job gets its one answer."""
    import threading

    from collafuse.common.config import LoadConfig
    from collafuse.tools.loadtest import run_load

    ports = (free_port(), free_port())
    front, back = start_broker(fleet, ports=ports)
    start_worker(fleet, back, front, "w0")
    ring = KEYRINGS[front]
    result: dict = {}
    load = LoadConfig(broker=front, clients=20, duration=6, mode="mixed", drain=60, keys=str(ring.peer("load", "node")),
                      admin_keys=str(ring.peer("admin", "admin")))
    runner = threading.Thread(target=lambda: result.update(run_load(load, say=lambda _: None)))
    runner.start()
    time.sleep(2)
    os.kill(fleet.procs["broker"].pid, signal.SIGKILL)
    fleet.procs.pop("broker").wait()
    start_broker(fleet, ports=ports, name="broker2")
    runner.join(timeout=180)
    assert not runner.is_alive()
    assert result["lost"] == result["answered_twice"] == 0 and result["rejoins"] >= 1 and result["errors"] == {}
    assert result["completed"] == result["submitted"] > 0


def test_a_restarted_broker_with_state_gives_late_workers_the_weights_and_keeps_names_bound(fleet, tmp_path):
    """With --state the broker keeps the trainer's latest relayed version and the client-name
    registry on disk: after a SIGKILL and restart, a worker that joins gets the weights at once
    (with no trainer left to publish them), and another key still cannot take a bound name."""
    from collafuse.protocol.security import PeerKeys

    ports, state = (free_port(), free_port()), str(tmp_path / "broker-state")
    front, back = start_broker(fleet, "--state", state, ports=ports)
    start_worker(fleet, back, front, "trainer", "--max-train-rows", "4", "--train-wait", "0", "--sync-every", "2",
                 "--checkpoint", str(tmp_path / "trainer.safetensors"))
    client = RawClient(front, "c")
    client.hello()
    jobs = {f"a{i}" for i in range(4)}
    assert sorted(v[0]["step"] for v in client.train_all(jobs).values()) == [1, 2, 3, 4]
    assert fleet.stop("trainer") == 0  # it published version 4 at step 4; nobody will publish again
    weights = tmp_path / "broker-state" / "weights.msgpack"
    wait_for(lambda: weights.is_file() and msgpack.unpackb(msgpack.unpackb(weights.read_bytes())["parts"][0][0])["version"] == 4,
             30, what="version 4 on disk")
    os.kill(fleet.procs["broker"].pid, signal.SIGKILL)
    fleet.procs.pop("broker").wait()
    start_broker(fleet, "--state", state, ports=ports, name="broker2")
    start_worker(fleet, back, front, "late", "--no-train", "--checkpoint", str(tmp_path / "late.safetensors"), "--seed", "9")
    impostor = RawClient(front, "c", keys=PeerKeys.load(KEYRINGS[front].peer("other", "node")))
    impostor.send(wire.encode("hello", client="c", t_c=60, image_shape=[1, 32, 32], levels=100))
    assert impostor.recv()[0]["code"] == "forbidden"
    time.sleep(1.0)
    assert fleet.stop("late") == 0

    def saved(name):
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["collafuse"])["metadata"]["step"], {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}

    (s_t, w_t), (s_l, w_l) = saved("trainer"), saved("late")
    assert s_t == s_l == 4 and all(torch.equal(w_t[k], w_l[k]) for k in w_t)


def test_chaos_nothing_acknowledged_is_lost_nothing_is_applied_twice(fleet, tmp_path):
    """Broker (with --state), a trainer (with its checkpoint) and a denoise-only worker; two lockstep
    nodes and a denoising load. In turn: a node SIGKILLed mid-run and restarted; the denoiser
    SIGKILLed and restarted, then SIGSTOPped and SIGCONTed; the broker SIGKILLed and restarted; the
    trainer SIGKILLed and restarted from its checkpoint. Every node finishes its steps, every load job is answered, and the
    trainer's model holds each node step's job exactly once: its step count is the number of steps
    sent, and the jobs it remembers applying are exactly those, with distinct steps."""
    import threading

    from collafuse.common.config import LoadConfig
    from collafuse.tools.loadtest import run_load

    steps, batch = 40, 2
    ports, state = (free_port(), free_port()), str(tmp_path / "broker-state")
    front, back = start_broker(fleet, "--state", state, ports=ports)
    ckpt = tmp_path / "trainer.safetensors"
    trainer = ("trainer", "--max-train-rows", str(batch), "--train-wait", "0", "--checkpoint", str(ckpt))
    denoiser = ("denoiser", "--no-train")
    start_worker(fleet, back, front, *trainer)
    start_worker(fleet, back, front, *denoiser)
    joins = {name: ("join", "--broker", front, "--name", name, "--shards", "2", "--shard", str(i), "--steps", str(steps), "--batch-size",
                    str(batch), "--lockstep", "--window", "2", "--checkpoint-every", "4", "--state", str(tmp_path / name), "--device", "cpu",
                    *FAST_HB) for i, name in enumerate(("n0", "n1"))}
    for name, args in joins.items():
        fleet.start(name, node(*args))
    ring, result = KEYRINGS[front], {}
    load = LoadConfig(broker=front, clients=6, duration=25, mode="denoise", drain=120, keys=str(ring.peer("load", "node")),
                      admin_keys=str(ring.peer("admin", "admin")))
    loader = threading.Thread(target=lambda: result.update(run_load(load, say=lambda _: None)))
    loader.start()

    def kill(name: str) -> None:
        os.kill(fleet.procs[name].pid, signal.SIGKILL)
        fleet.procs.pop(name).wait()

    progress = tmp_path / "n1" / "progress.json"
    wait_for(lambda: progress.is_file() and json.loads(progress.read_text())["step"] >= 5, 300, what="n1 at step 5")
    kill("n1")
    assert json.loads(progress.read_text())["step"] < steps
    fleet.start("n1-again", node(*joins["n1"]))
    kill("denoiser")
    start_worker(fleet, back, front, *denoiser)
    os.kill(fleet.procs["denoiser"].pid, signal.SIGSTOP)
    time.sleep(2)
    os.kill(fleet.procs["denoiser"].pid, signal.SIGCONT)
    kill("broker")
    start_broker(fleet, "--state", state, ports=ports, name="broker2")
    time.sleep(2)
    kill("trainer")
    start_worker(fleet, back, front, *trainer)
    for name in ("n0", "n1-again"):
        assert fleet.wait(name, 600) == 0, fleet.tail(name)
    loader.join(timeout=300)
    assert not loader.is_alive() and result["lost"] == 0 and result["answered_twice"] == 0 and result["completed"] == result["submitted"] > 0
    assert fleet.stop("trainer") == 0

    with safe_open(str(ckpt), framework="pt") as f:
        trained = json.loads(f.metadata()["collafuse"])["metadata"]["step"]
    applied = applied_jobs(ckpt)
    node_jobs = [(client, job) for client, job, _ in applied if client in joins]
    assert trained == len(node_jobs) == 2 * steps  # every step of both nodes, each once
    assert {job.rsplit("-", 1)[1] for _, job in node_jobs} == {str(s) for s in range(1, steps + 1)}
    assert sorted(step for _, _, step in applied) == list(range(1, trained + 1))
    print(json.dumps({"chaos": {"load_submitted": result["submitted"], "load_answered": result["completed"],
                                "load_answered_twice": result["answered_twice"], "node_steps": 2 * steps,
                                "contained": trained, "applied_twice": trained - len(set(node_jobs))}}))  # for BENCHMARKS.md (pytest -s)


def test_a_trainer_restarted_from_its_checkpoint_is_not_rolled_back_by_an_older_relay(fleet, tmp_path):
    """A trainer SIGKILLed and restarted at once registers while the broker still counts its old
    connection as the trainer, so it is sent the last relayed version (step 2) although its own
    checkpoint holds step 3, acknowledged: it keeps its model, and the next job is step 4."""
    slow = ("--heartbeat-liveness", "150")  # 30 s before the broker declares the killed trainer dead: longer than a worker's start
    front, back = start_broker(fleet, *slow)
    flags = ("--max-train-rows", "4", "--train-wait", "0", "--sync-every", "2", "--checkpoint", str(tmp_path / "t.safetensors"))
    start_worker(fleet, back, front, "t", *flags)
    client = RawClient(front, "c")
    client.hello()
    for i in range(3):
        client.train(f"a{i}", seed=i)
        assert client.collect({f"a{i}"}, timeout=60)[f"a{i}"][0]["step"] == i + 1
    os.kill(fleet.procs["t"].pid, signal.SIGKILL)
    fleet.procs.pop("t").wait()
    fleet.start("t-again", cli("-v", "worker", "--broker", back, "--name", "t", "--device", "cpu", *KEYRINGS[back].args("t", "trainer"),
                               *FAST_HB, *flags))  # registers beside the dead one: a standby, sent version 2
    log = fleet.logs / "t-again.log"
    wait_for(lambda: log.is_file() and "ignoring weights version 2" in log.read_text(), 120, what="the relay of version 2")
    client.train("b", seed=9)  # taken once the broker declares the killed trainer dead
    assert client.collect({"b"}, timeout=60)["b"][0]["step"] == 4


def _group_status(front: str) -> dict:
    st = _status(front) or {}
    return {w["name"]: w for w in st.get("workers", [])} | {"": st.get("trainer_group", {})}


def _trained_by_every_rank(front: str, client: RawClient, jobs: set[str], ranks: tuple[str, ...]) -> None:
    """These train jobs each get one ack, and every one of these ranks applies rows."""
    got = client.train_all(jobs)
    assert all(len(v) == 1 and v[0]["type"] == "ack" for v in got.values()), got
    wait_for(lambda: all(_group_status(front)[n]["stats"].get("train_rows", 0) > 0 for n in ranks), 20, what="every rank to apply rows")


def test_a_trainer_group_trains_as_one_and_survives_a_ranks_death(fleet, tmp_path):
    """Two trainers started with --group form one data-parallel group (ranks 0 and 1) and share the
    train jobs; a third joins and the group re-forms with three; one rank SIGKILLed while jobs
    stream, then another SIGSTOPped (and later continued: it re-joins): every job gets exactly one ack,
    a denoise-only worker gets rank 0's relayed weights, the survivors hold every acknowledged job (the
    checkpoint's memory of applied jobs) and no job's rows are applied twice (rows applied =
    jobs × rows per job)."""
    slow_hb = ("--heartbeat-interval", "0.5", "--heartbeat-liveness", "10")  # a 5 s deadline: above the group's timeout
    front, back = start_broker(fleet, *slow_hb)
    flags = ("--max-train-rows", "4", "--train-wait", "0", "--group-timeout", "2", "--sync-every", "4", *slow_hb)
    ckpt = tmp_path / "rank0.safetensors"
    start_worker(fleet, back, front, "t0", *flags, "--group", f"127.0.0.1:{free_port()}", "--checkpoint", str(ckpt))
    start_worker(fleet, back, front, "t1", *flags, "--group", f"127.0.0.1:{free_port()}")
    wait_for(lambda: _group_status(front)[""].get("world") == 2, 60, what="a group of two")
    start_worker(fleet, back, front, "d", "--no-train", "--checkpoint", str(tmp_path / "d.safetensors"), "--seed", "9", *slow_hb)
    ranks = _group_status(front)
    assert {ranks["t0"]["rank"], ranks["t1"]["rank"]} == {0, 1}
    client = RawClient(front, "c")
    client.hello()
    first = {f"a{i:02d}" for i in range(16)}
    _trained_by_every_rank(front, client, first, ("t0", "t1"))
    start_worker(fleet, back, front, "t2", *flags, "--group", f"127.0.0.1:{free_port()}")
    wait_for(lambda: _group_status(front)[""].get("world") == 3, 60, what="a group of three")
    second = {f"b{i:02d}" for i in range(24)}
    for i, job in enumerate(sorted(second)):
        client.train(job, seed=100 + i)
        if i == 8:
            victim = next(n for n in ("t1", "t2") if _group_status(front)[n]["rank"] != 0)
            os.kill(fleet.procs[victim].pid, signal.SIGKILL)
            fleet.procs.pop(victim).wait()
            killed = time.monotonic()
    more = client.collect(second, timeout=180)
    assert all(len(v) == 1 and v[0]["type"] == "ack" for v in more.values()), more
    recovered = time.monotonic() - killed
    survivor = next(n for n in ("t1", "t2") if n != victim)
    os.kill(fleet.procs[survivor].pid, signal.SIGSTOP)  # a stalled rank: the others time out, the broker drops it
    third = {f"c{i:02d}" for i in range(8)}
    stalled = client.train_all(third, first_seed=200)
    os.kill(fleet.procs[survivor].pid, signal.SIGCONT)  # it comes back, registers again and re-joins
    assert all(len(v) == 1 and v[0]["type"] == "ack" for v in stalled.values()), stalled
    wait_for(lambda: _group_status(front)[""].get("world") == 2, 60, what="the stalled rank to re-join")
    fourth = {f"d{i:02d}" for i in range(8)}
    assert all(len(v) == 1 and v[0]["type"] == "ack" for v in client.train_all(fourth, first_seed=300).values())
    assert fleet.stop("t0") == 0  # SIGTERM: it checkpoints
    assert fleet.stop("d") == 0
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        relayed = json.loads(f.metadata()["collafuse"])["metadata"]["step"]
    assert relayed >= 4 and relayed % 4 == 0  # the denoise-only worker runs on rank 0's relayed weights

    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["collafuse"])["metadata"]
    applied = {job for _, job, _ in applied_jobs(ckpt)}
    acknowledged = first | second | third | fourth
    assert acknowledged <= applied  # every acknowledged job is in the surviving model
    assert meta["rows"] == 4 * len(acknowledged)  # and none twice
    print(json.dumps({"trainer_group": {"acknowledged": len(acknowledged), "contained": len(acknowledged & applied),
                                        "applied_twice": meta["rows"] // 4 - len(acknowledged), "steps": meta["step"],
                                        "kill_to_all_acked_s": round(recovered, 1)}}))


@pytest.fixture
def second_host():
    """Another host: a network namespace joined to this one by a veth pair, (here, there) its two
    ends' addresses in RFC 2544's benchmarking range (the link leaves no machine). Its 127.0.0.1 is
    its own, so an address that only works on one host fails across it. Yields the command prefix
    that runs a process there. Needs root and iproute2: skipped without them."""
    tag = f"cf{os.getpid() % 100000}"
    net = f"198.18.{os.getpid() % 250}"
    here, there = f"{net}.1", f"{net}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)

    try:
        ip("netns", "add", tag)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no network namespaces here ({exc})")
    try:
        ip("link", "add", f"{tag}h", "type", "veth", "peer", "name", f"{tag}p")
        ip("link", "set", f"{tag}p", "netns", tag)
        ip("addr", "add", f"{here}/24", "dev", f"{tag}h")
        ip("link", "set", f"{tag}h", "up")
        ip("-n", tag, "addr", "add", f"{there}/24", "dev", f"{tag}p")
        ip("-n", tag, "link", "set", f"{tag}p", "up")
        ip("-n", tag, "link", "set", "lo", "up")
        yield ("ip", "netns", "exec", tag), here, there
    finally:
        subprocess.run(["ip", "netns", "del", tag], capture_output=True, timeout=20)  # the veth pair goes with its last process
        subprocess.run(["ip", "link", "del", f"{tag}h"], capture_output=True, timeout=20)


def test_a_trainer_group_spans_two_hosts(second_host, fleet, tmp_path):
    """Two trainers on two hosts (this one and a network namespace) form one group over the link:
    each rank's rendezvous and gloo connections use its own --group address. The far rank registers
    first, so it is rank 0 and serves the rendezvous there. Every job is acknowledged once, both
    ranks apply rows, and both end with bit-identical weights holding every job once."""
    inside, here, there = second_host
    slow_hb = ("--heartbeat-interval", "0.5", "--heartbeat-liveness", "10")
    front, back = start_broker(fleet, *slow_hb, host=here)
    flags = ("--max-train-rows", "4", "--train-wait", "0", "--group-timeout", "3", "--sync-every", "4", *slow_hb)
    start_worker(fleet, back, front, "far", *flags, "--group", f"{there}:{free_port()}", "--checkpoint", str(tmp_path / "far.safetensors"), inside=inside)
    start_worker(fleet, back, front, "near", *flags, "--group", f"{here}:{free_port()}", "--checkpoint", str(tmp_path / "near.safetensors"))
    wait_for(lambda: _group_status(front)[""].get("world") == 2, 90, what="a group of two across the link")
    assert _group_status(front)["far"]["rank"] == 0
    client = RawClient(front, "c")
    client.hello()
    jobs = {f"a{i:02d}" for i in range(12)}
    _trained_by_every_rank(front, client, jobs, ("far", "near"))
    assert fleet.stop("near") == 0 and fleet.stop("far") == 0  # SIGTERM: each checkpoints

    files = {n: tmp_path / f"{n}.safetensors" for n in ("far", "near")}
    weights = {}
    for n, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            weights[n] = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
            assert json.loads(f.metadata()["collafuse"])["metadata"]["rows"] == 4 * len(jobs)
        assert jobs <= {job for _, job, _ in applied_jobs(path)}
    assert weights["far"] and weights["far"].keys() == weights["near"].keys()
    assert all(torch.equal(weights["far"][k], weights["near"][k]) for k in weights["far"])


def _three_steps_then_a_standby(fleet: Fleet, front: str, back: str, flags: tuple[str, ...], tmp_path, standby: str) -> RawClient:
    """Trainer "t" (with a checkpoint) chosen and a standby registered; a client's three jobs are
    acknowledged as steps 1-3. The client, welcomed."""
    start_worker(fleet, back, front, "t", *flags, "--checkpoint", str(tmp_path / "t.safetensors"))
    wait_for(lambda: any(w["trainer"] for w in _status(front)["workers"]), 30, what="the trainer chosen")
    start_worker(fleet, back, front, standby, *flags)
    client = RawClient(front, "c")
    client.hello()
    assert sorted(v[0]["step"] for v in client.train_all({"a0", "a1", "a2"}).values()) == [1, 2, 3]
    return client


def _kill_the_trainer(fleet: Fleet, front: str) -> None:
    """SIGKILL trainer "t" and wait until the broker has declared it dead (the standby alone)."""
    os.kill(fleet.procs["t"].pid, signal.SIGKILL)
    fleet.procs.pop("t").wait()
    wait_for(lambda: [w["name"] for w in _status(front)["workers"]] == ["standby"], 30, what="the trainer declared dead")


def test_after_a_broker_restart_the_trainer_is_the_worker_holding_the_acknowledged_steps(fleet, tmp_path):
    """A trainer acknowledges 3 steps (none relayed: --sync-every 100) and the broker is SIGKILLed
    and started again on its ports. The new run does not know who holds those steps, and the
    standby, at step 0, registers first (the trainer is SIGSTOPped for part of the run's election,
    --elect-trainer-for 4): the trainer is chosen all the same, and the next job is step 4.
    Then, with --state, the broker is killed again and the trainer stopped past the election: the
    broker remembers step 4, so the standby does not take over; the job waits for the trainer."""
    slow_hb = ("--heartbeat-interval", "0.5", "--heartbeat-liveness", "8")
    flags = ("--max-train-rows", "4", "--train-wait", "0", "--sync-every", "100", *slow_hb)
    ports = (free_port(), free_port())
    front, back = start_broker(fleet, *slow_hb, "--elect-trainer-for", "4", ports=ports)
    client = _three_steps_then_a_standby(fleet, front, back, flags, tmp_path, "s")

    def restart(name: str, *extra: str, stop_trainer_for: float) -> None:
        os.kill(fleet.procs[name].pid, signal.SIGKILL)
        fleet.procs.pop(name).wait()
        os.kill(fleet.procs["t"].pid, signal.SIGSTOP)
        try:
            start_broker(fleet, *slow_hb, "--elect-trainer-for", "4", *extra, ports=ports, name=name + "'")
            wait_for(lambda: [w["name"] for w in _status(front)["workers"]] == ["s"], 30, what="the standby registered")
            time.sleep(stop_trainer_for)
        finally:
            os.kill(fleet.procs["t"].pid, signal.SIGCONT)
        wait_for(lambda: len(_status(front)["workers"]) == 2, 30, what="the trainer registered again")
        client.hello()

    restart("broker", "--state", str(tmp_path / "state"), stop_trainer_for=1.0)
    got = client.train_all({"b0"})
    assert got["b0"][0]["type"] == "ack" and got["b0"][0]["step"] == 4, got
    assert [w["name"] for w in _status(front)["workers"] if w["trainer"]] == ["t"]
    restart("broker'", "--state", str(tmp_path / "state"), stop_trainer_for=6.0)
    client.train("c0", seed=60)
    got = client.collect({"c0"}, timeout=60)
    assert got["c0"][0]["type"] == "ack" and got["c0"][0]["step"] == 5, got
    assert [w["name"] for w in _status(front)["workers"] if w["trainer"]] == ["t"]


def test_a_trainer_that_stops_cleanly_relays_its_last_steps_and_the_standby_takes_over(fleet, tmp_path):
    """A trainer acknowledges 3 steps and relays none (--sync-every 100), then is stopped (SIGTERM):
    it checkpoints, relays steps 1-3 and says bye, so the standby holds every acknowledged step and
    takes over at once: the next job is step 4 (before, the standby could not, and train jobs
    waited for the trainer to come back or `no_worker_wait`)."""
    front, back = start_broker(fleet)
    flags = ("--max-train-rows", "4", "--train-wait", "0", "--sync-every", "100")
    client = _three_steps_then_a_standby(fleet, front, back, flags, tmp_path, "standby")
    assert fleet.stop("t") == 0
    got = client.train_all({"b0"}, timeout=30)
    assert got["b0"][0]["type"] == "ack" and got["b0"][0]["step"] == 4, got
    assert [w["name"] for w in _status(front)["workers"] if w["trainer"]] == ["standby"]


def test_a_trainer_restarted_from_its_checkpoint_relays_its_steps_when_it_stops(fleet, tmp_path):
    """A trainer acknowledges 3 steps and relays none, dies, and is started again from its
    checkpoint; it trains nothing more and is stopped cleanly. Its steps were never relayed: it
    relays them before bye, and the standby takes over at once (step 4). Before, only steps taken
    by the stopping process were relayed, and the job waited for a trainer holding steps 1-3."""
    front, back = start_broker(fleet)
    flags = ("--max-train-rows", "4", "--train-wait", "0", "--sync-every", "100")
    client = _three_steps_then_a_standby(fleet, front, back, flags, tmp_path, "standby")
    _kill_the_trainer(fleet, front)
    start_worker(fleet, back, front, "t", *flags, "--checkpoint", str(tmp_path / "t.safetensors"))
    wait_for(lambda: [w["name"] for w in _status(front)["workers"] if w["trainer"]] == ["t"], 30, what="the trainer back")
    assert fleet.stop("t") == 0
    got = client.train_all({"b0"}, timeout=30)
    assert got["b0"][0]["type"] == "ack" and got["b0"][0]["step"] == 4, got
    assert [w["name"] for w in _status(front)["workers"] if w["trainer"]] == ["standby"]


def test_a_standby_does_not_take_over_without_every_acknowledged_step(fleet, tmp_path):
    """A trainer (with its checkpoint) and a standby; the trainer acknowledges 3 steps and relays
    none (--sync-every 100), then dies. The standby would continue from older weights and number
    its steps again, so it does not take over: a new job waits, and is acknowledged as step 4 by
    the trainer started again from its checkpoint; the same when it is restarted at once."""
    front, back = start_broker(fleet)
    flags = ("--max-train-rows", "4", "--train-wait", "0", "--sync-every", "100")
    client = _three_steps_then_a_standby(fleet, front, back, flags, tmp_path, "standby")
    _kill_the_trainer(fleet, front)
    assert not any(w["trainer"] for w in _status(front)["workers"])
    client.train("b0", seed=50)
    assert client.silent(2.0)  # waits: no trainer can take it without losing acknowledged steps
    start_worker(fleet, back, front, "t", *flags, "--checkpoint", str(tmp_path / "t.safetensors"))
    got = client.collect({"b0"}, timeout=60)
    assert got["b0"][0]["type"] == "ack" and got["b0"][0]["step"] == 4
    # Restarted at once, before the broker has noticed the death: the new connection registers
    # while the old still counts as the trainer, and takes over once its heartbeat reports step 4.
    os.kill(fleet.procs["t"].pid, signal.SIGKILL)
    fleet.procs.pop("t").wait()
    fleet.start("t", cli("worker", "--broker", back, "--name", "t", "--device", "cpu", *KEYRINGS[back].args("t", "trainer"), *FAST_HB, *flags,
                         "--checkpoint", str(tmp_path / "t.safetensors")))
    client.train("b1", seed=51)
    got = client.collect({"b1"}, timeout=120)
    assert got["b1"][0]["type"] == "ack" and got["b1"][0]["step"] == 5
