"""The server model compiled with inductor (`torch.compile`), and where its artifacts are kept.

Eager, the U-Net's many small kernels leave most of a GPU idle; inductor fuses them (the `paper`
U-Net's forward 1.9–2.0 × faster at batch 64–256 on an H200, BENCHMARKS.md). Compilation is slow
(about 50 s per graph on a GPU machine, more on a small CPU), so it happens once, at start, for
every shape that will be served, and its artifacts (FX graphs, AOT-autograd graphs, Triton kernels)
persist in a cache folder: a restarted worker reuses them and starts in seconds. The batch dimension is compiled dynamic, so a few graphs serve every
bucket and every training batch; batch 1 is a shape of its own (dynamo specialises sizes 0 and 1),
which the buckets avoid and which runs eagerly.

The parameters stay inputs of the compiled graphs (no freezing): optimiser steps and relayed weights,
written in place, take effect at the next call or CUDA-graph replay.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor keeps its caches here, Triton's kernels in its triton/ subfolder


def use_cache(folder: str) -> Path:
    """Keep the compiled artifacts in `folder` ('' = torch's default, a folder under the system's
    temporary directory). Must be called before the first compilation in this process."""
    if folder:
        os.environ[CACHE_ENV] = str(Path(folder).expanduser().resolve())
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


class Compiled:
    """`fn` (whose tensor arguments are batches) compiled by inductor in its default mode (no CUDA
    graphs of its own: the buckets capture them), the batch dimension dynamic. Batch 1 runs eagerly.
    Until `settle()`, a batch size no graph covers yet is compiled (dynamo re-specialises at some sizes,
    e.g. below and above 16 rows); after, it runs eagerly: a worker compiles while it warms up, never
    for minutes inside its serving loop."""

    def __init__(self, fn: Callable, static: bool = False) -> None:
        """`static`: one graph per batch size instead (the batch dimension not marked dynamic), an
        experiment for `bench raw --static`: whether kernels specialised to a batch run faster."""
        self.fn = fn
        self.static = static
        self.compiled = torch.compile(fn, dynamic=False) if static else torch.compile(fn)
        self.stance = "default"

    def settle(self, settled: bool = True) -> None:
        """Settled, a batch size no graph covers runs eagerly; unsettled, it is compiled."""
        self.stance = "eager_on_recompile" if settled else "default"

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if x.shape[0] < 2:
            return self.fn(x, *args, **kwargs)
        for a in (x, *args, *kwargs.values()) if not self.static else ():  # the batch dimension only: the image's stay static
            if isinstance(a, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(a, 0)
        with torch.compiler.set_stance(self.stance):
            return self.compiled(x, *args, **kwargs)


@dataclass
class CompileReport:
    """What warming up compiled, how long it took, and how much came from the cache."""

    what: str
    seconds: float
    cache_hits: int
    cache_misses: int

    def line(self) -> str:
        if not self.cache_hits and not self.cache_misses:
            return f"{self.what}: {self.seconds:.1f} s"
        warm = "warm" if not self.cache_misses else "cold" if not self.cache_hits else "partly cached"
        return f"{self.what}: {self.seconds:.1f} s ({warm}: {self.cache_hits} graphs from the cache, {self.cache_misses} compiled now)"


def _cache_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"]


def timed(what: str, work: Callable[[], None], device: torch.device) -> CompileReport:
    """Run `work` (which compiles) and report its time and the FX-graph cache's hits and misses."""
    hits, misses = _cache_counts()
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    after_hits, after_misses = _cache_counts()
    return CompileReport(what, time.perf_counter() - start, after_hits - hits, after_misses - misses)
