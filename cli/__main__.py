"""`python -m collafuse.cli` is the `collafuse` command."""

from collafuse.cli.main import app

app()
