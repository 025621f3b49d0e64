"""One client's side of the split: local model on levels 1..t_c, server messages, the finish.

The same object serves the in-process simulation and `collafuse-node`, so both run the same math.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

import torch

from collafuse.common.config import DiffusionConfig, SamplerConfig, TrainConfig
from collafuse.diffusion.cutnoise import CutNoise, image_ids
from collafuse.diffusion.models import build_unet
from collafuse.engine.optim import apply_loss
from collafuse.engine.sampler import BatchedSampler, SampleJob
from collafuse.diffusion.schedule import Scheduler
from collafuse.diffusion.split import ServerMessage, client_loss, cut_image, server_message

CLIENT_STREAM = 1  # the client's sampler noise, distinct from the server's (stream 0)


def client_seed(seed: int, index: int) -> int:
    """Client `index`'s seed (model init, batches, local noising, t and ε₂): the same in a node and
    in the simulation. Never the source of ε₁ (core.cutnoise)."""
    return seed * 1000 + index + 1


def _message_seed(seed: int) -> int:
    """The seed of the generator that draws t and ε₂, apart from the local training's stream."""
    return int.from_bytes(hashlib.sha256(b"collafuse/messages" + seed.to_bytes(8, "little")).digest()[:8], "little") >> 1


@dataclass
class Batch:
    index: torch.Tensor  # [B] int64: rows of the party's data
    x0: torch.Tensor  # [B, C, H, W] on the party's device


class ClientParty:
    def __init__(
        self,
        name: str,
        cut_ratio: float,
        data: torch.Tensor,
        model_preset: str = "tiny",
        diffusion: DiffusionConfig = DiffusionConfig(),
        train: TrainConfig = TrainConfig(),
        device: torch.device | str = "cpu",
        seed: int = 0,
        cut_noise: CutNoise | None = None,
        record_rows: bool = False,
    ) -> None:
        self.name, self.train_config = name, train
        self.scheduler = Scheduler(diffusion)
        self.cut = diffusion.cut(cut_ratio)
        self.device = torch.device(device)
        self.data = data
        self.image_shape: tuple[int, int, int] = tuple(data.shape[1:])  # type: ignore[assignment]
        self.generator = torch.Generator().manual_seed(seed)  # batches and local training
        self.message_generator = torch.Generator().manual_seed(_message_seed(seed))  # t and ε₂
        self.cut_noise = cut_noise
        self.ids = image_ids(data) if self.cut.uses_server and cut_noise is not None else []
        self.rows_sent = 0  # message rows so far: the row number `fresh` cut noise mixes in
        self.sent_rows: array | None = array("q") if record_rows else None  # data row of each message row, for the audit
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if self.cut.local_model:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the same initial weights in a node and in the simulation
                self.model = build_unet(model_preset, self.image_shape[-1], conditioned_on_cut=False, channels=self.image_shape[0]).to(self.device)
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train.learning_rate)
        self.step = 0

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Where the party's two random streams stand (batches and local noise; t and ε₂), for a
        checkpoint: a resumed node continues them instead of replaying them from the start."""
        return {"batch": self.generator.get_state(), "message": self.message_generator.get_state()}

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["batch"])
        self.message_generator.set_state(state["message"])

    def batch(self) -> Batch:
        index = torch.randint(0, self.data.shape[0], (self.train_config.batch_size,), generator=self.generator)
        return Batch(index, self.data[index].to(self.device))

    def train_local(self, x0: torch.Tensor) -> float:
        """One optimiser step of the local model on levels 1..t_c."""
        assert self.model is not None and self.optimizer is not None
        self.model.train()
        loss = client_loss(self.model, self.scheduler, x0, self.cut, self.generator)
        self.step += 1
        value = apply_loss(self.model, self.optimizer, loss, self.train_config.grad_clip)
        if value is None:
            raise FloatingPointError(f"client {self.name}: non-finite gradient in the local step (the model was left unchanged)")
        return value

    def server_message(self, batch: Batch) -> ServerMessage:
        """The privacy-correct training message for the server: x₀ → x_{t_c} with the secret cut
        noise ε₁ (one per image), then x_{t_c} → x_t with ε₂ from the message generator."""
        if self.cut_noise is None:
            raise ValueError(f"client {self.name} talks to the server and needs its secret cut noise")
        rows = batch.index.tolist()
        eps1 = self.cut_noise([self.ids[i] for i in rows], range(self.rows_sent, self.rows_sent + len(rows)), self.image_shape)
        x_tc = cut_image(self.scheduler, batch.x0.cpu(), self.cut, eps1)
        self.rows_sent += len(rows)
        if self.sent_rows is not None:
            self.sent_rows.extend(rows)
        return server_message(self.scheduler, x_tc, self.cut, self.message_generator)

    def finish_job(self, job_id: str, count: int, seed: int, sampler: SamplerConfig, x_tc: torch.Tensor | None) -> SampleJob:
        """The client's sampler job: from the server's x_{t_c} (or from noise at T when c = 1) to 0."""
        start = self.cut.t_c
        if not self.cut.uses_server:
            x_tc = None  # c = 1: the client samples alone from x_T
        elif x_tc is None:
            raise ValueError(f"client {self.name} with t_c = {start} needs the server's x_t_c to finish")
        share, eta = self.scheduler.share(sampler, start, 0)
        return SampleJob(job_id, count, start, 0, seed, share, eta, x_start=x_tc, stream=CLIENT_STREAM)

    @torch.no_grad()
    def finish(self, x_tc: torch.Tensor | None, count: int, seed: int, sampler: SamplerConfig, max_batch: int = 256) -> torch.Tensor:
        """Images in [-1, 1]: the local finish of a generation."""
        job = self.finish_job("finish", count, seed, sampler, x_tc)
        if not self.cut.local_model:
            assert x_tc is not None
            return x_tc.clamp(-1, 1)
        assert self.model is not None
        self.model.eval()
        model = self.model
        engine = BatchedSampler(lambda x, t, base: model(x, t).sample, self.scheduler, self.image_shape, max_batch, self.device)
        return engine.run([job])["finish"].clamp(-1, 1)
