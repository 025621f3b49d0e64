"""Hostile peers on loopback (DESIGN.md §7): every request gets exactly one reply, with a code; what
no honest node sends is refused where it enters; nobody else is harmed; memory stays bounded."""

from __future__ import annotations

import json
import struct
import time

import msgpack
import numpy as np
import pytest
import torch
from safetensors import safe_open

from collafuse.protocol import tensors, wire
from collafuse.protocol.security import PeerKeys
from collafuse.system.launch import Fleet, free_port, wait_for
from tests.netclient import KEYRINGS, RawClient, RawWorker
from tests.test_system import _status, start_broker, start_worker

SHAPE = (1, 32, 32)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "logs", threads=1)
    yield f
    f.stop_all(timeout=20)


def _train_arrays(rows: int, seed: int, t_c: int = 60) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x_t": rng.standard_normal((rows, *SHAPE), dtype=np.float32), "t": rng.integers(t_c + 1, 101, rows).astype(np.int64),
            "eps": rng.standard_normal((rows, *SHAPE), dtype=np.float32)}


def _one_reply(client: RawClient, timeout: float = 30.0) -> dict:
    """The one reply to what was just sent, and nothing after it."""
    env, _ = client.recv(timeout)
    while env["type"] == "heartbeat":
        env, _ = client.recv(timeout)
    quiet_until = time.monotonic() + 0.5
    while (left := quiet_until - time.monotonic()) > 0:  # heartbeats may come meanwhile; nothing else may
        try:
            more, _ = client.recv(left)
        except TimeoutError:
            break
        assert more["type"] == "heartbeat", f"a second reply: {more}"
    return env


