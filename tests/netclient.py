"""A minimal protocol client for tests: a raw DEALER socket speaking PROTOCOL.md by hand."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import zmq

from collafuse.common.config import ProtocolLimits
from collafuse.protocol import tensors, wire


class RawClient:
    def __init__(self, address: str, name: str, shape=(1, 32, 32)) -> None:
        self.name = name
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
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
