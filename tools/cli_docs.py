"""docs/CLI.md from every command's own `--help`, so that the reference cannot drift from the code.

    python -m collafuse.tools.cli_docs > docs/CLI.md

A test compares the committed file with this output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH, RUNPACK = "collafuse.tools.bench", "collafuse.tools.runpack"

# (heading, commands shown under it); a command is a console script or a module run with -m.
PAGES: list[tuple[str, list[list[str]]]] = [
    ("`collafuse`", [["collafuse"]]),
    *((f"`collafuse {c}`", [["collafuse", c]]) for c in ("simulate", "demo", "up", "broker", "worker", "status", "loadtest", "sweep", "audit")),
    ("`collafuse keys`", [["collafuse", "keys"], *(["collafuse", "keys", c] for c in ("init", "add", "revoke"))]),
    ("`collafuse-node`", [["collafuse-node"]]),
    *((f"`collafuse-node {c}`", [["collafuse-node", c]]) for c in ("join", "generate")),
    (f"`python -m {BENCH}`", [["-m", BENCH], *(["-m", BENCH, c] for c in ("raw", "sampler", "train", "system", "broker", "cpu", "cutnoise"))]),
    (f"`python -m {RUNPACK}`", [["-m", RUNPACK]]),
]


def help_text(command: list[str]) -> str:
    if command[0] == "-m":
        argv = [sys.executable, *command]
    else:  # the console script installed next to this interpreter
        argv = [str(Path(sys.executable).parent / command[0]), *command[1:]]
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    return out.rstrip() + "\n"


def render() -> str:
    parts = ["# CLI reference\n\nEvery command's `--help`, as printed by this version\n"
             "(`python -m collafuse.tools.cli_docs > docs/CLI.md` writes this file).\n"]
    for heading, commands in PAGES:
        parts.append(f"\n## {heading}\n")
        parts.extend(f"\n```\n{help_text(c)}```\n" for c in commands)
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
