"""The in-process run: every party in one process, with exactly the math of the distributed system.

Each training step, every client draws a batch, takes one local step on levels 1..t_c and builds
its privacy-correct server message; the server merges all messages into one optimiser step. At the
end the server denoises every client's jobs in one continuous batch down to each t_c, and every
client finishes locally. This is the research fast path and the oracle for the networked system.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from collafuse.common.config import SimulateConfig
from collafuse.engine.checkpoint import load_checkpoint, save_checkpoint
from collafuse.diffusion import cutnoise
from collafuse.diffusion.cutnoise import CutNoise, load_secret
from collafuse.diffusion.models import parameter_count, resolve_device
from collafuse.datasets import FederatedData, load_federated
from collafuse.common.energy import PhaseEnergy
from collafuse.engine.client import ClientParty, client_seed
from collafuse.datasets.images import save_grid
from collafuse.common.progress import Progress
from collafuse.engine.server import ServerParty

SAMPLE_SEED = 1234


SENT_ROWS = "sent_rows.safetensors"  # per client, the data row of every message row the server got: what the audit replays


def _checkpoint_all(folder: Path, clients: list[ClientParty], server: ServerParty | None, step: int, config: dict) -> None:
    meta = {"step": step, "config": config}
    for c in clients:
        if c.model is not None:
            save_checkpoint(folder / f"{c.name}.safetensors", c.model, c.optimizer, {**meta, "party": c.name, "t_c": c.cut.t_c})
    if server is not None:
        save_checkpoint(folder / "server.safetensors", server.model, server.optimizer, {**meta, "party": "server"})
    sent = {c.name: torch.tensor(c.sent_rows, dtype=torch.int64) for c in clients if c.sent_rows is not None}
    tmp = folder / (SENT_ROWS + ".tmp")
    save_file(sent, str(tmp), metadata={"step": str(step)})
    tmp.replace(folder / SENT_ROWS)


def _resume_all(folder: Path, clients: list[ClientParty], server: ServerParty | None, device: torch.device) -> int:
    steps = set()
    for c in clients:
        if c.model is not None:
            steps.add(load_checkpoint(folder / f"{c.name}.safetensors", c.model, c.optimizer, device)["step"])
    if server is not None:
        steps.add(load_checkpoint(folder / "server.safetensors", server.model, server.optimizer, device)["step"])
    if len(steps) != 1:
        raise ValueError(f"checkpoints in {folder} are from different steps: {sorted(steps)}")
    sent = load_file(str(folder / SENT_ROWS))
    for c in clients:
        if c.sent_rows is not None:
            c.sent_rows.extend(sent[c.name].tolist())
            c.rows_sent = len(c.sent_rows)
    return steps.pop()


def client_secret(out: Path, name: str, views: dict) -> bytes:
    """A simulated client's node secret, kept in OUT/secrets/ so that a resumed run keeps it (and a
    test can give a node the same one), bound to its views as a node's is (a resume with another
    cut is refused)."""
    return load_secret(out / "secrets" / f"{name}.key", views)


def generate(
    clients: list[ClientParty],
    server: ServerParty | None,
    count: int,
    seed: int,
    config: SimulateConfig,
    energy: PhaseEnergy,
    max_batch: int = 256,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per client: the server's output at t_c (what the server produced) and the finished images."""
    x_tc_of: dict[str, torch.Tensor] = {}
    if server is not None:
        jobs = [server.denoise_job(c.name, count, c.cut, seed + i, config.sampler) for i, c in enumerate(clients) if c.cut.uses_server]
        with energy.phase("server_denoising"):
            x_tc_of = server.sampler(max_batch).run(jobs)
    out = {}
    for i, c in enumerate(clients):
        x_tc = x_tc_of.get(c.name)
        with energy.phase(f"local_denoising/{c.name}"):
            out[c.name] = {"images": c.finish(x_tc, count, seed + i, config.sampler, max_batch)}
        if x_tc is not None:
            out[c.name]["x_tc"] = x_tc
    return out


