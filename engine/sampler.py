"""Continuous, step-level batched sampling (DESIGN.md §4), used by the worker and by the client.

A pool of active rows, each with its own level, base (t_c for the server, 0 for a client), path and
job. Every iteration admits queued rows up to `max_batch`, makes one model call over the pool,
advances each row by one step, and retires the rows that reached their base; a job is returned as
soon as its last row retires. Noise is counter-based (core.noise), so a row's result does not
depend on which other rows shared its batches.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from collafuse.engine.graphs import Forward
from collafuse.diffusion.noise import row_keys, row_noise
from collafuse.diffusion.schedule import Scheduler

_STREAM_START, _STREAM_STEP = 1, 2


@dataclass
class SampleJob:
    """`count` images walked from level `start` down to level `base`."""

    job_id: str
    count: int
    start: int
    base: int
    seed: int
    ddim_share: int | None = None  # this party's share of the DDIM steps (about k jumps); None: ancestral over every level
    eta: float = 1.0
    x_start: torch.Tensor | None = None  # None: x_start ~ N(0, I) from the job's counter noise
    stream: int = 0  # separates the server's and the client's noise for the same seed
    first_row: int = 0  # rows are keyed by first_row + index, so splitting a request into jobs changes nothing
    path: list[int] = field(init=False, default_factory=list)  # the levels visited, set by the sampler
    result: torch.Tensor | None = field(init=False, default=None)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = self.count


@dataclass
class _Row:
    job: SampleJob
    index: int  # row index within its job
    pos: int  # index into job.path of the row's current level


@dataclass
class _Transfer:
    """Retired rows on their way to host memory. On a GPU the copy runs behind the next model call
    (pinned memory, an event), so that returning results never makes the host wait for the device."""

    x: torch.Tensor
    rows: list[_Row]
    copied: torch.cuda.Event | None  # None: already on the host

    def ready(self) -> bool:
        return self.copied is None or self.copied.query()


class BatchedSampler:
    def __init__(
        self,
        eps_fn: Forward,  # (x_t, t, base) → ε̂_base, the noise relative to x_base
        scheduler: Scheduler,
        image_shape: tuple[int, int, int],
        max_batch: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.eps_fn, self.scheduler, self.image_shape = eps_fn, scheduler, image_shape
        self.max_batch, self.device = max_batch, torch.device(device)
        self.queue: deque[tuple[SampleJob, int]] = deque()  # (job, next row index to admit)
        self.rows: list[_Row] = []
        self.x = torch.empty((0, *image_shape), device=self.device)
        self.keys = torch.empty((0,), dtype=torch.int64, device=self.device)  # row_keys of each row
        self.streams = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.bases = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.etas = torch.empty((0,), dtype=torch.float64, device=self.device)
        self.transfers: deque[_Transfer] = deque()
        self.iterations = 0
        self.rows_processed = 0

    @property
    def active_rows(self) -> int:
        return len(self.rows)

    @property
    def queued_rows(self) -> int:
        return sum(job.count - nxt for job, nxt in self.queue)

    def idle(self) -> bool:
        return not self.rows and not self.queue and not self.transfers

    def submit(self, job: SampleJob) -> list[SampleJob]:
        """Queue a job; a job with nothing to do (start == base) is returned finished at once."""
        if job.x_start is not None and tuple(job.x_start.shape) != (job.count, *self.image_shape):
            raise ValueError(f"x_start has shape {tuple(job.x_start.shape)}, expected {(job.count, *self.image_shape)}")
        job.path = self.scheduler.timesteps(job.start, job.base, job.ddim_share)
        if len(job.path) == 1:
            job.result = (job.x_start if job.x_start is not None else self._start_noise(job, 0, job.count)).cpu()
            return [job]
        job.result = torch.empty((job.count, *self.image_shape))
        self.queue.append((job, 0))
        return []

    def _start_noise(self, job: SampleJob, first: int, n: int) -> torch.Tensor:
        keys = row_keys(job.seed, job.first_row + first, n, self.device)
        level = torch.full((n,), job.start, dtype=torch.int64, device=self.device)
        return row_noise(keys, level, self.image_shape, stream=job.stream * 4 + _STREAM_START)

    def _admit(self) -> None:
        free = self.max_batch - len(self.rows)
        new_x, new_keys, new_streams, new_bases, new_etas = [], [], [], [], []
        while free > 0 and self.queue:
            job, nxt = self.queue.popleft()
            n = min(free, job.count - nxt)
            if job.x_start is not None:
                new_x.append(job.x_start[nxt : nxt + n].to(self.device, torch.float32))
            else:
                new_x.append(self._start_noise(job, nxt, n))
            new_keys.append(row_keys(job.seed, job.first_row + nxt, n, self.device))
            new_streams.append(torch.full((n,), job.stream * 4 + _STREAM_STEP, dtype=torch.int64, device=self.device))
            new_bases.append(torch.full((n,), job.base, dtype=torch.int64, device=self.device))
            new_etas.append(torch.full((n,), job.eta, dtype=torch.float64, device=self.device))
            self.rows.extend(_Row(job, nxt + i, 0) for i in range(n))
            free -= n
            if nxt + n < job.count:
                self.queue.appendleft((job, nxt + n))
        if new_x:
            self.x = torch.cat([self.x, *new_x])
            self.keys = torch.cat([self.keys, *new_keys])
            self.streams = torch.cat([self.streams, *new_streams])
            self.bases = torch.cat([self.bases, *new_bases])
            self.etas = torch.cat([self.etas, *new_etas])

    def _upload(self, values: list) -> torch.Tensor:
        """Host integers as a device tensor, copied without waiting for the device: on a GPU through
        pinned memory, since a copy from pageable memory may wait for the stream to drain (the GPU's
        queue would empty once per iteration, and the host's bookkeeping would show as idle GPU)."""
        return torch.tensor(values, dtype=torch.int64, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

    def _keep(self, keep: list[int]) -> None:
        index = self._upload(keep)
        self.rows = [self.rows[i] for i in keep]
        self.x, self.keys, self.streams = self.x[index], self.keys[index], self.streams[index]
        self.bases, self.etas = self.bases[index], self.etas[index]

    @torch.no_grad()
    def iterate(self) -> list[SampleJob]:
        """Admit, one model call over the pool, advance every row, retire; return finished jobs."""
        finished = self._deliver(wait=False)
        self._admit()
        if not self.rows:
            return finished + self._deliver(wait=True)  # nothing left to overlap the copies with
        t, s = self._upload([[r.job.path[r.pos] for r in self.rows], [r.job.path[r.pos + 1] for r in self.rows]])  # one small copy
        if any(r.job.eta > 0 for r in self.rows):
            noise = row_noise(self.keys, s, self.image_shape, stream=self.streams)
        else:
            noise = torch.zeros_like(self.x)
        eps = self.eps_fn(self.x, t, self.bases).float()
        self.x = self.scheduler.step(eps, t, s, self.x, self.bases, self.etas, noise)
        self.iterations += 1
        self.rows_processed += len(self.rows)

        keep, retire = [], []
        for i, row in enumerate(self.rows):
            row.pos += 1
            (retire if row.pos == len(row.job.path) - 1 else keep).append(i)
        if retire:
            self._send_home(retire)
            self._keep(keep)
        return finished + self._deliver(wait=False)

    def _send_home(self, retire: list[int]) -> None:
        x = self.x[self._upload(retire)]
        copied = None
        if x.device.type == "cuda":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            x = host
        self.transfers.append(_Transfer(x, [self.rows[i] for i in retire], copied))

    def _deliver(self, wait: bool) -> list[SampleJob]:
        """Write arrived rows into their jobs (in order of retirement); the jobs now complete."""
        finished: list[SampleJob] = []
        while self.transfers and (wait or self.transfers[0].ready()):
            transfer = self.transfers.popleft()
            if transfer.copied is not None:
                transfer.copied.synchronize()
            for x, row in zip(transfer.x, transfer.rows):
                job = row.job
                assert job.result is not None
                job.result[row.index] = x
                job.remaining -= 1
                if job.remaining == 0:
                    finished.append(job)
        return finished

    def run(self, jobs: list[SampleJob]) -> dict[str, torch.Tensor]:
        """Submit jobs and iterate until all are done (the in-process path)."""
        done: dict[str, torch.Tensor] = {}
        for job in jobs:
            for j in self.submit(job):
                done[j.job_id] = j.result  # type: ignore[assignment]
        while not self.idle():
            for j in self.iterate():
                done[j.job_id] = j.result  # type: ignore[assignment]
        return done
