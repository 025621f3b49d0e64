"""`collafuse audit`: what an honest-but-curious server can learn from a finished run.

The server keeps every training message and the model it trained. From each message it recovers
x_{t_c} exactly (core.split.recover_cut_image), so its view of a client is the x_{t_c} of every
message row. The audit rebuilds exactly that view from the run (the client's data, its secret, its
cut-noise mode and the data row behind each message row, which the run records), attacks it as
evaluation.attacks describes, and scores the attacks against the truth, which the server never has:
- reconstruction per client: the linear (full-covariance) and the multi-view attack — MSE, PSNR,
  the share of the prior's error removed, re-identification top-1;
- membership inference on the server model: the clients' images (at most as many per client as
  there are non-members) against hold-out images — AUC and TPR at 1 % and 0.1 % FPR (the latter
  only with at least 1,000 non-members).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from collafuse.common.config import DataConfig, DiffusionConfig
from collafuse.common.cut import Cut
from collafuse.engine.checkpoint import load_checkpoint
from collafuse.diffusion.cutnoise import CutNoise, image_ids, load_secret
from collafuse.diffusion.schedule import Scheduler
from collafuse.diffusion.split import cut_image
from collafuse.datasets import load_federated
from collafuse.evaluation.attacks import (
    auc,
    linear_attack,
    membership_scores,
    multiview_attack,
    reconstruction_scores,
    reidentification,
    tpr_at_fpr,
)
from collafuse.engine.simulate import SENT_ROWS

AUDIT_FILE = "audit.json"


@dataclass
class ServerView:
    """What the server holds of one client: x_{t_c} of every message row, and (for scoring only)
    the data row each came from."""

    cut: Cut
    views: torch.Tensor  # [N, C, H, W]
    truth: torch.Tensor  # [N] int64


def server_view(scheduler: Scheduler, data: torch.Tensor, cut_noise: CutNoise, cut: Cut, sent_rows: torch.Tensor, chunk: int = 4096) -> ServerView:
    """x_{t_c} of each message row, exactly as the client computed it (message row i is numbered i)."""
    ids = image_ids(data)
    parts = []
    for start in range(0, sent_rows.shape[0], chunk):
        rows = sent_rows[start : start + chunk]
        eps1 = cut_noise([ids[r] for r in rows.tolist()], range(start, start + rows.shape[0]), tuple(data.shape[1:]))
        parts.append(cut_image(scheduler, data[rows], cut, eps1))
    views = torch.cat(parts) if parts else torch.empty((0, *data.shape[1:]))
    return ServerView(cut, views, sent_rows.clone())


def attack_view(scheduler: Scheduler, view: ServerView, data: torch.Tensor) -> dict[str, Any]:
    """Both reconstruction attacks on one client's view, scored."""
    a = float(scheduler.alpha_bar[view.cut.t_c])
    flat = view.views.flatten(1)
    linked = multiview_attack(flat, a, view.truth)
    return {
        "views": int(flat.shape[0]),
        "images_sent": int(view.truth.unique().numel()),
        "distinct_views": int(torch.unique(flat, dim=0).shape[0]),
        "linear": {**reconstruction_scores(linear_attack(flat, a), view.truth, data),
                   "reid_top1": reidentification(flat, a, view.truth, data)},
        "multiview": {**reconstruction_scores(linked.estimate, view.truth, data),
                      "reid_top1": reidentification(linked.average, a, view.truth, data),
                      "twins_found": linked.twins_found, "views_averaged": linked.group_size, "link_spreads": linked.spreads},
    }


def _membership(scores_in: dict[str, np.ndarray], scores_out: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        kind: {"auc": auc(scores_in[kind], scores_out[kind]), "tpr_at_1pct_fpr": tpr_at_fpr(scores_in[kind], scores_out[kind], 0.01),
               "tpr_at_0.1pct_fpr": tpr_at_fpr(scores_in[kind], scores_out[kind], 0.001)}
        for kind in scores_in
    }


def _some(images: torch.Tensor, count: int) -> torch.Tensor:
    """At most `count` of the images, drawn without replacement (seeded): members are scored in
    about the number of non-members."""
    if images.shape[0] <= count:
        return images
    return images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:count]]


def audit_run(folder: Path, nonmembers: int = 1024, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Audit an in-process run folder (`collafuse simulate` or `collafuse sweep --in-process`);
    writes FOLDER/audit.json and returns it."""
    from collafuse.engine.server import ServerParty

    metrics = json.loads((folder / "metrics.json").read_text())
    config = metrics["config"]
    diffusion = DiffusionConfig(**config["diffusion"])
    scheduler = Scheduler(diffusion)
    data_config = DataConfig(**{**config["data"], "brats_slices": tuple(config["data"]["brats_slices"]), "holdout_images": nonmembers})
    data = load_federated(data_config)
    sent = load_file(str(folder / "checkpoints" / SENT_ROWS))
    cuts = [Cut(c["t_c"], diffusion.levels) for c in metrics["clients"]]  # a run's file: checked once here
    talking = [c for c, cut in zip(metrics["clients"], cuts) if cut.uses_server]
    report: dict[str, Any] = {"cut_noise": config["cut_noise"], "clients": [], "membership": None}
    for i, c in enumerate(metrics["clients"]):
        if c not in talking:
            continue
        secret = load_secret(folder / "secrets" / f"{c['name']}.key", create=False)
        view = server_view(scheduler, data.clients[i], CutNoise(secret, config["cut_noise"]), cuts[i], sent[c["name"]])
        row = {"client": c["name"], "t_c": c["t_c"], **attack_view(scheduler, view, data.clients[i])}
        report["clients"].append(row)
        say(f"[audit] {c['name']} t_c={c['t_c']}: {row['views']} views of {row['images_sent']} images ({row['distinct_views']} distinct); "
            f"linear MSE {row['linear']['mse']:.4f} re-id {row['linear']['reid_top1']:.3f}; "
            f"multi-view MSE {row['multiview']['mse']:.4f} re-id {row['multiview']['reid_top1']:.3f}")
    if talking:
        server = ServerParty(tuple(data.clients[0].shape[1:]), config["server_model"], diffusion)  # type: ignore[arg-type]
        load_checkpoint(folder / "checkpoints" / "server.safetensors", server.model)
        server.model.eval()
        generator = torch.Generator().manual_seed(0)
        outside = {cut.t_c: membership_scores(server.eps, scheduler, data.holdout, cut, generator)
                   for cut in sorted({cuts[i] for i, c in enumerate(metrics["clients"]) if c in talking}, key=lambda cut: cut.t_c)}
        inside = {c["name"]: membership_scores(server.eps, scheduler, _some(data.clients[i], nonmembers), cuts[i], generator)
                  for i, c in enumerate(metrics["clients"]) if c in talking}
        membership: dict[str, Any] = {"nonmembers": data.holdout.shape[0],
                                      "clients": {c["name"]: _membership(inside[c["name"]], outside[c["t_c"]]) for c in talking}}
        if len(outside) == 1:  # one cut for all: the clients' images together against the hold-out set
            pooled = {k: np.concatenate([s[k] for s in inside.values()]) for k in ("loss", "pia")}
            membership.update(members=len(pooled["loss"]), **_membership(pooled, next(iter(outside.values()))))
            say(f"[audit] membership: AUC loss {membership['loss']['auc']:.3f}, PIA {membership['pia']['auc']:.3f}")
        report["membership"] = membership
    (folder / AUDIT_FILE).write_text(json.dumps(report, indent=2))
    return report
