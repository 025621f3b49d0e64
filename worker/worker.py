"""The worker process: one DEALER connection to the broker, the server model, two batchers.

Each loop: take every waiting message; merge waiting training rows into one optimiser step when
enough have come or the first has waited long enough, and acknowledge each job after its step;
run one continuous-batching denoising iteration and answer the jobs it finished. Credit is implicit:
the broker counts the rows it gave and gets them back with each reply. The trainer publishes its
weights (and its optimiser's moments) every `sync_every` steps; the broker relays them to every
other worker (the moments to those that may take over training), which loads them between
iterations. Heartbeats both ways; a broker silent for interval × liveness means reconnect
(Paranoid Pirate), dropping work that the broker will have re-queued.

As in the ZeroMQ guide's Majordomo worker, the loop is small and each message type has a named
handler; the training batcher (worker/training.py) and the weight relay (worker/relay.py) keep
their own state.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zmq

from collafuse.common.config import DiffusionConfig, SamplerConfig, WorkerConfig
from collafuse.common.energy import PhaseEnergy
from collafuse.common.lifecycle import Stoppable
from collafuse.diffusion.models import resolve_device
from collafuse.diffusion.split import ServerMessage
from collafuse.engine.checkpoint import load_checkpoint, load_extra, save_checkpoint
from collafuse.engine.compiled import use_cache
from collafuse.engine.sampler import SampleJob
from collafuse.engine.server import ServerParty
from collafuse.protocol import tensors, wire
from collafuse.protocol.security import PeerKeys
from collafuse.protocol.sockets import dealer, drain
from collafuse.protocol.wire import ErrorCode, ProtocolError
from collafuse.engine.collective import Collective, CollectiveFailed
from collafuse.worker.group import GroupMember
from collafuse.worker.relay import WeightRelay
from collafuse.worker.training import TrainBatcher, row_count

log = logging.getLogger("collafuse.worker")

TRAIN_CREDIT_STEPS = 2  # train credit in steps' worth of rows: the next step's rows arrive while one is applied
# With a checkpoint, credit comes back only with the ack, after the checkpoint: room for more steps
# keeps rows arriving while acks wait, so that one checkpoint serves several steps under load.
DURABLE_TRAIN_CREDIT_STEPS = 8
IDLE_POLLS_PER_HEARTBEAT = 2  # an idle loop wakes this often per heartbeat interval, so heartbeats leave on time
LOOPBACK = ("127.0.0.1", "localhost", "::1")
GROUP_IDLE_POLL_MS = 20  # an idle rank of a trainer group: its peers wait this long at most for it to agree on a step
BYE_LINGER_MS = 1000  # how long the closing socket may take to deliver `bye`
FINAL_RELAY_LINGER_MS = 10000  # ... and a lone trainer's last relay before it


@dataclass
class WorkerStats:
    """This worker's counters; every heartbeat carries them (the broker's status and the load test read them)."""

    train_steps: int = 0
    train_rows: int = 0
    denoise_iterations: int = 0
    denoise_rows: int = 0
    jobs: int = 0  # train jobs acknowledged and denoise jobs answered


class Worker(Stoppable):
    """One connection to the broker and the loop that serves it; training waits in `batcher`,
    denoising runs in `engine`, the trainer's weights travel through `relay`."""

    def __init__(self, config: WorkerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.shape = (config.channels, config.image_size, config.image_size)
        self.device = resolve_device(config.device)
        on_cuda = self.device.type == "cuda"
        compiled = on_cuda if config.compile is None else config.compile
        self.compile_cache = use_cache(config.compile_cache) if compiled or (config.compile_train and config.trainer) else None
        self.party = ServerParty(
            self.shape, config.model, DiffusionConfig(levels=self.limits.levels), config.train, self.device, config.bf16, seed=config.seed,
            cuda_graphs=on_cuda if config.cuda_graphs is None else config.cuda_graphs, compile=compiled,
            compile_train=config.compile_train and config.trainer,
        )
        self.batcher = TrainBatcher(config.max_train_rows, config.train_wait)
        if config.group:
            if not config.trainer:
                raise ValueError("a worker in the trainer group must train (--group with --no-train)")
            deadline = config.heartbeat.interval * config.heartbeat.liveness
            if config.group_timeout >= deadline:  # a rank waiting in a collective sends no heartbeats
                raise ValueError(f"--group-timeout {config.group_timeout:g} s must be below the heartbeat deadline "
                                 f"(interval × liveness = {deadline:g} s), or a rank waiting for a slow peer is declared dead")
        self.group = GroupMember(config, self.party, self.batcher, self.heartbeat) if config.group else None
        if self.group is not None and self.group.host.host in LOOPBACK and not any(h in config.broker for h in LOOPBACK):
            log.warning("--group %s is reachable from this machine only, the broker at %s is not: trainers on other machines "
                        "cannot reach this one, and every generation with them will fail", config.group, config.broker)
        if config.checkpoint and Path(config.checkpoint).is_file():
            meta = load_checkpoint(config.checkpoint, self.party.model, self.party.optimizer, self.device)
            self.party.step, self.party.rows_applied = int(meta.get("step", 0)), int(meta.get("rows", 0))
            applied = load_extra(config.checkpoint).get("applied")
            if applied is not None:
                self.batcher.restore(applied)
            log.info("resumed the server model from %s at step %d (%d applied jobs remembered)", config.checkpoint, self.party.step,
                     self.batcher.total)
        elif config.trainer and not config.checkpoint:
            log.warning("no --checkpoint: this worker's acknowledgements are not durable (a trainer that dies loses acknowledged updates)%s",
                        "; in a trainer group of two or more they are: every rank holds every step" if config.group else "")
        self.ctx = context or zmq.Context.instance()
        self.keys = PeerKeys.load(Path(config.keys)) if config.keys else None
        self.sock: zmq.Socket | None = None
        self.engine = self.party.sampler(config.max_batch)
        self.denoising: dict[str, dict] = {}  # engine job id → envelope
        self.relay = WeightRelay(self.party, self.limits.max_frame_bytes, self.send)
        self.stopping = False
        self.last_heard = self.next_heartbeat = 0.0
        self.last_checkpoint_step = self.party.step
        self.energy = PhaseEnergy()
        self.stats = WorkerStats()
        self.epoch = ""  # the broker run this connection registered with ('' until its first heartbeat)
        self.handlers: dict[str, Callable[[dict, list[zmq.Frame]], None]] = {  # message type → handler; others are only heard
            "train": self.on_train,
            "denoise": self.on_denoise,
            "error": self.on_error,
            "heartbeat": self.on_heartbeat,
            "group": self.on_group,
            **{kind: self.on_relayed for kind in wire.RELAYED},
        }

    # ---- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.engine = self.party.sampler(self.config.max_batch)  # the broker re-queues what we held
        self.denoising.clear()
        self.batcher.pending.clear()
        self.epoch = ""
        if self.group is not None:  # the broker forms a new generation with us once we are registered
            self.group.leave()
            # Held jobs go too: the broker re-queues them (or their nodes re-send them) to whichever rank
            # it chooses, which acknowledges them from the group's memory or applies them; kept here,
            # one could be put back and applied by this rank as well.
            self.batcher.drop_held()
        self.sock = dealer(self.ctx, self.config.broker, self.limits.max_frame_bytes, self.keys)
        self.send(
            wire.encode(
                "ready",
                worker=self.config.name,
                denoise_credit=self.config.max_batch + self.config.queue_rows,
                train_credit=(DURABLE_TRAIN_CREDIT_STEPS if self.config.checkpoint else TRAIN_CREDIT_STEPS) * self.config.max_train_rows,
                trainer=self.config.trainer,
                image_shape=list(self.shape),
                levels=self.limits.levels,
                model=self.config.model,
                **({"group": self.config.group} if self.group is not None else {}),
            )
        )
        self.last_heard = time.monotonic()
        log.info("connected to %s as %s (%s, denoising %s%s)", self.config.broker, self.config.name, self.device,
                 "compiled" if self.party.compiled else "eager", ", with CUDA graphs" if self.party.cuda_graphs else "")

    def send(self, *frames: bytes) -> None:
        assert self.sock is not None
        self.sock.send_multipart(list(frames), copy=False)

    def reply_error(self, env: dict, exc: ProtocolError) -> None:
        named = {"client": env["client"]} if "client" in env else {}
        self.send(wire.encode("error", job=env.get("job", ""), code=exc.code, reason=exc.reason, **named))

    def heartbeat(self) -> None:
        """Heartbeat the broker when due (with this worker's counters)."""
        now = time.monotonic()
        if now >= self.next_heartbeat:
            rank = self.group.rank if self.group is not None else None
            generation = self.group.generation if rank is not None else ""  # the one this rank formed with the others
            self.send(wire.encode("heartbeat", stats={**asdict(self.stats), "max_batch": self.config.max_batch, "step": self.party.step,
                                                      "rows": self.party.rows_applied, "rank": rank, "generation": generation,
                                                      "durable": bool(self.config.checkpoint)}))
            self.next_heartbeat = now + self.config.heartbeat.interval

    def keep_alive(self, now: float) -> None:
        """Heartbeat the broker when due; reconnect when it has been silent too long."""
        hb = self.config.heartbeat
        self.heartbeat()
        if now - self.last_heard > hb.interval * hb.liveness:
            log.warning("broker silent for %.1f s: reconnecting", now - self.last_heard)
            self.connect()

    # ---- the loop ---------------------------------------------------------------------------
    def warm_up(self, say: Callable[[str], None]) -> None:
        """Compile and capture everything serving runs before registering, so that the broker sends
        no job to a worker that would stall for minutes (and miss its heartbeats). A model that fails
        to compile (no compiler, an unsupported GPU) is served eagerly: it served before."""
        if self.compile_cache is not None:
            say(f"compiling the {self.config.model} model for {self.device} (artifacts in {self.compile_cache}; "
                f"a cold start takes minutes, a warm one seconds)")
        train_rows = self.config.max_train_rows if self.config.trainer else 0
        failure = ""
        try:
            reports = self.party.warm_up(self.config.max_batch, train_rows)
        except Exception as exc:  # noqa: BLE001 - inductor and Triton raise many kinds
            if self.compile_cache is None:
                raise
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if failure:  # outside the except block, so that nothing holds the compiled graphs while the eager ones are captured
            say(f"warming up the compiled model failed ({failure}); serving the eager model")
            self.party.uncompile()
            self.engine = self.party.sampler(self.config.max_batch)  # drops the first engine's graphs
            self.compile_cache = None
            if self.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            reports = self.party.warm_up(self.config.max_batch, train_rows)
        for report in reports:
            say(report.line())

    def run(self, say: Callable[[str], None] = log.info) -> None:
        """Warm up (its progress to `say`), register, serve until stopped (a stop asked for while
        warming up ends the worker before it registers)."""
        self.warm_up(say)
        if self.stopping:
            self.shutdown()
            return
        self.connect()
        idle_poll_ms = int(self.config.heartbeat.interval * 1000 / IDLE_POLLS_PER_HEARTBEAT)
        while not self.stopping:
            busy = not self.engine.idle() or bool(self.batcher.pending)
            in_group = self.group is not None and (self.group.collective is not None or self.group.announced is not None)
            assert self.sock is not None
            if self.sock.poll(0 if busy else GROUP_IDLE_POLL_MS if in_group else idle_poll_ms, zmq.POLLIN):
                drain(self.sock, self.on_message)
            self.train()
            if not self.engine.idle():
                self.denoise_once()
            self.keep_alive(time.monotonic())
            if self.checkpoint_due():
                self.checkpoint()
        self.shutdown()

    def replicated(self) -> bool:
        """Whether a step, once every rank has passed the next collective, is on several processes:
        then an ack needs no checkpoint to survive the death of any one of them."""
        return self.group is not None and self.group.world >= 2

    def checkpoint_due(self) -> bool:
        if not self.config.checkpoint:
            return False
        if self.party.step - self.last_checkpoint_step >= self.config.checkpoint_every:
            return True
        return self.checkpoint_makes_durable() and self.batcher.commit_due(self.config.durable_wait)

    def checkpoint_makes_durable(self) -> bool:
        """Whether a checkpoint makes the held acks' steps durable: for a lone trainer, yes; in a
        group only for a rank alone in a live generation (otherwise the next generation may start
        from another rank's state, without this rank's last step)."""
        return self.group is None or (self.group.collective is not None and self.group.world == 1)

    def on_message(self, frames: list[zmq.Frame]) -> None:
        """Any message proves the broker alive; a job that fails still gets its one reply."""
        self.last_heard = time.monotonic()
        try:
            env = wire.decode(frames[0].buffer, self.limits)
        except ProtocolError as exc:
            log.warning("bad envelope from the broker: %s", exc)
            return
        handler = self.handlers.get(env["type"])
        if handler is None:
            return
        try:
            handler(env, frames)
        except ProtocolError as exc:
            exc.job = env.get("job", "")
            self.reply_error(env, exc)
        except Exception as exc:
            if env["type"] not in wire.KINDS_WITH_REPLY:
                raise
            log.exception("job %s of %s failed", env["job"], env["client"])
            self.reply_error(env, ProtocolError(ErrorCode.INTERNAL, f"the worker failed on this job ({type(exc).__name__})", env["job"]))

    def on_heartbeat(self, env: dict, frames: list[zmq.Frame]) -> None:
        """A heartbeat from another broker run than the one we registered with: it has lost our
        registration (and requeued nothing of ours), so register again at once."""
        epoch = env.get("epoch", self.epoch)
        if self.epoch and epoch != self.epoch:
            log.warning("the broker restarted (a new epoch): registering again")
            self.connect()
        else:
            self.epoch = epoch

    def on_relayed(self, env: dict, frames: list[zmq.Frame]) -> None:
        """A member of the trainer group takes a relay only while it has no history of its own (a
        fresh worker registering where an earlier run left a relayed version, e.g. in the broker's
        --state): the group keeps its ranks identical, and a rank with a history keeps its memory of
        applied jobs consistent with its model. The next generation starts from the most advanced."""
        if self.group is None or (self.group.collective is None and self.party.step == 0 and not self.batcher.applied):
            self.relay.on_relayed(env, frames)

    def on_group(self, env: dict, frames: list[zmq.Frame]) -> None:
        if self.group is not None:
            self.group.on_group(env)

    def on_error(self, env: dict, frames: list[zmq.Frame]) -> None:
        """Rejoin a broker that does not know this connection (it restarted); stop if it never will take us."""
        if env["code"] == ErrorCode.NOT_JOINED:
            self.connect()
        elif env["code"] in (ErrorCode.INCOMPATIBLE, ErrorCode.FORBIDDEN):
            log.error("broker refused this worker: %s", env["reason"])
            self.stopping = True
        elif env["code"] == ErrorCode.REFUSED and not env["job"] and self.group is not None:
            self.leave_group(env["reason"])
        else:
            log.warning("the broker refused a message of this worker: %s %s", env["code"], env["reason"])

    def leave_group(self, reason: str) -> None:
        """The broker left this trainer out of the group: from now on it is a denoise-only worker on
        the relayed weights (the broker re-queued its train jobs), also when it reconnects, and it
        writes no checkpoint (its weights are the relays, not a trainer's state)."""
        log.error("%s", reason)
        self.group = None
        self.config = replace(self.config, trainer=False, checkpoint="")
        self.batcher.pending.clear()
        self.batcher.drop_held()

    # ---- training ---------------------------------------------------------------------------
    def on_train(self, env: dict, frames: list[zmq.Frame]) -> None:
        """A job applied before (a broker or trainer restart, or another rank of the group applied
        it and died) is acknowledged again, not applied again; a held ack goes out when its step is
        durable. In a group that is only after the next collective: the step that applied it may
        still be lost with a peer, so the job is held with its rows, like a fresh one."""
        ack = self.batcher.ack_of(env)
        if ack is not None and (self.group is None or self.batcher.is_held(env)):
            if not self.batcher.is_held(env):
                self.send(ack)
            return
        if len(frames) != 2:
            raise ProtocolError(ErrorCode.BAD_TENSOR, "train needs a tensor frame")
        arrays = tensors.decode(frames[1].buffer, wire.tensor_spec(env, self.shape), self.limits.max_frame_bytes)
        wire.check_train_values(env, arrays, self.limits)
        t, x_t, eps = (torch.from_numpy(arrays[k].copy()) for k in ("t", "x_t", "eps"))
        msg = ServerMessage(x_t, t, torch.full_like(t, wire.cut_of(env, self.limits).t_c), eps)
        if ack is not None:
            self.batcher.remember(env, ack, hold=True, msg=msg)
        else:
            self.batcher.add(env, msg)

    def train(self, flush: bool = False) -> None:
        """One optimiser step over the jobs the batcher has due (with `flush`, the oldest that fit one,
        due or not); in a trainer group, the step the ranks agree on (`flush` does not apply: a
        group steps when any rank has a step due)."""
        if self.group is not None:
            self.train_in_group()
            return
        batch = self.batcher.take(flush)
        if batch:
            self.apply(batch)

    def train_in_group(self) -> None:
        """Join an announced generation, or agree with the other ranks whether a step is due and take
        it together (with this rank's jobs that fit one step, or none, whether due here or not).
        Held acks go out once every rank has passed the collective after their step (alone in a
        generation with a checkpoint: once a checkpoint holds it). A failed collective puts the
        step's jobs back and tells the broker, which re-forms the group."""
        group = self.group
        assert group is not None
        batch: list = []
        try:
            if group.collective is None:
                if group.announced is not None:
                    group.join()
                    self.next_heartbeat = 0.0  # say at once that it formed here: an ack of its first step must not come first
                    self.heartbeat()
                    for (env, msg), ack in self.batcher.settle_applied():  # applied by the others in a step this rank missed
                        self.batcher.remember(env, ack, hold=True, msg=msg)
                return
            due = group.agree(self.batcher.due())
            if self.replicated() or not self.config.checkpoint:
                self.send_acks(self.batcher.release())
            if due:
                batch = self.batcher.take(flush=True)
                self.apply(batch, group.collective)
        except CollectiveFailed as exc:
            self.batcher.put_back(batch)
            log.warning("trainer group %s failed (%s): telling the broker", group.generation or "(none)", exc)
            group.collective = None
            self.send(wire.encode("group_failed", id=group.generation))

    def apply(self, batch: list, collective: Collective | None = None) -> None:
        """One optimiser step over these jobs (in a group: with the other ranks'), each answered
        with an ack or `refused`; the acks of the jobs other ranks applied are remembered too, so
        that one re-sent to this rank is acknowledged, not applied again. The trainer (rank 0)
        publishes the weights every `sync_every` steps."""
        with self.energy.phase("server_training"):
            outcome = self.party.train_step([m for _, m in batch], [env["client"] for env, _ in batch], collective,
                                            [[env["client"], env["job"]] for env, _ in batch])
        self.batcher.stepped()
        hold = bool(self.config.checkpoint) or self.group is not None  # a group's acks wait for the next collective
        for i, (env, msg) in enumerate(batch):
            if i in outcome.refused:
                self.reply_error(env, ProtocolError(ErrorCode.REFUSED, outcome.refused[i], env["job"]))
                continue
            ack = wire.encode("ack", job=env["job"], client=env["client"], step=self.party.step, loss=float(outcome.loss))
            self.batcher.remember(env, ack, hold=hold, msg=msg if self.group is not None else None)  # rows kept only to re-apply
            if not hold:
                self.send(ack)
        if outcome.loss is None:  # every job was refused: no step was taken
            return
        for client, job in outcome.applied_elsewhere:
            ack = wire.encode("ack", job=job, client=client, step=self.party.step, loss=float(outcome.loss))
            self.batcher.remember({"client": client, "job": job}, ack, hold=False)
        self.stats.train_steps += 1
        self.stats.train_rows += row_count(batch)
        self.stats.jobs += len(batch) - len(outcome.refused)
        if self.party.step % self.config.sync_every == 0 and (self.group is None or self.group.rank == 0):
            if self.config.checkpoint:  # a relayed version is durable first: a standby starts from steps that are in the checkpoint
                self.checkpoint()
            self.relay.publish()

    # ---- denoising --------------------------------------------------------------------------
    def on_denoise(self, env: dict, frames: list[zmq.Frame]) -> None:
        if len(frames) != 1:
            raise ProtocolError(ErrorCode.BAD_TENSOR, "denoise carries no tensor frame")
        sampler = SamplerConfig(kind=env["sampler"], ddim_steps=env["steps"], eta=env["eta"])
        key = f"{env['client']}\x00{env['job']}"
        if key in self.denoising:
            return
        job = self.party.denoise_job(key, env["count"], wire.cut_of(env, self.limits), env["seed"], sampler, first_row=env["first_row"])
        self.denoising[key] = env
        for done in self.engine.submit(job):
            self.reply_denoised(done)

    def denoise_once(self) -> None:
        """One continuous-batching iteration over every job in the engine; answer those it finished."""
        before = self.engine.rows_processed
        with self.energy.phase("server_denoising"):
            finished = self.engine.iterate()
        self.stats.denoise_iterations += 1
        self.stats.denoise_rows += self.engine.rows_processed - before
        for job in finished:
            self.reply_denoised(job)

    def reply_denoised(self, job: SampleJob) -> None:
        """Answer a denoise job the engine has finished with its rows x_{t_c}, for the node to finish."""
        env = self.denoising.pop(job.job_id)
        assert job.result is not None
        blob = tensors.encode({"x": job.result.numpy().astype(np.float32)})
        self.send(wire.encode("result", job=env["job"], client=env["client"], count=env["count"]), blob)
        self.stats.jobs += 1

    # ---- persistence and exit ---------------------------------------------------------------
    def checkpoint(self) -> None:
        """Weights, optimiser, step and the acks of applied jobs (so that a restarted trainer answers a
        job it contains instead of applying it again) in one atomic file; then the held acks, whose
        steps it now contains, go out: an ack is sent only once its update survives this process."""
        save_checkpoint(self.config.checkpoint, self.party.model, self.party.optimizer,
                        {"step": self.party.step, "rows": self.party.rows_applied, "model": self.config.model}, {"applied": self.batcher.applied_tensor()})
        self.last_checkpoint_step = self.party.step
        log.debug("checkpoint at step %d: %s", self.party.step, self.config.checkpoint)
        if self.checkpoint_makes_durable():
            self.send_acks(self.batcher.release())

    def send_acks(self, acks: list[bytes]) -> None:
        for ack in acks:
            if self.sock is not None:
                self.send(ack)

    def shutdown(self) -> None:
        """Apply what is waiting, checkpoint, tell the broker (it re-queues the rest at once). A rank
        of a trainer group applies nothing alone: the broker gives its jobs to the other ranks,
        which hold every step this rank took. A lone trainer then relays the steps no relay carried
        (taken since its last relay, or restored from its checkpoint; they are in its checkpoint
        first), so that a standby may take over at once."""
        while self.batcher.pending and (self.group is None or self.group.world == 1):
            self.apply(self.batcher.take(flush=True), self.group.collective if self.group is not None else None)
        if self.group is not None and self.group.world == 1 and not self.config.checkpoint:
            self.send_acks(self.batcher.release())  # alone and without a checkpoint: not durable, as the log said at start
        if self.config.checkpoint:
            self.checkpoint()
        report = self.energy.stop()
        if self.config.energy_report:
            Path(self.config.energy_report).write_text(json.dumps({**report, "stats": asdict(self.stats)}, indent=2))
        if self.sock is not None:
            final_relay = self.config.trainer and self.group is None and self.relay.unrelayed()  # from a standby, the broker ignores it
            if final_relay:
                self.relay.publish()
            self.send(wire.encode("bye"))
            self.sock.close(linger=FINAL_RELAY_LINGER_MS if final_relay else BYE_LINGER_MS)
            self.sock = None
