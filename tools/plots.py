"""The sweep's figure: the paper's Figure 3 across cut ratios, with the privacy audit beside it.
Points are means over seeds, bars their standard deviation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

STYLE = {"keyed": ("tab:blue", "o"), "fresh": ("tab:orange", "s"), "local": ("black", "D")}


def _stats(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def sweep_figure(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        (axes[0, 0], [("kid_client", "")], "KID on client data (sum over clients) ↓"),
        (axes[1, 0], [("kid_holdout", "")], "KID on hold-out data (sum over clients) ↓"),
        (axes[0, 1], [("linear_mse", "linear"), ("multiview_mse", "multi-view")], "Reconstruction of x₀ from what the server saw: MSE ↑"),
        (axes[1, 1], [("linear_reid_top1", "linear"), ("multiview_reid_top1", "multi-view")], "Re-identification top-1 ↓"),
        (axes[0, 2], [("mi_loss_auc", "loss"), ("mi_pia_auc", "PIA")], "Membership inference on the server model: AUC ↓"),
        (axes[1, 2], [("local_kwh", "")], "Local energy, kWh (sum over clients)"),
    ]
    modes = sorted({e["cut_noise"] for e in summary}, key=list(STYLE).index)
    for ax, keys, title in panels:
        for mode in modes:
            entries = sorted((e for e in summary if e["cut_noise"] == mode), key=lambda e: e["cut_ratio"])
            color, marker = STYLE[mode]
            for key, label in keys:
                stats = [_stats(e[key]) for e in entries]
                if all(math.isnan(m) for m, _ in stats):
                    continue
                ax.errorbar([e["cut_ratio"] for e in entries], [m for m, _ in stats], yerr=[s for _, s in stats], color=color,
                            marker=marker, linestyle="--" if label in ("multi-view", "PIA") else "-", capsize=3,
                            label=f"{mode} {label}".strip())
        if "AUC" in title:
            ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cut ratio c (share of denoising steps on the client)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
