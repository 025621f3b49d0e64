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


def run_load(cfg: LoadConfig, say=print) -> dict[str, Any]:
    if cfg.mode not in ("denoise", "train", "mixed"):
        raise ValueError(f"mode must be denoise, train or mixed, got {cfg.mode!r}")
    rng = random.Random(cfg.seed)
    ctx = zmq.Context.instance()
    shape = (1, cfg.image_size, cfg.image_size)
    sockets = []
    keys = PeerKeys.load(Path(cfg.keys)) if cfg.keys else None
    for _ in range((cfg.clients + CLIENTS_PER_SOCKET - 1) // CLIENTS_PER_SOCKET):
        sockets.append(dealer(ctx, cfg.broker, ProtocolLimits().max_frame_bytes, keys, sndhwm=0, rcvhwm=0))
    run = uuid.uuid4().hex[:8]  # job ids unique to this run: a reused id would be answered from the broker's cache
    clients = {f"load-{i:05d}": SimClient(f"load-{i:05d}", sockets[i // CLIENTS_PER_SOCKET]) for i in range(cfg.clients)}
    train_blob = tensors.encode({
        "x_t": np.random.default_rng(cfg.seed).standard_normal((cfg.rows, *shape), dtype=np.float32),
        "t": np.full(cfg.rows, cfg.levels, dtype=np.int64),
        "eps": np.random.default_rng(cfg.seed + 1).standard_normal((cfg.rows, *shape), dtype=np.float32),
    })
    poller = zmq.Poller()
    for s in sockets:
        poller.register(s, zmq.POLLIN)

    latencies: list[float] = []
    errors: dict[str, int] = {}
    submitted = completed = image_steps = 0  # throughput counts replies before the deadline only
    completed_total = rejoins = 0
    epochs: dict[zmq.Socket, str] = {}  # the broker run each socket's clients said hello to
    rejoin_at: dict[zmq.Socket, float] = {}

    def hello(c: SimClient) -> None:
        c.sock.send(wire.encode("hello", client=c.name, t_c=cfg.cut_levels[0], image_shape=list(shape), levels=cfg.levels))

    def rejoin(sock: zmq.Socket) -> None:
        """The broker restarted or forgot this socket: hello again for its clients, then their jobs
        again under the same ids (a node's link does the same)."""
        nonlocal rejoins
        if time.monotonic() < rejoin_at.get(sock, 0.0):
            return
        rejoin_at[sock] = time.monotonic() + cfg.retry_after
        rejoins += 1
        for c in clients.values():
            if c.sock is sock:
                hello(c)
                if c.job is not None:
                    c.retry_at = time.monotonic()

    def new_job(c: SimClient) -> None:
        nonlocal submitted
        c.seq += 1
        c.job = f"{c.name}-{run}-{c.seq}"
        t_c = rng.choice(cfg.cut_levels)
        c.kind = cfg.mode if cfg.mode != "mixed" else rng.choice(("denoise", "train"))
        if c.kind == "denoise":
            c.frames = [wire.encode("denoise", job=c.job, client=c.name, count=cfg.rows, t_c=t_c, seed=c.seq, first_row=0,
                                    sampler="ddim", steps=cfg.ddim_steps, eta=0.0)]
            c.image_steps = cfg.rows * _server_steps(cfg, t_c)
        else:
            c.frames = [wire.encode("train", job=c.job, client=c.name, rows=cfg.rows, t_c=cfg.levels - 1), train_blob]
            c.image_steps = 0
        c.sent_at = time.monotonic()
        c.sock.send_multipart(c.frames, copy=False)
        submitted += 1

    def on_reply(sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        nonlocal completed, completed_total, image_steps
        env = wire.decode(frames[0].buffer, limits)
        if env["type"] in ("welcome", "heartbeat"):
            epoch = env.get("epoch", "")
            if epoch and epochs.get(sock, epoch) != epoch:
                rejoin(sock)
            epochs[sock] = epoch or epochs.get(sock, "")
            return
        if env["type"] == "error" and (env["code"] == "not_joined" or (env["code"] == "unavailable" and not env["job"])):
            rejoin(sock)
            return
        c = clients.get(env.get("client", "")) or next((x for x in clients.values() if x.job == env.get("job")), None)
        if c is None or env.get("job") != c.job:
            return
        if env["type"] == "error" and env["code"] == "busy":
            errors["busy"] = errors.get("busy", 0) + 1
            c.retry_at = time.monotonic() + cfg.retry_after
            return
        if env["type"] == "error":
            errors[env["code"]] = errors.get(env["code"], 0) + 1
        else:
            completed_total += 1
            latencies.append(time.monotonic() - c.sent_at)
            if time.monotonic() <= deadline:
                completed += 1
                image_steps += c.image_steps
        c.job = None

    for c in clients.values():
        hello(c)
    before = _worker_stats(cfg.broker, cfg.admin_keys)
    start = time.monotonic()
    deadline = start + cfg.duration
    drain_deadline = deadline + cfg.drain
    next_report = start + 5
    next_heartbeat = start
    limits = ProtocolLimits(levels=cfg.levels)
    while True:
        now = time.monotonic()
        outstanding = sum(1 for c in clients.values() if c.job is not None)
        if now >= deadline and (outstanding == 0 or now >= drain_deadline):
            break
        if now >= next_report:
            say(f"[loadtest] {now - start:5.1f} s  completed {completed_total}  outstanding {outstanding}  errors {sum(errors.values())}")
            next_report = now + 5
        for sock, _ in poller.poll(50):
            drain(sock, lambda frames: on_reply(sock, frames))
        if now >= next_heartbeat:  # a restarted broker answers with a new epoch (or not_joined)
            for sock in sockets:
                sock.send(wire.encode("heartbeat"))
            next_heartbeat = now + HeartbeatConfig.interval
        now = time.monotonic()
        for c in clients.values():
            if c.job is None and now < deadline:
                new_job(c)
            elif c.job is not None and c.retry_at and now >= c.retry_at:
                c.retry_at = 0.0
                c.sock.send_multipart(c.frames, copy=False)
    elapsed = cfg.duration
    time.sleep(1.2)  # the workers' counters reach the broker with their next heartbeat
    after = _worker_stats(cfg.broker, cfg.admin_keys)
    lost = sum(1 for c in clients.values() if c.job is not None)
    for s in sockets:
        s.close(0)
    lat = np.array(latencies) if latencies else np.zeros(1)
    rows = after["denoise_rows"] - before["denoise_rows"]
    capacity = after["capacity"] - before["capacity"]
    return {
        "clients": cfg.clients,
        "mode": cfg.mode,
        "duration_s": round(elapsed, 2),
        "submitted": submitted,
        "completed": completed_total,
        "completed_in_window": completed,
        "lost": lost,
        "rejoins": rejoins,  # sockets that said hello again after a broker restart
        "errors": errors,
        "jobs_per_s": round(completed / elapsed, 2),
        "image_steps_per_s": round(image_steps / elapsed, 1),
        "latency_ms": {p: round(float(np.percentile(lat, q)) * 1000, 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "mean_batch_fill": round(rows / capacity, 3) if capacity else None,
        "train_steps": after["train_steps"] - before["train_steps"],
    }


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
