"""`collafuse-node join`: train the local model and stream server-training messages.

Local training never waits on the server: at most `window` train jobs are in flight, and a step
whose message finds the window full keeps its local step and sends nothing (counted as skipped).
With `lockstep` the node waits for room instead, which makes a run reproducible step for step.
The local model is checkpointed every `checkpoint_every` steps and at the end (or on SIGINT /
SIGTERM), and a restarted node resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from collafuse.common.config import DiffusionConfig, NodeConfig, ProtocolLimits
from collafuse.engine.checkpoint import load_checkpoint, load_extra, read_metadata, save_checkpoint
from collafuse.diffusion import cutnoise
from collafuse.diffusion.cutnoise import CutNoise, load_secret
from collafuse.diffusion.schedule import Scheduler
from collafuse.diffusion.models import resolve_device
from collafuse.datasets import load_federated
from collafuse.common.energy import PhaseEnergy
from collafuse.common.lifecycle import Stoppable
from collafuse.protocol.link import BrokerLink
from collafuse.protocol.security import PeerKeys
from collafuse.diffusion.split import ServerMessage
from collafuse.engine.client import Batch, ClientParty, client_seed
from collafuse.protocol import tensors, wire
from collafuse.common.progress import Progress

log = logging.getLogger("collafuse.node")


def secret_path(config: NodeConfig) -> Path:
    """The node's 256-bit secret (its cut noise key): created on the first join, never sent."""
    return Path(config.state_dir) / "secret.key"


def checkpoint_path(config: NodeConfig) -> Path:
    return Path(config.state_dir) / "local.safetensors"


def open_secret(config: NodeConfig) -> bytes:
    """This node's secret, bound to its views (cutnoise.views); refused where it would hand the
    server more than one view of an image, or the image itself: clean images (t_c = 0) unless asked
    for, another cut or data with the same secret, a new secret where a checkpoint shows that one
    was used and lost."""
    cut, path = config.cut, secret_path(config)
    if cut.t_c == 0 and not config.share_clean_images:
        raise ValueError(f"cut ratio {config.cut_ratio} gives t_c = 0 of T = {cut.levels}: the server would receive the clean "
                         f"images. Choose a larger ratio, or pass --share-clean-images to send them knowingly")
    noise = float((1 - Scheduler(DiffusionConfig(levels=cut.levels)).alpha_bar[cut.t_c]).sqrt())
    if 0 < cut.t_c and noise < config.clean_noise:
        log.warning("cut t_c = %d sends the server images with noise of standard deviation %.3f (pixels in [-1, 1]): nearly "
                    "clean; a larger --cut-ratio hides them better", cut.t_c, noise)
    old_default = Path(f"collafuse-node-{config.name}")  # the default state folder before it moved to ~/.collafuse
    if not config.state and not path.exists() and (old_default / "secret.key").exists():
        raise ValueError(f"this node's secret is in {old_default.resolve()} (the default state folder of earlier versions); "
                         f"a new one in {path.parent} would give the server a second view of every image. Pass --state "
                         f"{old_default}, or move that folder to {path.parent}")
    checkpoint = checkpoint_path(config)
    if not path.exists() and checkpoint.is_file() and read_metadata(checkpoint).get("rows_sent", 0) > 0:
        raise ValueError(f"{checkpoint} shows that this node has sent images under a secret, but {path} is gone; a "
                         f"new secret would give the server a second, independent view of every image it has seen. Restore "
                         f"the secret, or start over in a new state folder knowing that")
    return load_secret(path, cutnoise.views(cut, config.cut_noise, config.shard_data, config.shard))


def make_party(config: NodeConfig, data: torch.Tensor, cut_noise: CutNoise | None = None) -> ClientParty:
    return ClientParty(
        config.name,
        config.cut_ratio,
        data,
        config.model,
        DiffusionConfig(levels=config.limits.levels),
        config.train,
        resolve_device(config.device),
        seed=client_seed(config.seed, config.shard),
        cut_noise=cut_noise,
    )


def connect(config: NodeConfig, party: ClientParty) -> BrokerLink:
    link = BrokerLink(
        config.broker,
        {"client": config.name, "t_c": party.cut.t_c, "image_shape": list(party.image_shape), "levels": config.limits.levels},
        config.limits,
        config.heartbeat,
        config.retry_after,
        keys=PeerKeys.load(Path(config.keys)) if config.keys else None,
    )
    link.connect()
    return link


@dataclass
class JoinFigures:
    """What a join run reports, in progress.json and to the CLI (the field order is the file's key order)."""

    local_loss: list[list[float]] = field(default_factory=list)  # [step, mean local loss since the previous report]
    server_loss: list[list[float]] = field(default_factory=list)  # [server step, loss] per acknowledgement
    sent: int = 0
    resent: int = 0  # jobs a resumed node sent again from its checkpoint's outbox
    acked: int = 0
    skipped: int = 0  # steps whose message found the window full
    errors: dict[str, int] = field(default_factory=dict)  # server error code -> count
    energy: dict[str, Any] | None = None  # measured once, at the end of the run

    def as_json(self) -> dict[str, Any]:
        """The fields for progress.json; `energy` only once it has been measured."""
        return {k: v for k, v in asdict(self).items() if k != "energy" or v is not None}


