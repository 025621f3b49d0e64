"""Finished sweep runs packed for the trip from a GPU machine, and unpacked here.

A GPU machine may lack the Inception weights, and may send back only small files (the device tool
returns at most 8 files of 16 MiB). `collafuse sweep --in-process --pack DIR` trains and generates
each cut ratio there and packs each finished run into one safetensors file: the images as uint8,
which is what KID sees anyway (pixel MSE moves by at most 1/255), and metrics.json as metadata.
Here `python -m collafuse.tools.runpack PACKS --out DIR` restores the run folders, and the same
`collafuse sweep` command without `--pack` evaluates them from disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def pack(folder: Path, dest: Path) -> Path:
    """One file per run: samples quantised to uint8, metrics.json in the metadata."""
    samples = load_file(str(folder / "samples.safetensors"))
    quantised = {k: ((v.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous() for k, v in samples.items()}
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{folder.name}.safetensors"
    save_file(quantised, str(path), metadata={"metrics.json": (folder / "metrics.json").read_text()})
    return path


def unpack(path: Path, out: Path) -> Path:
    """A packed run back into a run folder that the sweep evaluates from disk."""
    with safe_open(str(path), "pt") as f:
        metrics = f.metadata()["metrics.json"]
    folder = out / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float() / 127.5 - 1 for k, v in load_file(str(path)).items()}, str(folder / "samples.safetensors"))
    (folder / "metrics.json").write_text(metrics)
    return folder


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command()
def main(
    packs: Path = typer.Argument(..., help="Folder holding packed runs (c*.safetensors, from `collafuse sweep --pack`)."),
    out: Path = typer.Option(..., "--out", help="Sweep folder to restore the runs into."),
) -> None:
    """Restore packed sweep runs as run folders for `collafuse sweep` to evaluate."""
    files = sorted(packs.glob("c*.safetensors"))
    if not files:
        raise typer.BadParameter(f"no packed runs (c*.safetensors) in {packs}")
    for path in files:
        typer.echo(f"restored {unpack(path, out)}")


if __name__ == "__main__":
    app()
