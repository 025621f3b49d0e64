"""`collafuse sweep`: the paper's experiment across cut ratios (Figure 3), resumable.

For each cut ratio: train and generate (in one process with `--in-process`, else through the real
system: broker, worker and nodes as processes), then measure per client
- fidelity: KID of the generated images against the client's own data and against the hold-out set;
- disclosure: what the server *saw* (x_{t_c} recovered from real training messages, paired with the
  clean images; and its one-shot reconstruction of x₀) and what it *produced* at t_c for that
  client's generations, each against the client's real images by pixel MSE and KID;
- energy: the client's local share (training and denoising) and the server's, in kWh (in-process).
A cut ratio whose `evaluation.json` exists is not recomputed. With `--pack` the sweep only trains
and generates, and packs each run to be evaluated on another machine (tools/runpack.py).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from collafuse.config import DataConfig, DiffusionConfig, SimulateConfig, TrainConfig
from collafuse.core.schedule import CosineSchedule
from collafuse.datasets import load_federated
from collafuse.evaluation.disclosure import nearest_mse, one_shot_reconstruction, paired_mse, seen_by_server
from collafuse.evaluation.kid import InceptionFeatures, kernel_distance


@dataclass(frozen=True)
class SweepConfig:
    out: Path
    cut_ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    clients: int = 3
    steps: int = 600
    batch_size: int = 16
    image_size: int = 32
    samples: int = 64  # generated images per client
    real_images: int = 512  # real images per client that KID compares with (half as many hold-out images)
    in_process: bool = True
    device: str = "auto"
    client_model: str = "tiny"
    server_model: str = "tiny"
    seed: int = 0


def _kid(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """KID ± its standard deviation over 100 subsets of half the generated set (features `a`), so that
    the spread reflects sampling on both sides (with equal full sets every subset would be the same)."""
    return kernel_distance(a, b, max_subset_size=max(2, a.shape[0] // 2))


def _names(cfg: SweepConfig) -> list[str]:
    return [f"client{i}" for i in range(cfg.clients)]


def _finished(cfg: SweepConfig, folder: Path) -> bool:
    """Training and generation for this cut ratio are on disk (then only the evaluation is redone)."""
    if cfg.in_process:
        return (folder / "metrics.json").is_file() and (folder / "samples.safetensors").is_file()
    return (folder / "server_energy.json").is_file() and all(
        (folder / n / "samples" / "generate.json").is_file() for n in _names(cfg)
    )


def _train_and_generate(cfg: SweepConfig, c: float, folder: Path, say: Callable[[str], None]) -> None:
    if cfg.in_process:
        from collafuse.tools.simulate import run_simulation

        run_simulation(
            SimulateConfig(
                cut_ratios=(c,), steps=cfg.steps, client_model=cfg.client_model, server_model=cfg.server_model,
                samples_per_client=cfg.samples, device=cfg.device,
                data=DataConfig(clients=cfg.clients, image_size=cfg.image_size, seed=cfg.seed),
                train=TrainConfig(batch_size=cfg.batch_size),
            ),
            folder,
        )
        return
    from collafuse.tools.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=folder, clients=cfg.clients, cut_ratios=(c,), steps=cfg.steps, batch_size=cfg.batch_size,
                        image_size=cfg.image_size, samples=cfg.samples, client_model=cfg.client_model,
                        server_model=cfg.server_model, device=cfg.device, seed=cfg.seed), say=say)


def _load_run(cfg: SweepConfig, folder: Path) -> tuple[dict, dict, float]:
    """(per-client samples {images, server_output?}, per-client energy, wall seconds) of a finished run."""
    names = _names(cfg)
    if cfg.in_process:
        metrics = json.loads((folder / "metrics.json").read_text())
        flat = load_file(str(folder / "samples.safetensors"))
        samples = {n: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(n + ".")} for n in names}
        phases = metrics["energy"]["phases"]
        server_kwh = sum(p["kwh"] for k, p in phases.items() if k.startswith("server"))
        energy = {
            n: {"local_kwh": sum(p["kwh"] for k, p in phases.items() if k.endswith("/" + n)),
                "server_kwh": server_kwh / cfg.clients, "method": metrics["energy"]["method"]}
            for n in names
        }
        return samples, energy, metrics["wall_seconds"]["total"]
    samples = {n: load_file(str(folder / n / "samples" / "samples.safetensors")) for n in names}
    server = json.loads((folder / "server_energy.json").read_text())
    energy = {}
    for n in names:
        trained = json.loads((folder / n / "progress.json").read_text())["energy"]
        generated = json.loads((folder / n / "samples" / "generate.json").read_text())["energy"]
        energy[n] = {"local_kwh": trained["total_kwh"] + generated["total_kwh"], "server_kwh": server["total_kwh"] / cfg.clients,
                     "method": trained["method"]}
    wall = json.loads((folder / "report" / "metrics.json").read_text())["wall_seconds"]
    return samples, energy, wall


def run_folder(cfg: SweepConfig, c: float) -> Path:
    return cfg.out / f"c{c:.2f}"


def ensure_run(cfg: SweepConfig, c: float, say: Callable[[str], None]) -> Path:
    """Train and generate for cut ratio c unless that run is already on disk; its folder."""
    folder = run_folder(cfg, c)
    if _finished(cfg, folder):
        say(f"[sweep] c={c:.2f}: training and generation on disk")
    else:
        say(f"[sweep] c={c:.2f}: training and generating")
        _train_and_generate(cfg, c, folder, say)
    return folder


def evaluate_cut(cfg: SweepConfig, c: float, say: Callable[[str], None], features: InceptionFeatures, data, real_feats) -> list[dict]:
    done = run_folder(cfg, c) / "evaluation.json"
    if done.is_file():
        say(f"[sweep] c={c:.2f}: already done, not recomputed")
        return json.loads(done.read_text())
    folder = ensure_run(cfg, c, say)
    samples, energy, wall = _load_run(cfg, folder)
    schedule = CosineSchedule(DiffusionConfig())
    t_c = DiffusionConfig().cut_level(c)
    rows = []
    for i in range(cfg.clients):
        name = f"client{i}"
        real = data.clients[i][: cfg.samples]
        gen = samples[name]["images"]
        row: dict[str, Any] = {"cut_ratio": c, "t_c": t_c, "client": name, "wall_s": round(wall, 1), **energy[name]}
        gen_feats = features(gen)
        row["kid_client"], row["kid_client_std"] = _kid(gen_feats, real_feats["client"][i])
        row["kid_holdout"], row["kid_holdout_std"] = _kid(gen_feats, real_feats["holdout"])
        if t_c < schedule.levels:
            seen = seen_by_server(schedule, real, t_c, seed=i)
            recon = one_shot_reconstruction(schedule, seen, t_c)
            produced = samples[name]["server_output"]
            row["mse_seen_paired"] = paired_mse(seen, real)
            row["mse_reconstruction_paired"] = paired_mse(recon, real)
            row["kid_reconstruction"], row["kid_reconstruction_std"] = _kid(features(recon), real_feats["client"][i])
            row["mse_produced_nearest"] = nearest_mse(produced.clamp(-1, 1), data.clients[i])
            row["kid_produced"], row["kid_produced_std"] = _kid(features(produced.clamp(-1, 1)), real_feats["client"][i])
        else:  # c = 1: the server never sees or produces anything for this client
            for k in ("mse_seen_paired", "mse_reconstruction_paired", "kid_reconstruction", "kid_reconstruction_std",
                      "mse_produced_nearest", "kid_produced", "kid_produced_std"):
                row[k] = math.nan
        rows.append(row)
        say(f"[sweep] c={c:.2f} {name}: KID client {row['kid_client']:.4f}±{row['kid_client_std']:.4f}  "
            f"hold-out {row['kid_holdout']:.4f}  disclosure KID {row['kid_produced']:.4f}  MSE nearest {row['mse_produced_nearest']:.4f}")
    done.write_text(json.dumps(rows, indent=2))
    return rows


COLUMNS = ["cut_ratio", "t_c", "client", "kid_client", "kid_client_std", "kid_holdout", "kid_holdout_std", "kid_produced",
           "kid_produced_std", "mse_produced_nearest", "mse_seen_paired", "mse_reconstruction_paired", "kid_reconstruction",
           "kid_reconstruction_std", "local_kwh", "server_kwh", "wall_s", "method"]


def _fmt(v: float | None, std: float | None = None, digits: str = ".4f") -> str:
    if v is None or math.isnan(v):
        return "–"
    return f"{v:{digits}} ± {std:{digits}}" if std is not None else f"{v:{digits}}"


def write_tables(rows: list[dict], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| c | t_c | client | KID client | KID hold-out | disclosure KID (produced) | MSE produced→nearest | MSE seen→paired | MSE one-shot x̂₀ | local kWh |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['cut_ratio']:.1f} | {r['t_c']} | {r['client']} | {_fmt(r['kid_client'], r['kid_client_std'])} | "
            f"{_fmt(r['kid_holdout'], r['kid_holdout_std'])} | {_fmt(r['kid_produced'], r['kid_produced_std'])} | "
            f"{_fmt(r['mse_produced_nearest'])} | {_fmt(r['mse_seen_paired'])} | {_fmt(r['mse_reconstruction_paired'])} | "
            f"{_fmt(r['local_kwh'], digits='.2e')} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _real_features(cfg: SweepConfig, features: InceptionFeatures, data) -> dict:
    """Inception features of the real images, cached in OUT/real_features.npz (plain arrays, no pickle)."""
    path = cfg.out / "real_features.npz"
    key = np.array([cfg.clients, cfg.image_size, cfg.seed, cfg.real_images])
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            if np.array_equal(cached["key"], key):
                return {"client": [cached[f"client{i}"] for i in range(cfg.clients)], "holdout": cached["holdout"]}
    feats = {"client": [features(x) for x in data.clients], "holdout": features(data.holdout)}
    np.savez(path, key=key, holdout=feats["holdout"], **{f"client{i}": f for i, f in enumerate(feats["client"])})
    return feats


def pack_runs(cfg: SweepConfig, dest: Path, say: Callable[[str], None] = print) -> None:
    """Train and generate only (no evaluation, no Inception weights), packing each finished run
    into `dest` at once, so that a run stopped midway still leaves the cut ratios it finished."""
    from collafuse.tools.runpack import pack

    if not cfg.in_process:
        raise ValueError("--pack needs --in-process (a networked run keeps its images in each node's folder)")
    cfg.out.mkdir(parents=True, exist_ok=True)
    for c in cfg.cut_ratios:
        say(f"[sweep] packed {pack(ensure_run(cfg, c, say), dest)}")


def run_sweep(cfg: SweepConfig, say: Callable[[str], None] = print) -> list[dict]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    features = InceptionFeatures(device="cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    data = load_federated(DataConfig(clients=cfg.clients, image_size=cfg.image_size, seed=cfg.seed,
                                     images_per_client=cfg.real_images, holdout_images=max(2, cfg.real_images // 2)))
    real_feats = _real_features(cfg, features, data)
    rows = [r for c in cfg.cut_ratios for r in evaluate_cut(cfg, c, say, features, data, real_feats)]
    write_tables(rows, cfg.out)
    from collafuse.tools.plots import sweep_figure

    sweep_figure(rows, cfg.out / "figure.png")
    return rows
