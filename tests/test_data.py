"""Client shards: disjoint, non-IID, deterministic; NIfTI and image-folder readers; clear errors."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.common.config import DataConfig
from collafuse.datasets import DataError, load_federated
from collafuse.datasets.shards import mni_slice_split
from collafuse.datasets.sources import mni_template_path, read_volume


def test_mni_shards_are_disjoint_banded_and_a_slice_apart_from_holdout(mni_data):
    bands = [set(p["slices"]) for p in mni_data.provenance]
    hold = set(mni_data.holdout_provenance["slices"])
    assert all(bands) and hold
    for i, a in enumerate(bands):
        assert not a & hold
        for b in bands[i + 1 :]:
            assert not a & b
    client_slices = set().union(*bands)
    assert min(abs(h - c) for h in hold for c in client_slices) >= 2
    assert max(bands[0]) < min(bands[1]) and max(bands[1]) < min(bands[2])  # non-IID: one band each
    for x in [*mni_data.clients, mni_data.holdout]:
        assert x.shape[1:] == (1, 32, 32) and x.min() >= -1 and x.max() <= 1
        assert x.std() > 0.2  # real content, not blank


def test_mni_shards_are_deterministic_for_a_seed(mni_data):
    cfg = DataConfig(clients=3, image_size=32, images_per_client=64, holdout_images=32, seed=0)
    again = load_federated(cfg)
    for a, b in zip(mni_data.clients, again.clients):
        assert torch.equal(a, b)
    other = load_federated(DataConfig(clients=3, image_size=32, images_per_client=64, holdout_images=32, seed=1))
    assert not torch.equal(mni_data.clients[0], other.clients[0])


def test_any_number_of_clients_and_sizes():
    volume = read_volume(mni_template_path())
    for n in (1, 2, 7, 20):
        bands, hold = mni_slice_split(volume, n)
        assert len(bands) == n and all(bands)
    d = load_federated(DataConfig(clients=5, image_size=64, images_per_client=4, holdout_images=4))
    assert len(d.clients) == 5 and d.clients[0].shape == (4, 1, 64, 64)
    with pytest.raises(DataError, match="at most"):
        mni_slice_split(volume, 1000)


def _brats_tree(root, patients=8, depth=110):
    rng = np.random.default_rng(0)
    for i in range(patients):
        folder = root / f"BraTS_{i:03d}"
        folder.mkdir(parents=True)
        vol = np.zeros((48, 40, depth), dtype=np.float32)
        vol[8:40, 6:34, :] = rng.uniform(100, 1000, size=(32, 28, depth)) * (i + 1)
        for modality in ("t1", "t2"):
            suffix = ".nii.gz" if i % 2 else ".nii"
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(folder / f"BraTS_{i:03d}_{modality}{suffix}"))
    return root


def test_brats_reader_splits_patients_and_normalises(tmp_path):
    root = _brats_tree(tmp_path / "brats")
    d = load_federated(DataConfig(spec=f"brats:{root}", clients=3, image_size=32, seed=0))
    groups = [set(p["patients"]) for p in d.provenance] + [set(d.holdout_provenance["patients"])]
    assert sum(len(g) for g in groups) == 8 and len(set().union(*groups)) == 8  # disjoint, complete
    assert len(groups[-1]) == 1
    for x, g in zip(d.clients, groups):
        assert x.shape == (41 * len(g), 1, 32, 32)  # slices 60..100
        assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.5  # each volume scaled to [0, 1] whatever its raw scale


def test_image_folder_reader(tmp_path):
    for i in range(10):
        Image.fromarray((np.random.default_rng(i).uniform(0, 255, (40, 50))).astype(np.uint8)).save(tmp_path / f"{i}.png")
    d = load_federated(DataConfig(spec=f"images:{tmp_path}", clients=2, image_size=32))
    assert sum(x.shape[0] for x in d.clients) + d.holdout.shape[0] == 10
    assert d.clients[0].shape[1:] == (1, 32, 32)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("brats:/no/such/folder", "/no/such/folder"),
        ("images:/no/such/folder", "/no/such/folder"),
        ("nonsense", "unknown data spec"),
    ],
)
def test_bad_paths_give_a_one_line_error_naming_them(spec, needle):
    with pytest.raises(DataError, match=needle):
        load_federated(DataConfig(spec=spec))


def test_empty_and_unreadable_inputs(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_federated(DataConfig(spec=f"images:{tmp_path}"))
    bad = tmp_path / "p1"
    bad.mkdir()
    (bad / "p1_t1.nii").write_bytes(b"not a nifti file")
    with pytest.raises(DataError, match="p1_t1.nii"):
        load_federated(DataConfig(spec=f"brats:{tmp_path}", clients=1, holdout_fraction=0))


def test_cli_reports_a_missing_path_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "collafuse.cli", "simulate", "--out", str(tmp_path / "o"), "--data", "brats:/missing/tree"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: data path does not exist: /missing/tree"]
