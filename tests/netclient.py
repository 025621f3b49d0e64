"""A minimal protocol client for tests: a raw DEALER socket speaking PROTOCOL.md by hand."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import zmq

from collafuse.common.config import ProtocolLimits
from collafuse.protocol import tensors, wire
from collafuse.protocol.security import PeerKeys
from collafuse.protocol.sockets import dealer
from collafuse.system.keyring import Keyring

KEYRINGS: dict[str, Keyring] = {}  # a test broker's addresses (frontend and backend) → its keys


class RawClient:
    """A node by hand; with the key of its own name from the broker's keyring (if the broker has one),
    or the `keys` given (None: plain TCP)."""

    role = "node"

    def __init__(self, address: str, name: str, shape=(1, 32, 32), keys: PeerKeys | None | str = "default") -> None:
        self.name = name
        if keys == "default":
            ring = KEYRINGS.get(address)
            keys = PeerKeys.load(ring.peer(name, self.role)) if ring and ring.folder else None
        self.sock = dealer(zmq.Context.instance(), address, ProtocolLimits().max_frame_bytes, keys)
        self.shape = shape

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 10.0) -> tuple[dict, list[bytes]]:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        frames = self.sock.recv_multipart()
        return msgpack.unpackb(frames[0]), frames[1:]

    def hello(self, t_c: int = 60) -> dict:
        self.send(wire.encode("hello", client=self.name, t_c=t_c, image_shape=list(self.shape), levels=100))
        env, _ = self.recv()
        assert env["type"] == "welcome", env
        return env

    def denoise(self, job: str, count: int = 2, t_c: int = 60, steps: int = 4, sampler: str = "ddim", seed: int = 0) -> None:
        self.send(wire.encode("denoise", job=job, client=self.name, count=count, t_c=t_c, seed=seed, first_row=0,
                              sampler=sampler, steps=steps, eta=0.0))

    def train(self, job: str, rows: int = 4, t_c: int = 60, seed: int = 0) -> None:
        """A valid server-training job: x_t, t in (t_c, T], eps (random values of the right shapes)."""
        rng = np.random.default_rng(seed)
        blob = tensors.encode({"x_t": rng.standard_normal((rows, *self.shape), dtype=np.float32),
                               "t": rng.integers(t_c + 1, 101, rows).astype(np.int64),
                               "eps": rng.standard_normal((rows, *self.shape), dtype=np.float32)})
        self.send(wire.encode("train", job=job, client=self.name, rows=rows, t_c=t_c), blob)

    def silent(self, seconds: float = 1.0) -> bool:
        """Whether nothing at all arrives for `seconds`."""
        try:
            self.recv(seconds)
        except TimeoutError:
            return True
        return False

    def train_all(self, jobs: set[str], first_seed: int = 0, timeout: float = 120) -> dict[str, list[dict]]:
        """Send these train jobs (in sorted order, seeds counting up from `first_seed`) and collect their replies."""
        for i, job in enumerate(sorted(jobs)):
            self.train(job, seed=first_seed + i)
        return self.collect(jobs, timeout)

    def collect(self, jobs: set[str], timeout: float) -> dict[str, list[dict]]:
        """Every reply per job id until all have one (and a short grace for duplicates)."""
        got: dict[str, list[dict]] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not jobs <= set(got):
            try:
                env, _ = self.recv(0.5)
            except TimeoutError:
                continue
            if "job" in env:
                got.setdefault(env["job"], []).append(env)
        grace = time.monotonic() + 1.0
        while time.monotonic() < grace:
            try:
                env, _ = self.recv(0.2)
                if "job" in env:
                    got.setdefault(env["job"], []).append(env)
            except TimeoutError:
                pass
        return got

    def close(self) -> None:
        self.sock.close(0)


LIMITS = ProtocolLimits()


class RawWorker(RawClient):
    """A worker speaking the backend protocol by hand: it registers and answers as a test tells it."""

    role = "trainer"

    def ready(self, denoise_credit: int = 8, train_credit: int = 8, trainer: bool = True, **extra) -> None:
        self.send(wire.encode("ready", worker=self.name, denoise_credit=denoise_credit, train_credit=train_credit, trainer=trainer,
                              image_shape=list(self.shape), levels=100, model="tiny", **extra))

    def next_job(self, timeout: float = 10.0) -> tuple[dict, list[bytes]]:
        """The next train or denoise job forwarded to this worker (heartbeats skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            env, rest = self.recv(max(0.01, deadline - time.monotonic()))
            if env["type"] in ("train", "denoise"):
                return env, rest
        raise TimeoutError("no job")
