"""The server's side of the split: one model conditioned on (t, t_c) for every client.

Training merges the rows of many clients' messages into one optimiser step; denoising runs every
client's jobs through one continuous-batching sampler. The worker process and the in-process
simulation both drive this object.
"""

from __future__ import annotations

import contextlib

import torch

from collafuse.common.config import DiffusionConfig, SamplerConfig, TrainConfig
from collafuse.engine.graphs import Forward, GraphedForward
from collafuse.diffusion.models import build_unet
from collafuse.engine.optim import apply_loss
from collafuse.engine.sampler import BatchedSampler, SampleJob
from collafuse.diffusion.schedule import Scheduler
from collafuse.diffusion.split import ServerMessage, server_loss

SERVER_STREAM = 0


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
        self._graphed: dict[int, GraphedForward] = {}
        self.step = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_bf16:
            # No cast cache: each weight is cast once per forward anyway, and a CUDA graph must
            # capture the casts so that it reads the current weights at every replay.
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def train_step(self, messages: list[ServerMessage]) -> float:
        """One optimiser step over the rows of all given messages (from any clients, any t_c)."""
        merged = ServerMessage(
            torch.cat([m.x_t for m in messages]).to(self.device),
            torch.cat([m.t for m in messages]),
            torch.cat([m.t_c for m in messages]),
            torch.cat([m.eps for m in messages]).to(self.device),
        )
        self.model.train()
        with self._autocast():
            loss = server_loss(self.model, merged)
        self.step += 1
        return apply_loss(self.model, self.optimizer, loss, self.train_config.grad_clip)

    def eps(self, x: torch.Tensor, t: torch.Tensor, t_c: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(x, t, class_labels=t_c).sample

    def denoiser(self, max_batch: int) -> Forward:
        """The forward that sampling calls: eager, or replayed CUDA graphs (`cuda_graphs`)."""
        if not self.cuda_graphs:
            return self.eps
        if max_batch not in self._graphed:
            self._graphed[max_batch] = GraphedForward(self.eps, self.image_shape, max_batch, self.device)
        return self._graphed[max_batch]

    def sampler(self, max_batch: int) -> BatchedSampler:
        self.model.eval()
        return BatchedSampler(self.denoiser(max_batch), self.scheduler, self.image_shape, max_batch, self.device)

    def denoise_job(self, job_id: str, count: int, t_c: int, seed: int, sampler: SamplerConfig, first_row: int = 0) -> SampleJob:
        """The server's part of a generation: x_T ~ N(0, I) from the seed, down to x_{t_c}."""
        levels = self.scheduler.levels
        if not 0 <= t_c < levels:
            raise ValueError(f"server denoising needs 0 <= t_c < {levels}, got {t_c}")
        steps, eta = self.scheduler.share(sampler, levels, t_c)
        return SampleJob(job_id, count, levels, t_c, seed, steps, eta, stream=SERVER_STREAM, first_row=first_row)
