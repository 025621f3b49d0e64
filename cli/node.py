"""`collafuse-node`: the edge client. `join` trains; `generate` makes images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from collafuse.cli.options import HB_INTERVAL, HB_LIVENESS, INSECURE, KEYS, LEVELS, fail, key_folder

app = typer.Typer(
    help="CollaFuse edge node: keeps its private data and its local model, and sends the server only "
    "images noised past its cut level t_c = round(c*T).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

BROKER = typer.Option("tcp://127.0.0.1:5555", "--broker", help="The broker's frontend address.")
NAME = typer.Option(..., "--name", help="This node's client name (unique per broker).")
CUT = typer.Option(0.6, "--cut-ratio", min=0.0, max=1.0, help="c in [0,1]: this node owns levels 1..round(c*T); 1 = purely local, 0 = no local model.")
DATA = typer.Option("mni", "--data", help="'mni' (embedded MNI152 slices), 'brats:PATH' or 'images:PATH'.")
SHARD = typer.Option(0, "--shard", min=0, help="Which client shard of the data this node holds (0-based).")
SHARDS = typer.Option(3, "--shards", min=1, help="Into how many client shards the data is split.")
SIZE = typer.Option(32, "--image-size", help="32, 64 or 128; must match the server model.")
MODEL = typer.Option("tiny", "--model", help="Local U-Net preset: tiny, paper or large.")
STATE = typer.Option("", "--state", help="Folder for the local checkpoint and progress.json (default ./collafuse-node-NAME).")
SEED = typer.Option(0, "--seed", help="Seed for the data shards and this node's training.")
DEVICE = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda:N'.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log connection events.")) -> None:
    """CollaFuse edge node."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _config(**kw):
    from collafuse.common.config import DataConfig, HeartbeatConfig, NodeConfig, ProtocolLimits, TrainConfig

    heartbeat = HeartbeatConfig(kw.pop("heartbeat_interval", 1.0), kw.pop("heartbeat_liveness", 10))
    data = DataConfig(spec=kw.pop("data"), image_size=kw.pop("image_size"), seed=kw["seed"], clients=kw["shards"])
    train = TrainConfig(batch_size=kw.pop("batch_size", 32), learning_rate=kw.pop("lr", 1e-3))
    limits = ProtocolLimits(levels=kw.pop("levels"))
    return NodeConfig(data=data, train=train, limits=limits, heartbeat=heartbeat, **kw)


@app.command()
def join(
    broker: str = BROKER,
    name: str = NAME,
    cut_ratio: float = CUT,
    data: str = DATA,
    shard: int = SHARD,
    shards: int = SHARDS,
    image_size: int = SIZE,
    model: str = MODEL,
    state: str = STATE,
    steps: int = typer.Option(600, "--steps", min=1, help="Local training steps to reach (a resumed node continues)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate of the local model."),
    window: int = typer.Option(4, "--window", min=1, help="Train jobs in flight at most; a step that finds the window full sends nothing."),
    lockstep: bool = typer.Option(False, "--lockstep", help="Wait for room in the window instead of skipping (reproducible runs)."),
    cut_noise: str = typer.Option(
        "keyed", "--cut-noise",
        help="How the noise that hides an image at the cut (ε₁) is drawn. 'keyed' (default): one secret draw per image, "
        "from this node's 256-bit secret (STATE/secret.key, never sent), so the server sees each image's x_t_c once however "
        "often it is sent. 'fresh': a new draw in every message, for comparison only: the server gets one noisy view of an "
        "image per message and can link and average them (see `collafuse audit`)."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=1, help="Steps between local checkpoints."),
    seed: int = SEED,
    device: str = DEVICE,
    levels: int = LEVELS,
    heartbeat_interval: float = HB_INTERVAL,
    heartbeat_liveness: int = HB_LIVENESS,
    keys: Optional[Path] = KEYS,
    insecure: bool = INSECURE,
) -> None:
    """Train the local model on levels 1..t_c and stream server-training messages to the broker."""
    from collafuse.datasets import DataError
    from collafuse.node.join import Join
    from collafuse.protocol.link import BrokerRefused
    from collafuse.protocol.security import KeyFolderError

    try:
        cfg = _config(broker=broker, name=name, cut_ratio=cut_ratio, data=data, shard=shard, shards=shards, image_size=image_size,
                      model=model, state=state, steps=steps, batch_size=batch_size, lr=lr, window=window, cut_noise=cut_noise,
                      checkpoint_every=checkpoint_every, seed=seed, device=device, levels=levels,
                      heartbeat_interval=heartbeat_interval, heartbeat_liveness=heartbeat_liveness, keys=key_folder(keys, insecure))
        runner = Join(cfg, lockstep=lockstep)
        runner.install_signal_handlers()
        figures = runner.run()
    except (DataError, ValueError, FileNotFoundError, TimeoutError, BrokerRefused, KeyFolderError) as exc:
        fail(str(exc))
    typer.echo(
        f"{name}: t_c={runner.party.t_c}, sent {figures['sent']} train jobs, {figures['acked']} acknowledged, "
        f"{figures['skipped']} skipped (window full); checkpoint in {cfg.state_dir}/"
    )


@app.command()
def generate(
    n: int = typer.Option(64, "--n", min=1, help="Number of images."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG files, grid.png and samples.safetensors."),
    broker: str = BROKER,
    name: str = NAME,
    cut_ratio: float = CUT,
    image_size: int = SIZE,
    model: str = MODEL,
    state: str = STATE,
    shard: int = SHARD,
    shards: int = SHARDS,
    sampler: str = typer.Option("ancestral", "--sampler", help="'ancestral' (every level) or 'ddim'."),
    ddim_steps: int = typer.Option(20, "--ddim-steps", min=1, help="Total DDIM steps over T..0, shared in proportion to the levels each side owns."),
    seed: int = typer.Option(1234, "--seed", help="Sampling seed: the same seed gives the same images."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the server's part."),
    device: str = DEVICE,
    levels: int = LEVELS,
    heartbeat_interval: float = HB_INTERVAL,
    heartbeat_liveness: int = HB_LIVENESS,
    keys: Optional[Path] = KEYS,
    insecure: bool = INSECURE,
) -> None:
    """Generate images: the server denoises T -> t_c through the broker, this node finishes t_c -> 0."""
    from collafuse.common.config import SamplerConfig
    from collafuse.node.generate import run_generate
    from collafuse.protocol.link import BrokerRefused
    from collafuse.protocol.security import KeyFolderError

    try:
        cfg = _config(broker=broker, name=name, cut_ratio=cut_ratio, data="mni", shard=shard, shards=shards, image_size=image_size,
                      model=model, state=state, seed=0, device=device, levels=levels,
                      heartbeat_interval=heartbeat_interval, heartbeat_liveness=heartbeat_liveness, keys=key_folder(keys, insecure))
        info = run_generate(cfg, n, out, seed, SamplerConfig(kind=sampler, ddim_steps=ddim_steps))
    except (ValueError, FileNotFoundError, TimeoutError, RuntimeError, BrokerRefused, KeyFolderError) as exc:
        fail(str(exc))
    typer.echo(f"{name}: {n} images (t_c={info['t_c']}, server part {info['server_seconds']} s, total {info['total_seconds']} s) in {out}/")


if __name__ == "__main__":
    app()
