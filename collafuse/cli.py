"""`collafuse`: the server-side and whole-system commands. One command per role.

Heavy modules are imported inside each command, so `collafuse broker` never imports torch.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="CollaFuse: collaborative split diffusion. Edge nodes keep their data and the last "
    "denoising steps; a shared server model does the noisy first steps for everybody.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """CollaFuse: collaborative split diffusion between edge nodes and a shared server model."""


def fail(message: str, code: int = 2) -> None:
    """A one-line error for the user, no traceback."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        fail(f"cut ratios must be numbers, got {text!r}")
    for r in ratios:
        if not 0.0 <= r <= 1.0:
            fail(f"cut ratio must lie in [0, 1], got {r}")
    return ratios


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, samples.png and checkpoints/."),
    clients: int = typer.Option(3, help="Number of clients."),
    cut_ratio: str = typer.Option("0.6", "--cut-ratio", help="c in [0,1]: one for all clients, or a comma list, one per client. The client owns levels 1..round(c*T)."),
    image_size: int = typer.Option(32, help="Image side: 32, 64 or 128."),
    steps: int = typer.Option(600, help="Training steps (each: one local step per client, one merged server step)."),
    data: str = typer.Option("mni", help="'mni' (embedded MNI152 slices), 'brats:PATH' or 'images:PATH'."),
    client_model: str = typer.Option("tiny", help="Client U-Net preset: tiny, paper or large."),
    server_model: str = typer.Option("tiny", help="Server U-Net preset: tiny, paper or large."),
    batch_size: int = typer.Option(32, help="Images per client per step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (both parties)."),
    images_per_client: int = typer.Option(512, help="Augmented images per client (embedded data)."),
    samples: int = typer.Option(16, help="Images generated per client at the end."),
    sampler: str = typer.Option("ancestral", help="'ancestral' (every level) or 'ddim'."),
    ddim_steps: int = typer.Option(20, help="Total DDIM steps over T..0, shared by the parties in proportion."),
    levels: int = typer.Option(100, help="T, the number of noise levels."),
    seed: int = typer.Option(0, help="Seed for data shards, augmentation and training."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu' or 'cuda:N'."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints."),
) -> None:
    """Run every party in one process, with the distributed system's exact math."""
    from collafuse.config import DataConfig, DiffusionConfig, SamplerConfig, SimulateConfig, TrainConfig
    from collafuse.datasets import DataError
    from collafuse.tools.simulate import run_simulation

    try:
        config = SimulateConfig(
            cut_ratios=parse_ratios(cut_ratio),
            steps=steps,
            client_model=client_model,
            server_model=server_model,
            samples_per_client=samples,
            device=device,
            log_every=max(1, min(25, steps // 20 or 1)),
            data=DataConfig(spec=data, clients=clients, image_size=image_size, images_per_client=images_per_client, seed=seed),
            train=TrainConfig(learning_rate=lr, batch_size=batch_size),
            sampler=SamplerConfig(kind=sampler, ddim_steps=ddim_steps),
            diffusion=DiffusionConfig(levels=levels),
        )
        config.client_cut_ratios()
        metrics = run_simulation(config, out, resume=resume)
    except (DataError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    wall = metrics["wall_seconds"]
    typer.echo(f"done in {wall['total']:.0f} s (train {wall['train']:.0f} s, sampling {wall['sample']:.0f} s) on {metrics['device']}")
    for name, curve in metrics["losses"].items():
        typer.echo(f"  {name:8s} loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f}")
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'samples.png'}, {out / 'real.png'}, {out / 'checkpoints'}/")


if __name__ == "__main__":
    app()
