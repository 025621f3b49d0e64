"""The sweep's training and generation on a lent GPU machine; its evaluation back here.

The GPU machine has neither the Inception weights nor room to send back float images (the device
tool returns at most 8 files of 16 MiB). So `generate` runs each cut ratio in one process (the
sweep's own runs, in the order given, most telling first) and after each one packs the run into
one safetensors file: the images as uint8, which is what KID sees anyway (pixel MSE moves by at
most 1/255), and metrics.json as metadata. `unpack` restores the run folders here; then
`collafuse sweep --in-process` with the same settings on that folder evaluates them from disk.

    python -m collafuse.tools.gpu_sweep generate --out /tmp/sweep --pack $OUT --image-size 128 ...
    python -m collafuse.tools.gpu_sweep unpack PACKS --out runs/sweep-gpu
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from safetensors.torch import load_file, save_file

from collafuse.cli import parse_ratios
from collafuse.tools.sweep import SweepConfig, ensure_run

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


def pack(folder: Path, dest: Path) -> Path:
    """One file per run: samples quantised to uint8, metrics.json in the metadata."""
    samples = load_file(str(folder / "samples.safetensors"))
    quantised = {k: ((v.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous() for k, v in samples.items()}
    path = dest / f"{folder.name}.safetensors"
    save_file(quantised, str(path), metadata={"metrics.json": (folder / "metrics.json").read_text()})
    return path


def unpack(path: Path, out: Path) -> Path:
    """A packed run back into a run folder that the sweep evaluates from disk."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metrics = f.metadata()["metrics.json"]
    folder = out / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float() / 127.5 - 1 for k, v in load_file(str(path)).items()}, str(folder / "samples.safetensors"))
    (folder / "metrics.json").write_text(metrics)
    return folder


@app.command("generate")
def generate_cmd(
    out: Path = typer.Option(..., "--out", help="Sweep folder on the GPU machine."),
    pack_to: Path = typer.Option(..., "--pack", help="Folder for one packed file per finished cut ratio."),
    cut_ratios: str = typer.Option("1,0,0.6,0.2,0.4,0.8", "--cut-ratios", help="Comma list, run in this order."),
    clients: int = typer.Option(3, "--clients", min=1, help="Clients per run."),
    steps: int = typer.Option(600, "--steps", min=1, help="Training steps per cut ratio."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per client per step."),
    image_size: int = typer.Option(128, "--image-size", help="32, 64 or 128."),
    samples: int = typer.Option(64, "--samples", min=4, help="Images generated per client."),
    client_model: str = typer.Option("paper", "--client-model", help="Client U-Net preset."),
    server_model: str = typer.Option("paper", "--server-model", help="Server U-Net preset."),
    device: str = typer.Option("cuda", "--device", help="'cuda:N', 'cuda', or 'cpu' for a dry run."),
    seed: int = typer.Option(0, "--seed", help="Seed for data and training."),
) -> None:
    """Train and generate each cut ratio in one process; pack each run as soon as it is done."""
    cfg = SweepConfig(out=out, cut_ratios=parse_ratios(cut_ratios), clients=clients, steps=steps, batch_size=batch_size,
                      image_size=image_size, samples=samples, in_process=True, client_model=client_model,
                      server_model=server_model, device=device, seed=seed)
    pack_to.mkdir(parents=True, exist_ok=True)
    for c in cfg.cut_ratios:
        folder = ensure_run(cfg, c, say=lambda line: typer.echo(line, err=True))
        typer.echo(f"packed {pack(folder, pack_to)}", err=True)


@app.command("unpack")
def unpack_cmd(
    packs: Path = typer.Argument(..., help="Folder holding the packed c*.safetensors files."),
    out: Path = typer.Option(..., "--out", help="Sweep folder to restore the runs into."),
) -> None:
    """Restore packed runs as sweep run folders."""
    files = sorted(packs.glob("c*.safetensors"))
    if not files:
        raise typer.BadParameter(f"no packed runs (c*.safetensors) in {packs}")
    for path in files:
        typer.echo(f"restored {unpack(path, out)}")


if __name__ == "__main__":
    app()
