"""The CLI reference is the commands' own --help output, not a copy that drifts."""

from pathlib import Path

from collafuse.tools.cli_docs import render


def test_cli_reference_is_current():
    committed = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    assert committed == render(), "docs/CLI.md is stale: python -m collafuse.tools.cli_docs > docs/CLI.md"
