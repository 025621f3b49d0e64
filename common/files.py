"""Files that survive a crash: written to a temporary name, fsynced, renamed into place, and the
rename itself fsynced (so a power cut, not only a killed process, leaves the old or the new file)."""

from __future__ import annotations

import os
from pathlib import Path


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the fsynced `tmp` over `path` and make the rename durable."""
    os.replace(tmp, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Make the renames and links done in this folder durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
