"""Image grids and PNG files for samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,1,H,W] in [-1, 1] → [N,H,W] uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> None:
    """One row of images per entry (e.g. per client), white padding between images."""
    from PIL import Image

    h, w = rows[0].shape[-2:]
    cols = max(r.shape[0] for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(to_uint8(row)):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img
    Image.fromarray(canvas).save(path)


def save_pngs(images: torch.Tensor, folder: str | Path, prefix: str = "sample") -> list[Path]:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(images)):
        path = folder / f"{prefix}_{i:04d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths
