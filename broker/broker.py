"""The broker loop, in the manner of the ZeroMQ guide's Majordomo and Paranoid Pirate.

Two ROUTER sockets: nodes connect to the frontend, workers to the backend. The broker reads only
envelopes; tensor frames are forwarded as the zmq.Frame objects they arrived in (no decode, no
copy). State is explicit and lives in this module, but for the trainer group's membership
(broker/group.py), who speaks for which client (broker/identity.py) and who may be the lone
trainer (broker/succession.py):

- per client: a bounded queue per job kind (train, denoise); a full queue answers `busy` at once;
- per worker: credit in rows per kind, the jobs it holds, when it was last heard from;
- dispatch: per kind, round robin over the clients with queued jobs, one job per turn, only to a worker whose credit
  covers the job's rows; train jobs go to the one active trainer, or spread over the members of
  the data-parallel trainer group (broker/group.py keeps its membership);
- exactly one final reply per accepted job: the worker's, or the broker's own error when no live
  worker can ever take the job, none could for `no_worker_wait`, a worker held it past
  `job_timeout`, or the worker's reply was invalid;
- heartbeats both ways; a worker silent for interval × liveness is dead and its jobs go back to the
  front of their queues. A reply from a worker a job is no longer assigned to is dropped, so no job
  is answered twice. Retried job ids are idempotent: in flight → ignored; recently answered →
  the cached reply is sent again; the same id with different content → `conflict`;
- bounded memory: clients idle for `client_idle_expiry` are forgotten, names, queued bytes and
  cached replies are capped;
- trust (with a key folder): CURVE on both sockets; the key each message carries must hold the role
  the message needs (node: hello and jobs; admin: status; worker: the backend; trainer: training),
  re-checked every message, so removing a key file revokes it without a restart; a client name is
  bound to the first key that said hello with it (broker/identity.py).
"""

from __future__ import annotations

import logging
import secrets
import time
import zlib
from pathlib import Path
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from collafuse.common.config import BrokerConfig
from collafuse.common.lifecycle import Stoppable
from collafuse.protocol import security, tensors, wire
from collafuse.broker.group import TrainerGroup
from collafuse.broker.identity import Identities
from collafuse.broker.state import ACKS, OWNERS, BrokerState
from collafuse.broker.succession import Succession
from collafuse.protocol.sockets import drain
from collafuse.protocol.wire import ErrorCode, ProtocolError

log = logging.getLogger("collafuse.broker")
KINDS = ("train", "denoise")
NODE_ROLE = {"hello": "node", "heartbeat": "node", "train": "node", "denoise": "node", "status": "admin"}  # message → role it needs
WORKER_TYPES = ("ready", "heartbeat", *wire.REPLIES, *wire.RELAYED, "group_failed", "bye")  # what the backend takes


def digest(frames: list[zmq.Frame]) -> int:
    """What a job id stands for: a re-send under the same id must be this request (CRC-32 over every
    frame and its length: a check against a client's own mistakes or tricks on its own jobs, which
    is all a name bound to one key allows; cheap enough for 64 KiB frames at line rate)."""
    crc = 0
    for frame in frames:
        crc = zlib.crc32(frame.buffer, zlib.crc32(len(frame.buffer).to_bytes(8, "little"), crc))
    return crc


@dataclass
class Job:
    client: str
    job_id: str
    kind: str  # train | denoise
    rows: int
    frames: list[zmq.Frame]  # envelope (+ tensors), forwarded untouched
    received: float
    digest: int
    nbytes: int  # envelope and tensors, for the broker's cap on queued bytes
    route: bytes  # the node connection that sent it (last): its reply goes there
    dispatched: float = 0.0  # when a worker took it (the worker's `jobs` says which)


@dataclass
class ClientState:
    name: str
    image_shape: tuple[int, int, int]
    last_seen: float
    t_c: int = 0  # the cut it announced in hello: shown in status, so an operator sees who sends what
    queues: dict[str, deque[Job]] = field(default_factory=lambda: {k: deque() for k in KINDS})
    replies: OrderedDict[str, tuple[int, list[zmq.Frame]]] = field(default_factory=OrderedDict)  # job → (digest, reply)
    counts: dict[str, int] = field(default_factory=lambda: {"submitted": 0, "completed": 0, "errors": 0, "busy": 0})

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
    group: str = ""  # a data-parallel trainer's rendezvous address ('' = not in the group)

    def wants(self, relayed: str) -> bool:
        """Every worker needs the trainer's weights; only one that may take over training its moments.
        A member of the trainer group needs them only when it registers (`on_ready`): the group
        keeps its ranks identical."""
        return not self.group and (relayed == "weights" or self.trainer)


