"""Counter-based Gaussian noise: the same numbers for a row whatever batch it runs in.

Continuous batching admits a job's rows into whatever iteration has room, so noise drawn from one
shared generator would depend on who else was in the batch. Here the noise of a row at a level is
a pure function of (row key, level, element index), computed with an integer hash on the device:
the in-process run and the networked worker give the same images for the same seed.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons) on uint32 values held in int64 (products wrap, then masked)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_keys(seed: int, first_row: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One key per row of a job: a hash of the job's seed and the row's index in the job."""
    rows = torch.arange(first_row, first_row + count, dtype=torch.int64, device=device)
    return _hash32(_hash32(torch.full_like(rows, seed & _MASK32)) ^ _hash32(rows * 0x9E3779B9))


def row_noise(
    keys: torch.Tensor, level: torch.Tensor, shape: tuple[int, ...], stream: torch.Tensor | int = 0
) -> torch.Tensor:
    """Standard normal noise of `shape` per row (Box–Muller on hashed counters), float32.

    `level` is the row's current level; `stream` separates independent uses (initial x_T, steps,
    the server's and the client's samplers), per row or for all rows.
    """
    n = 1
    for d in shape:
        n *= d
    base = _hash32(keys ^ _hash32(level.to(torch.int64) * 0x27D4EB2F + stream * 0x165667B1))
    idx = torch.arange(n, dtype=torch.int64, device=keys.device)
    h1 = _hash32(base[:, None] ^ _hash32(2 * idx)[None, :])
    h2 = _hash32(base[:, None] ^ _hash32(2 * idx + 1)[None, :])
    u1 = ((h1 >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    u2 = (h2 >> 8).to(torch.float32) * (1.0 / 16777216.0)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.view(keys.shape[0], *shape)
