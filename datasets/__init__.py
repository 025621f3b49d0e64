"""Client data: the embedded MNI152 brain template, BraTS-style NIfTI trees, image folders."""

from collafuse.datasets.shards import DataError, FederatedData, load_federated

__all__ = ["DataError", "FederatedData", "load_federated"]