class Broker(Stoppable):
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.limits = config.limits
        # This run's name, in every welcome and heartbeat: a peer that sees another one knows the
        # broker restarted (and lost its queues), so it registers again and re-sends what is unanswered.
        self.epoch = secrets.token_hex(8)
        self.ctx = context or zmq.Context.instance()
        self.keys = security.KeyStore(Path(config.keys)) if config.keys else None
        self.authenticator = self.keys.authenticator(self.ctx) if self.keys else None
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        for sock, domain in ((self.frontend, security.FRONTEND), (self.backend, security.BACKEND)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
            # A transport-level cap far above any valid message: beyond it ZeroMQ drops the peer.
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.limits.max_frame_bytes)
            if self.keys:
                self.keys.serve(sock, domain)
        self.frontend.bind(config.frontend)
        self.backend.bind(config.backend)
        self.state = BrokerState(Path(config.state)) if config.state else None
        self.identities = Identities(config, self.state)
        self.clients: dict[str, ClientState] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.jobs: dict[tuple[str, str], Job] = {}  # every accepted, unanswered job, queued or held by a worker
        # Per kind, the clients with queued jobs in round-robin order: dicts, so that joining, leaving
        # and going to the back of the line cost O(1) with thousands of clients queued.
        self.turns: dict[str, dict[str, None]] = {kind: {} for kind in KINDS}
        # Per kind, the rows of every waiting client's next job (rows → how many): when the best
        # taker's credit is below the smallest, nothing can be sent, and dispatch looks at nobody.
        self.heads: dict[str, Counter[int]] = {kind: Counter() for kind in KINDS}
        self.queued_bytes = 0
        self.cached: OrderedDict[tuple[str, str], int] = OrderedDict()  # every cached reply → its bytes, oldest first
        self.cached_bytes = 0
        self.trainer: bytes | None = None  # the trainer whose weights are relayed (the group's rank 0)
        self.succession = Succession(config.elect_trainer_for, self.state)  # who may be the lone trainer
        self.relayed_version = 0  # the optimiser step of the latest complete weights relay
        self.group = TrainerGroup(config.group_settle, config.group_max_failures, config.group_report_wait)
        self.relayed: dict[str, list[list[zmq.Frame]]] = {kind: [] for kind in wire.RELAYED}  # the trainer's latest parts
        self.model_shape: tuple[int, int, int] | None = None
        self.levels: int | None = None
        if self.state is not None:
            try:
                self.restore()
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # readable but not ours: start empty
                log.warning("ignoring the state in %s (%s: %s)", config.state, type(exc).__name__, exc)
                self.identities.clear()
                self.relayed = {kind: [] for kind in wire.RELAYED}
                self.model_shape = self.levels = None
        self.started = time.monotonic()
        self.next_heartbeat = 0.0
        self.stopping = False
        self.forwarded = 0

    # ---- state on disk (--state) -------------------------------------------------------------
    def restore(self) -> None:
        """What the last run left in --state: the name registry and the trainer's latest relayed
        versions (with the model they fit), so late workers get weights at once after a restart."""
        assert self.state is not None
        self.identities.restore(self.state.read(OWNERS) or {})
        acks = self.state.read(ACKS)
        if acks:
            self.succession.restore(acks)
        for kind in wire.RELAYED:
            saved = self.state.read(kind)
            if saved:
                self.model_shape, self.levels = tuple(saved["model"][0]), saved["model"][1]  # type: ignore[assignment]
                self.relayed[kind] = [[zmq.Frame(env), zmq.Frame(blob)] for env, blob in saved["parts"]]
        if self.relayed["weights"]:
            self.relayed_version = wire.decode(self.relayed["weights"][-1][0].bytes, self.limits)["version"]
        log.info("state from %s: %d client names, relayed weights %s", self.state.folder, len(self.identities.owners),
                 "kept" if self.relayed["weights"] else "none")

    def save_relayed(self, kind: str) -> None:
        assert self.state is not None and self.model_shape is not None
        self.state.write(kind, {"model": [list(self.model_shape), self.levels],
                                "parts": [[part[0].bytes, part[1].bytes] for part in self.relayed[kind]]})

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        interval_ms = int(self.config.heartbeat.interval * 1000)
        while not self.stopping:
            events = dict(poller.poll(min(interval_ms, 100)))
            if self.backend in events:
                drain(self.backend, lambda frames: self.on_worker(frames[0].bytes, frames[1:]))
            if self.frontend in events:
                drain(self.frontend, lambda frames: self.on_node(frames[0].bytes, frames[1:]))
            self.reform_group()
            self.dispatch()
            self.heartbeat()
        self.close()

    def close(self) -> None:
        if self.state is not None:
            self.state.flush()
        self.frontend.close(0)
        self.backend.close(0)
        if self.authenticator is not None:
            self.authenticator.stop()

    def forbidden(self, frame: zmq.Frame, role: str) -> str | None:
        """Why the key that sent this frame may not act as `role` (None: it may, or no keys are in use)."""
        if self.keys is None:
            return None
        key = security.user_id(frame)
        if role in self.keys.roles(key):
            return None
        name = self.keys.names.get(key)
        return f"key {name or key[:8] + '…'} is not allowed as {role}" + (" (revoked?)" if not name else "")

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
            env = wire.decode(frames[0].buffer, self.limits, NODE_ROLE)
        except ProtocolError as exc:
            self.node_error(route, exc)
            return
        kind = env["type"]
        why = self.forbidden(frames[0], NODE_ROLE[kind])
        if why:
            self.node_error(route, ProtocolError(ErrorCode.FORBIDDEN, why, wire.job_of(env)))
            return
        if len(frames) == 2 and kind not in KINDS:
            self.node_error(route, ProtocolError(ErrorCode.BAD_TENSOR, f"{kind} carries no tensor frame"))
            return
        if kind == "hello":
            self.on_hello(route, env, security.user_id(frames[0]))
        elif kind == "heartbeat":
            self.on_node_heartbeat(route)
        elif kind == "status":
            self.reply_node(route, [wire.encode("status_reply", status=self.status())])
        else:
            self.on_job(route, env, frames)

    def on_node_heartbeat(self, route: bytes) -> None:
        """Answer a node's heartbeat; `not_joined` from a connection that never said hello here
        (e.g. after a broker restart), so that its link says hello and re-sends at once. It keeps
        every name the connection said hello as alive."""
        clients = [self.clients[name] for name in self.identities.names(route) if name in self.clients]
        if not clients:
            self.node_error(route, ProtocolError(ErrorCode.NOT_JOINED, "this broker does not know this connection: send hello"))
            return
        now = time.monotonic()
        for client in clients:
            client.last_seen = now
        self.reply_node(route, [wire.encode("heartbeat", epoch=self.epoch)])

    def on_hello(self, route: bytes, env: dict, key: str) -> None:
        shape = tuple(env["image_shape"])
        if self.keys is not None and not self.identities.bind(env["client"], key):
            self.node_error(route, ProtocolError(ErrorCode.FORBIDDEN, f"client name {env['client']!r} belongs to another key, or this key has bound {self.config.max_names_per_key} names"))
            return
        if self.model_shape is None:
            self.node_error(route, ProtocolError(ErrorCode.UNAVAILABLE, "no worker has registered yet, so the server's image shape is unknown; retry"))
            return
        if shape != self.model_shape or env["levels"] != self.levels:
            self.node_error(
                route,
                ProtocolError(ErrorCode.INCOMPATIBLE, f"server model takes images {list(self.model_shape)} with T={self.levels}; node has {list(shape)} with T={env['levels']}"),
            )
            return
        now = time.monotonic()
        client = self.clients.get(env["client"])
        if client is None:
            if len(self.clients) >= self.config.max_clients:
                self.expire_idle(now)
            if len(self.clients) >= self.config.max_clients:
                self.node_error(route, ProtocolError(ErrorCode.BUSY, f"this broker serves {self.config.max_clients} clients at most; retry later"))
                return
            client = self.clients[env["client"]] = ClientState(env["client"], shape, now)  # type: ignore[arg-type]
        client.last_seen, client.t_c = now, env["t_c"]
        self.identities.welcome(route, client.name, key if self.keys is not None else None)
        self.reply_node(
            route,
            [
                wire.encode(
                    "welcome",
                    epoch=self.epoch,
                    image_shape=list(shape),
                    levels=self.levels,
                    max_rows=self.max_job_rows("denoise"),
                    max_frame_bytes=self.limits.max_frame_bytes,
                    heartbeat_interval=self.config.heartbeat.interval,
                )
            ],
        )

    def max_job_rows(self, kind: str) -> int:
        """The largest job of this kind a live worker can take at once (its full credit); the
        protocol's limit while no such worker is registered."""
        credits = [w.max_credit[kind] for w in self.workers.values() if w.max_credit[kind] > 0]
        return max(1, min(self.limits.max_rows, max(credits) if credits else self.limits.max_rows))

    def on_job(self, route: bytes, env: dict, frames: list[zmq.Frame]) -> None:
        kind, job_id = env["type"], env["job"]
        client = self.clients.get(env["client"])
        if client is None or not self.identities.welcomed(route):  # a name nobody said hello with, or a connection that never did
            self.node_error(route, ProtocolError(ErrorCode.NOT_JOINED, f"send hello as {env['client']!r} on this connection first", job_id))
            return
        if self.keys is not None and self.identities.owner(client.name) != security.user_id(frames[0]):
            self.node_error(route, ProtocolError(ErrorCode.FORBIDDEN, f"client name {client.name!r} belongs to another key", job_id))
            return
        client.last_seen = time.monotonic()
        key, sent = (client.name, job_id), digest(frames)
        held = self.jobs.get(key)
        cached = client.replies.get(job_id)
        if (held is not None and held.digest != sent) or (cached is not None and cached[0] != sent):
            self.node_error(route, ProtocolError(ErrorCode.CONFLICT, f"job id {job_id!r} was used for a different request", job_id), client)
            return
        if held is not None:
            held.route = route  # a retry of a job we hold (perhaps on a new connection): its one reply will come, here
            return
        if cached is not None:
            self.reply_node(route, cached[1])  # a retry of a job already answered
            return
        try:
            size = sum(len(f.buffer) for f in frames)
            rows = self.check_job(client, env, frames, size)
        except ProtocolError as exc:
            self.node_error(route, exc, client)
            return
        job = Job(client.name, job_id, kind, rows, frames, time.monotonic(), sent, size, route)
        self.jobs[key] = job
        client.counts["submitted"] += 1
        self.enqueue(job)

    def check_job(self, client: ClientState, env: dict, frames: list[zmq.Frame], size: int) -> int:
        """The job's rows, after checking its tensor frame against the envelope and its size
        against what workers and queues can take; raises ProtocolError."""
        kind, job_id = env["type"], env["job"]
        spec = wire.tensor_spec(env, client.image_shape)
        if spec is None and len(frames) == 2:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"{kind} carries no tensor frame", job_id)
        if spec is not None:
            if len(frames) != 2:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"{kind} needs a tensor frame", job_id)
            try:
                tensors.check(frames[1].buffer, spec, self.limits.max_frame_bytes)
            except ProtocolError as exc:
                raise ProtocolError(exc.code, exc.reason, job_id) from None
        rows = env["rows"] if kind == "train" else env["count"]
        if rows > self.max_job_rows(kind):
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{kind} of {rows} rows exceeds the {self.max_job_rows(kind)} rows a worker takes at once", job_id)
        if client.queued() >= self.config.max_queue_per_client or self.queued_bytes + size > self.config.max_queued_bytes:
            client.counts["busy"] += 1
            raise ProtocolError(ErrorCode.BUSY, f"queue of {client.name} (or the broker's) is full; retry later", job_id)
        return rows

    def enqueue(self, job: Job, front: bool = False) -> None:
        queue = self.clients[job.client].queues[job.kind]
        if front and queue:
            self.drop_head(queue[0])
        if front or not queue:
            self.heads[job.kind][job.rows] += 1
        queue.appendleft(job) if front else queue.append(job)
        self.queued_bytes += job.nbytes
        self.turns[job.kind].setdefault(job.client)

    def answer(self, job: Job, frames: list[Any], failed: bool) -> None:
        """The job's one final reply: sent, counted, cached for retries of its id."""
        del self.jobs[(job.client, job.job_id)]
        client = self.clients[job.client]
        client.counts["errors" if failed else "completed"] += 1
        client.last_seen = time.monotonic()
        client.replies[job.job_id] = (job.digest, frames)
        size = sum(len(f.buffer) if isinstance(f, zmq.Frame) else len(f) for f in frames)
        self.cached[(job.client, job.job_id)] = size
        self.cached_bytes += size
        while len(client.replies) > self.config.reply_cache_per_client:
            self.forget_reply(job.client, next(iter(client.replies)))
        while self.cached_bytes > self.config.reply_cache_bytes:
            self.forget_reply(*next(iter(self.cached)))
        self.reply_node(job.route, frames)

    def fail(self, job: Job, code: str, reason: str) -> None:
        self.answer(job, [wire.error(job.job_id, code, reason)], failed=True)

    def forget_reply(self, client: str, job_id: str) -> None:
        self.cached_bytes -= self.cached.pop((client, job_id))
        self.clients[client].replies.pop(job_id)

    # ---- workers ----------------------------------------------------------------------------
    def on_worker(self, route: bytes, frames: list[zmq.Frame]) -> None:
        worker = self.workers.get(route)
        if worker is not None:
            worker.last_seen = time.monotonic()
        try:
            env = wire.decode(frames[0].buffer, self.limits, WORKER_TYPES)
            expected = 1 + wire.tensor_frames(env)
            if len(frames) != expected:
                raise ProtocolError(ErrorCode.BAD_ENVELOPE, f"{env['type']} takes {expected} frame(s), got {len(frames)}", wire.job_of(env))
        except ProtocolError as exc:
            log.warning("bad message from worker %s: %s", worker.name if worker else "?", exc)
            loose = wire.loose_decode(frames[0].buffer, self.limits)
            if worker is None or not self.on_invalid_reply(worker, loose, exc):
                self.backend.send_multipart([route, wire.error(loose.get("job", ""), exc.code, exc.reason)])
            return
        kind = env["type"]
        training = (kind == "ready" and env["trainer"]) or (kind != "ready" and (route == self.trainer or route in self.group.current.members))
        why = self.forbidden(frames[0], "trainer" if training else "worker")
        if why:
            if worker is not None:
                self.remove_worker(worker, why)
            self.backend.send_multipart([route, wire.error("", ErrorCode.FORBIDDEN, why)])
            return
        if kind == "ready":
            self.on_ready(route, env)
        elif worker is None:
            # Unknown (e.g. declared dead, or the broker restarted): it must say ready again.
            self.backend.send_multipart([route, wire.error("", ErrorCode.NOT_JOINED, "send ready first")])
        elif kind == "heartbeat":
            if isinstance(env.get("stats"), dict):
                worker.stats = env["stats"]
            if worker.group and isinstance(worker.stats.get("generation"), str):
                self.group.formed(route, worker.stats["generation"], time.monotonic())
            if self.trainer is None and worker.trainer and not worker.group and not self.succession.electing() and self.may_train(worker):
                self.trainer = route  # e.g. the trainer back from its checkpoint, which reports its step here
                log.info("worker %s is the trainer now (at step %s)", worker.name, worker.stats.get("step"))
        elif kind in wire.REPLIES:
            self.on_reply(worker, env, frames)
        elif kind in wire.RELAYED and route == self.trainer:
            if env["part"] == 0:
                self.relayed[kind] = []
            self.relayed[kind].append(frames)
            if kind == "weights" and env["part"] == env["parts"] - 1:
                self.relayed_version = env["version"]
            if self.state is not None and env["part"] == env["parts"] - 1:
                self.save_relayed(kind)
            for other in self.workers.values():
                if other.route != route and other.wants(kind):
                    self.backend.send_multipart([other.route, *frames], copy=False)
        elif kind == "group_failed" and worker.group:
            log.warning("trainer %s: group generation %s failed", worker.name, env["id"] or "(none)")
            self.group.failed(route, env["id"], time.monotonic())
        elif kind == "bye":
            self.remove_worker(worker, "said bye")

    def on_ready(self, route: bytes, env: dict) -> None:
        shape = tuple(env["image_shape"])
        if self.model_shape is None:
            self.model_shape, self.levels = shape, env["levels"]  # type: ignore[assignment]
        elif shape != self.model_shape or env["levels"] != self.levels:
            self.backend.send_multipart([route, wire.error("", ErrorCode.INCOMPATIBLE, f"this broker serves images {list(self.model_shape)} with T={self.levels}")])
            return
        group = env.get("group", "") if env["trainer"] else ""
        lone = self.workers.get(self.trainer) if self.trainer is not None else None
        if lone is None and self.succession.electing():  # the election will name one of these
            lone = next((w for w in self.workers.values() if w.trainer and not w.group and self.may_train(w)), None)
        if group and lone is not None and not lone.group and lone.route != route:
            problem: str | None = (f"a lone trainer ({lone.name}) trains here; stop it before starting a trainer group (its checkpoint, "
                                   f"given to a group member as --checkpoint, carries its steps over)")
        else:
            problem = self.group.refuses(route, env["model"]) if group else None
        if problem:
            self.backend.send_multipart([route, wire.error("", ErrorCode.INCOMPATIBLE, problem)])
            return
        old = self.workers.pop(route, None)
        if old is not None:
            self.requeue(old)
            self.group.leave(route, time.monotonic())
        # Beside a trainer group a worker without --group only denoises: two trainers of one model
        # that do not reduce together would each lose the other's steps.
        trains = env["trainer"] and (bool(group) or not self.group.candidates)
        credit = {"denoise": env["denoise_credit"], "train": env["train_credit"] if trains else 0}
        worker = WorkerState(route, env["worker"], dict(credit), dict(credit), trains, time.monotonic(), group=group)
        self.workers[route] = worker
        if worker.group:
            self.group.join(route, worker.group, env["model"], time.monotonic())
        if worker.trainer and self.trainer is None and (worker.group or (not self.succession.electing() and self.may_train(worker))):
            self.trainer = route
        # The latest version's parts, in order, weights first; a group member takes them only now, a
        # trainer only if they are newer than its model (a fresh one then starts from them).
        for kind in (k for k in wire.RELAYED if worker.wants(k) or worker.group):
            for part in self.relayed[kind]:
                self.backend.send_multipart([route, *part], copy=False)
        log.info("worker %s ready (credit %s%s)", worker.name, credit, ", trainer" if self.trainer == route else "")

    def release(self, worker: WorkerState, key: tuple[str, str]) -> Job | None:
        """The job this worker held under `key`, its credit returned; None if it held none."""
        job = worker.jobs.pop(key, None)
        if job is not None:
            worker.credit[job.kind] += job.rows
        return job

    def held_key(self, worker: WorkerState, env: dict) -> tuple[str, str] | None:
        """Which held job a worker's reply answers: (client, job). A worker's `error` may leave its
        client out (PROTOCOL.md): then the one job of that id this worker holds."""
        if "client" in env:
            return env["client"], env.get("job", "")
        named = [key for key in worker.jobs if key[1] == env.get("job")]
        return named[0] if len(named) == 1 else None

    def take_held(self, worker: WorkerState, env: dict) -> Job | None:
        """The unanswered job this worker's reply is for, its credit returned; None for a late or
        duplicate reply, or one that names no job the worker holds."""
        key = self.held_key(worker, env)
        job = self.release(worker, key) if key is not None else None
        return job if job is not None and self.jobs.get(key) is job else None  # type: ignore[arg-type]

    def on_reply(self, worker: WorkerState, env: dict, frames: list[zmq.Frame]) -> None:
        job = self.take_held(worker, env)
        if job is None:
            log.info("dropping a late or duplicate reply for %s of %s from %s", env["job"], env.get("client", "?"), worker.name)
            return
        problem = self.reply_problem(job, env, frames)
        if problem:
            self.fail(job, ErrorCode.INTERNAL, f"the worker's reply was invalid ({problem})")
            return
        worker.completed += 1
        if env["type"] == "ack":
            self.succession.note_ack(worker, env["step"], replicated=bool(worker.group) and len(self.group.current.members) >= 2)
            if worker.group:
                self.group.acknowledged(worker.route, time.monotonic())
        self.answer(job, frames, failed=env["type"] == "error")

    def reply_problem(self, job: Job, env: dict, frames: list[zmq.Frame]) -> str | None:
        """Why a worker's reply cannot be this job's answer (None: it can)."""
        expected = {"train": "ack", "denoise": "result"}[job.kind]
        if env["type"] not in (expected, "error"):
            return f"{env['type']} for a {job.kind} job"
        spec = wire.tensor_spec(env, self.model_shape or (1, 1, 1))
        if env["type"] == "result" and env["count"] != job.rows:
            return f"{env['count']} rows for a job of {job.rows}"
        if spec is not None:
            try:
                tensors.check(frames[1].buffer, spec, self.limits.max_frame_bytes)
            except ProtocolError as exc:
                return exc.reason
        return None

    def on_invalid_reply(self, worker: WorkerState, loose: dict, exc: ProtocolError) -> bool:
        """A worker's reply that failed validation still ends its job: an error to the node. Whether
        it named a job this worker holds (if not, the worker is told instead)."""
        job = self.take_held(worker, loose)
        if job is not None:
            self.fail(job, ErrorCode.INTERNAL, f"the worker's reply was invalid ({exc.reason})")
        return job is not None

    def remove_worker(self, worker: WorkerState, why: str) -> None:
        log.warning("worker %s removed (%s); re-queueing %d jobs", worker.name, why, len(worker.jobs))
        self.workers.pop(worker.route, None)
        self.requeue(worker)
        self.group.leave(worker.route, time.monotonic())
        if self.trainer == worker.route:
            self.trainer = None if self.group.candidates or worker.group else self.standby()  # a group re-forms instead

    def standby(self) -> bytes | None:
        """The worker that takes over from a trainer that is gone, or is chosen when the election
        ends (broker/succession.py). (A trainer group re-forms instead.)"""
        chosen = self.succession.standby(self.workers.values(), self.relayed_version)
        return chosen.route if chosen is not None else None

    def elect(self, now: float) -> None:
        """Once the election ends, the lone trainer is the standby with the highest step (none
        while a trainer group forms instead)."""
        if self.succession.election_ends(now, self.workers.values()) and self.trainer is None and not self.group.candidates:
            self.trainer = self.standby()
            if self.trainer is not None:
                worker = self.workers[self.trainer]
                log.info("worker %s is the trainer (the highest step reported: %s)", worker.name, worker.stats.get("step", 0))

    def may_train(self, worker: WorkerState) -> bool:
        return self.succession.may_train(worker, self.relayed_version)

    def requeue(self, worker: WorkerState, *kinds: str) -> None:
        """The jobs this worker holds (of these kinds; all without) back to the front of their queues, in their order."""
        held = [job for job in worker.jobs.values() if not kinds or job.kind in kinds]
        for job in sorted(held, key=lambda j: j.received, reverse=True):
            self.release(worker, (job.client, job.job_id))
            if self.jobs.get((job.client, job.job_id)) is job:  # not already answered (e.g. timed out)
                self.enqueue(job, front=True)

    # ---- dispatch, deadlines and heartbeats -------------------------------------------------
    def takers(self, kind: str) -> list[WorkerState]:
        """The workers that take this kind of job: train jobs go to the trainer group's current
        members (spread by credit), or, without a group, to the one active trainer."""
        if kind == "denoise":
            return list(self.workers.values())
        if self.group.current.members:
            return [self.workers[r] for r in self.group.current.members if r in self.workers]
        return [self.workers[self.trainer]] if self.trainer in self.workers else []

    def best_taker(self, kind: str, kept: dict[bytes, Job]) -> WorkerState | None:
        """The taker of this kind with the most credit, of those not kept for an old job: the next
        job goes there, if it fits."""
        return max((w for w in self.takers(kind) if w.route not in kept), key=lambda w: w.credit[kind], default=None)

    def servable(self, job: Job) -> bool:
        """Some live worker could take this job once its credit is back."""
        return any(w.max_credit[job.kind] >= job.rows for w in self.takers(job.kind))

    def reform_group(self) -> None:
        """Tell the trainer group's members their new generation once a re-form is due; its rank 0's
        weights are the ones relayed."""
        generation = self.group.reform(self.epoch, time.monotonic())
        if generation is None:
            return
        log.info("trainer group %s: %s", generation.id, ", ".join(self.workers[r].name for r in generation.members) or "empty")
        for route in generation.left_out:
            self.leave_out(route)
        for route in generation.members:
            self.backend.send_multipart([route, wire.encode("group", **generation.message(route))])
        self.trainer = generation.members[0] if generation.members else None

    def group_status(self) -> dict:
        """The trainer group's generation and, while a member at fault is searched for, who is out
        of its generations and who is parked (broker/group.py)."""
        def names(routes: list[bytes]) -> list[str]:
            return [self.workers[r].name for r in routes if r in self.workers]

        g = self.group
        return {"generation": g.current.id, "world": len(g.current.members), "out": names(g.left_out_now()), "parked": names(g.parked)}

    def leave_out(self, route: bytes) -> None:
        """A trainer the group left out (broker/group.py) serves denoise jobs only: it is told why,
        its train jobs go back to the queue, and it gets the trainer's weights from now on."""
        worker = self.workers.get(route)
        if worker is None:
            return
        reason = ("left out of the trainer group: its generations failed, one of every other member held (formed and took a "
                  "step) without it, and the next with it failed, every other member reporting it (can the other ranks reach its "
                  "--group address? is it too slow for --group-timeout?); it serves denoise jobs only until it restarts")
        log.warning("worker %s %s", worker.name, reason)
        self.backend.send_multipart([route, wire.error("", ErrorCode.REFUSED, reason)])  # first: the relays below are for a non-member
        self.requeue(worker, "train")
        if self.trainer == route:
            self.trainer = None
        worker.group, worker.trainer = "", False
        worker.credit["train"] = worker.max_credit["train"] = 0
        for part in self.relayed["weights"]:
            self.backend.send_multipart([route, *part], copy=False)

    def dispatch(self) -> None:
        """Round robin per kind: the client served last goes to the back of the line; one whose next
        job does not fit the best taker's credit keeps its place while smaller jobs pass it, for
        `reserve_after`; after that the worker closest to holding it is kept for it (`keep_for`),
        so a large job is not starved by a stream of small ones. A pass stops as soon as no waiting
        job fits the best taker's credit (kept workers take none anyway), so thousands of clients
        waiting on full or nearly full workers cost one look per job sent."""
        now = time.monotonic()
        for kind, turns in self.turns.items():
            kept: dict[bytes, Job] = {}  # workers kept for an old job that does not fit yet → that job
            worker = self.best_taker(kind, kept)
            progress = True
            while progress and self.fits(worker, kind):
                progress = False
                for name in list(turns):
                    head = self.clients[name].queues[kind][0]
                    if head.rows > worker.credit[kind]:
                        if now - head.received > self.config.reserve_after and not any(j is head for j in kept.values()) \
                                and self.keep_for(head, kept):
                            worker = self.best_taker(kind, kept)
                            if not self.fits(worker, kind):
                                break
                        continue
                    job = self.dequeue(name, kind)
                    job.dispatched = now
                    worker.credit[kind] -= job.rows
                    worker.jobs[(name, job.job_id)] = job
                    self.backend.send_multipart([worker.route, *job.frames], copy=False)
                    self.forwarded += 1
                    progress = True
                    worker = self.best_taker(kind, kept)
                    if not self.fits(worker, kind):
                        break

    def keep_for(self, job: Job, kept: dict[bytes, Job]) -> bool:
        """Keep, for this job, the taker not yet kept with the most free credit among those that can
        hold it once their held jobs come back (a job answered `timeout` may never come back): from
        now on its credit only grows until the job, first in line by then, fits."""
        able = [w for w in self.takers(job.kind) if w.route not in kept and w.max_credit[job.kind] - self.stranded(w, job.kind) >= job.rows]
        if not able:
            return False
        kept[max(able, key=lambda w: w.credit[job.kind]).route] = job
        return True

    def stranded(self, worker: WorkerState, kind: str) -> int:
        """Rows of this kind the worker holds for jobs already answered (timed out): their credit
        returns only if the worker ever replies."""
        return sum(j.rows for key, j in worker.jobs.items() if j.kind == kind and self.jobs.get(key) is not j)

    def dequeue(self, name: str, kind: str) -> Job:
        """The head of this client's queue of this kind; the client goes to the back of the line."""
        queue = self.clients[name].queues[kind]
        job = queue.popleft()
        self.drop_head(job)
        self.queued_bytes -= job.nbytes
        del self.turns[kind][name]
        if queue:
            self.turns[kind][name] = None
            self.heads[kind][queue[0].rows] += 1
        return job

    def drop_head(self, job: Job) -> None:
        """This job is no longer its client's next one."""
        heads = self.heads[job.kind]
        heads[job.rows] -= 1
        if not heads[job.rows]:
            del heads[job.rows]

    def fits(self, worker: WorkerState | None, kind: str) -> bool:
        """Whether some waiting client's next job of this kind fits this worker's free credit."""
        return worker is not None and worker.credit[kind] > 0 and worker.credit[kind] >= min(self.heads[kind], default=worker.credit[kind] + 1)

    def enforce_deadlines(self, now: float) -> None:
        """Answer the jobs that would otherwise wait forever: a queue head no live worker can take
        (too large for every worker: at once; no worker at all: after `no_worker_wait`), and jobs a
        worker has held past `job_timeout` (its late reply is then dropped)."""
        for kind, turns in self.turns.items():
            for name in list(turns):
                self.enforce_head(name, kind, now)
        for worker in self.workers.values():
            for job in list(worker.jobs.values()):
                if self.jobs.get((job.client, job.job_id)) is job and now - job.dispatched > self.config.job_timeout:
                    self.fail(job, ErrorCode.TIMEOUT, f"worker {worker.name} held this job for more than {self.config.job_timeout:.0f} s")

    def enforce_head(self, name: str, kind: str, now: float) -> None:
        """Answer this queue's head at once if no live worker can ever take it, or after
        `no_worker_wait` if no worker takes its kind at all."""
        head = self.clients[name].queues[kind][0]
        if not self.servable(head):
            if self.takers(kind):
                self.fail(self.dequeue(name, kind), ErrorCode.TOO_LARGE, f"{head.kind} of {head.rows} rows exceeds what every live worker takes at once")
            elif now - head.received > self.config.no_worker_wait:
                self.fail(self.dequeue(name, kind), ErrorCode.UNAVAILABLE, f"no worker could take this {kind} job for {self.config.no_worker_wait:.0f} s")

    def expire_idle(self, now: float) -> None:
        """Forget clients with nothing queued or in flight that have been silent too long."""
        busy = {client for client, _ in self.jobs}
        for name, client in list(self.clients.items()):
            if name not in busy and now - client.last_seen > self.config.client_idle_expiry:
                for job_id in list(client.replies):
                    self.forget_reply(name, job_id)
                del self.clients[name]
        self.identities.forget_names(self.clients)

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
                self.backend.send_multipart([worker.route, wire.encode("heartbeat", epoch=self.epoch)])
        self.elect(now)
        self.enforce_deadlines(now)
        self.expire_idle(now)
        if self.keys is not None:
            self.keys.reload()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        in_flight: dict[str, int] = {}
        for worker in self.workers.values():
            for client, _ in worker.jobs:
                in_flight[client] = in_flight.get(client, 0) + 1
        listed = list(self.clients.values())[: self.config.max_status_clients]
        return {
            "uptime_s": round(now - self.started, 1),
            "queued": sum(c.queued() for c in self.clients.values()),
            "in_flight": sum(in_flight.values()),
            "forwarded": self.forwarded,
            "weights_relayed": bool(self.relayed["weights"]),
            "trainer_group": self.group_status(),
            "workers": [
                {
                    "name": w.name,
                    "trainer": w.route == self.trainer,
                    "rank": self.group.rank(w.route),
                    "credit": w.credit,
                    "in_flight": len(w.jobs),
                    "completed": w.completed,
                    "last_seen_s": round(now - w.last_seen, 2),
                    "stats": w.stats,
                }
                for w in list(self.workers.values())[: self.config.max_status_clients]
            ],
            "clients_total": len(self.clients),
            "clients": {c.name: {**c.counts, "t_c": c.t_c, "queued": c.queued(), "in_flight": in_flight.get(c.name, 0)} for c in listed},
        }
