"""The broker loop, in the manner of the ZeroMQ guide's Majordomo and Paranoid Pirate.

Two ROUTER sockets: nodes connect to the frontend, workers to the backend. The broker reads only
envelopes; tensor frames are forwarded as the zmq.Frame objects they arrived in (no decode, no
copy). State is explicit and lives in this module:

- per client: a bounded queue per job kind (train, denoise); a full queue answers `busy` at once;
- per worker: credit in rows per kind, the jobs it holds, when it was last heard from;
- dispatch: round robin over (client, kind) queues, one job per turn, only to a worker whose credit
  covers the job's rows; train jobs go to the one active trainer;
- heartbeats both ways; a worker silent for interval × liveness is dead and its jobs go back to the
  front of their queues. A reply from a worker a job is no longer assigned to is dropped, so no job
  is answered twice. Retried job ids are idempotent: in flight → ignored; recently answered →
  the cached reply is sent again.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from collafuse.common.config import BrokerConfig
from collafuse.common.lifecycle import Stoppable
from collafuse.protocol import tensors, wire
from collafuse.protocol.wire import ErrorCode, ProtocolError

log = logging.getLogger("collafuse.broker")
KINDS = ("train", "denoise")


@dataclass
class Job:
    client: str
    job_id: str
    kind: str  # train | denoise
    rows: int
    frames: list[zmq.Frame]  # envelope (+ tensors), forwarded untouched
    received: float
    worker: bytes | None = None
    attempts: int = 0


@dataclass
class ClientState:
    name: str
    route: bytes
    image_shape: tuple[int, int, int]
    queues: dict[str, deque[Job]] = field(default_factory=lambda: {k: deque() for k in KINDS})
    replies: OrderedDict[str, list[zmq.Frame]] = field(default_factory=OrderedDict)
    counts: dict[str, int] = field(default_factory=lambda: {"submitted": 0, "completed": 0, "errors": 0, "busy": 0, "in_flight": 0})

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())


@dataclass
class WorkerState:
    route: bytes
    name: str
    credit: dict[str, int]
    max_credit: dict[str, int]
    trainer: bool
    last_seen: float
    jobs: dict[tuple[str, str], Job] = field(default_factory=dict)
    completed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # the worker's own counters, from its heartbeats

    def wants(self, relayed: str) -> bool:
        """Every worker needs the trainer's weights; only one that may take over training its moments."""
        return relayed == "weights" or self.trainer


