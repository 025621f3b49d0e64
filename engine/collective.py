"""A data-parallel trainer group's collectives, on torch.distributed's gloo engine.

The ranks meet through a TCPStore that rank 0 serves; each generation of the group (a new set of
members after a death or a join) gets its own process group under its own key prefix, so a group
can re-form any number of times without restarting a process. Gloo reduces CPU and CUDA tensors
alike; every call blocks until all ranks make it, or fails after `timeout` (a dead or stalled rank).
"""

from __future__ import annotations

import datetime
import functools

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore


class CollectiveFailed(Exception):
    """The group broke: a peer died or closed, or a call waited past the timeout. Local errors
    (a bug, out of memory) are not this: they must not pass for a broken group."""


def collective(method):
    """Turn what gloo and the store raise when the group breaks into CollectiveFailed."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (RuntimeError, TimeoutError, ConnectionError) as exc:  # gloo: RuntimeError "Connection closed by peer", timeouts
            raise CollectiveFailed(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc

    return wrapper


def split_address(address: str) -> tuple[str, int]:
    """'host:port' → (host, port); a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


class StoreHost:
    """The rendezvous store this process serves whenever it is a generation's rank 0, bound when
    the process starts (a port already taken is an error then, not a group that never forms), and
    the address its gloo connections use."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        host, port = split_address(address)
        self.host = host
        try:
            self.store = TCPStore(host, port, None, True, datetime.timedelta(seconds=timeout), wait_for_workers=False)
        except RuntimeError as exc:  # taken, or not an address of this machine
            raise ValueError(f"cannot serve the trainer group's rendezvous on {address}: {(str(exc).splitlines() or [''])[0]}") from None


class Collective:
    """One generation of the group: this process's rank among `world` ranks. Rank 0 is the process
    whose `host` serves `store_address`; every rank's gloo connections use its own host's address."""

    @collective
    def __init__(self, generation: str, rank: int, world: int, store_address: str, timeout: float, host: StoreHost) -> None:
        self.generation, self.rank, self.world = generation, rank, world
        delta = datetime.timedelta(seconds=timeout)
        if rank == 0:
            store = host.store
        else:
            address, port = split_address(store_address)
            store = TCPStore(address, port, None, False, delta)
        options = ProcessGroupGloo._Options()
        options._timeout = delta
        options._devices = [ProcessGroupGloo.create_device(hostname=host.host)]
        self.group = ProcessGroupGloo(PrefixStore(f"collafuse/{generation}", store), rank, world, options)

    @collective
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

    @collective
    def gather_bytes(self, blob: bytes) -> list[bytes]:
        """Every rank's blob, in rank order."""
        size = torch.tensor([len(blob)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self.group.allgather([sizes], [size]).wait()
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if blob:
            mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        everyone = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        self.group.allgather([everyone], [mine]).wait()
        return [bytes(t[: int(s)].numpy()) for t, s in zip(everyone, sizes)]

    @collective
    def broadcast_bytes(self, blob: bytes, root: int) -> bytes:
        """`root`'s blob on every rank (the others' `blob` is ignored)."""
        size = torch.tensor([len(blob) if self.rank == root else 0], dtype=torch.int64)
        self.group.broadcast(size, root).wait()
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if self.rank == root and blob else torch.zeros(int(size), dtype=torch.uint8)
        if int(size):
            self.group.broadcast(data, root).wait()
        return bytes(data.numpy())

    @collective
    def any_of(self, *flags: bool) -> list[bool]:
        """For each flag, whether any rank raised it; every rank gets the same answer."""
        values = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64)
        self.group.allreduce([values]).wait()  # a sum: more than 0 is "someone"
        return [int(v) > 0 for v in values]
