"""`collafuse-node`: the edge client. `join` trains; `generate` makes images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from collafuse.cli.options import Connection, Node, command_line, takes, user_errors
from collafuse.common.config import DataConfig, NodeConfig, SamplerConfig, TrainConfig

app = command_line(
    "CollaFuse edge node: keeps its private data and its local model, and sends the server only "
    "images noised past its cut level t_c = round(c*T).",
    "Log connection events.",
)


def _config(node: Node, conn: Connection, data: str = DataConfig.spec, seed: int = NodeConfig.seed,
            train: TrainConfig = TrainConfig()) -> NodeConfig:
    """The node's config from the shared option blocks; each command then sets its own fields."""
    return NodeConfig(
        broker=node.broker, name=node.name, cut_ratio=node.cut_ratio, shard=node.shard, shards=node.shards, model=node.model,
        state=node.state, device=node.device, seed=seed, train=train,
        data=DataConfig(spec=data, image_size=node.image_size, seed=seed, clients=node.shards), **conn.peer(),
    )


@app.command()
@takes(Node, Connection)
def join(
    node: Node,
    conn: Connection,
    data: str = typer.Option(DataConfig.spec, "--data", help="'mni' (embedded MNI152 slices), 'brats:PATH' or 'images:PATH'."),
    steps: int = typer.Option(NodeConfig.steps, "--steps", min=1, help="Local training steps to reach (a resumed node continues)."),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size", min=1, help="Images per step."),
    lr: float = typer.Option(TrainConfig.learning_rate, "--lr", help="Adam learning rate of the local model."),
    window: int = typer.Option(NodeConfig.window, "--window", min=1, help="Train jobs in flight at most; a step that finds the window full sends nothing."),
    lockstep: bool = typer.Option(NodeConfig.lockstep, "--lockstep", help="Wait for room in the window instead of skipping (reproducible runs)."),
    cut_noise: str = typer.Option(
        NodeConfig.cut_noise, "--cut-noise",
        help="How the noise that hides an image at the cut (ε₁) is drawn. 'keyed' (default): one secret draw per image, "
        "from this node's 256-bit secret (STATE/secret.key, never sent), so the server sees each image's x_t_c once however "
        "often it is sent, as long as the secret is kept and used with these settings only (another image, even an augmented "
        "copy of one, has its own view). 'fresh': a new draw in every message, for comparison only: the server gets one noisy view of an "
        "image per message and can link and average them (see `collafuse audit`)."),
    share_clean_images: bool = typer.Option(
        NodeConfig.share_clean_images, "--share-clean-images",
        help="Allow a cut of t_c = 0 (no local levels), which sends the server the clean images; refused without it."),
    checkpoint_every: int = typer.Option(NodeConfig.checkpoint_every, "--checkpoint-every", min=1, help="Steps between local checkpoints; plus --window at most 256, the train jobs per client a trainer remembers (after a crash the node re-sends up to that many)."),
    seed: int = typer.Option(NodeConfig.seed, "--seed", help="Seed for the data shards and this node's training."),
) -> None:
    """Train the local model on levels 1..t_c and stream server-training messages to the broker."""
    from collafuse.datasets import DataError
    from collafuse.node.join import Join
    from collafuse.protocol.link import BrokerRefused
    from collafuse.protocol.security import KeyFolderError

    with user_errors(DataError, ValueError, FileNotFoundError, TimeoutError, BrokerRefused, KeyFolderError):
        cfg = replace(_config(node, conn, data=data, seed=seed, train=TrainConfig(batch_size=batch_size, learning_rate=lr)),
                      steps=steps, window=window, lockstep=lockstep, cut_noise=cut_noise, checkpoint_every=checkpoint_every,
                      share_clean_images=share_clean_images)
        runner = Join(cfg)
        runner.install_signal_handlers()
        figures = runner.run()
    typer.echo(
        f"{node.name}: t_c={runner.party.cut.t_c}, sent {figures.sent} train jobs, {figures.acked} acknowledged, "
        f"{figures.skipped} skipped (window full); checkpoint in {cfg.state_dir}/"
    )


@app.command()
@takes(Node, Connection)
def generate(
    node: Node,
    conn: Connection,
    n: int = typer.Option(NodeConfig.samples, "--n", min=1, help="Number of images."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG files, grid.png and samples.safetensors."),
    sampler: str = typer.Option(SamplerConfig.kind, "--sampler", help="'ancestral' (every level) or 'ddim'."),
    ddim_steps: int = typer.Option(SamplerConfig.ddim_steps, "--ddim-steps", min=1, help="Total DDIM steps over T..0, shared in proportion to the levels each side owns."),
    seed: int = typer.Option(NodeConfig.sample_seed, "--seed", help="Sampling seed: the same seed gives the same images."),
    timeout: float = typer.Option(NodeConfig.server_timeout, "--timeout", help="Seconds to wait for the server's part."),
) -> None:
    """Generate images: the server denoises T -> t_c through the broker, this node finishes t_c -> 0."""
    from collafuse.node.generate import run_generate
    from collafuse.protocol.link import BrokerRefused
    from collafuse.protocol.security import KeyFolderError

    with user_errors(ValueError, FileNotFoundError, TimeoutError, RuntimeError, BrokerRefused, KeyFolderError):
        info = run_generate(_config(node, conn), n, out, seed, SamplerConfig(kind=sampler, ddim_steps=ddim_steps), timeout)
    typer.echo(f"{node.name}: {n} images (t_c={info['t_c']}, server part {info['server_seconds']} s, total {info['total_seconds']} s) in {out}/")


if __name__ == "__main__":
    app()
