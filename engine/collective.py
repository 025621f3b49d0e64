"""A data-parallel trainer group's collectives, on torch.distributed's gloo engine.

The ranks meet through a TCPStore that rank 0 serves; each generation of the group (a new set of
members after a death or a join) gets its own process group under its own key prefix, so a group
can re-form any number of times without restarting a process. Gloo reduces CPU and CUDA tensors
alike; every call blocks until all ranks make it, or fails after `timeout` (a dead or stalled rank).
"""

from __future__ import annotations

import datetime

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

# Collective failures surface as these (gloo: RuntimeError "Connection closed by peer", timeouts).
CollectiveError = (RuntimeError, TimeoutError, ConnectionError)


def split_address(address: str) -> tuple[str, int]:
    """'host:port' → (host, port); a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


class StoreHost:
    """The rendezvous store this process serves while it is some generation's rank 0 (bound once)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.store: TCPStore | None = None

    def serve(self, timeout: float) -> TCPStore:
        if self.store is None:
            host, port = split_address(self.address)
            self.store = TCPStore(host, port, None, True, datetime.timedelta(seconds=timeout), wait_for_workers=False)
        return self.store


class Collective:
    """One generation of the group: this process's rank among `world` ranks."""

    def __init__(self, generation: str, rank: int, world: int, store_address: str, timeout: float, host: StoreHost | None = None) -> None:
        self.generation, self.rank, self.world = generation, rank, world
        delta = datetime.timedelta(seconds=timeout)
        if host is not None and rank == 0:
            store = host.serve(timeout)
        else:
            address, port = split_address(store_address)
            store = TCPStore(address, port, None, False, delta)
        options = ProcessGroupGloo._Options()
        options._timeout = delta
        options._devices = [ProcessGroupGloo.create_device(hostname=split_address(store_address)[0])]
        self.group = ProcessGroupGloo(PrefixStore(f"collafuse/{generation}", store), rank, world, options)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum these tensors over the ranks, in place (flattened into one call: one round trip)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.group.allreduce([flat]).wait()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def gather_bytes(self, blob: bytes) -> list[bytes]:
        """Every rank's blob, in rank order."""
        size = torch.tensor([len(blob)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self.group.allgather([sizes], [size]).wait()
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else mine[:0]
        everyone = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        self.group.allgather([everyone], [mine]).wait()
        return [bytes(t[: int(s)].numpy()) for t, s in zip(everyone, sizes)]

    def broadcast_bytes(self, blob: bytes, root: int) -> bytes:
        """`root`'s blob on every rank (the others' `blob` is ignored)."""
        size = torch.tensor([len(blob) if self.rank == root else 0], dtype=torch.int64)
        self.group.broadcast(size, root).wait()
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if self.rank == root and blob else torch.zeros(int(size), dtype=torch.uint8)
        if int(size):
            self.group.broadcast(data, root).wait()
        return bytes(data.numpy())

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes (a step is due somewhere); every rank gets the same answer."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int64)
        self.group.allreduce([value]).wait()
        return bool(int(value))