def make_parties(config: SimulateConfig, data: FederatedData, out: Path, device: torch.device) -> tuple[list[ClientParty], ServerParty | None]:
    """Every client (its secret in OUT/secrets/) and the server, when any client talks to it."""
    clients = []
    for i, c in enumerate(config.client_cut_ratios()):
        name = f"client{i}"
        cut = config.diffusion.cut(c)
        talks = cut.uses_server  # c = 1 never talks to the server
        cut_noise = CutNoise(client_secret(out, name, cutnoise.views(cut, config.cut_noise, config.data, i)), config.cut_noise) if talks else None
        clients.append(ClientParty(name, c, data.clients[i], config.client_model, config.diffusion, config.train, device,
                                   seed=client_seed(config.data.seed, i), cut_noise=cut_noise, record_rows=talks))
    image_shape = tuple(data.clients[0].shape[1:])
    server = (
        ServerParty(image_shape, config.server_model, config.diffusion, config.train, device, seed=config.data.seed)  # type: ignore[arg-type]
        if any(c.cut.uses_server for c in clients)
        else None
    )
    return clients, server


def train(config: SimulateConfig, clients: list[ClientParty], server: ServerParty | None, first: int, ckpt: Path,
          energy: PhaseEnergy) -> dict[str, list[list[float]]]:
    """Steps first+1..steps: each client's local step and message, then one merged server step;
    mean losses every `log_every` steps; checkpoints every `checkpoint_every`."""
    losses: dict[str, list[list[float]]] = {c.name: [] for c in clients if c.cut.local_model}
    if server is not None:
        losses["server"] = []
    window: dict[str, list[float]] = {k: [] for k in losses}
    progress = Progress(config.steps, "simulate", every=config.log_every)
    for step in range(first + 1, config.steps + 1):
        messages, owners = [], []
        for c in clients:
            batch = c.batch()
            with energy.phase(f"local_training/{c.name}"):
                if c.cut.local_model:
                    window[c.name].append(c.train_local(batch.x0))
                if c.cut.uses_server:
                    messages.append(c.server_message(batch))
                    owners.append(c.name)
        if server is not None:
            with energy.phase("server_training"):
                outcome = server.train_step(messages, owners)
            if outcome.loss is None:
                raise FloatingPointError(f"the server refused step {step}: {outcome.refused}")
            window["server"].append(outcome.loss)
        if step % config.log_every == 0 or step == config.steps:
            for k, v in window.items():
                losses[k].append([step, sum(v) / len(v)])
            progress.update(step, **{k: v[-1][1] for k, v in losses.items()})
            window = {k: [] for k in losses}
        if step % config.checkpoint_every == 0 or step == config.steps:
            _checkpoint_all(ckpt, clients, server, step, asdict(config))
    return losses


def run_simulation(config: SimulateConfig, out: Path, resume: bool = False, track_energy: bool = True) -> dict[str, Any]:
    started = time.monotonic()
    energy = PhaseEnergy(enabled=track_energy)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.data.seed)
    data = load_federated(config.data)
    clients, server = make_parties(config, data, out, device)
    ckpt = out / "checkpoints"
    first = _resume_all(ckpt, clients, server, device) if resume else 0
    losses = train(config, clients, server, first, ckpt, energy)
    train_seconds = time.monotonic() - started

    sample_start = time.monotonic()
    samples = generate(clients, server, config.samples_per_client, SAMPLE_SEED, config, energy)
    sample_seconds = time.monotonic() - sample_start
    save_grid([samples[c.name]["images"] for c in clients], out / "samples.png")
    save_grid([data.clients[i][: config.samples_per_client] for i in range(len(clients))], out / "real.png")
    save_file(
        {f"{name}.{kind}": t.contiguous() for name, d in samples.items() for kind, t in d.items()},
        str(out / "samples.safetensors"),
    )
    metrics = {
        "config": asdict(config),
        "device": str(device),
        "clients": [
            {
                "name": c.name,
                "cut_ratio": config.client_cut_ratios()[i],  # as given; t_c is what it rounds to
                "t_c": c.cut.t_c,
                "images": int(c.data.shape[0]),
                "data": data.provenance[i],
                "parameters": parameter_count(c.model) if c.model is not None else 0,
            }
            for i, c in enumerate(clients)
        ],
        "server": {"parameters": parameter_count(server.model)} if server is not None else None,
        "holdout": {"images": int(data.holdout.shape[0]), "data": data.holdout_provenance},
        "losses": losses,
        "resumed_from_step": first,
        "energy": energy.stop(),
        "wall_seconds": {"train": round(train_seconds, 2), "sample": round(sample_seconds, 2), "total": round(time.monotonic() - started, 2)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