def _header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_hostile_client_between_honest_jobs_gets_one_error_each_and_changes_nothing(fleet, tmp_path):
    front, back = start_broker(fleet)
    early = RawClient(front, "early")
    early.send(wire.encode("hello", client="early", t_c=60, image_shape=list(SHAPE), levels=100))
    assert _one_reply(early)["code"] == "unavailable"  # no worker yet: the shape is not known, so no welcome
    checkpoint = tmp_path / "server.safetensors"
    start_worker(fleet, back, front, "w0", "--max-train-rows", "4", "--train-wait", "0", "--checkpoint", str(checkpoint))
    alice, mallory = RawClient(front, "alice"), RawClient(front, "mallory")
    alice.hello()
    mallory.hello()

    def train(over: dict, rows: int = 4):
        arrays = {**_train_arrays(rows, 99), **over}
        return [wire.encode("train", job="m", client="mallory", rows=rows, t_c=60), tensors.encode(arrays)]

    nested = struct.pack("<Q", 100_000) + b"[" * 100_000
    hostile = [
        (train({"x_t": np.full((4, *SHAPE), np.nan, np.float32)}), "bad_tensor"),
        (train({"eps": np.full((4, *SHAPE), np.inf, np.float32)}), "bad_tensor"),
        (train({"x_t": np.full((4, *SHAPE), 1e30, np.float32)}), "bad_tensor"),
        (train({"eps": np.full((4, *SHAPE), 100.0, np.float32)}), "bad_tensor"),
        (train({"eps": np.full((4, *SHAPE), 1e16, np.float32)}), "bad_tensor"),
        (train({"t": np.full(4, 30, np.int64)}), "bad_tensor"),
        ([msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": ["train"]})], "unknown_type"),
        ([msgpack.packb({"v": float(wire.PROTOCOL_VERSION), "type": "status"})], "bad_version"),
        ([wire.encode("train", job="m", client="mallory", rows=4, t_c=60), nested], "bad_tensor"),
        ([wire.encode("train", job="m", client="mallory", rows=1, t_c=60),
          _header({"x_t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)], "bad_tensor"),
        (train({}, rows=64), "too_large"),  # more rows than the trainer's credit (2 × 4): once queued forever
        ([wire.encode("denoise", job="m", client="mallory", count=1000, t_c=60, seed=0, first_row=0, sampler="ddim", steps=4, eta=0.0)], "too_large"),
    ]
    honest: list[dict[str, np.ndarray]] = []
    for i, (frames, code) in enumerate(hostile):
        arrays = _train_arrays(4, i)
        honest.append(arrays)
        alice.send(wire.encode("train", job=f"h{i}", client="alice", rows=4, t_c=60), tensors.encode(arrays))
        ack = _one_reply(alice)
        assert ack["type"] == "ack" and ack["job"] == f"h{i}" and np.isfinite(ack["loss"]), ack
        env = msgpack.unpackb(frames[0])
        if "job" in env:  # a fresh id each time, so that no answer comes from the reply cache
            frames = [msgpack.packb({**env, "job": f"m{i}"}), *frames[1:]]
        mallory.send(*frames)
        reply = _one_reply(mallory)
        assert reply["type"] == "error" and reply["code"] == code, (i, reply)
    # a job id stands for one request: re-sent as is, the cached answer; changed, a conflict
    mallory.denoise("d", count=2)
    first = _one_reply(mallory)
    mallory.denoise("d", count=2)
    assert _one_reply(mallory) == first
    mallory.denoise("d", count=3)
    assert _one_reply(mallory)["code"] == "conflict"
    mallory.train("d")
    assert _one_reply(mallory)["code"] == "conflict"  # a train job under a denoise job's id
    alice.denoise("g", count=3)
    result = alice.recv(30)
    assert result[0]["type"] == "result"
    assert np.isfinite(tensors.decode(result[1][0], None, 1 << 26)["x"]).all()
    assert fleet.stop("w0") == 0
    # the server model is exactly the one trained on alice's jobs alone, one step each
    from collafuse.diffusion.split import ServerMessage
    from collafuse.engine.server import ServerParty

    alone, threads = ServerParty(SHAPE, seed=0), torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (the fleet's processes run one thread): the same float order
    try:
        for arrays in honest:
            t = torch.from_numpy(arrays["t"])
            message = ServerMessage(torch.from_numpy(arrays["x_t"]), t, torch.full_like(t, 60), torch.from_numpy(arrays["eps"]))
            assert alone.train_step([message], ["alice"]).loss
    finally:
        torch.set_num_threads(threads)
    with safe_open(str(checkpoint), framework="pt") as f:
        saved = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.allclose(saved[k], v, atol=1e-6) for k, v in alone.model.state_dict().items())
    st = _status(front)
    assert st["clients"]["mallory"]["errors"] >= 10 and fleet.alive("broker")


def test_every_accepted_job_gets_one_final_reply_whatever_the_workers_do(fleet):
    """Raw workers misbehave in each way a job could once be stranded. (The raw worker sends no
    heartbeats, so the broker is told to wait long before it counts it dead.)"""
    front, back = start_broker(fleet, "--no-worker-wait", "1", "--job-timeout", "1", "--heartbeat-liveness", "200")
    rogue = RawWorker(back, "rogue")
    rogue.ready(denoise_credit=8, train_credit=8)
    wait = time.monotonic() + 10
    while not (_status(front) or {}).get("workers") and time.monotonic() < wait:
        time.sleep(0.05)
    node = RawClient(front, "n")
    node.hello()
    # a reply that fails validation (a NaN loss) becomes an error for the node, and the credit returns
    node.train("t1")
    env, _ = rogue.next_job()
    rogue.send(msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "ack", "job": env["job"], "client": env["client"], "step": 1, "loss": float("nan")}))
    reply = _one_reply(node)
    assert reply["code"] == "internal" and "invalid" in reply["reason"] and reply["job"] == "t1"
    # a result for a train job, or with the wrong rows, likewise
    node.train("t2")
    env, _ = rogue.next_job()
    rogue.send(wire.encode("result", job="t2", client="n", count=4), tensors.encode({"x": np.zeros((4, *SHAPE), np.float32)}))
    assert _one_reply(node)["code"] == "internal"
    node.denoise("d1", count=2)
    env, _ = rogue.next_job()
    rogue.send(wire.encode("result", job="d1", client="n", count=2), tensors.encode({"x": np.zeros((3, *SHAPE), np.float32)}))
    assert _one_reply(node)["code"] == "internal"
    # a worker that holds a job past the job timeout: the node hears `timeout`, the late answer is dropped
    node.denoise("d2", count=2)
    env, _ = rogue.next_job()
    assert _one_reply(node, timeout=10)["code"] == "timeout"
    rogue.send(wire.encode("result", job="d2", client="n", count=2), tensors.encode({"x": np.zeros((2, *SHAPE), np.float32)}))
    with pytest.raises(TimeoutError):
        node.recv(0.5)
    # no worker at all: queued jobs are answered `unavailable` after the wait, not kept forever
    rogue.send(wire.encode("bye"))
    time.sleep(0.3)
    node.denoise("d3", count=2)
    assert _one_reply(node, timeout=10)["code"] == "unavailable"
    # a heartbeat from a connection that never said hello is told so (a restarted broker's answer)
    stranger = RawClient(front, "stranger")
    stranger.send(wire.encode("heartbeat"))
    assert _one_reply(stranger)["code"] == "not_joined"
    assert fleet.alive("broker")


def test_invented_names_are_capped_and_forgotten(fleet):
    front, back = start_broker(fleet, "--max-clients", "20", "--client-idle-expiry", "1")
    rogue = RawWorker(back, "w")
    rogue.ready()
    time.sleep(0.3)
    codes = []
    for i in range(30):
        c = RawClient(front, f"name{i}")
        c.send(wire.encode("hello", client=f"name{i}", t_c=60, image_shape=list(SHAPE), levels=100))
        env, _ = c.recv()
        codes.append(env.get("code", env["type"]))
        c.close()
    assert codes.count("welcome") == 20 and codes.count("busy") == 10
    assert _status(front)["clients_total"] == 20
    deadline = time.monotonic() + 10
    while _status(front)["clients_total"] and time.monotonic() < deadline:
        rogue.send(wire.encode("heartbeat"))
        time.sleep(0.2)
    assert _status(front)["clients_total"] == 0  # idle names expire
    late = RawClient(front, "late")
    late.hello()  # room again


def test_a_flooding_client_delays_the_others_by_one_turn_not_by_its_queue(fleet):
    """Dispatch is round robin per kind over the clients with queued jobs: a client with twenty jobs
    queued gets one per turn like everybody else; a head too large for the worker's credit keeps its
    place while smaller jobs pass, and goes as soon as the credit covers it."""
    front, back = start_broker(fleet, "--heartbeat-liveness", "200")
    worker = RawWorker(back, "w")
    worker.ready(denoise_credit=3, train_credit=1)
    wait_for(lambda: (_status(front) or {}).get("workers"), 10, what="the raw worker")
    flood, a, b = (RawClient(front, name) for name in ("flood", "a", "b"))
    for c in (flood, a, b):
        c.hello()

    def held(queued: int, in_flight: int) -> None:  # the broker has read them all (it reads connections in no set order)
        wait_for(lambda: (st := _status(front)) is not None and (st["queued"], st["in_flight"]) == (queued, in_flight), 20,
                 what=f"{queued} jobs queued, {in_flight} in flight")

    for i in range(20):
        flood.train(f"f{i}", rows=1)
    held(19, 1)  # f0 went at once
    a.train("a0", rows=1), a.train("a1", rows=1)
    held(21, 1)
    b.train("b0", rows=1)
    flood.denoise("fd0", count=1), flood.denoise("fd1", count=3)
    held(23, 2)  # fd0 went at once
    a.denoise("ad0", count=1), a.denoise("ad1", count=1)
    held(23, 4)  # both fit the 2 rows of credit left; fd1 (3 rows) waits
    order: dict[str, list[str]] = {"train": [], "denoise": []}
    for _ in range(10):
        env, _ = worker.next_job()
        order[env["type"]].append(env["job"])
        if env["type"] == "train":
            worker.send(wire.encode("ack", job=env["job"], client=env["client"], step=len(order["train"]), loss=0.1))
        else:
            worker.send(wire.encode("result", job=env["job"], client=env["client"], count=env["count"]),
                        tensors.encode({"x": np.zeros((env["count"], *SHAPE), np.float32)}))
    assert order["train"][:6] == ["f0", "f1", "a0", "b0", "f2", "a1"], order
    # fd0 holds 1 of the 3 rows of credit: fd1 (3 rows) waits while ad0 and ad1 pass it, then goes
    assert order["denoise"] == ["fd0", "ad0", "ad1", "fd1"], order
    assert fleet.alive("broker")


def test_a_large_job_is_not_starved_by_a_stream_of_small_ones(fleet):
    """A job larger than the worker's free credit lets smaller ones pass only for --reserve-after:
    then the worker is kept for it, drains, and takes it, and the small ones follow."""
    front, back = start_broker(fleet, "--heartbeat-liveness", "200", "--reserve-after", "1")
    worker = RawWorker(back, "w")
    worker.ready(denoise_credit=4, train_credit=0, trainer=False)
    wait_for(lambda: (_status(front) or {}).get("workers"), 10, what="the raw worker")
    small, big = RawClient(front, "small"), RawClient(front, "big")
    small.hello(), big.hello()
    held = []
    for i in range(3):
        small.denoise(f"s{i}", count=1)
        held.append(worker.next_job()[0]["job"])
    big.denoise("b", count=4)  # 1 row of credit free: it waits
    order, sent, started = [], 3, time.monotonic()
    while "b" not in order and time.monotonic() - started < 8:
        if held:  # answer the oldest small job and send another, which fits the row it frees
            job = held.pop(0)
            worker.send(wire.encode("result", job=job, client="small", count=1), tensors.encode({"x": np.zeros((1, *SHAPE), np.float32)}))
            small.denoise(f"s{sent}", count=1)
            sent += 1
        try:
            env, _ = worker.next_job(timeout=0.3)
        except (TimeoutError, ConnectionError):
            continue
        order.append(env["job"])
        if env["job"] != "b":
            held.append(env["job"])
        time.sleep(0.1)
    assert "b" in order, f"the 4-row job never went: {order}"
    waited = time.monotonic() - started
    assert 1.0 <= waited < 8, waited  # small jobs passed it for about --reserve-after, not longer
    assert fleet.alive("broker")


def test_what_a_client_written_from_protocol_md_found(fleet):
    """Each case a client written from PROTOCOL.md alone once found answered late, wrongly or not at
    all: now one coded reply each, and a reply goes to the connection that sent the job."""
    front, back = start_broker(fleet, "--heartbeat-liveness", "200")
    worker = RawWorker(back, "w")
    worker.ready(denoise_credit=8, train_credit=8)
    wait_for(lambda: (_status(front) or {}).get("workers"), 10, what="the raw worker")
    # a worker's bad ready, or one with a tensor frame, is answered (it used to hear only not_joined later)
    bad = RawWorker(back, "bad")
    bad.send(wire.encode("ready", worker="bad", denoise_credit=-5, train_credit=0, trainer=False, image_shape=list(SHAPE), levels=100, model="tiny"))
    assert _one_reply(bad)["code"] == "bad_field"
    bad.send(wire.encode("ready", worker="bad", denoise_credit=8, train_credit=0, trainer=False, image_shape=list(SHAPE), levels=100, model="tiny"), b"x")
    assert _one_reply(bad)["code"] == "bad_envelope"
    # a node's hello with a tensor frame, a worker's message type from a node
    a = RawClient(front, "a")
    a.send(wire.encode("hello", client="a", t_c=60, image_shape=list(SHAPE), levels=100), b"anything")
    assert _one_reply(a)["code"] == "bad_tensor"
    a.send(msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "ready"}))
    assert _one_reply(a)["code"] == "unknown_type"
    a.hello()
    # a worker's error with the fields PROTOCOL.md lists (no client) ends the job at once
    a.denoise("d1", count=2)
    env, _ = worker.next_job()
    worker.send(wire.encode("error", job=env["job"], code="internal", reason="model exploded"))
    reply = _one_reply(a, timeout=5)
    assert (reply["job"], reply["code"], reply["reason"]) == ("d1", "internal", "model exploded")
    # a job from a connection that never said hello is not_joined, and cannot take another's reply
    a.denoise("d2", count=2)
    held, _ = worker.next_job()
    thief = RawClient(front, "a")  # the same name (and, with keys, the same key), never said hello
    thief.denoise("d3", count=2)
    assert _one_reply(thief)["code"] == "not_joined"
    worker.send(wire.encode("result", job="d2", client="a", count=2), tensors.encode({"x": np.zeros((2, *SHAPE), np.float32)}))
    assert _one_reply(a)["job"] == "d2" and thief.silent(0.5)
    # two welcomed connections of one name: each job's reply goes to the one that sent it
    thief.hello()
    thief.denoise("d4", count=2)
    a.denoise("d5", count=2)
    for _ in range(2):
        env, _ = worker.next_job()
        worker.send(wire.encode("result", job=env["job"], client="a", count=2), tensors.encode({"x": np.zeros((2, *SHAPE), np.float32)}))
    assert _one_reply(thief)["job"] == "d4" and _one_reply(a)["job"] == "d5"
    # a result with a third frame is not forwarded as valid: the node hears internal
    a.denoise("d6", count=2)
    worker.next_job()
    worker.send(wire.encode("result", job="d6", client="a", count=2), tensors.encode({"x": np.zeros((2, *SHAPE), np.float32)}), b"junk")
    reply = _one_reply(a)
    assert reply["code"] == "internal" and "frame" in reply["reason"]
    assert fleet.alive("broker")


def test_one_key_cannot_hold_more_than_its_connections(fleet):
    """A node key that opens connection after connection (here 5, each with its own name, the cap
    3) keeps only its newest 3 known; its oldest are answered `not_joined` (they may say hello
    again), and another key's node is untouched."""
    front, back = start_broker(fleet, "--max-connections-per-key", "3")
    worker = RawWorker(back, "w")
    worker.ready()
    time.sleep(0.3)
    ring = KEYRINGS[front]
    one_key = PeerKeys.load(ring.peer("many", "node"))
    other = RawClient(front, "other")
    other.hello()
    conns = [RawClient(front, f"many{i}", keys=one_key) for i in range(5)]
    for c in conns:
        c.hello()
    answers = []
    for c in [*conns, other]:
        c.send(wire.encode("heartbeat"))
        env, _ = c.recv()
        answers.append(env.get("code", env["type"]))
    assert answers == ["not_joined", "not_joined", "heartbeat", "heartbeat", "heartbeat", "heartbeat"]
    conns[0].hello()  # says hello again: now the next oldest of that key is forgotten
    conns[2].send(wire.encode("heartbeat"))
    assert conns[2].recv()[0]["code"] == "not_joined"


def test_a_lone_trainer_and_a_trainer_group_do_not_mix(fleet):
    """Two trainers of one model that do not reduce together would each lose the other's steps: a
    group member that registers while a lone trainer trains is refused (`incompatible`, saying
    why), and a worker without --group that registers beside a group only denoises."""
    front, back = start_broker(fleet)
    lone = RawWorker(back, "lone")
    lone.ready()
    time.sleep(0.3)
    member = RawWorker(back, "member")
    member.ready(group="127.0.0.1:29999")
    env, _ = member.recv()
    assert env["code"] == "incompatible" and "lone trainer" in env["reason"]
    lone.send(wire.encode("bye"))
    time.sleep(0.3)
    member.ready(group="127.0.0.1:29999")
    time.sleep(0.3)
    late = RawWorker(back, "late")
    late.ready()
    time.sleep(0.3)
    workers = {w["name"]: w for w in _status(front)["workers"]}
    assert workers["late"]["credit"]["train"] == 0 and workers["member"]["credit"]["train"] == 8


def _next(worker: RawWorker, kind: str, timeout: float = 10.0, **fields) -> dict:
    """The next message of this type (with these field values) to a raw worker; others skipped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        env, _ = worker.recv(max(0.01, deadline - time.monotonic()))
        if env["type"] == kind and all(env.get(k) == v for k, v in fields.items()):
            return env
    raise TimeoutError(f"no {kind} {fields}")


def _generation(workers: list[RawWorker], world: int, timeout: float = 10.0) -> dict:
    """The next generation of this size, as each of these raw members is told it (the same one)."""
    told = [_next(w, "group", timeout, world=world) for w in workers]
    assert len({g["id"] for g in told}) == 1, told
    return told[0]


def _formed(workers: list[RawWorker], generation: dict) -> None:
    """Say, as each member's heartbeat does, that this generation formed there."""
    for rank, w in enumerate(workers):
        w.send(wire.encode("heartbeat", stats={"rank": rank, "generation": generation["id"]}))


def _failed(workers: list[RawWorker], generation: dict) -> None:
    for w in workers:
        w.send(wire.encode("group_failed", id=generation["id"]))


def test_a_trainer_that_breaks_every_generation_is_left_out_of_the_group(fleet):
    """A trainer whose generations all fail (every rank reports such a failure, so no report names
    it) is put on trial after --group-max-failures of them; the group forms without it and takes a
    step (an ack), it is let back in to check, and that generation fails too: it is left out. The
    train job it held goes to a member and is answered once (its own late ack is dropped); it is
    told why, gets no train job again, and its reports cause no re-form."""
    front, back = start_broker(fleet, "--heartbeat-liveness", "200", "--group-settle", "0.2", "--group-max-failures", "2")
    a, b = RawWorker(back, "a"), RawWorker(back, "b")
    a.ready(group="127.0.0.1:29991", train_credit=8)
    b.ready(group="127.0.0.1:29992", train_credit=4)
    _formed([a, b], _generation([a, b], world=2))  # a may first be alone in a generation, formed before b registered
    node = RawClient(front, "n")
    node.hello()
    c = RawWorker(back, "c")
    c.ready(group="127.0.0.1:29993", train_credit=16)
    generation = _generation([a, b, c], world=3)
    node.train("held")
    assert c.next_job()[0]["job"] == "held"  # the most train credit; c never answers in time
    _failed([a, b, c], generation)
    _failed([a, b, c], _generation([a, b, c], world=3))  # c's second failure in a row: on trial
    without = _generation([a, b], world=2)
    with pytest.raises(TimeoutError):
        _next(c, "error", timeout=0.5)  # not told while on trial
    assert _status(front)["trainer_group"]["out"] == ["c"]
    _formed([a, b], without)
    node.train("step")
    assert a.next_job()[0]["job"] == "step"
    with pytest.raises(TimeoutError):
        _next(a, "group", timeout=1.0)  # formed without c, but no step yet: no evidence
    a.send(wire.encode("ack", job="step", client="n", step=2, loss=0.5))
    assert _one_reply(node)["step"] == 2
    _failed([a, b, c], _generation([a, b, c], world=3))  # held: c let back in to check, and it fails again
    notice = _next(c, "error")
    assert notice["job"] == "" and notice["code"] == "refused" and "left out of the trainer group" in notice["reason"]
    after = _generation([a, b], world=2)
    env, _ = a.next_job()
    assert env["job"] == "held"  # re-queued to a member
    c.send(wire.encode("ack", job="held", client="n", step=9, loss=0.5))  # too late: dropped
    a.send(wire.encode("ack", job="held", client="n", step=3, loss=0.5))
    reply = _one_reply(node)
    assert reply["type"] == "ack" and reply["step"] == 3
    workers = {w["name"]: w for w in _status(front)["workers"]}
    assert workers["c"]["credit"]["train"] == 0 and workers["c"]["rank"] is None and not workers["c"]["trainer"]
    assert _status(front)["trainer_group"]["world"] == 2
    _failed([c], after)  # from a member left out: no re-form
    node.train("later")
    assert a.next_job()[0]["job"] == "later"
    with pytest.raises(TimeoutError):
        _next(a, "group", timeout=1.0)


def test_a_worker_left_out_of_the_group_serves_denoise_jobs_only(fleet):
    """A real worker that cannot join the group's generations (the rank 0 it is given serves no
    rendezvous) while the two others form without it is left out: it is told, says so in its log,
    leaves the group, keeps running and serves denoise jobs."""
    front, back = start_broker(fleet, "--heartbeat-liveness", "200", "--group-settle", "3", "--group-max-failures", "2")
    r1, r2 = RawWorker(back, "r1"), RawWorker(back, "r2")
    r1.ready(denoise_credit=0, group=f"127.0.0.1:{free_port()}")  # nobody serves this rendezvous
    r2.ready(denoise_credit=0, train_credit=4, group=f"127.0.0.1:{free_port()}")
    _formed([r1, r2], _generation([r1, r2], world=2))
    start_worker(fleet, back, front, "w", "--group", f"127.0.0.1:{free_port()}", "--heartbeat-liveness", "50", "--group-timeout", "1")
    for _ in range(2):  # the worker reports its own failure within the settle
        _failed([r1, r2], _generation([r1, r2], world=3, timeout=30))
    _formed([r1, r2], _generation([r1, r2], world=2, timeout=30))  # without it, the two form
    node = RawClient(front, "n")
    node.hello()
    node.train("t")
    assert r1.next_job()[0]["job"] == "t"
    r1.send(wire.encode("ack", job="t", client="n", step=1, loss=0.5))  # and take a step
    assert _one_reply(node)["type"] == "ack"
    _failed([r1, r2], _generation([r1, r2], world=3, timeout=30))  # with it again, not
    _generation([r1, r2], world=2, timeout=30)
    wait_for(lambda: "left out of the trainer group" in (fleet.logs / "w.log").read_text(), 30, what="the worker's log line")
    workers = {w["name"]: w for w in _status(front)["workers"]}
    assert workers["w"]["credit"]["train"] == 0 and workers["w"]["rank"] is None
    node.denoise("d", count=2)
    reply = _one_reply(node, timeout=60)
    assert reply["type"] == "result" and reply["count"] == 2
    assert fleet.procs["w"].poll() is None  # still running


def test_only_a_worker_holding_the_latest_acknowledged_step_becomes_the_trainer(fleet):
    """A durable trainer acknowledges step 3 and leaves. A trainer that registers afterwards is
    made the trainer only once its heartbeat reports a model at step 3 or later: before, the job
    waits (a fresh worker would lose the acknowledged steps and number steps again)."""
    front, back = start_broker(fleet, "--heartbeat-liveness", "200")
    old = RawWorker(back, "old")
    old.ready()
    old.send(wire.encode("heartbeat", stats={"step": 0, "durable": True}))
    time.sleep(0.3)
    node = RawClient(front, "n")
    node.hello()
    node.train("a")
    env, _ = old.next_job()
    old.send(wire.encode("ack", job="a", client="n", step=3, loss=0.5))
    assert node.recv()[0]["type"] == "ack"
    old.send(wire.encode("bye"))
    fresh = RawWorker(back, "fresh")
    fresh.ready()
    fresh.send(wire.encode("heartbeat", stats={"step": 0, "durable": True}))
    time.sleep(0.3)
    node.train("b")
    with pytest.raises(TimeoutError):
        fresh.next_job(timeout=1.0)  # step 0 < 3: not the trainer
    fresh.send(wire.encode("heartbeat", stats={"step": 3, "durable": True}))  # e.g. it loaded the trainer's checkpoint
    env, _ = fresh.next_job(timeout=5.0)
    assert env["job"] == "b" and [w["name"] for w in _status(front)["workers"] if w["trainer"]] == ["fresh"]
