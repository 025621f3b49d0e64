"""`collafuse demo` and `collafuse up`: the whole system as separate processes on loopback.

The demo starts a broker, a worker and one node per client (each its own process, talking over
TCP on 127.0.0.1), shows progress while the nodes train, has every node generate images through
the broker, and writes a report folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from collafuse.common.config import DemoConfig, NodeConfig, one_per_client
from collafuse.protocol.admin import fetch_status
from collafuse.protocol.security import PeerKeys
from collafuse.system.keyring import Keyring
from collafuse.system.launch import Fleet, cli, free_port, wait_for

# Seconds to wait for the workers to register: a worker compiles its model before it registers,
# minutes on a GPU machine whose compile cache is cold (a worker that exits ends the wait at once).
REGISTER_WAIT = 900.0


def start_server_side(fleet: Fleet, workers: int, worker_args: list[str], state: Path | None, keyring: Keyring, trainers: int = 1) -> tuple[str, str]:
    """A broker and `workers` workers, of which the first `trainers` offer to train (with trainer
    keys; two or more form one data-parallel group, each serving its rendezvous on a free port);
    returns (frontend, backend). With a `state` folder the server side keeps what it needs across
    restarts: the broker's state (STATE/broker) and each trainer's checkpoint, so its acks are durable.
    The broker elects a lone trainer only when a trainer's checkpoint exists (a restart)."""
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    checkpoints = [state / ("server.safetensors" if i == 0 else f"server-worker{i}.safetensors") for i in range(trainers)] if state else []
    durable = ["--state", str(state / "broker")] if state is not None else []
    if not any(path.exists() for path in checkpoints):  # no trainer holds a step: nothing to elect
        durable += ["--elect-trainer-for", "0"]
    fleet.start("broker", cli("broker", "--frontend", frontend, "--backend", backend, *keyring.broker_args(), *durable))
    admin = keyring.admin()
    for i in range(workers):
        trains = i < trainers
        args = ["worker", "--broker", backend, "--name", f"worker{i}", *worker_args, *keyring.args(f"worker{i}", "trainer" if trains else "worker")]
        if checkpoints and trains:
            args += ["--checkpoint", str(checkpoints[i])] + (["--energy-report", str(state / "server_energy.json")] if i == 0 else [])
        if trainers > 1 and trains:
            args += ["--group", f"127.0.0.1:{free_port()}"]
        if not trains:
            args.append("--no-train")
        fleet.start(f"worker{i}", cli(*args))
    def registered() -> bool:
        for i in range(workers):
            if not fleet.alive(f"worker{i}"):
                raise RuntimeError(f"worker{i} exited before it registered:\n{fleet.tail(f'worker{i}')}")
        return len(_status(frontend, admin).get("workers", [])) >= workers

    wait_for(registered, REGISTER_WAIT, what="the workers to register")
    if trainers > 1:
        wait_for(lambda: _status(frontend, admin).get("trainer_group", {}).get("world") == trainers, 120, what="the trainer group to form")
    return frontend, backend


def _status(frontend: str, keys: PeerKeys | None) -> dict[str, Any]:
    try:
        return fetch_status(frontend, timeout=2.0, keys=keys)
    except (TimeoutError, ConnectionError):
        return {}


def _progress(state: Path) -> dict[str, Any]:
    try:
        return json.loads((state / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def run_demo(cfg: DemoConfig, say=print) -> dict[str, Any]:
    started = time.monotonic()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(out / "logs", threads=cfg.threads)
    keyring = Keyring(None if cfg.insecure else out / "keys")
    admin = keyring.admin()
    ratios = one_per_client(cfg.cut_ratios, cfg.clients)
    names = [f"client{i}" for i in range(cfg.clients)]
    common = ["--image-size", str(cfg.image_size), "--device", cfg.device, "--seed", str(cfg.seed)]
    try:
        say(f"[demo] starting broker and worker (logs in {fleet.logs})")
        frontend, _ = start_server_side(
            fleet, 1, ["--model", cfg.server_model, "--max-train-rows", str(cfg.batch_size * cfg.clients), *common], out, keyring
        )
        say(f"[demo] broker at {frontend}; starting {cfg.clients} nodes, {cfg.steps} local steps each")
        for i, (name, c) in enumerate(zip(names, ratios)):
            fleet.start(name, cli(
                "join", "--broker", frontend, "--name", name, "--cut-ratio", str(c), "--data", cfg.data, "--shard", str(i),
                "--shards", str(cfg.clients), "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
                "--model", cfg.client_model, "--state", str(out / name), "--cut-noise", cfg.cut_noise, *common, *keyring.args(name, "node"),
                *(["--lockstep"] if cfg.lockstep else []),
                *(["--share-clean-images"] if NodeConfig(cut_ratio=c).cut.t_c == 0 else []),  # asked for on the embedded data
                module="collafuse.cli.node"))
        next_report = 0.0
        while any(fleet.alive(n) for n in names):
            if time.monotonic() >= next_report:
                st = _status(frontend, admin)
                parts = [f"{n} {p.get('step', 0)}/{cfg.steps}" for n, p in ((n, _progress(out / n)) for n in names)]
                done = sum(c.get("completed", 0) for c in st.get("clients", {}).values())
                say(f"[demo] {time.monotonic() - started:5.0f} s  train: {'  '.join(parts)}  server jobs done {done}")
                next_report = time.monotonic() + 10
            time.sleep(0.5)
        for n in names:
            code = fleet.wait(n, 5)
            if code != 0:
                raise RuntimeError(f"node {n} exited with {code}:\n{fleet.tail(n)}")
        say("[demo] training done; generating through the broker")
        for i, (name, c) in enumerate(zip(names, ratios)):
            fleet.start(f"{name}-generate", cli(
                "generate", "--broker", frontend, "--name", name, "--cut-ratio", str(c), "--n", str(cfg.samples),
                "--out", str(out / name / "samples"), "--state", str(out / name), "--model", cfg.client_model,
                "--image-size", str(cfg.image_size), "--device", cfg.device, "--seed", str(1234 + i), *keyring.args(name, "node"),
                module="collafuse.cli.node"))
        for name in names:
            if fleet.wait(f"{name}-generate", 900) != 0:
                raise RuntimeError(f"generation for {name} failed:\n{fleet.tail(name + '-generate')}")
        status = _status(frontend, admin)
    finally:
        fleet.stop_all()
    return write_report(cfg, names, ratios, status, time.monotonic() - started)


def write_report(cfg: DemoConfig, names: list[str], ratios: list[float], status: dict, seconds: float) -> dict[str, Any]:
    from safetensors.torch import load_file

    from collafuse.common.config import DataConfig
    from collafuse.datasets import load_federated
    from collafuse.datasets.images import save_grid

    report = cfg.out / "report"
    report.mkdir(parents=True, exist_ok=True)
    samples = [load_file(str(cfg.out / n / "samples" / "samples.safetensors"))["images"] for n in names]
    save_grid(samples, report / "samples.png")
    data = load_federated(DataConfig(spec=cfg.data, clients=cfg.clients, image_size=cfg.image_size, seed=cfg.seed, images_per_client=cfg.samples))
    save_grid([x[: cfg.samples] for x in data.clients], report / "real.png")
    metrics = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "wall_seconds": round(seconds, 1),
        "clients": {n: {"cut_ratio": c, **_progress(cfg.out / n)} for n, c in zip(names, ratios)},
        "broker_status": status,
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"report": report, "metrics": metrics}
