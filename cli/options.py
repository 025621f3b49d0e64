"""What the two command lines share: one-line errors, argument parsing, and the options both
offer (their defaults read from the typed config, so that they cannot disagree)."""

from __future__ import annotations

from pathlib import Path

import typer

from collafuse.common.config import DiffusionConfig, HeartbeatConfig, ProtocolLimits

LEVELS = typer.Option(DiffusionConfig.levels, "--levels", help="T, the number of noise levels (must match between nodes and workers).")
HB_INTERVAL = typer.Option(HeartbeatConfig.interval, "--heartbeat-interval", min=0.01, help="Seconds between heartbeats.")
HB_LIVENESS = typer.Option(HeartbeatConfig.liveness, "--heartbeat-liveness", min=1, help="Missed heartbeats before the peer counts as dead (a node or worker then reconnects and re-sends).")
MAX_FRAME = typer.Option(ProtocolLimits.max_frame_bytes, "--max-frame-bytes", min=1024, help="Largest tensor frame accepted.")


KEYS = typer.Option(None, "--keys", help="Key folder: the broker's from `collafuse keys init`, a peer's from `collafuse keys add`. Every connection is then encrypted and authenticated (CURVE).")
INSECURE = typer.Option(False, "--insecure", help="Plain TCP: no encryption, no authentication, anyone who reaches the port is trusted. Only for loopback experiments.")


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


def key_folder(keys: Path | None, insecure: bool) -> str:
    """The key folder a command runs with ('' = plain TCP, only when asked for, and said loudly)."""
    if keys is not None and insecure:
        fail("give either --keys or --insecure, not both")
    if keys is None and not insecure:
        fail("give --keys DIR (see `collafuse keys --help`), or --insecure for a plain-TCP loopback experiment")
    if insecure:
        typer.secho("WARNING: --insecure: plain TCP, no encryption or authentication; anyone who reaches the ports is trusted",
                    err=True, fg=typer.colors.YELLOW)
        return ""
    if not keys.is_dir():
        fail(f"key folder {keys} does not exist")
    return str(keys)
