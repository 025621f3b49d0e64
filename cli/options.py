"""What the two command lines share: one-line errors and argument parsing."""

from __future__ import annotations

import typer


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
