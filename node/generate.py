"""`collafuse-node generate`: the server's part through the broker, the local finish, PNG files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from collafuse.common.config import NodeConfig, SamplerConfig
from collafuse.engine.checkpoint import load_checkpoint
from collafuse.common.energy import PhaseEnergy
from collafuse.node.join import checkpoint_path, connect, make_party
from collafuse.protocol import tensors, wire
from collafuse.datasets.images import save_grid, save_pngs


def server_part(config: NodeConfig, party, count: int, seed: int, sampler: SamplerConfig, timeout: float) -> torch.Tensor:
    """x_{t_c} for `count` images, in jobs no larger than the broker allows."""
    link = connect(config, party)
    try:
        assert link.welcome is not None
        chunk = int(link.welcome["max_rows"])
        steps = sampler.ddim_steps
        pieces: dict[int, torch.Tensor] = {}
        firsts: dict[str, int] = {}
        for first in range(0, count, chunk):
            n = min(chunk, count - first)
            job = f"{config.name}-gen-{seed}-{first}-{time.time_ns()}"
            env = wire.encode(
                "denoise", job=job, client=config.name, count=n, t_c=party.cut.t_c, seed=seed, first_row=first,
                sampler=sampler.kind, steps=steps, eta=sampler.eta,
            )
            link.submit(job, "denoise", [env])
            firsts[job] = first
        deadline = time.monotonic() + timeout
        while link.outstanding:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(link.outstanding)} denoise jobs unanswered after {timeout:.0f} s")
            for reply in link.poll(0.2):
                if reply.env["type"] == "error":
                    raise RuntimeError(f"server refused job {reply.env['job']}: {reply.env['code']}: {reply.env['reason']}")
                spec = wire.tensor_spec(reply.env, party.image_shape)
                x = tensors.decode(reply.blob.buffer, spec, config.limits.max_frame_bytes)["x"]
                pieces[firsts[reply.env["job"]]] = torch.from_numpy(x.copy())
        return torch.cat([pieces[k] for k in sorted(pieces)])
    finally:
        link.close()


def run_generate(config: NodeConfig, count: int, out: Path, seed: int, sampler: SamplerConfig, timeout: float = NodeConfig.server_timeout) -> dict:
    shape = (1, config.data.image_size, config.data.image_size)  # the readers give grayscale images
    party = make_party(config, torch.empty((0, *shape)))
    if party.model is not None:
        path = checkpoint_path(config)
        if not path.is_file():
            raise FileNotFoundError(f"no local model at {path}: run `collafuse-node join` first")
        load_checkpoint(path, party.model, None, party.device)
    started = time.monotonic()
    x_tc = server_part(config, party, count, seed, sampler, timeout) if party.cut.uses_server else None
    server_seconds = time.monotonic() - started
    energy = PhaseEnergy()
    with energy.phase("local_denoising"):
        images = party.finish(x_tc, count, seed, sampler)
    report = energy.stop()
    out.mkdir(parents=True, exist_ok=True)
    save_pngs(images, out)
    save_grid([images[i : i + 8] for i in range(0, count, 8)], out / "grid.png")
    tensors_out = {"images": images.contiguous()}
    if x_tc is not None:
        tensors_out["x_tc"] = x_tc.contiguous()
    save_file(tensors_out, str(out / "samples.safetensors"))
    info = {"count": count, "t_c": party.cut.t_c, "server_seconds": round(server_seconds, 2),
            "total_seconds": round(time.monotonic() - started, 2), "energy": report}
    (out / "generate.json").write_text(json.dumps(info, indent=2))
    return info
