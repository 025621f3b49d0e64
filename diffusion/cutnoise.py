"""ε₁, the client's cut noise: a secret, keyed, one per image (DESIGN.md §2).

The server may learn x_{t_c} = √ᾱ_{t_c}·x₀ + √(1−ᾱ_{t_c})·ε₁ of an image and nothing closer to
x₀. That needs two things of ε₁. It must be unpredictable to the server: never drawn from the
generator that draws t and ε₂ (ε₂ is sent in the clear, and a seeded generator can be replayed),
nor from any training seed. And it must be the same in every message of an image: fresh draws hand
the server many independent noisy views of one x₀, which it can link and average. So ε₁ of an
image is SHAKE-256(node secret ‖ image id) through Box–Muller, where the secret is 256 bits of the
OS's entropy that never leave the node and the image id is the SHA-256 of its pixels. The `fresh`
mode mixes each message row's number into the key: one unpredictable draw per message, kept for
comparison, at the cost of giving the server one view of an image per message that carries it.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SECRET_BYTES = 32
MODES = ("keyed", "fresh")
_DOMAIN = b"collafuse/cut-noise/v1\x00"


def image_ids(images: torch.Tensor) -> list[bytes]:
    """A stable id per image: the SHA-256 of its pixels as little-endian float32, so an image gets
    the same ε₁ wherever it sits in the data and whichever batch carries it."""
    arrays = images.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return [hashlib.sha256(a.tobytes()).digest() for a in arrays]


def keyed_normal(key: bytes, n: int) -> np.ndarray:
    """n standard normal numbers (float64), a pure function of `key`: Box–Muller on 32-bit uniforms
    in (0, 1) read from SHAKE-256(key)."""
    pairs = (n + 1) // 2
    u = (np.frombuffer(hashlib.shake_256(key).digest(8 * pairs), dtype="<u4").astype(np.float64) + 0.5) / 2.0**32
    radius, angle = np.sqrt(-2.0 * np.log(u[0::2])), 2.0 * np.pi * u[1::2]
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)[:n]


class CutNoise:
    """ε₁ for rows of images, keyed by the node's secret; the secret is never shown."""

    def __init__(self, secret: bytes, mode: str = "keyed") -> None:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a node secret is {SECRET_BYTES} bytes, got {len(secret)}")
        if mode not in MODES:
            raise ValueError(f"cut noise must be one of {', '.join(MODES)}, got {mode!r}")
        self._secret, self.mode = bytes(secret), mode

    def __repr__(self) -> str:
        return f"CutNoise(mode={self.mode!r})"

    def stream_id(self) -> str:
        """A public name for this node's stream of train jobs: the same after every restart from
        the same state folder (so a re-sent job keeps its id and is not applied twice), another
        for another secret; a one-way hash under its own domain, so it tells nothing of the secret."""
        return hashlib.sha256(b"collafuse job stream\0" + self._secret).hexdigest()[:12]

    def __call__(self, ids: Sequence[bytes], rows: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        """ε₁ [len(ids), *shape] float32. `rows` numbers the message rows (only `fresh` uses it)."""
        n = math.prod(shape)
        keys = [
            _DOMAIN + self._secret + image + (row.to_bytes(8, "little") if self.mode == "fresh" else b"")
            for image, row in zip(ids, rows, strict=True)
        ]
        noise = np.stack([keyed_normal(k, n) for k in keys]) if keys else np.zeros((0, n))
        return torch.from_numpy(noise.astype(np.float32)).view(len(keys), *shape)


def load_secret(path: str | Path, create: bool = True) -> bytes:
    """The node's secret, created on first use from the OS's entropy with owner-only permissions.
    A secret file that others may read is refused (like ssh's private keys)."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"no node secret at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.stat().st_mode & 0o077:
        raise ValueError(f"node secret {path} may be read by others; make it private: chmod 600 {path}")
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"{path} is not a node secret ({len(secret)} bytes, expected {SECRET_BYTES})")
    return secret
