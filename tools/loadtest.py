"""`collafuse loadtest`: many simulated clients against a broker, in one process.

Clients are multiplexed over a few DEALER sockets (the broker routes by client name, so one socket
can carry many clients). Each client keeps one job outstanding: it submits, waits for the final
reply, submits the next, until the duration ends; then every outstanding job gets a bounded time
to finish. A job with no final reply by then is lost. `busy` answers are retried after a pause and
counted, like every error code.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from collafuse.common.config import DiffusionConfig, HeartbeatConfig, LoadConfig, ProtocolLimits, SamplerConfig
from collafuse.diffusion.schedule import Scheduler
from collafuse.protocol.admin import fetch_status
from collafuse.protocol import tensors, wire
from collafuse.protocol.security import PeerKeys
from collafuse.protocol.sockets import dealer, drain

CLIENTS_PER_SOCKET = 50


@dataclass
class SimClient:
    name: str
    sock: zmq.Socket
    job: str | None = None
    kind: str = ""
    sent_at: float = 0.0
    image_steps: int = 0
    retry_at: float = 0.0
    frames: list[bytes] = field(default_factory=list)
    seq: int = 0


def _server_steps(cfg: LoadConfig, t_c: int) -> int:
    """The model calls the server makes for one row of a denoise job with this cut: its DDIM share."""
    scheduler = Scheduler(DiffusionConfig(levels=cfg.levels))
    steps, _ = scheduler.share(SamplerConfig(kind="ddim", ddim_steps=cfg.ddim_steps), cfg.levels, t_c)
    return len(scheduler.timesteps(cfg.levels, t_c, steps)) - 1


@dataclass
class Tally:
    """What the run counts; throughput and latency count only the replies inside the window (after
    the warm-up, before the deadline)."""

    submitted: int = 0
    completed: int = 0  # with the drain
    completed_in_window: int = 0
    image_steps: int = 0  # in the window
    rejoins: int = 0  # sockets that said hello again after a broker restart
    answered_twice: int = 0  # final replies for a job of this run that already had its answer (must stay 0)
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


class LoadRun:
    """The simulated clients, their sockets and the loop that keeps one job outstanding per client."""

    def __init__(self, cfg: LoadConfig) -> None:
        if cfg.mode not in ("denoise", "train", "mixed"):
            raise ValueError(f"mode must be denoise, train or mixed, got {cfg.mode!r}")
        self.cfg, self.rng, self.tally = cfg, random.Random(cfg.seed), Tally()
        self.shape = (1, cfg.image_size, cfg.image_size)
        self.limits = ProtocolLimits(levels=cfg.levels)
        keys = PeerKeys.load(Path(cfg.keys)) if cfg.keys else None
        self.sockets = [dealer(zmq.Context.instance(), cfg.broker, self.limits.max_frame_bytes, keys, sndhwm=0, rcvhwm=0)
                        for _ in range((cfg.clients + CLIENTS_PER_SOCKET - 1) // CLIENTS_PER_SOCKET)]
        self.run_id = uuid.uuid4().hex[:8]  # job ids unique to this run: a reused id would be answered from the broker's cache
        self.clients = {f"load-{i:05d}": SimClient(f"load-{i:05d}", self.sockets[i // CLIENTS_PER_SOCKET]) for i in range(cfg.clients)}
        self.train_blob = tensors.encode({
            "x_t": np.random.default_rng(cfg.seed).standard_normal((cfg.rows, *self.shape), dtype=np.float32),
            "t": np.full(cfg.rows, cfg.levels, dtype=np.int64),
            "eps": np.random.default_rng(cfg.seed + 1).standard_normal((cfg.rows, *self.shape), dtype=np.float32),
        })
        self.epochs: dict[zmq.Socket, str] = {}  # the broker run each socket's clients said hello to
        self.rejoin_at: dict[zmq.Socket, float] = {}
        self.window_start = self.deadline = 0.0

    def hello(self, c: SimClient) -> None:
        c.sock.send(wire.encode("hello", client=c.name, t_c=self.cfg.cut_levels[0], image_shape=list(self.shape), levels=self.cfg.levels))

    def rejoin(self, sock: zmq.Socket) -> None:
        """The broker restarted or forgot this socket: hello again for its clients, then their jobs
        again under the same ids (a node's link does the same)."""
        if time.monotonic() < self.rejoin_at.get(sock, 0.0):
            return
        self.rejoin_at[sock] = time.monotonic() + self.cfg.retry_after
        self.tally.rejoins += 1
        for c in self.clients.values():
            if c.sock is sock:
                self.hello(c)
                if c.job is not None:
                    c.retry_at = time.monotonic()

    def submit(self, c: SimClient) -> None:
        cfg = self.cfg
        c.seq += 1
        c.job = f"{c.name}-{self.run_id}-{c.seq}"
        t_c = self.rng.choice(cfg.cut_levels)
        c.kind = cfg.mode if cfg.mode != "mixed" else self.rng.choice(("denoise", "train"))
        if c.kind == "denoise":
            c.frames = [wire.encode("denoise", job=c.job, client=c.name, count=cfg.rows, t_c=t_c, seed=c.seq, first_row=0,
                                    sampler="ddim", steps=cfg.ddim_steps, eta=0.0)]
            c.image_steps = cfg.rows * _server_steps(cfg, t_c)
        else:
            c.frames = [wire.encode("train", job=c.job, client=c.name, rows=cfg.rows, t_c=cfg.levels - 1), self.train_blob]
            c.image_steps = 0
        c.sent_at = time.monotonic()
        c.sock.send_multipart(c.frames, copy=False)
        self.tally.submitted += 1

    def on_reply(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        env = wire.decode(frames[0].buffer, self.limits)
        if env["type"] in ("welcome", "heartbeat"):
            epoch = env.get("epoch", "")
            if epoch and self.epochs.get(sock, epoch) != epoch:
                self.rejoin(sock)
            self.epochs[sock] = epoch or self.epochs.get(sock, "")
            return
        if env["type"] == "error" and (env["code"] == "not_joined" or (env["code"] == "unavailable" and not env["job"])):
            self.rejoin(sock)
            return
        c = self.clients.get(env.get("client", "")) or next((x for x in self.clients.values() if x.job == env.get("job")), None)
        t = self.tally
        if c is None or env.get("job") != c.job:
            if f"-{self.run_id}-" in env.get("job", "") and not (env["type"] == "error" and env["code"] == "busy"):
                t.answered_twice += 1  # one of ours, answered before: the broker promises exactly one final reply
            return
        if env["type"] == "error":
            t.errors[env["code"]] = t.errors.get(env["code"], 0) + 1
            if env["code"] == "busy":
                c.retry_at = time.monotonic() + self.cfg.retry_after
                return
        else:
            t.completed += 1
            if self.window_start <= time.monotonic() <= self.deadline:
                t.latencies.append(time.monotonic() - c.sent_at)
                t.completed_in_window += 1
                t.image_steps += c.image_steps
        c.job = None

    def outstanding(self) -> int:
        return sum(1 for c in self.clients.values() if c.job is not None)

    def keep_busy(self, now: float) -> None:
        """A new job for every idle client until the deadline; busy jobs again once their pause is over."""
        for c in self.clients.values():
            if c.job is None and now < self.deadline:
                self.submit(c)
            elif c.job is not None and c.retry_at and now >= c.retry_at:
                c.retry_at = 0.0
                c.sock.send_multipart(c.frames, copy=False)

    def run(self, say) -> dict[str, Any]:
        cfg = self.cfg
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        for c in self.clients.values():
            self.hello(c)
        before = _worker_stats(cfg.broker, cfg.admin_keys)  # batch fill and train steps: over the whole run
        start = time.monotonic()
        self.window_start = start + cfg.warmup
        self.deadline = self.window_start + cfg.duration
        next_report = start + 5
        next_heartbeat = start
        while True:
            now = time.monotonic()
            if now >= self.deadline and (self.outstanding() == 0 or now >= self.deadline + cfg.drain):
                break
            if now >= next_report:
                say(f"[loadtest] {now - start:5.1f} s  completed {self.tally.completed}  outstanding {self.outstanding()}  "
                    f"errors {sum(self.tally.errors.values())}")
                next_report = now + 5
            for sock, _ in poller.poll(50):
                drain(sock, lambda frames: self.on_reply(sock, frames))
            if now >= next_heartbeat:  # a restarted broker answers not_joined (or with a new epoch)
                for sock in self.sockets:
                    sock.send(wire.encode("heartbeat"))
                next_heartbeat = now + HeartbeatConfig.interval
            self.keep_busy(time.monotonic())
        time.sleep(1.2)  # the workers' counters reach the broker with their next heartbeat
        after = _worker_stats(cfg.broker, cfg.admin_keys)
        for sock in self.sockets:
            sock.close(0)
        return self.report(before, after)

    def report(self, before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
        cfg, t = self.cfg, self.tally
        lat = np.array(t.latencies) if t.latencies else np.zeros(1)
        capacity = after["capacity"] - before["capacity"]
        return {
            "clients": cfg.clients,
            "mode": cfg.mode,
            "duration_s": round(cfg.duration, 2),
            "warmup_s": round(cfg.warmup, 2),
            "submitted": t.submitted,
            "completed": t.completed,
            "completed_in_window": t.completed_in_window,
            "lost": self.outstanding(),
            "answered_twice": t.answered_twice,
            "rejoins": t.rejoins,
            "errors": t.errors,
            "jobs_per_s": round(t.completed_in_window / cfg.duration, 2),
            "image_steps_per_s": round(t.image_steps / cfg.duration, 1),
            "latency_ms": {p: round(float(np.percentile(lat, q)) * 1000, 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
            "mean_batch_fill": round((after["denoise_rows"] - before["denoise_rows"]) / capacity, 3) if capacity else None,
            "train_steps": after["train_steps"] - before["train_steps"],
        }


def run_load(cfg: LoadConfig, say=print) -> dict[str, Any]:
    """One load run: the figures `collafuse loadtest` prints (and writes with --json)."""
    return LoadRun(cfg).run(say)


def _worker_stats(broker: str, admin_keys: str) -> dict[str, int]:
    """Summed counters of every worker, as their heartbeats reported them to the broker
    (capacity: rows the denoising iterations could have held)."""
    total = {"denoise_rows": 0, "capacity": 0, "train_steps": 0}
    try:
        workers = fetch_status(broker, timeout=5, keys=PeerKeys.load(Path(admin_keys)) if admin_keys else None).get("workers", [])
    except (TimeoutError, ConnectionError):
        return total
    for w in workers:
        st = w.get("stats", {})
        total["denoise_rows"] += int(st.get("denoise_rows", 0))
        total["capacity"] += int(st.get("denoise_iterations", 0)) * int(st.get("max_batch", 0))
        total["train_steps"] += int(st.get("train_steps", 0))
    return total
