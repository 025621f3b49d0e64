"""`collafuse sweep`: the paper's experiment across cut ratios (Figure 3), over seeds and both
cut-noise modes, resumable.

For each (cut-noise mode, seed, cut ratio): train and generate (in one process with `--in-process`,
else through the real system: broker, worker and nodes as processes), then measure per client
- fidelity: KID of the generated images against the client's own data and against the hold-out set;
- disclosure: what the server *produced* at t_c for that client's generations (KID, pixel MSE to
  the nearest real image), and the privacy audit of what it *saw* (evaluation.audit: reconstruction
  attacks and membership inference; in-process runs, which record what the server received);
- energy: the client's local share (training and denoising) and the server's, in kWh.
A run whose `evaluation.json` exists is not recomputed. c = 1 sends nothing, so its runs do not
depend on the cut-noise mode and are shared. With `--pack` the sweep only trains and generates,
and packs each run to be evaluated on another machine (tools/runpack.py).
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

from collafuse.common.config import DataConfig, DiffusionConfig, SimulateConfig, SweepConfig, TrainConfig
from collafuse.common.cut import Cut
from collafuse.datasets import load_federated
from collafuse.evaluation.attacks import nearest_mse
from collafuse.evaluation.kid import InceptionFeatures, kernel_distance


@dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    cut_noise: str
    seed: int
    cut_ratio: float

    def folder(self, cfg: SweepConfig) -> Path:
        mode = "local" if self.local else "server" if self.all_server else self.cut_noise
        return cfg.out / mode / f"seed{self.seed}" / f"c{self.cut_ratio:.2f}"

    @property
    def cut(self) -> Cut:
        return DiffusionConfig().cut(self.cut_ratio)

    @property
    def local(self) -> bool:
        """c = 1: nothing is sent, so the cut-noise mode does not matter."""
        return not self.cut.uses_server

    @property
    def all_server(self) -> bool:
        """c = 0: x_{t_c} is x₀ itself, no cut noise is drawn, so one run serves every mode."""
        return not self.cut.local_model

    @property
    def label(self) -> str:
        return f"{'local' if self.local else self.cut_noise} seed {self.seed} c={self.cut_ratio:.2f}"


def runs(cfg: SweepConfig) -> list[Run]:
    """Every run, seed by seed (so that a sweep stopped midway has whole seeds), c = 0 and c = 1
    once per seed."""
    seen, out = set(), []
    for seed in cfg.seeds:
        for mode in cfg.cut_noise:
            for c in cfg.cut_ratios:
                run = Run(mode, seed, c)
                if run.folder(cfg) not in seen:
                    seen.add(run.folder(cfg))
                    out.append(run)
    return out


def _kid(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """KID ± its standard deviation over 100 subsets of half the generated set (features `a`), so that
    the spread reflects sampling on both sides (with equal full sets every subset would be the same)."""
    return kernel_distance(a, b, max_subset_size=max(2, a.shape[0] // 2))


def _names(cfg: SweepConfig) -> list[str]:
    return [f"client{i}" for i in range(cfg.clients)]


def _finished(cfg: SweepConfig, folder: Path) -> bool:
    """Training and generation of this run are on disk (then only the evaluation is redone)."""
    if cfg.in_process:
        return (folder / "metrics.json").is_file() and (folder / "samples.safetensors").is_file()
    return (folder / "server_energy.json").is_file() and all(
        (folder / n / "samples" / "generate.json").is_file() for n in _names(cfg)
    )


def _train_and_generate(cfg: SweepConfig, run: Run, folder: Path, say: Callable[[str], None]) -> None:
    if cfg.in_process:
        from collafuse.engine.simulate import run_simulation

        run_simulation(
            SimulateConfig(
                cut_ratios=(run.cut_ratio,), steps=cfg.steps, client_model=cfg.client_model, server_model=cfg.server_model,
                samples_per_client=cfg.samples, device=cfg.device, cut_noise=run.cut_noise,
                data=DataConfig(clients=cfg.clients, image_size=cfg.image_size, seed=run.seed),
                train=TrainConfig(batch_size=cfg.batch_size),
            ),
            folder,
        )
        return
    from collafuse.system.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=folder, clients=cfg.clients, cut_ratios=(run.cut_ratio,), steps=cfg.steps, batch_size=cfg.batch_size,
                        image_size=cfg.image_size, samples=cfg.samples, client_model=cfg.client_model, cut_noise=run.cut_noise,
                        server_model=cfg.server_model, device=cfg.device, seed=run.seed), say=say)


def _load_run(cfg: SweepConfig, folder: Path) -> tuple[dict, dict, float]:
    """(per-client samples {images, x_tc?}, per-client energy, wall seconds) of a finished run."""
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


def ensure_run(cfg: SweepConfig, run: Run, say: Callable[[str], None]) -> Path:
    """Train and generate this run unless it is already on disk; its folder."""
    folder = run.folder(cfg)
    if _finished(cfg, folder):
        say(f"[sweep] {run.label}: training and generation on disk")
    else:
        say(f"[sweep] {run.label}: training and generating")
        _train_and_generate(cfg, run, folder, say)
    return folder


AUDIT_COLUMNS = {  # column → path in a client's audit entry
    f"{attack}_{score}": (attack, score)
    for attack in ("linear", "multiview")
    for score in ("mse", "psnr", "prior_error_removed", "reid_top1")
}
MEMBERSHIP_COLUMNS = {f"mi_{kind}_{key}": (kind, key) for kind in ("loss", "pia") for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")}


def _audit(cfg: SweepConfig, run: Run, folder: Path, say: Callable[[str], None]) -> dict[str, Any] | None:
    """The privacy audit of an in-process run (cached in audit.json); None where nothing was sent
    or the run is networked."""
    from collafuse.evaluation.audit import AUDIT_FILE, audit_run

    if run.local or not cfg.in_process:
        return None
    if (folder / AUDIT_FILE).is_file():
        return json.loads((folder / AUDIT_FILE).read_text())
    return audit_run(folder, cfg.nonmembers, say)


def evaluate_run(cfg: SweepConfig, run: Run, say: Callable[[str], None], features: InceptionFeatures, data, real_feats) -> list[dict]:
    done = run.folder(cfg) / "evaluation.json"
    if done.is_file():
        say(f"[sweep] {run.label}: already evaluated, not recomputed")
        return json.loads(done.read_text())
    folder = ensure_run(cfg, run, say)
    samples, energy, wall = _load_run(cfg, folder)
    audit = _audit(cfg, run, folder, say)
    rows = []
    for i, name in enumerate(_names(cfg)):
        gen = samples[name]["images"]
        row: dict[str, Any] = {"cut_noise": "local" if run.local else run.cut_noise, "seed": run.seed, "cut_ratio": run.cut_ratio,
                               "t_c": run.cut.t_c, "client": name, "wall_s": round(wall, 1), **energy[name]}
        gen_feats = features(gen)
        row["kid_client"], row["kid_client_std"] = _kid(gen_feats, real_feats["client"][i])
        row["kid_holdout"], row["kid_holdout_std"] = _kid(gen_feats, real_feats["holdout"])
        row.update({k: math.nan for k in ("kid_produced", "kid_produced_std", "mse_produced_nearest", *AUDIT_COLUMNS, "twins_found",
                                          *MEMBERSHIP_COLUMNS)})
        if not run.local and cfg.disclosure_kid:
            produced = samples[name]["x_tc"].clamp(-1, 1)
            row["mse_produced_nearest"] = nearest_mse(produced, data.clients[i])
            row["kid_produced"], row["kid_produced_std"] = _kid(features(produced), real_feats["client"][i])
        if audit is not None:
            entry = next(e for e in audit["clients"] if e["client"] == name)
            row.update({col: entry[attack][score] for col, (attack, score) in AUDIT_COLUMNS.items()})
            row["twins_found"] = entry["multiview"]["twins_found"]
            membership = audit["membership"]
            row.update({col: membership[kind][key] if membership[kind][key] is not None else math.nan
                        for col, (kind, key) in MEMBERSHIP_COLUMNS.items()})
        rows.append(row)
        say(f"[sweep] {run.label} {name}: KID client {row['kid_client']:.4f}±{row['kid_client_std']:.4f}  "
            f"hold-out {row['kid_holdout']:.4f}  linear attack MSE {row['linear_mse']:.4f}  multi-view {row['multiview_mse']:.4f}")
    done.write_text(json.dumps(rows, indent=2))
    return rows


COLUMNS = ["cut_noise", "seed", "cut_ratio", "t_c", "client", "kid_client", "kid_client_std", "kid_holdout", "kid_holdout_std",
           "kid_produced", "kid_produced_std", "mse_produced_nearest", *AUDIT_COLUMNS, "twins_found", *MEMBERSHIP_COLUMNS,
           "local_kwh", "server_kwh", "wall_s", "method"]


def _fmt(values: list[float], digits: str = ".3f") -> str:
    """mean ± std over seeds (just the value for one seed); – when there is nothing to show."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:{digits}}"
    return f"{np.mean(values):{digits}} ± {np.std(values, ddof=1):{digits}}"


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (cut-noise mode, cut ratio): per seed the stacked KID (summed over clients, as in
    the paper's figure) and the clients' mean of every other figure; then the seeds' values."""
    summary = []
    for mode in sorted({r["cut_noise"] for r in rows}, key=["keyed", "fresh", "local"].index):
        for c in sorted({r["cut_ratio"] for r in rows if r["cut_noise"] == mode}):
            mine = [r for r in rows if r["cut_noise"] == mode and r["cut_ratio"] == c]
            seeds = sorted({r["seed"] for r in mine})
            per_seed = {s: [r for r in mine if r["seed"] == s] for s in seeds}
            entry: dict[str, Any] = {"cut_noise": mode, "cut_ratio": c, "t_c": mine[0]["t_c"], "seeds": seeds}
            for key in ("kid_client", "kid_holdout", "kid_produced", "local_kwh"):
                entry[key] = [float(sum(r[key] for r in per_seed[s])) for s in seeds]
            entry["kid_client_subset_std"] = [float(math.sqrt(sum(r["kid_client_std"] ** 2 for r in per_seed[s]))) for s in seeds]
            for key in ("mse_produced_nearest", *AUDIT_COLUMNS, "twins_found", *MEMBERSHIP_COLUMNS):
                entry[key] = [float(np.mean([r[key] for r in per_seed[s]])) for s in seeds]
            summary.append(entry)
    return summary


def client_signs(rows: list[dict]) -> dict[tuple[str, float, str], tuple[int, int]]:
    """H1 per client: (seeds where the client's KID at c beats its purely local KID at c = 1 of the
    same seed, seeds compared)."""
    local = {(r["seed"], r["client"]): r["kid_client"] for r in rows if r["cut_noise"] == "local"}
    signs: dict[tuple[str, float, str], tuple[int, int]] = {}
    for r in rows:
        if r["cut_noise"] == "local" or (r["seed"], r["client"]) not in local:
            continue
        key = (r["cut_noise"], r["cut_ratio"], r["client"])
        wins, total = signs.get(key, (0, 0))
        signs[key] = (wins + (r["kid_client"] < local[(r["seed"], r["client"])]), total + 1)
    return signs


def write_tables(rows: list[dict], out: Path) -> list[dict]:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    summary = summarise(rows)
    lines = [
        "Mean ± std over seeds. KID columns: summed over the clients (the paper's stacked bars); `subset std`: KID's own",
        "standard deviation over subsets, combined over the clients. Attacks: mean over clients. MSE in pixels of [-1, 1].",
        "",
        "| cut noise | c | t_c | seeds | KID client ↓ | subset std | KID hold-out ↓ | disclosure KID ↑ | linear MSE ↑ | linear re-id ↓ | "
        "multi-view MSE ↑ | multi-view re-id ↓ | prior error removed (multi-view) ↓ | MI AUC loss | MI AUC PIA | MI TPR@1% (loss) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['cut_noise']} | {e['cut_ratio']:.1f} | {e['t_c']} | {len(e['seeds'])} | {_fmt(e['kid_client'])} | "
            f"{_fmt(e['kid_client_subset_std'])} | {_fmt(e['kid_holdout'])} | {_fmt(e['kid_produced'])} | {_fmt(e['linear_mse'], '.4f')} | "
            f"{_fmt(e['linear_reid_top1'])} | {_fmt(e['multiview_mse'], '.4f')} | {_fmt(e['multiview_reid_top1'])} | "
            f"{_fmt(e['multiview_prior_error_removed'])} | {_fmt(e['mi_loss_auc'])} | {_fmt(e['mi_pia_auc'])} | {_fmt(e['mi_loss_tpr_at_1pct_fpr'])} |"
        )
    signs = client_signs(rows)
    if signs:
        clients = sorted({k[2] for k in signs})
        lines += ["", "H1 per client: seeds in which the client's KID at c beats its purely local KID (c = 1, same seed).", "",
                  "| cut noise | c | " + " | ".join(clients) + " |", "|---|---|" + "---|" * len(clients)]
        for mode, c in sorted({(k[0], k[1]) for k in signs}, key=lambda k: (["keyed", "fresh"].index(k[0]), k[1])):
            cells = [f"{signs[(mode, c, n)][0]}/{signs[(mode, c, n)][1]}" for n in clients]
            lines.append(f"| {mode} | {c:.1f} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return summary


def _real_features(cfg: SweepConfig, features: InceptionFeatures, seed: int) -> tuple[Any, dict]:
    """The real images of a seed's data and their Inception features, cached in OUT/real_features_seedS.npz
    (plain arrays, no pickle)."""
    data = load_federated(DataConfig(clients=cfg.clients, image_size=cfg.image_size, seed=seed,
                                     images_per_client=cfg.real_images, holdout_images=max(2, cfg.real_images // 2)))
    path = cfg.out / f"real_features_seed{seed}.npz"
    key = np.array([cfg.clients, cfg.image_size, seed, cfg.real_images])
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            if np.array_equal(cached["key"], key):
                return data, {"client": [cached[f"client{i}"] for i in range(cfg.clients)], "holdout": cached["holdout"]}
    feats = {"client": [features(x) for x in data.clients], "holdout": features(data.holdout)}
    np.savez(path, key=key, holdout=feats["holdout"], **{f"client{i}": f for i, f in enumerate(feats["client"])})
    return data, feats


def pack_runs(cfg: SweepConfig, dest: Path, say: Callable[[str], None] = print) -> None:
    """Train and generate only (no evaluation, no Inception weights), packing each finished run
    into `dest` at once, so that a run stopped midway still leaves the runs it finished."""
    from collafuse.tools.runpack import pack

    if not cfg.in_process:
        raise ValueError("--pack needs --in-process (a networked run keeps its images in each node's folder)")
    cfg.out.mkdir(parents=True, exist_ok=True)
    for run in runs(cfg):
        say(f"[sweep] packed {pack(ensure_run(cfg, run, say), cfg.out, dest)}")


def run_sweep(cfg: SweepConfig, say: Callable[[str], None] = print) -> list[dict]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    features = InceptionFeatures(device="cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    rows = []
    for seed in cfg.seeds:
        data, real_feats = _real_features(cfg, features, seed)
        rows += [r for run in runs(cfg) if run.seed == seed for r in evaluate_run(cfg, run, say, features, data, real_feats)]
    rows += [{**r, "cut_noise": mode} for r in rows if r["t_c"] == 0 for mode in cfg.cut_noise if mode != r["cut_noise"]]  # c = 0 in every mode
    summary = write_tables(rows, cfg.out)
    from collafuse.tools.plots import sweep_figure

    sweep_figure(summary, cfg.out / "figure.png")
    return rows
