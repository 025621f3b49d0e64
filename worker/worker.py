"""The worker process: one DEALER connection to the broker, the server model, two batchers.

Each loop: take every waiting message; merge waiting training rows into one optimiser step when
enough have come or the first has waited long enough, and acknowledge each job after its step;
run one continuous-batching denoising iteration and answer the jobs it finished. Credit is implicit:
the broker counts the rows it gave and gets them back with each reply. The trainer publishes its
weights (and its optimiser's moments) every `sync_every` steps; the broker relays them to every
other worker (the moments to those that may take over training), which loads them between
iterations. Heartbeats both ways; a broker silent for interval × liveness means reconnect
(Paranoid Pirate), dropping work that the broker will have re-queued.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import zmq

from collafuse.common.config import DiffusionConfig, SamplerConfig, WorkerConfig
from collafuse.engine.checkpoint import flatten_optimizer, load_checkpoint, load_optimizer, save_checkpoint
from collafuse.diffusion.models import resolve_device
from collafuse.engine.sampler import SampleJob
from collafuse.diffusion.split import ServerMessage
from collafuse.common.energy import PhaseEnergy
from collafuse.common.lifecycle import Stoppable
from collafuse.protocol import tensors, wire
from collafuse.protocol.security import PeerKeys
from collafuse.protocol.sockets import dealer, drain
from collafuse.protocol.wire import ErrorCode, ProtocolError
from collafuse.engine.server import ServerParty

log = logging.getLogger("collafuse.worker")


def moments_problem(param_shapes: list[tuple[int, ...]], arrays: dict[str, np.ndarray]) -> str | None:
    """Why relayed optimiser state does not fit these parameters (None: it fits): every parameter
    needs the same keys, each tensor shaped like its parameter or a scalar (a step count)."""
    keys: dict[int, set[str]] = {}
    for name, arr in arrays.items():
        prefix, _, rest = name.partition(".")
        index, _, key = rest.partition(".")
        if prefix != "optim" or not index.isdigit() or int(index) >= len(param_shapes) or not key:
            return f"unexpected tensor {name!r}"
        if arr.shape not in (param_shapes[int(index)], ()):
            return f"{name!r} has shape {list(arr.shape)}, its parameter {list(param_shapes[int(index)])}"
        keys.setdefault(int(index), set()).add(key)
    if len(keys) != len(param_shapes) or len({frozenset(k) for k in keys.values()}) != 1:
        return "not every parameter has the same state"
    return None


class Worker(Stoppable):
    def __init__(self, config: WorkerConfig, context: zmq.Context | None = None, seed: int = 0) -> None:
        self.config = config
        self.limits = config.limits
        self.shape = (config.channels, config.image_size, config.image_size)
        self.device = resolve_device(config.device)
        self.party = ServerParty(
            self.shape, config.model, DiffusionConfig(levels=self.limits.levels), config.train_config, self.device, config.bf16, seed=seed,
            cuda_graphs=self.device.type == "cuda" if config.cuda_graphs is None else config.cuda_graphs,
        )
        if config.checkpoint and Path(config.checkpoint).is_file():
            meta = load_checkpoint(config.checkpoint, self.party.model, self.party.optimizer, self.device)
            self.party.step = int(meta.get("step", 0))
            log.info("resumed the server model from %s at step %d", config.checkpoint, self.party.step)
        self.ctx = context or zmq.Context.instance()
        self.keys = PeerKeys.load(Path(config.keys)) if config.keys else None
        self.sock: zmq.Socket | None = None
        self.engine = self.party.sampler(config.max_batch)
        self.denoising: dict[str, dict] = {}  # engine job id → envelope
        self.pending: list[tuple[dict, ServerMessage]] = []  # training rows waiting for an optimiser step
        self.pending_since = 0.0
        self.applied: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # train jobs already applied → their ack
        self.stopping = False
        self.last_heard = self.next_heartbeat = 0.0
        self.last_checkpoint_step = self.party.step
        # The weights travel in parts that each fit a frame; fixed by the model, so checked at start.
        self.weight_parts = [list(group) for group in tensors.split(self._state_arrays(), self.limits.max_frame_bytes)]
        self.incoming: dict[str, tuple[int, dict[str, np.ndarray]]] = {}  # relayed kind → (version, parts so far)
        self.energy = PhaseEnergy()
        self.stats = {"train_steps": 0, "train_rows": 0, "denoise_iterations": 0, "denoise_rows": 0, "jobs": 0}

    # ---- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.engine = self.party.sampler(self.config.max_batch)  # the broker re-queues what we held
        self.denoising.clear()
        self.pending.clear()
        self.sock = dealer(self.ctx, self.config.broker, self.limits.max_frame_bytes, self.keys)
        self.send(
            wire.encode(
                "ready",
                worker=self.config.name,
                denoise_credit=self.config.max_batch + self.config.queue_rows,
                train_credit=2 * self.config.max_train_rows,
                trainer=self.config.train,
                image_shape=list(self.shape),
                levels=self.limits.levels,
                model=self.config.model,
            )
        )
        self.last_heard = time.monotonic()
        log.info("connected to %s as %s (%s, denoising %s)", self.config.broker, self.config.name, self.device,
                 "with CUDA graphs" if self.party.cuda_graphs else "eager")

    def send(self, *frames: bytes) -> None:
        assert self.sock is not None
        self.sock.send_multipart(list(frames), copy=False)

    def reply_error(self, env: dict, exc: ProtocolError) -> None:
        self.send(wire.encode("error", job=env.get("job", ""), client=env.get("client", ""), code=exc.code, reason=exc.reason))

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.connect()
        hb = self.config.heartbeat
        while not self.stopping:
            busy = not self.engine.idle() or bool(self.pending)
            assert self.sock is not None
            if self.sock.poll(0 if busy else int(hb.interval * 1000 / 2), zmq.POLLIN):
                drain(self.sock, self.on_message)
            self.maybe_train()
            if not self.engine.idle():
                self.denoise_once()
            now = time.monotonic()
            if now >= self.next_heartbeat:
                self.send(wire.encode("heartbeat", stats={**self.stats, "max_batch": self.config.max_batch, "step": self.party.step}))
                self.next_heartbeat = now + hb.interval
            if now - self.last_heard > hb.interval * hb.liveness:
                log.warning("broker silent for %.1f s: reconnecting", now - self.last_heard)
                self.connect()
            if self.config.checkpoint and self.party.step - self.last_checkpoint_step >= self.config.checkpoint_every:
                self.checkpoint()
        self.shutdown()

    def on_message(self, frames: list[zmq.Frame]) -> None:
        self.last_heard = time.monotonic()
        try:
            env = wire.decode(frames[0].buffer, self.limits)
        except ProtocolError as exc:
            log.warning("bad envelope from the broker: %s", exc)
            return
        kind = env["type"]
        try:
            if kind == "train":
                self.on_train(env, frames)
            elif kind == "denoise":
                self.on_denoise(env, frames)
            elif kind in wire.RELAYED and len(frames) == 2:
                self.on_relayed(kind, env, frames[1])
            elif kind == "error" and env["code"] in (ErrorCode.NOT_JOINED, ErrorCode.INCOMPATIBLE, ErrorCode.FORBIDDEN):
                if env["code"] != ErrorCode.NOT_JOINED:
                    log.error("broker refused this worker: %s", env["reason"])
                    self.stopping = True
                else:
                    self.connect()
        except ProtocolError as exc:
            exc.job = env.get("job", "")
            self.reply_error(env, exc)
        except Exception as exc:  # a job must still get its one reply
            if kind not in wire.KINDS_WITH_REPLY:
                raise
            log.exception("job %s of %s failed", env["job"], env["client"])
            self.reply_error(env, ProtocolError(ErrorCode.INTERNAL, f"the worker failed on this job ({type(exc).__name__})", env["job"]))

    def on_train(self, env: dict, frames: list[zmq.Frame]) -> None:
        key = (env["client"], env["job"])
        if key in self.applied:  # applied before a broker restart: acknowledge again, do not re-apply
            self.send(self.applied[key])
            return
        if len(frames) != 2:
            raise ProtocolError(ErrorCode.BAD_TENSOR, "train needs a tensor frame")
        arrays = tensors.decode(frames[1].buffer, wire.tensor_spec(env, self.shape), self.limits.max_frame_bytes)
        wire.check_train_values(env, arrays, self.limits)
        t, x_t, eps = (torch.from_numpy(arrays[k].copy()) for k in ("t", "x_t", "eps"))
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((env, ServerMessage(x_t, t, torch.full_like(t, env["t_c"]), eps)))

    def maybe_train(self, flush: bool = False) -> None:
        """One optimiser step when enough rows wait, the first has waited `train_wait`, or `flush`."""
        if not self.pending:
            return
        rows = sum(m.t.shape[0] for _, m in self.pending)
        if not flush and rows < self.config.max_train_rows and time.monotonic() - self.pending_since < self.config.train_wait:
            return
        batch, total = [], 0
        while self.pending and (not batch or total + self.pending[0][1].t.shape[0] <= self.config.max_train_rows):
            env, msg = self.pending.pop(0)
            batch.append((env, msg))
            total += msg.t.shape[0]
        with self.energy.phase("server_training"):
            outcome = self.party.train_step([m for _, m in batch], [env["client"] for env, _ in batch])
        self.pending_since = time.monotonic()
        for i, (env, _) in enumerate(batch):
            if i in outcome.refused:
                self.reply_error(env, ProtocolError(ErrorCode.REFUSED, outcome.refused[i], env["job"]))
                continue
            ack = wire.encode("ack", job=env["job"], client=env["client"], step=self.party.step, loss=float(outcome.loss))
            self.applied[(env["client"], env["job"])] = ack
            self.send(ack)
        if outcome.loss is None:
            return
        self.stats["train_steps"] += 1
        self.stats["train_rows"] += total
        while len(self.applied) > 4096:
            self.applied.popitem(last=False)
        self.stats["jobs"] += len(batch) - len(outcome.refused)
        if self.party.step % self.config.sync_every == 0:
            self.publish_weights()

    def on_denoise(self, env: dict, frames: list[zmq.Frame]) -> None:
        if len(frames) != 1:
            raise ProtocolError(ErrorCode.BAD_TENSOR, "denoise carries no tensor frame")
        sampler = SamplerConfig(kind=env["sampler"], ddim_steps=env["steps"], eta=env["eta"])
        key = f"{env['client']}\x00{env['job']}"
        if key in self.denoising:
            return
        job = self.party.denoise_job(key, env["count"], env["t_c"], env["seed"], sampler, first_row=env["first_row"])
        self.denoising[key] = env
        for done in self.engine.submit(job):
            self.finish(done)

    def denoise_once(self) -> None:
        before = self.engine.rows_processed
        with self.energy.phase("server_denoising"):
            finished = self.engine.iterate()
        self.stats["denoise_iterations"] += 1
        self.stats["denoise_rows"] += self.engine.rows_processed - before
        for job in finished:
            self.finish(job)

    def finish(self, job: SampleJob) -> None:
        env = self.denoising.pop(job.job_id)
        assert job.result is not None
        blob = tensors.encode({"x": job.result.numpy().astype(np.float32)})
        self.send(wire.encode("result", job=env["job"], client=env["client"], count=env["count"]), blob)
        self.stats["jobs"] += 1

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() for k, v in self.party.model.state_dict().items()}

    def publish_weights(self) -> None:
        """The model's state as `weights` parts that each fit a frame, then the optimiser's as
        `moments` parts (for workers that may take over training); the broker relays them in order."""
        state = self._state_arrays()
        self._publish("weights", [{k: state[k] for k in names} for names in self.weight_parts])
        moments = {k: v.float().numpy() for k, v in flatten_optimizer(self.party.optimizer)[0].items()}
        if moments:
            self._publish("moments", tensors.split(moments, self.limits.max_frame_bytes))

    def _publish(self, kind: str, parts: list[dict[str, np.ndarray]]) -> None:
        for i, part in enumerate(parts):
            self.send(wire.encode(kind, version=self.party.step, part=i, parts=len(parts)), tensors.encode(part))

    def on_relayed(self, kind: str, env: dict, blob: zmq.Frame) -> None:
        """Collect one version's parts of the trainer's weights or moments and load the whole after
        the last (a new version or a part 0 starts over, so a version cut short by a trainer's
        failure is never half-loaded)."""
        if env["part"] >= env["parts"]:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{kind}: part {env['part']} of {env['parts']}")
        version, arrays = self.incoming.pop(kind, (-1, {}))
        if env["part"] == 0 or env["version"] != version:
            arrays = {}
        decoded = tensors.decode(blob.buffer, None, self.limits.max_frame_bytes)
        arrays.update({k: v.copy() for k, v in decoded.items()})  # copies: the frame is released after this
        if env["part"] < env["parts"] - 1:
            self.incoming[kind] = (env["version"], arrays)
        elif kind == "weights":
            self.load_weights(env["version"], arrays)
        else:
            self.load_moments(env["version"], arrays)

    def load_weights(self, version: int, arrays: dict[str, np.ndarray]) -> None:
        current = self.party.model.state_dict()
        if set(arrays) != set(current) or any(tuple(arrays[k].shape) != tuple(current[k].shape) for k in current):
            log.error("ignoring weights version %d: incomplete, or not this worker's model", version)
            return
        self.party.model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        self.party.step = version
        log.info("loaded weights version %d from the trainer", version)

    def load_moments(self, version: int, arrays: dict[str, np.ndarray]) -> None:
        """The trainer's optimiser state, so that this worker continues it if it takes over training."""
        if version != self.party.step:
            log.error("ignoring moments version %d: this worker's weights are at version %d", version, self.party.step)
            return
        problem = moments_problem([tuple(p.shape) for p in self.party.model.parameters()], arrays)
        if problem:
            log.error("ignoring moments version %d: %s", version, problem)
            return
        load_optimizer(self.party.optimizer, {k: torch.from_numpy(v) for k, v in arrays.items()})
        log.info("loaded optimiser moments version %d from the trainer", version)

    def checkpoint(self) -> None:
        save_checkpoint(self.config.checkpoint, self.party.model, self.party.optimizer, {"step": self.party.step, "model": self.config.model})
        self.last_checkpoint_step = self.party.step
        log.info("checkpoint at step %d: %s", self.party.step, self.config.checkpoint)

    def shutdown(self) -> None:
        """Apply what is waiting, checkpoint, tell the broker (it re-queues the rest at once)."""
        while self.pending:
            self.maybe_train(flush=True)
        if self.config.checkpoint:
            self.checkpoint()
        report = self.energy.stop()
        if self.config.energy_report:
            Path(self.config.energy_report).write_text(json.dumps({**report, "stats": self.stats}, indent=2))
        if self.sock is not None:
            self.send(wire.encode("bye"))
            self.sock.close(linger=1000)
            self.sock = None