"""The server's side of the split: one model conditioned on (t, t_c) for every client.

Training merges the rows of many clients' messages into one optimiser step; denoising runs every
client's jobs through one continuous-batching sampler. The worker process and the in-process
simulation both drive this object.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from collafuse.common.config import DiffusionConfig, SamplerConfig, TrainConfig
from collafuse.common.cut import Cut
from collafuse.engine.collective import Collective
from collafuse.engine.compiled import CompileReport, Compiled, timed
from collafuse.engine.graphs import COMPILED_SMALLEST_BUCKET, Forward, GraphedForward
from collafuse.diffusion.models import build_unet
from collafuse.engine.optim import apply_loss
from collafuse.engine.sampler import BatchedSampler, SampleJob
from collafuse.diffusion.schedule import Scheduler
from collafuse.diffusion.split import ServerMessage, row_losses

SERVER_STREAM = 0


@dataclass
class TrainOutcome:
    """What one guarded optimiser step did with the messages it was given."""

    loss: float | None  # the applied step's (weighted) loss; None: nothing was applied
    refused: dict[int, str] = field(default_factory=dict)  # index of a message not applied → why
    applied_elsewhere: list[Any] = field(default_factory=list)  # tags of the messages other ranks applied in this step


def capped_shares(rows: dict[str, int], cap: float) -> dict[str, float]:
    """Each owner's share of a step: proportional to its rows, but none above `cap` (what a capped
    owner gives up goes to the others in proportion to theirs). With too few owners for the cap
    (owners × cap < 1) the shares stay proportional."""
    total = sum(rows.values())
    if len(rows) * cap < 1:
        return {o: n / total for o, n in rows.items()}
    capped: set[str] = set()
    while True:
        free = sum(n for o, n in rows.items() if o not in capped)
        shares = {o: cap if o in capped else (1 - cap * len(capped)) * n / free for o, n in rows.items()}
        over = {o for o, s in shares.items() if o not in capped and s > cap}
        if not over:
            return shares
        capped |= over


class ServerParty:
    def __init__(
        self,
        image_shape: tuple[int, int, int],
        model_preset: str = "tiny",
        diffusion: DiffusionConfig = DiffusionConfig(),
        train: TrainConfig = TrainConfig(),
        device: torch.device | str = "cpu",
        autocast_bf16: bool = False,
        seed: int = 0,
        cuda_graphs: bool = False,
        compile: bool = False,
        compile_train: bool = False,
        compile_static: bool = False,
    ) -> None:
        self.image_shape, self.train_config = image_shape, train
        self.scheduler = Scheduler(diffusion)
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same initial weights in a worker and in the simulation
            self.model = build_unet(model_preset, image_shape[-1], conditioned_on_cut=True, channels=image_shape[0]).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train.learning_rate)
        self.autocast_bf16 = autocast_bf16 and self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this server model is on {self.device}")
        self.cuda_graphs = cuda_graphs
        # Compiled (engine/compiled.py): the denoising forward (`compile`; one graph per batch size
        # with `compile_static`), the training forward and its backward (`compile_train`).
        self.compiled = compile
        self._compiled_eps = Compiled(self.eps, static=compile_static) if compile else None
        self._compiled_model = Compiled(self.model) if compile_train else None
        self._graphed: dict[int, GraphedForward] = {}
        self.step = 0
        self.rows_applied = 0  # rows in every step taken (all ranks of a group): a job applied twice shows here
        self.accepted_losses: deque[float] = deque(maxlen=256)  # recent accepted messages' losses, for the bound

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_bf16:
            # No cast cache: each weight is cast once per forward anyway, and a CUDA graph must
            # capture the casts so that it reads the current weights at every replay.
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def loss_bound(self) -> float:
        """Messages whose loss is beyond this are refused (TrainConfig's floor and factor)."""
        cfg = self.train_config
        recent = statistics.median(self.accepted_losses) if self.accepted_losses else 0.0
        return max(cfg.loss_bound_floor, cfg.loss_bound_factor * recent)

    def train_step(self, messages: list[ServerMessage], owners: list[str] | None = None, group: Collective | None = None,
                   tags: list[Any] | None = None) -> TrainOutcome:
        """One guarded optimiser step over the rows of the given messages (any clients, any t_c).
        A message whose loss is not finite or beyond `loss_bound()` is refused; each owner (client)
        weighs at most `max_client_share` of the step; a non-finite gradient refuses the whole step.

        With a `group` (data-parallel ranks, each with its own messages, possibly none), the
        accepted messages' owners, sizes and losses are shared, so that every rank weighs rows as
        one trainer with the union would, and the gradients are summed: the ranks step as one.
        `tags` (msgpack-able, one per message) travel along; the outcome lists the other ranks'."""
        self.model.train()
        try:
            return self._train_step(messages, owners, group, tags)
        finally:
            self.model.eval()  # denoising always sees eval mode (a compiled forward is specialised to one)

    def _train_step(self, messages: list[ServerMessage], owners: list[str] | None, group: Collective | None,
                    tags: list[Any] | None) -> TrainOutcome:
        owners = owners or ["" for _ in messages]
        tags = tags or [None for _ in messages]
        sizes = [m.t.shape[0] for m in messages]
        per_row = self._row_losses(messages) if messages else None
        message_loss = torch.stack([chunk.mean() for chunk in per_row.detach().split(sizes)]).tolist() if per_row is not None else []
        bound = self.loss_bound()
        refused = {i: f"loss {v:.3g} of these rows is beyond the trainer's bound {bound:.3g}" if v == v else "loss is not finite"
                   for i, v in enumerate(message_loss) if not (v <= bound)}
        kept = [i for i in range(len(messages)) if i not in refused]
        table = [[owners[i], sizes[i], message_loss[i], tags[i]] for i in kept]
        tables = [table] if group is None else [msgpack.unpackb(b, raw=False) for b in group.gather_bytes(msgpack.packb(table))]
        everyone = [row for t in tables for row in t]  # rank order: the union as one trainer would hold it
        if not everyone:
            return TrainOutcome(None, refused)
        if refused and kept:  # a refused row must not even be in the graph: 0 × NaN is NaN in the backward pass
            per_row = self._row_losses([messages[i] for i in kept])
        rows: dict[str, int] = {}
        for owner, size, _, _ in everyone:
            rows[owner] = rows.get(owner, 0) + size
        shares = capped_shares(rows, self.train_config.max_client_share)
        loss = None
        if kept:
            assert per_row is not None
            weights = torch.cat([torch.full((sizes[i],), shares[owners[i]] / rows[owners[i]]) for i in kept])
            loss = (per_row * weights.to(per_row.device)).sum()
        value = apply_loss(self.model, self.optimizer, loss, self.train_config.grad_clip, group.sum_ if group is not None else None)
        if value is None:
            return TrainOutcome(None, {i: "the step's gradient was not finite" for i in range(len(messages))})
        self.step += 1
        self.rows_applied += sum(row[1] for row in everyone)
        self.accepted_losses.extend(row[2] for row in everyone)
        others = [row[3] for rank, t in enumerate(tables) if group is not None and rank != group.rank for row in t]
        return TrainOutcome(value, refused, others)

    def _row_losses(self, messages: list[ServerMessage]) -> torch.Tensor:
        merged = ServerMessage(
            torch.cat([m.x_t for m in messages]).to(self.device),
            torch.cat([m.t for m in messages]),
            torch.cat([m.t_c for m in messages]),
            torch.cat([m.eps for m in messages]).to(self.device),
        )
        model = self._compiled_model or self.model
        with self._autocast():
            return row_losses(model, merged).float()

    def eps(self, x: torch.Tensor, t: torch.Tensor, t_c: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(x, t, class_labels=t_c).sample

    def _denoise_forward(self, x: torch.Tensor, t: torch.Tensor, t_c: torch.Tensor) -> torch.Tensor:
        return (self._compiled_eps or self.eps)(x, t, t_c)

    def denoiser(self, max_batch: int) -> Forward:
        """The forward that sampling calls: eager or compiled, or either replayed as CUDA graphs
        (`cuda_graphs`; a compiled forward's buckets start at COMPILED_SMALLEST_BUCKET rows)."""
        if not self.cuda_graphs:
            return self._denoise_forward
        if max_batch not in self._graphed:
            smallest = COMPILED_SMALLEST_BUCKET if self.compiled else 1
            self._graphed[max_batch] = GraphedForward(self._denoise_forward, self.image_shape, max_batch, self.device, smallest)
        return self._graphed[max_batch]

    def uncompile(self) -> None:
        """Serve and train eagerly from now on (a compilation failed); drops the graphs captured so far."""
        self.compiled = False
        self._compiled_eps = self._compiled_model = None
        self._graphed.clear()

    def warm_up(self, max_batch: int, train_rows: int = 0) -> list[CompileReport]:
        """Compile and capture now what serving will run (every denoising bucket; with `train_rows`,
        the training forward and backward for up to that many rows), so that no job waits minutes for
        it and a serving loop never stalls its heartbeats; after, a shape not compiled runs eagerly.
        The dummy training pass's gradients are discarded: the weights are unchanged."""
        reports = []
        compiled = [c for c in (self._compiled_eps, self._compiled_model) if c is not None]
        for c in compiled:
            c.settle(False)
        self.model.eval()
        if self.cuda_graphs:
            graphed = self.denoiser(max_batch)
            assert isinstance(graphed, GraphedForward)
            compiled_buckets = self.compiled and graphed.buckets[-1] > 1  # batch 1 is never compiled
            what = f"denoising forward{' compiled' if compiled_buckets else ''}, CUDA graphs for batches {graphed.buckets}"
            reports.append(timed(what, graphed.warm, self.device))
        elif self._compiled_eps is not None and max_batch > 1:
            reports.append(timed("denoising forward compiled", lambda: self._warm_denoising(max_batch), self.device))
        if train_rows and self._compiled_model is not None:
            reports.append(timed(f"training forward and backward compiled, up to {train_rows} rows", lambda: self._warm_training(train_rows),
                                 self.device))
        for c in compiled:
            c.settle()
        return reports

    @torch.no_grad()
    def _warm_denoising(self, max_batch: int) -> None:
        for n in sorted({2, max_batch}):
            t = torch.ones(n, dtype=torch.int64, device=self.device)
            self._denoise_forward(torch.zeros((n, *self.image_shape), device=self.device), t, t - 1)

    def _warm_training(self, train_rows: int) -> None:
        self.model.train()
        try:
            for n in sorted({2, max(2, train_rows)}):
                t = torch.ones(n, dtype=torch.int64)
                self._row_losses([ServerMessage(torch.zeros((n, *self.image_shape)), t, t - 1, torch.zeros((n, *self.image_shape)))]).sum().backward()
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.eval()

    def sampler(self, max_batch: int) -> BatchedSampler:
        self.model.eval()
        return BatchedSampler(self.denoiser(max_batch), self.scheduler, self.image_shape, max_batch, self.device)

    def denoise_job(self, job_id: str, count: int, cut: Cut, seed: int, sampler: SamplerConfig, first_row: int = 0) -> SampleJob:
        """The server's part of a generation: x_T ~ N(0, I) from the seed, down to x_{t_c}."""
        levels = self.scheduler.levels
        if not cut.uses_server or cut.levels != levels:
            raise ValueError(f"server denoising needs a cut below T = {levels}, got t_c = {cut.t_c} of T = {cut.levels}")
        share, eta = self.scheduler.share(sampler, levels, cut.t_c)
        return SampleJob(job_id, count, levels, cut.t_c, seed, share, eta, stream=SERVER_STREAM, first_row=first_row)
