"""CUDA graphs of the server model's forward, one per batch-size bucket.

Eager, a small U-Net is launch-bound: hundreds of short kernels per call, and whenever the host
waits for the device (a job's rows coming back) the next call starts from an empty queue. A graph
replays the whole forward (eager or compiled, engine/compiled.py) with one launch. Graph shapes are
static, so a pool of n rows runs in the smallest bucket ≥ n (powers of two, and the sampler's max
batch), padded. The parameters are read
in place at every replay, so an optimiser step or new weights from the trainer take effect at once.
"""

from __future__ import annotations

from typing import Callable

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, t_c) → ε̂


# A compiled forward's smallest bucket: its graph has a dynamic batch, which dynamo specialises for
# batch 1 (a second compilation); and on an H200 one compiled call of 8 rows of the paper U-Net took
# 2.3 ms, one eager call of 1 row 2.9 ms (BENCHMARKS.md).
COMPILED_SMALLEST_BUCKET = 8


def buckets(max_batch: int, smallest: int = 1) -> list[int]:
    """smallest, 2·smallest, 4·smallest, … below max_batch, then max_batch (only max_batch when
    smallest ≥ max_batch): padding never doubles a full pool's work."""
    return sorted({smallest << k for k in range(max_batch.bit_length()) if smallest << k < max_batch} | {max_batch})


class GraphedForward:
    def __init__(self, forward: Forward, image_shape: tuple[int, ...], max_batch: int, device: torch.device, smallest: int = 1) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.forward, self.image_shape, self.device = forward, image_shape, device
        self.buckets = buckets(max_batch, smallest)
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all buckets
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.zeros((size, *self.image_shape), device=self.device)
        t = torch.ones(size, dtype=torch.int64, device=self.device)
        t_c = torch.zeros(size, dtype=torch.int64, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph asks
            for _ in range(2):
                self.forward(x, t, t_c)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(x, t, t_c)
        return graph, x, t, t_c, out

    def warm(self) -> None:
        """Capture every bucket now (a compiled forward compiles at the first), not at the first pool
        of each size: a capture inside the serving loop would stall every job and the heartbeats."""
        for size in self.buckets:
            if size not in self.graphs:
                self.graphs[size] = self._capture(size)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_c: torch.Tensor) -> torch.Tensor:
        """ε̂ for the first n rows; a view of the graph's output, valid until the next call."""
        n = x.shape[0]
        size = next(b for b in self.buckets if b >= n)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, gx, gt, gtc, out = self.graphs[size]
        gx[:n].copy_(x)
        gt[:n].copy_(t)
        gtc[:n].copy_(t_c)
        graph.replay()
        return out[:n]