class TrainSender:
    """One train job per local step to the broker, with at most `window` of them in flight.

    A step whose message finds the window full is skipped (local training never waits on the
    server) unless the sender waits for room: with `lockstep`, which makes a run reproducible, and
    on a node without a local model, whose steps would otherwise do nothing at all.
    """

    def __init__(self, link: BrokerLink, party: ClientParty, config: NodeConfig, figures: JoinFigures, energy: PhaseEnergy,
                 stopping: Callable[[], bool]) -> None:
        self.link, self.party, self.figures, self.energy, self.stopping = link, party, figures, energy, stopping
        self.name, self.window = config.name, config.window
        self.wait = config.lockstep or not party.cut.local_model
        assert party.cut_noise is not None  # a node that talks to the server has its secret
        self.stream = party.cut_noise.stream_id()  # job ids: the same for a step after a restart, so never applied twice

    @property
    def full(self) -> bool:
        return self.link.count("train") >= self.window

    def offer(self, step: int, batch: Batch) -> None:
        """Send this step's message if the window has room (waiting for room when `wait`), else skip
        it. The message is built either way, so the random streams never depend on timing and a
        resumed node rebuilds every step's message bit for bit."""
        with self.energy.phase("local_training"):  # the local noising is local work too
            msg = self.party.server_message(batch)
        while self.wait and self.full and not self.stopping():
            self.collect(0.05)
        if self.full:
            self.figures.skipped += 1
        else:
            self.send(step, msg)
        self.collect(0)

    def send(self, step: int, msg: ServerMessage) -> None:
        job = f"{self.name}-{self.stream}-{step}"
        blob = tensors.encode({"x_t": msg.x_t.numpy().astype(np.float32), "t": msg.t.numpy(), "eps": msg.eps.numpy().astype(np.float32)})
        env = wire.encode("train", job=job, client=self.name, rows=int(msg.t.shape[0]), t_c=self.party.cut.t_c)
        self.link.submit(job, "train", [env, blob])
        self.figures.sent += 1

    def outbox(self) -> dict[str, list[bytes]]:
        """The train jobs sent and not yet answered, for the checkpoint: job id → frames."""
        return {job: o.frames for job, o in self.link.outstanding.items() if o.kind == "train"}

    def resend(self, outbox: dict[str, list[bytes]]) -> None:
        """After a crash, the jobs the checkpoint held unanswered, under their ids: the broker or
        the trainer answers one already applied from what it remembers, and applies the rest once."""
        for job, frames in outbox.items():
            self.link.submit(job, "train", frames)
        self.figures.resent += len(outbox)

    def collect(self, timeout: float) -> None:
        """The replies that arrive within `timeout`: acknowledgements carry the server's loss, errors are counted."""
        for r in self.link.poll(timeout):
            if r.env["type"] == "ack":
                self.figures.acked += 1
                self.figures.server_loss.append([r.env["step"], r.env["loss"]])
            elif r.env["type"] == "error":
                self.figures.errors[r.env["code"]] = self.figures.errors.get(r.env["code"], 0) + 1
                log.warning("server error for %s: %s %s", r.env["job"], r.env["code"], r.env["reason"])

    def wait_for_acks(self, timeout: float) -> None:
        """At the end: wait (at most `timeout` seconds) for the acknowledgements of what is still in flight."""
        deadline = time.monotonic() + timeout
        while self.link.outstanding and time.monotonic() < deadline:
            self.collect(0.1)
        if self.link.outstanding:
            log.warning("%d train jobs unacknowledged after %.0f s", len(self.link.outstanding), timeout)


class Join(Stoppable):
    """One node's run: resume, local steps (each offering its message to the sender), reports, checkpoints."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        if not 0 <= config.shard < config.shards:
            raise ValueError(f"shard {config.shard} does not exist among {config.shards}")
        if config.checkpoint_every + config.window > ProtocolLimits.acks_per_client:
            raise ValueError(f"--checkpoint-every {config.checkpoint_every} plus --window {config.window} is above the "
                             f"{ProtocolLimits.acks_per_client} train jobs per client a trainer remembers: after a crash this "
                             f"node would re-send jobs the trainer may have forgotten, and they would be applied twice")
        self.state = Path(config.state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        cut_noise = CutNoise(open_secret(config), config.cut_noise) if config.cut.uses_server else None
        self.party = make_party(config, load_federated(config.shard_data).clients[config.shard], cut_noise)
        self.outbox: dict[str, list[bytes]] = {}  # from the checkpoint: jobs to re-send at start
        self.first_step = self.resume()
        self.sender: TrainSender | None = None
        self.stopping = False
        self.energy = PhaseEnergy()
        self.figures = JoinFigures()

    def resume(self) -> int:
        """Load the local checkpoint, if there is one; the step to continue after (0 for a fresh node)."""
        path = checkpoint_path(self.config)
        if not path.is_file():
            return 0
        meta = load_checkpoint(path, self.party.model or torch.nn.Module(), self.party.optimizer, self.party.device)
        if meta.get("t_c") != self.party.cut.t_c:
            raise ValueError(f"checkpoint {path} is for t_c={meta.get('t_c')}, not {self.party.cut.t_c}")
        self.party.rows_sent = int(meta.get("rows_sent", 0))
        extra = load_extra(path)
        if "rng.batch" in extra:
            self.party.load_rng_state({k: extra[f"rng.{k}"] for k in ("batch", "message")})
        else:
            log.warning("checkpoint %s predates exact resume: the random streams start again", path)
        jobs = meta.get("outbox", [])
        self.outbox = {job: [bytes(extra[f"outbox.{i}.{part}"].numpy()) for part in ("env", "blob")] for i, job in enumerate(jobs)}
        log.info("resumed from %s at step %d (%d unanswered jobs to re-send)", path, int(meta["step"]), len(self.outbox))
        return int(meta["step"])

    def run(self) -> JoinFigures:
        if self.party.cut.uses_server:
            link = connect(self.config, self.party)
            self.sender = TrainSender(link, self.party, self.config, self.figures, self.energy, lambda: self.stopping)
            self.sender.resend(self.outbox)
        step = self.train()
        if self.sender is not None:
            self.sender.wait_for_acks(self.config.ack_timeout)
        self.figures.energy = self.energy.stop()
        self.checkpoint(step)
        self.write_progress(step, done=True)
        if self.sender is not None:
            self.sender.link.close()
        return self.figures

    def train(self) -> int:
        """The local steps up to `steps` (fewer on a stop); the last step done, for the final checkpoint."""
        cfg = self.config
        progress = Progress(cfg.steps, cfg.name, every=max(1, min(25, cfg.steps // 20 or 1)))
        losses: list[float] = []  # local losses since the last report
        step = self.first_step
        while step < cfg.steps and not self.stopping:
            step += 1
            batch = self.party.batch()
            if self.party.cut.local_model:
                with self.energy.phase("local_training"):
                    losses.append(self.party.train_local(batch.x0))
            if self.sender is not None:
                self.sender.offer(step, batch)
            if step % progress.every == 0 or step == cfg.steps:
                self.report(progress, step, losses)
                losses = []
            if step % cfg.checkpoint_every == 0:
                self.checkpoint(step)
        return step

    def report(self, progress: Progress, step: int, losses: list[float]) -> None:
        """The mean local loss since the last report, a progress line and progress.json."""
        if losses:
            self.figures.local_loss.append([step, sum(losses) / len(losses)])
        shown: dict[str, float | str] = {}
        if self.figures.local_loss:
            shown["local"] = self.figures.local_loss[-1][1]
        if self.figures.server_loss:
            shown["server"] = self.figures.server_loss[-1][1]
        if self.sender is not None:
            shown["acked"] = f"{self.figures.acked}/{self.figures.sent}"
        progress.update(step, **shown)
        self.write_progress(step)

    def checkpoint(self, step: int) -> None:
        """The local model with everything an exact resume needs, in one atomic file: the random
        streams, the message row counter and the jobs sent but not yet answered (with their frames).
        A node without a local model (c = 0) checkpoints all but the model, so it resumes exactly too."""
        outbox = self.sender.outbox() if self.sender else {}
        extra = {f"rng.{k}": v for k, v in self.party.rng_state().items()}
        for i, frames in enumerate(outbox.values()):
            extra.update({f"outbox.{i}.{part}": torch.frombuffer(bytearray(f), dtype=torch.uint8) for part, f in zip(("env", "blob"), frames)})
        meta = {"step": step, "t_c": self.party.cut.t_c, "cut_ratio": self.config.cut_ratio, "model": self.config.model, "name": self.config.name,
                "rows_sent": self.party.rows_sent, "outbox": list(outbox)}
        save_checkpoint(checkpoint_path(self.config), self.party.model or torch.nn.Module(), self.party.optimizer, meta, extra)

    def write_progress(self, step: int, done: bool = False) -> None:
        link = self.sender.link if self.sender else None
        info = {
            "name": self.config.name,
            "step": step,
            "steps": self.config.steps,
            "done": done,
            "t_c": self.party.cut.t_c,
            "cut_ratio": self.config.cut_ratio,
            "reconnects": link.reconnects if link else 0,
            "busy_replies": link.busy_replies if link else 0,
            "in_flight": len(link.outstanding) if link else 0,
            **self.figures.as_json(),
        }
        tmp = self.state / "progress.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.state / "progress.json")
