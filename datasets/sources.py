"""Readers that turn files into float slices in [0, 1]; every failure names the path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """A data problem a user can fix: missing, empty or unreadable input. One line, names the path."""


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise DataError("reading NIfTI needs nibabel: pip install 'collafuse[data]'") from None
    return nibabel


def mni_template_path() -> Path:
    """The MNI152 T1 template (1 mm) that ships inside the nilearn package: no download."""
    try:
        import nilearn.datasets
    except ImportError:
        raise DataError("the embedded MNI152 data needs nilearn: pip install 'collafuse[data]'") from None
    path = Path(nilearn.datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise DataError(f"nilearn is installed but its MNI152 template is missing: {path}")
    return path


def read_volume(path: Path) -> np.ndarray:
    """A 3-D volume as float32, percentile-normalised to [0, 1] over its non-zero voxels."""
    nib = _nibabel()
    try:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for broken files
        raise DataError(f"cannot read NIfTI file {path}: {exc}") from None
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"expected a 3-D volume in {path}, got shape {data.shape}")
    return normalise_percentile(data)


def normalise_percentile(data: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    foreground = data[data > 0]
    if foreground.size == 0:
        return np.zeros_like(data)
    lo, hi = np.percentile(foreground, [low, high])
    return np.clip((data - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * (data > 0)


def slices_to_images(volume: np.ndarray, indices: list[int], size: int) -> torch.Tensor:
    """Axial slices (axis 2), rotated so the nose points up, zero-padded square, resized: [N,1,S,S]."""
    stack = np.stack([np.rot90(volume[:, :, k]) for k in indices]).astype(np.float32)
    return square_resize(torch.from_numpy(stack.copy())[:, None], size)


def square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad [N,C,H,W] to a centred square with zeros, then resize with antialiasing."""
    h, w = images.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    images = F.pad(images, (left, side - w - left, top, side - h - top))
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def brats_patients(root: Path, modality: str) -> list[tuple[str, Path]]:
    """(patient, volume path) for every patient folder holding `*_<modality>.nii[.gz]`, sorted."""
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"BraTS data must be a folder of patient folders: {root}")
    found = []
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(patient.glob(f"*_{modality}.nii")) + sorted(patient.glob(f"*_{modality}.nii.gz"))
        if files:
            found.append((patient.name, files[0]))
    if not found:
        raise DataError(f"no patient folder with a *_{modality}.nii[.gz] file under {root}")
    return found


def image_files(root: Path) -> list[Path]:
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"image data must be a folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def read_images(files: list[Path], size: int) -> torch.Tensor:
    """Grayscale images, centre-cropped square and resized: [N,1,S,S] in [0, 1]."""
    from PIL import Image

    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        h, w = arr.shape
        side = min(h, w)
        arr = arr[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        out.append(torch.from_numpy(arr.copy()))
    images = torch.stack(out)[:, None]
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
