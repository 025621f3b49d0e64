"""CURVE on the wire (DESIGN.md §7): who may connect, as what, under which name; revocation without
a restart. Every refused peer gets nothing: no welcome, no job, no status."""

from __future__ import annotations

import time

import pytest
import zmq.auth

from collafuse.protocol import wire
from collafuse.protocol.security import KeyPair, PeerKeys, revoke
from collafuse.system.launch import Fleet
from tests.netclient import KEYRINGS, RawClient, RawWorker
from tests.test_system import _status, start_broker


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "logs", threads=1)
    yield f
    f.stop_all(timeout=20)


def _stranger_keys(folder, name: str, broker_public: bytes) -> PeerKeys:
    """A well-formed key pair that no allow-list holds."""
    folder.mkdir(parents=True, exist_ok=True)
    _, secret = zmq.auth.create_certificates(str(folder), name)
    return PeerKeys(KeyPair(*zmq.auth.load_certificate(secret)), broker_public)


def test_keys_decide_who_connects_and_as_what(fleet, tmp_path):
    front, back = start_broker(fleet, "--heartbeat-liveness", "200")
    ring = KEYRINGS[front]
    broker_public = PeerKeys.load(ring.peer("alice", "node")).broker
    worker = RawWorker(back, "w0")  # a trainer key
    worker.ready()
    deadline = time.monotonic() + 10
    while not (_status(front) or {}).get("workers") and time.monotonic() < deadline:
        time.sleep(0.05)
    alice = RawClient(front, "alice")
    alice.hello()

    # an unknown key, or the right key with the wrong server key: no connection, so no answer at all
    stranger = RawClient(front, "stranger", keys=_stranger_keys(tmp_path, "stranger", broker_public))
    stranger.send(wire.encode("hello", client="stranger", t_c=60, image_shape=[1, 32, 32], levels=100))
    assert stranger.silent()
    impostor_server = _stranger_keys(tmp_path / "other", "fake-broker", broker_public).own.public
    wrong_server = RawClient(front, "alice2", keys=PeerKeys(own=PeerKeys.load(ring.peer("alice", "node")).own, broker=impostor_server))
    wrong_server.send(wire.encode("status"))
    assert wrong_server.silent()

    # a node key on the workers' socket: refused before any message, so it is never given a job
    rogue = RawWorker(back, "rogue", keys=PeerKeys.load(ring.peer("mallory", "node")))
    rogue.ready()
    alice.denoise("d1", count=2)
    env, _ = worker.next_job()
    assert env["job"] == "d1" and rogue.silent(0.5)
    assert [w["name"] for w in _status(front)["workers"]] == ["w0"]

    # a worker key may denoise but not train; a node key may not read status; an admin key may not join
    denoiser = RawWorker(back, "denoiser", keys=PeerKeys.load(ring.peer("denoiser", "worker")))
    denoiser.ready(trainer=True)
    reply, _ = denoiser.recv()
    assert reply["code"] == "forbidden" and "trainer" in reply["reason"]
    alice.send(wire.encode("status"))
    assert alice.recv()[0]["code"] == "forbidden"
    admin = RawClient(front, "admin", keys=ring.admin())
    admin.send(wire.encode("hello", client="admin", t_c=60, image_shape=[1, 32, 32], levels=100))
    assert admin.recv()[0]["code"] == "forbidden"

    # a name belongs to the first key that said hello with it
    bob = RawClient(front, "bob")
    bob.send(wire.encode("hello", client="alice", t_c=60, image_shape=[1, 32, 32], levels=100))
    assert bob.recv()[0]["code"] == "forbidden"
    bob.hello()
    bob.send(wire.encode("denoise", job="steal", client="alice", count=2, t_c=60, seed=0, first_row=0, sampler="ddim", steps=4, eta=0.0))
    assert bob.recv()[0]["code"] == "forbidden"

    # revocation: the broker re-reads its allow-lists every heartbeat; no restart
    assert revoke("alice", ring.broker) == ["node"]
    time.sleep(1.0)
    alice.denoise("d2", count=2)
    reply = alice.recv()[0]
    while reply["type"] != "error":  # d1's result may still be on its way
        reply = alice.recv()[0]
    assert reply["code"] == "forbidden" and reply["job"] == "d2"
    again = RawClient(front, "alice")
    again.send(wire.encode("hello", client="alice", t_c=60, image_shape=[1, 32, 32], levels=100))
    assert again.silent()  # a new connection with the revoked key is refused outright
    assert fleet.alive("broker")
