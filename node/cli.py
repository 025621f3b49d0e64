"""`collafuse-node`: the edge client."""

from __future__ import annotations

import typer

app = typer.Typer(help="CollaFuse edge node: keeps its data and its local model.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """CollaFuse edge node: keeps its data and its local model."""
