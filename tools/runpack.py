"""Finished sweep runs packed for the trip from a GPU machine, and unpacked here.

A GPU machine may lack the Inception weights, and may send back only small files (the device tool
returns at most 8 files of 16 MiB). `collafuse sweep --in-process --pack DIR` trains and generates
each run there and packs each finished run into one safetensors file with what the evaluation and
the privacy audit read: the samples as uint8 (what KID sees anyway; pixel MSE moves by at most
1/255), the server model's weights as float16 (for membership inference), the data row of every
message row, and, as metadata, metrics.json, the simulated clients' secrets and the run's place in
the sweep. Here `python -m collafuse.tools.runpack PACKS --out DIR` restores the run folders, and
the same `collafuse sweep` command without `--pack` evaluates them from disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from collafuse.engine.simulate import SENT_ROWS


def pack(folder: Path, root: Path, dest: Path) -> Path:
    """One file per run; `root` is the sweep folder (the run's path below it is kept)."""
    place = folder.relative_to(root)
    tensors = {f"samples.{k}": ((v.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
               for k, v in load_file(str(folder / "samples.safetensors")).items()}
    checkpoints = folder / "checkpoints"
    if (checkpoints / "server.safetensors").is_file():
        tensors.update({f"server.{k}": v.half().contiguous() for k, v in load_file(str(checkpoints / "server.safetensors")).items()
                        if k.startswith("model.")})
    if (checkpoints / SENT_ROWS).is_file():
        tensors.update({f"sent.{k}": v for k, v in load_file(str(checkpoints / SENT_ROWS)).items()})
    secrets = {p.stem: p.read_bytes().hex() for p in sorted((folder / "secrets").glob("*.key"))}
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{'-'.join(place.parts)}.safetensors"
    save_file(tensors, str(path), metadata={"metrics.json": (folder / "metrics.json").read_text(), "place": str(place),
                                            "secrets": json.dumps(secrets)})
    return path


def unpack(path: Path, out: Path) -> Path:
    """A packed run back into a run folder that the sweep evaluates and audits from disk."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    folder = out / meta["place"]
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    flat = load_file(str(path))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}

    save_file({k: v.float() / 127.5 - 1 for k, v in part("samples.").items()}, str(folder / "samples.safetensors"))
    if part("server."):
        save_file({k: v.float() for k, v in part("server.").items()}, str(folder / "checkpoints" / "server.safetensors"),
                  metadata={"collafuse": json.dumps({"metadata": {"restored_from": path.name}})})
    if part("sent."):
        save_file(part("sent."), str(folder / "checkpoints" / SENT_ROWS))
    for name, hexed in json.loads(meta["secrets"]).items():
        key = folder / "secrets" / f"{name}.key"
        key.parent.mkdir(exist_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes.fromhex(hexed))
    (folder / "metrics.json").write_text(meta["metrics.json"])
    return folder


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command()
def main(
    packs: Path = typer.Argument(..., help="Folder holding packed runs (*.safetensors, from `collafuse sweep --pack`)."),
    out: Path = typer.Option(..., "--out", help="Sweep folder to restore the runs into."),
) -> None:
    """Restore packed sweep runs as run folders for `collafuse sweep` to evaluate."""
    files = sorted(packs.glob("*.safetensors"))
    if not files:
        raise typer.BadParameter(f"no packed runs (*.safetensors) in {packs}")
    for path in files:
        typer.echo(f"restored {unpack(path, out)}")


if __name__ == "__main__":
    app()
