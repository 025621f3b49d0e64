"""The sweep's figure, laid out like the paper's Figure 3 (plus local energy)."""

from __future__ import annotations

import math
from pathlib import Path


def sweep_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["cut_ratio"] for r in rows})
    clients = sorted({r["client"] for r in rows})
    labels = [f"{int(round(c * 100))}%" for c in ratios]

    def value(c: float, client: str, key: str) -> float:
        v = next((r[key] for r in rows if r["cut_ratio"] == c and r["client"] == client), math.nan)
        return 0.0 if v is None or math.isnan(v) else v

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        (axes[0, 0], "kid_client", "KID on client data (stacked per client) ↓"),
        (axes[1, 0], "kid_holdout", "KID on hold-out data (stacked per client) ↓"),
        (axes[0, 1], "kid_produced", "Disclosure: KID of server output at t_c vs client data ↑"),
        (axes[1, 1], "mse_produced_nearest", "Disclosure: MSE of server output to nearest real ↑"),
        (axes[0, 2], "mse_reconstruction_paired", "Disclosure: MSE of server's one-shot x̂₀ (paired) ↑"),
        (axes[1, 2], "local_kwh", "Local energy per client, kWh (stacked)"),
    ]
    for ax, key, title in panels:
        bottom = [0.0] * len(ratios)
        for client in clients:
            heights = [value(c, client, key) for c in ratios]
            ax.bar(labels, heights, bottom=bottom, label=client)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cut ratio c (share of denoising steps on the client)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
