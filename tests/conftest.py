import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mni_data():
    """The embedded data at 32×32 for three clients (built once per test session)."""
    from collafuse.common.config import DataConfig
    from collafuse.datasets import load_federated

    return load_federated(DataConfig(clients=3, image_size=32, images_per_client=64, holdout_images=32, seed=0))
