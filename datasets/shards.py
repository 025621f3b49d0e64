"""Split a data source into disjoint, non-IID client shards and a hold-out set.

- `mni` (default): axial slices of the embedded MNI152 template. Usable slices go, in order, into a
  repeating pattern of six: one hold-out slice, a gap slice, three client slices, a gap slice, so
  every hold-out slice is at least one slice away from every client slice. The client slices are
  cut into contiguous bands (non-IID: each client sees its own part of the brain), and each client
  draws `images_per_client` seeded augmentations from its band.
- `brats:PATH`: one folder per patient; patients are shuffled with the seed, a share is held out,
  the rest split among clients, so no patient is shared. Slices 60–100 along axis 2.
- `images:PATH`: a folder of image files, split by file in the same way.
Images are returned in [-1, 1], shape [N, 1, S, S].
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collafuse.common.config import DataConfig
from collafuse.datasets.augment import augment
from collafuse.datasets.sources import (
    DataError,
    brats_patients,
    image_files,
    mni_template_path,
    read_images,
    read_volume,
    slices_to_images,
)

__all__ = ["DataError", "FederatedData", "load_federated", "mni_slice_split"]

VALID_SIZES = (32, 64, 128)


@dataclass
class FederatedData:
    clients: list[torch.Tensor]  # one [N,1,S,S] tensor in [-1, 1] per client
    holdout: torch.Tensor
    provenance: list[dict[str, Any]] = field(default_factory=list)  # what each client holds
    holdout_provenance: dict[str, Any] = field(default_factory=dict)


def _to_signed(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def mni_slice_split(volume: np.ndarray, clients: int) -> tuple[list[list[int]], list[int]]:
    """(client bands of slice indices, hold-out slice indices) for the template volume."""
    brain = [k for k in range(volume.shape[2]) if (volume[:, :, k] > 0.1).mean() > 0.05]
    holdout, pool = [], []
    for i, k in enumerate(brain):
        phase = i % 6
        if phase == 0:
            holdout.append(k)
        elif phase in (2, 3, 4):
            pool.append(k)
    if clients > len(pool):
        raise DataError(f"the embedded data has {len(pool)} client slices: at most {len(pool)} clients, got {clients}")
    bounds = [round(i * len(pool) / clients) for i in range(clients + 1)]
    return [pool[bounds[i] : bounds[i + 1]] for i in range(clients)], holdout


def _draw(images: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` augmented images cycling evenly through `images`."""
    index = torch.arange(count) % images.shape[0]
    return augment(images[index], generator)


def _load_mni(config: DataConfig) -> FederatedData:
    volume = read_volume(mni_template_path())
    bands, holdout_slices = mni_slice_split(volume, config.clients)
    clients = [
        _to_signed(_draw(slices_to_images(volume, band, config.image_size), config.images_per_client, _generator(config.seed, i + 1)))
        for i, band in enumerate(bands)
    ]
    holdout = slices_to_images(volume, holdout_slices, config.image_size)
    return FederatedData(
        clients,
        _to_signed(_draw(holdout, config.holdout_images, _generator(config.seed, 0))),
        [{"source": "mni152", "slices": band} for band in bands],
        {"source": "mni152", "slices": holdout_slices},
    )


def _split_items(items: list[Any], config: DataConfig, what: str) -> tuple[list[list[Any]], list[Any]]:
    """Shuffle with the seed, hold out a share, split the rest into `clients` disjoint parts."""
    items = list(items)
    random.Random(config.seed).shuffle(items)
    n_hold = math.ceil(config.holdout_fraction * len(items)) if config.holdout_fraction > 0 else 0
    rest = items[n_hold:]
    if len(rest) < config.clients:
        raise DataError(f"{len(items)} {what} are too few for {config.clients} clients and a hold-out set")
    bounds = [round(i * len(rest) / config.clients) for i in range(config.clients + 1)]
    return [rest[bounds[i] : bounds[i + 1]] for i in range(config.clients)], items[:n_hold]


def _brats_images(patients: list[tuple[str, Path]], config: DataConfig) -> torch.Tensor:
    lo, hi = config.brats_slices
    out = []
    for _, path in patients:
        volume = read_volume(path)
        indices = [k for k in range(lo, hi + 1) if k < volume.shape[2]]
        if not indices:
            raise DataError(f"{path} has {volume.shape[2]} slices along axis 2; none in {lo}..{hi}")
        out.append(slices_to_images(volume, indices, config.image_size))
    return _to_signed(torch.cat(out)) if out else torch.empty(0, 1, config.image_size, config.image_size)


def _load_brats(root: Path, config: DataConfig) -> FederatedData:
    shards, hold = _split_items(brats_patients(root, config.brats_modality), config, "patients")
    return FederatedData(
        [_brats_images(s, config) for s in shards],
        _brats_images(hold, config),
        [{"source": "brats", "patients": [p for p, _ in s]} for s in shards],
        {"source": "brats", "patients": [p for p, _ in hold]},
    )


def _load_folder(root: Path, config: DataConfig) -> FederatedData:
    shards, hold = _split_items(image_files(root), config, "image files")

    def load(files: list[Path]) -> torch.Tensor:
        return _to_signed(read_images(files, config.image_size)) if files else torch.empty(0, 1, config.image_size, config.image_size)

    return FederatedData(
        [load(s) for s in shards],
        load(hold),
        [{"source": "images", "files": [str(f) for f in s]} for s in shards],
        {"source": "images", "files": [str(f) for f in hold]},
    )


def load_federated(config: DataConfig) -> FederatedData:
    """Parse `config.spec` and build every client's shard plus the hold-out set."""
    if config.image_size not in VALID_SIZES:
        raise DataError(f"image size must be one of {VALID_SIZES}, got {config.image_size}")
    if config.clients < 1:
        raise DataError(f"need at least one client, got {config.clients}")
    kind, _, arg = config.spec.partition(":")
    if kind == "mni" and not arg:
        return _load_mni(config)
    if kind == "brats" and arg:
        return _load_brats(Path(arg).expanduser(), config)
    if kind == "images" and arg:
        return _load_folder(Path(arg).expanduser(), config)
    raise DataError(f"unknown data spec {config.spec!r}: use 'mni', 'brats:PATH' or 'images:PATH'")
