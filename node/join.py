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
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collafuse.common.config import DataConfig, DiffusionConfig, NodeConfig
from collafuse.engine.checkpoint import load_checkpoint, save_checkpoint
from collafuse.diffusion.cutnoise import CutNoise, load_secret
from collafuse.diffusion.models import resolve_device
from collafuse.datasets import load_federated
from collafuse.common.energy import PhaseEnergy
from collafuse.common.lifecycle import Stoppable
from collafuse.protocol.link import BrokerLink
from collafuse.protocol.security import PeerKeys
from collafuse.engine.client import Batch, ClientParty, client_seed
from collafuse.protocol import tensors, wire
from collafuse.common.progress import Progress

log = logging.getLogger("collafuse.node")


def secret_path(config: NodeConfig) -> Path:
    """The node's 256-bit secret (its cut noise key): created on the first join, never sent."""
    return Path(config.state_dir) / "secret.key"


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
        {"client": config.name, "t_c": party.t_c, "image_shape": list(party.image_shape), "levels": config.limits.levels},
        config.limits,
        config.heartbeat,
        config.retry_after,
        keys=PeerKeys.load(Path(config.keys)) if config.keys else None,
    )
    link.connect()
    return link


def checkpoint_path(config: NodeConfig) -> Path:
    return Path(config.state_dir) / "local.safetensors"


class Join(Stoppable):
    def __init__(self, config: NodeConfig, lockstep: bool = False) -> None:
        self.config, self.lockstep = config, lockstep
        data_config = DataConfig(**{**config.data.__dict__, "clients": config.shards})
        if not 0 <= config.shard < config.shards:
            raise ValueError(f"shard {config.shard} does not exist among {config.shards}")
        self.state = Path(config.state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        talks = DiffusionConfig(levels=config.limits.levels).cut_level(config.cut_ratio) < config.limits.levels
        cut_noise = CutNoise(load_secret(secret_path(config)), config.cut_noise) if talks else None
        self.party = make_party(config, load_federated(data_config).clients[config.shard], cut_noise)
        self.first_step = 0
        if self.party.model is not None and checkpoint_path(config).is_file():
            meta = load_checkpoint(checkpoint_path(config), self.party.model, self.party.optimizer, self.party.device)
            if meta.get("t_c") != self.party.t_c:
                raise ValueError(f"checkpoint {checkpoint_path(config)} is for t_c={meta.get('t_c')}, not {self.party.t_c}")
            self.first_step = int(meta["step"])
            self.party.rows_sent = int(meta.get("rows_sent", 0))
            log.info("resumed from %s at step %d", checkpoint_path(config), self.first_step)
        self.link: BrokerLink | None = None
        self.run_id = uuid.uuid4().hex[:8]
        self.stopping = False
        self.energy = PhaseEnergy()
        self.figures: dict[str, Any] = {"local_loss": [], "server_loss": [], "sent": 0, "acked": 0, "skipped": 0, "errors": {}}

    def handle(self, replies) -> None:
        for r in replies:
            if r.env["type"] == "ack":
                self.figures["acked"] += 1
                self.figures["server_loss"].append([r.env["step"], r.env["loss"]])
            elif r.env["type"] == "error":
                self.figures["errors"][r.env["code"]] = self.figures["errors"].get(r.env["code"], 0) + 1
                log.warning("server error for %s: %s %s", r.env["job"], r.env["code"], r.env["reason"])

    def send_message(self, step: int, batch: Batch) -> None:
        assert self.link is not None
        msg = self.party.server_message(batch)
        job = f"{self.config.name}-{self.run_id}-{step}"
        blob = tensors.encode({"x_t": msg.x_t.numpy().astype(np.float32), "t": msg.t.numpy(), "eps": msg.eps.numpy().astype(np.float32)})
        env = wire.encode("train", job=job, client=self.config.name, rows=int(msg.t.shape[0]), t_c=self.party.t_c)
        self.link.submit(job, "train", [env, blob])
        self.figures["sent"] += 1

    def run(self) -> dict[str, Any]:
        party, cfg = self.party, self.config
        if party.uses_server:
            self.link = connect(cfg, party)
        progress = Progress(cfg.steps, cfg.name, every=max(1, min(25, cfg.steps // 20 or 1)))
        window_losses: list[float] = []
        step = self.first_step
        for step in range(self.first_step + 1, cfg.steps + 1):
            if self.stopping:
                step -= 1
                break
            batch = party.batch()
            if party.has_local_model:
                with self.energy.phase("local_training"):
                    window_losses.append(party.train_local(batch.x0))
            if self.link is not None:
                must_wait = self.lockstep or not party.has_local_model
                while must_wait and self.link.count("train") >= cfg.window and not self.stopping:
                    self.handle(self.link.poll(0.05))
                if self.link.count("train") < cfg.window:
                    with self.energy.phase("local_training"):  # the local noising is local work too
                        self.send_message(step, batch)
                else:
                    self.figures["skipped"] += 1
                self.handle(self.link.poll(0))
            if step % progress.every == 0 or step == cfg.steps:
                if window_losses:
                    self.figures["local_loss"].append([step, sum(window_losses) / len(window_losses)])
                    window_losses = []
                shown: dict[str, float | str] = {}
                if self.figures["local_loss"]:
                    shown["local"] = self.figures["local_loss"][-1][1]
                if self.figures["server_loss"]:
                    shown["server"] = self.figures["server_loss"][-1][1]
                if self.link is not None:
                    shown["acked"] = f"{self.figures['acked']}/{self.figures['sent']}"
                progress.update(step, **shown)
                self.write_progress(step)
            if step % cfg.checkpoint_every == 0:
                self.checkpoint(step)
        self.drain()
        self.figures["energy"] = self.energy.stop()
        self.checkpoint(step)
        self.write_progress(step, done=True)
        if self.link is not None:
            self.link.close()
        return self.figures

    def drain(self) -> None:
        """Wait (bounded) for the acknowledgements of what is still in flight."""
        if self.link is None:
            return
        deadline = time.monotonic() + self.config.drain_timeout
        while self.link.outstanding and time.monotonic() < deadline:
            self.handle(self.link.poll(0.1))
        if self.link.outstanding:
            log.warning("%d train jobs unacknowledged after %.0f s", len(self.link.outstanding), self.config.drain_timeout)

    def checkpoint(self, step: int) -> None:
        if self.party.model is not None:
            meta = {"step": step, "t_c": self.party.t_c, "cut_ratio": self.party.cut_ratio, "model": self.config.model, "name": self.config.name,
                    "rows_sent": self.party.rows_sent}
            save_checkpoint(checkpoint_path(self.config), self.party.model, self.party.optimizer, meta)

    def write_progress(self, step: int, done: bool = False) -> None:
        info = {
            "name": self.config.name,
            "step": step,
            "steps": self.config.steps,
            "done": done,
            "t_c": self.party.t_c,
            "cut_ratio": self.party.cut_ratio,
            "reconnects": self.link.reconnects if self.link else 0,
            "busy_replies": self.link.busy_replies if self.link else 0,
            "in_flight": len(self.link.outstanding) if self.link else 0,
            **self.figures,
        }
        tmp = self.state / "progress.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.state / "progress.json")
