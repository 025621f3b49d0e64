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

ε₁ does not depend on the cut. So a secret is bound, when it is made, to what shapes its views
(the cut, T, the mode, the data settings: `load_secret`'s `views`), and a later load that asks for
others is refused: two views of one image under one ε₁ at two cuts are two linear equations in x₀
and ε₁, which the server solves exactly; other data settings (image size, augmentation seed) hand
it freshly noised views of the same images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from collafuse.common.config import DataConfig
from collafuse.common.cut import Cut
from collafuse.common.files import create_durably, sync_folder

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


def views(cut: Cut, mode: str, data: DataConfig, shard: int) -> dict[str, Any]:
    """What shapes the views of its images a client's secret gives the server, for `load_secret`:
    the cut on its chain of T, the mode, and every data setting that shapes the client's pixels."""
    return {"t_c": cut.t_c, "levels": cut.levels, "cut_noise": mode, "shard": shard, **{f"data.{k}": v for k, v in asdict(data).items()}}


def views_path(path: str | Path) -> Path:
    """Where a secret's binding lives: beside it, SECRET.views.json."""
    return Path(path).with_suffix(".views.json")


def load_secret(path: str | Path, views: Mapping[str, Any] | None = None, create: bool = True) -> bytes:
    """The node's secret, created on first use from the OS's entropy with owner-only permissions.
    A secret file that others may read is refused (like ssh's private keys).

    With `views` (JSON-able settings that shape the views its noise makes) the secret is bound to
    them: recorded beside it before it is made, and compared at every later load; any change is a
    ValueError that names it. A record without its secret means one was made here and lost: no new
    one is made in its place, because a new secret gives the server a second, independent view of
    every image it has seen; that choice is left to whoever starts a new state folder."""
    path, record = Path(path), views_path(path)
    wanted = json.loads(json.dumps(views)) if views is not None else None  # as the record reads back (tuples → lists)
    if path.exists() and path.stat().st_size == 0:  # not removed here: another process may be making one meanwhile
        raise ValueError(f"{path} is empty: an earlier version was killed while it created it, so it was never used. "
                         f"Delete it and start again")
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"no node secret at {path}")
        if record.exists() and not _appears(path) and not _adopt_unlinked(path):
            raise ValueError(f"{record} records a node secret that was made here but {path} is gone; if it sent anything, a new "
                             f"secret would give the server a second, independent view of every image it has seen. Restore the "
                             f"secret, or start over in a new state folder knowing that (if the node was killed during its very "
                             f"first start, nothing was sent)")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Both whole and only once: a record and a secret another process linked into place first
        # stand (the check after the secret is read compares against that record), so two nodes
        # racing on one folder cannot leave a record of settings its secret never used.
        if wanted is not None:
            create_durably(record, json.dumps(wanted, sort_keys=True).encode())
        create_durably(path, secrets.token_bytes(SECRET_BYTES), 0o600)
    if path.stat().st_mode & 0o077:
        raise ValueError(f"node secret {path} may be read by others; make it private: chmod 600 {path}")
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"{path} is not a node secret ({len(secret)} bytes, expected {SECRET_BYTES})")
    if wanted is not None:
        _check_record(record, wanted)
    return secret


def _appears(path: Path, wait: float = 2.0) -> bool:
    """Whether the file appears within `wait` seconds: another process that has just written the
    record links its secret a moment later."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.01)
    return path.exists()


def _adopt_unlinked(path: Path) -> bool:
    """A secret written whole beside `path` and never linked into place (its process was killed
    in between): nothing ever read it at `path`, so it was never used; link it in."""
    for tmp in sorted(path.parent.glob(f"{path.name}.*.tmp")):
        try:
            if tmp.stat().st_size == SECRET_BYTES:
                os.link(tmp, path)
                tmp.unlink(missing_ok=True)
                sync_folder(path.parent)
                return True
        except FileExistsError:
            return True
        except FileNotFoundError:  # its owner linked or removed it meanwhile
            continue
    return path.exists()


def _check_record(record: Path, wanted: dict[str, Any]) -> None:
    """That the secret is asked for the views it was bound to (ValueError naming each change)."""
    try:
        bound = json.loads(record.read_text())
    except FileNotFoundError:
        raise ValueError(f"no record ({record}) of the settings this secret has noised images with (a state folder "
                         f"from before secrets were bound to them?): it cannot be checked that this run makes no second "
                         f"view. Start over in a new state folder, knowing the server then holds two views of each image") from None
    except ValueError:
        raise ValueError(f"{record} is not a secret's record of its views") from None
    changed = sorted(k for k in bound.keys() | wanted.keys() if bound.get(k) != wanted.get(k))
    if changed:
        was = ", ".join(f"{k}={bound.get(k)}" for k in changed)
        now = ", ".join(f"{k}={wanted.get(k)}" for k in changed)
        raise ValueError(f"this node's secret has sent the server views of its images with {was}; this run asks for {now}. "
                         f"With one secret, another cut or T lets the server solve two views for the clean images, and other "
                         f"data settings hand it new views of the same images. Keep the settings, or start over in a new "
                         f"state folder (a new secret), knowing that the server then holds two views of each image")
