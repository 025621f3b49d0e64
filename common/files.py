"""Files that survive a crash: written to a temporary name, fsynced, renamed into place, and the
rename itself fsynced (so a power cut, not only a killed process, leaves the old or the new file)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the fsynced `tmp` over `path` and make the rename durable."""
    os.replace(tmp, path)
    sync_folder(path.parent)


def create_durably(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Create `path` with `data` only if nobody has: written whole beside it (PATH.PID.RANDOM.tmp),
    fsynced, then linked into place, so the file is never seen empty or half written, and one that
    another process linked first stands. Whether this call's file is the one in place."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    finally:
        tmp.unlink(missing_ok=True)  # (or taken by another process meanwhile, as cutnoise adopts an unlinked secret)
    sync_folder(path.parent)
    return created


def sync_folder(folder: Path) -> None:
    """Make the renames and links done in this folder durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