class Broker(Stoppable):
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.ctx = context or zmq.Context.instance()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        for sock in (self.frontend, self.backend):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
            # A transport-level cap far above any valid message: beyond it ZeroMQ drops the peer.
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.limits.max_frame_bytes)
        self.frontend.bind(config.frontend)
        self.backend.bind(config.backend)
        self.clients: dict[str, ClientState] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.jobs: dict[tuple[str, str], Job] = {}
        self.turns: deque[tuple[str, str]] = deque()  # (client, kind) with queued jobs, round robin
        self.trainer: bytes | None = None
        self.relayed: dict[str, list[list[zmq.Frame]]] = {kind: [] for kind in wire.RELAYED}  # the trainer's latest parts
        self.model_shape: tuple[int, int, int] | None = None
        self.levels: int | None = None
        self.started = time.monotonic()
        self.next_heartbeat = 0.0
        self.stopping = False
        self.forwarded = 0

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        interval_ms = int(self.config.heartbeat.interval * 1000)
        while not self.stopping:
            events = dict(poller.poll(min(interval_ms, 100)))
            if self.backend in events:
                self._drain(self.backend, self.on_worker)
            if self.frontend in events:
                self._drain(self.frontend, self.on_node)
            self.dispatch()
            self.heartbeat()
        self.close()

    def _drain(self, sock: zmq.Socket, handler) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames[0].bytes, frames[1:])
            except Exception:  # one bad message must never stop the broker
                log.exception("unexpected error while handling a message")

    def close(self) -> None:
        self.frontend.close(0)
        self.backend.close(0)

    # ---- nodes ------------------------------------------------------------------------------
    def reply_node(self, route: bytes, frames: list[Any]) -> None:
        try:
            self.frontend.send_multipart([route, *frames], copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            log.debug("could not reply to a node (gone or full)")

    def node_error(self, route: bytes, exc: ProtocolError, client: ClientState | None = None) -> None:
        if client is not None:
            client.counts["errors"] += 1
        self.reply_node(route, [wire.error(exc.job, exc.code, exc.reason)])

    def on_node(self, route: bytes, frames: list[zmq.Frame]) -> None:
        if not 1 <= len(frames) <= 2:
            self.node_error(route, ProtocolError(ErrorCode.BAD_ENVELOPE, f"expected 1 or 2 frames after the routing id, got {len(frames)}"))
            return
        try:
            env = wire.decode(frames[0].buffer, self.limits)
        except ProtocolError as exc:
            self.node_error(route, exc)
            return
        kind = env["type"]
        if kind == "hello":
            self.on_hello(route, env)
        elif kind == "heartbeat":
            self.reply_node(route, [wire.encode("heartbeat")])
        elif kind == "status":
            self.reply_node(route, [wire.encode("status_reply", status=self.status())])
        elif kind in KINDS:
            self.on_job(route, env, frames)
        else:
            self.node_error(route, ProtocolError(ErrorCode.UNKNOWN_TYPE, f"a node may not send {kind!r}", env.get("job", "")))

    def on_hello(self, route: bytes, env: dict) -> None:
        shape = tuple(env["image_shape"])
        if (self.model_shape and shape != self.model_shape) or (self.levels and env["levels"] != self.levels):
            self.node_error(
                route,
                ProtocolError(ErrorCode.INCOMPATIBLE, f"server model takes images {list(self.model_shape or ())} with T={self.levels}; node has {list(shape)} with T={env['levels']}"),
            )
            return
        client = self.clients.get(env["client"])
        if client is None:
            client = self.clients[env["client"]] = ClientState(env["client"], route, shape)  # type: ignore[arg-type]
        client.route, client.image_shape = route, shape  # type: ignore[assignment]
        self.reply_node(
            route,
            [
                wire.encode(
                    "welcome",
                    image_shape=list(shape),
                    levels=self.levels or env["levels"],
                    max_rows=self.max_job_rows(),
                    max_frame_bytes=self.limits.max_frame_bytes,
                    heartbeat_interval=self.config.heartbeat.interval,
                )
            ],
        )

    def max_job_rows(self) -> int:
        """The largest job any live worker can take at once (its full credit)."""
        credits = [w.max_credit["denoise"] for w in self.workers.values()]
        return max(1, min(self.limits.max_rows, max(credits) if credits else self.limits.max_rows))

    def on_job(self, route: bytes, env: dict, frames: list[zmq.Frame]) -> None:
        kind, job_id = env["type"], env["job"]
        client = self.clients.get(env["client"])
        if client is None:
            self.node_error(route, ProtocolError(ErrorCode.NOT_JOINED, f"client {env['client']!r} must send hello first", job_id))
            return
        client.route = route
        key = (client.name, job_id)
        if key in self.jobs:
            return  # a retry of a job we hold: its one reply will come
        if job_id in client.replies:
            self.reply_node(route, client.replies[job_id])  # a retry of a job already answered
            return
        try:
            spec = wire.tensor_spec(env, client.image_shape)
            if spec is None and len(frames) == 2:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"{kind} carries no tensor frame", job_id)
            if spec is not None:
                if len(frames) != 2:
                    raise ProtocolError(ErrorCode.BAD_TENSOR, f"{kind} needs a tensor frame", job_id)
                try:
                    tensors.check(frames[1].buffer, spec, self.limits.max_frame_bytes)
                except ProtocolError as exc:
                    exc.job = job_id
                    raise
            rows = env["rows"] if kind == "train" else env["count"]
            if kind == "denoise" and rows > self.max_job_rows():
                raise ProtocolError(ErrorCode.TOO_LARGE, f"denoise count {rows} exceeds the {self.max_job_rows()} rows a worker takes at once", job_id)
            if client.queued() >= self.config.max_queue_per_client:
                client.counts["busy"] += 1
                raise ProtocolError(ErrorCode.BUSY, f"queue of {client.name} is full ({self.config.max_queue_per_client} jobs); retry later", job_id)
        except ProtocolError as exc:
            self.node_error(route, exc, client)
            return
        job = Job(client.name, job_id, kind, rows, frames, time.monotonic())
        self.jobs[key] = job
        client.counts["submitted"] += 1
        self.enqueue(job)

    def enqueue(self, job: Job, front: bool = False) -> None:
        queue = self.clients[job.client].queues[job.kind]
        queue.appendleft(job) if front else queue.append(job)
        if (job.client, job.kind) not in self.turns:
            self.turns.append((job.client, job.kind))

    # ---- workers ----------------------------------------------------------------------------
    def on_worker(self, route: bytes, frames: list[zmq.Frame]) -> None:
        try:
            env = wire.decode(frames[0].buffer, self.limits)
        except ProtocolError as exc:
            log.warning("bad message from worker: %s", exc)
            return
        worker = self.workers.get(route)
        if worker is not None:
            worker.last_seen = time.monotonic()
        kind = env["type"]
        if kind == "ready":
            self.on_ready(route, env)
        elif worker is None:
            # Unknown (e.g. declared dead, or the broker restarted): it must say ready again.
            self.backend.send_multipart([route, wire.error("", ErrorCode.NOT_JOINED, "send ready first")])
        elif kind == "heartbeat":
            if isinstance(env.get("stats"), dict):
                worker.stats = env["stats"]
        elif kind in ("ack", "result", "error"):
            self.on_reply(worker, env, frames)
        elif kind in wire.RELAYED and route == self.trainer and len(frames) == 2:
            if env["part"] == 0:
                self.relayed[kind] = []
            self.relayed[kind].append(frames)
            for other in self.workers.values():
                if other.route != route and other.wants(kind):
                    self.backend.send_multipart([other.route, *frames], copy=False)
        elif kind == "bye":
            self.remove_worker(worker, "said bye")

    def on_ready(self, route: bytes, env: dict) -> None:
        shape = tuple(env["image_shape"])
        if self.model_shape is None:
            self.model_shape, self.levels = shape, env["levels"]  # type: ignore[assignment]
        elif shape != self.model_shape or env["levels"] != self.levels:
            self.backend.send_multipart([route, wire.error("", ErrorCode.INCOMPATIBLE, f"this broker serves images {list(self.model_shape)} with T={self.levels}")])
            return
        old = self.workers.pop(route, None)
        if old is not None:
            self.requeue(old)
        credit = {"denoise": env["denoise_credit"], "train": env["train_credit"] if env["trainer"] else 0}
        worker = WorkerState(route, env["worker"], dict(credit), dict(credit), env["trainer"], time.monotonic())
        self.workers[route] = worker
        if worker.trainer and self.trainer is None:
            self.trainer = route
        else:
            for kind in filter(worker.wants, wire.RELAYED):  # the latest version's parts, in order, weights first
                for part in self.relayed[kind]:
                    self.backend.send_multipart([route, *part], copy=False)
        log.info("worker %s ready (credit %s%s)", worker.name, credit, ", trainer" if self.trainer == route else "")

    def on_reply(self, worker: WorkerState, env: dict, frames: list[zmq.Frame]) -> None:
        key = (env.get("client", ""), env.get("job", ""))
        job = worker.jobs.pop(key, None)
        if job is None or self.jobs.get(key) is not job:
            log.info("dropping a late or duplicate reply for %s from %s", key, worker.name)
            return
        worker.credit[job.kind] += job.rows
        worker.completed += 1
        del self.jobs[key]
        client = self.clients[job.client]
        client.counts["in_flight"] -= 1
        client.counts["errors" if env["type"] == "error" else "completed"] += 1
        client.replies[job.job_id] = frames
        while len(client.replies) > self.config.reply_cache_per_client:
            client.replies.popitem(last=False)
        self.reply_node(client.route, frames)

    def remove_worker(self, worker: WorkerState, why: str) -> None:
        log.warning("worker %s removed (%s); re-queueing %d jobs", worker.name, why, len(worker.jobs))
        self.workers.pop(worker.route, None)
        self.requeue(worker)
        if self.trainer == worker.route:
            self.trainer = next((w.route for w in self.workers.values() if w.trainer), None)

    def requeue(self, worker: WorkerState) -> None:
        for job in sorted(worker.jobs.values(), key=lambda j: j.received, reverse=True):
            job.worker = None
            self.clients[job.client].counts["in_flight"] -= 1
            self.enqueue(job, front=True)
        worker.jobs.clear()

    # ---- dispatch and heartbeats ------------------------------------------------------------
    def pick_worker(self, job: Job) -> WorkerState | None:
        if job.kind == "train":
            w = self.workers.get(self.trainer) if self.trainer else None
            return w if w is not None and w.credit["train"] >= job.rows else None
        best = max(self.workers.values(), key=lambda w: w.credit["denoise"], default=None)
        return best if best is not None and best.credit["denoise"] >= job.rows else None

    def dispatch(self) -> None:
        """Round robin: the (client, kind) queue served last goes to the back of the line; a queue
        whose head does not fit any worker's credit keeps its place."""
        progress = True
        while progress and self.turns:
            progress = False
            for entry in list(self.turns):
                name, kind = entry
                queue = self.clients[name].queues[kind]
                worker = self.pick_worker(queue[0])
                if worker is None:
                    continue
                job = queue.popleft()
                self.turns.remove(entry)
                if queue:
                    self.turns.append(entry)
                job.worker, job.attempts = worker.route, job.attempts + 1
                worker.credit[kind] -= job.rows
                worker.jobs[(name, job.job_id)] = job
                self.clients[name].counts["in_flight"] += 1
                self.backend.send_multipart([worker.route, *job.frames], copy=False)
                self.forwarded += 1
                progress = True

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + self.config.heartbeat.interval
        deadline = self.config.heartbeat.interval * self.config.heartbeat.liveness
        for worker in list(self.workers.values()):
            if now - worker.last_seen > deadline:
                self.remove_worker(worker, f"silent for {now - worker.last_seen:.1f} s")
            else:
                self.backend.send_multipart([worker.route, wire.encode("heartbeat")])

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "uptime_s": round(now - self.started, 1),
            "queued": sum(c.queued() for c in self.clients.values()),
            "in_flight": sum(len(w.jobs) for w in self.workers.values()),
            "forwarded": self.forwarded,
            "weights_relayed": bool(self.relayed["weights"]),
            "workers": [
                {
                    "name": w.name,
                    "trainer": w.route == self.trainer,
                    "credit": w.credit,
                    "in_flight": len(w.jobs),
                    "completed": w.completed,
                    "last_seen_s": round(now - w.last_seen, 2),
                    "stats": w.stats,
                }
                for w in self.workers.values()
            ],
            "clients": {c.name: {**c.counts, "queued": c.queued()} for c in self.clients.values()},
        }
