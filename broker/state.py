"""The broker's state on disk (`collafuse broker --state DIR`): what a restarted broker needs so
that a worker joining after the restart gets the trainer's weights at once, no client name
changes hands, and no worker behind the acknowledged steps becomes the trainer.

- `owners.msgpack`: the registry of client identities (client name → the key that first said
  hello with it);
- `weights.msgpack`, `moments.msgpack`: the trainer's latest relayed version of each, as the
  parts it came in (envelope and tensor frame), with the image shape and T of the model;
- `acks.msgpack`: the latest optimiser step a lone trainer acknowledged, whether its acks were
  durable, and the trainer's name (written after the ack is forwarded: a crash just then leaves
  the step before).

Each file is written whole, fsynced and renamed into place, by one background thread (the latest
content wins), so the broker's loop never waits for a disk. Queued and in-flight jobs are not
journalled: a node holds every unanswered job and re-sends it after a restart (PROTOCOL.md), which
costs nothing while the broker runs.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import msgpack

from collafuse.common.files import replace_durably

log = logging.getLogger("collafuse.broker")

OWNERS = "owners"
ACKS = "acks"


class BrokerState:
    """Writes the broker's durable state in the background and reads it back at start."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, Any] = {}  # file stem → content still to write
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def read(self, stem: str) -> Any:
        """A file's content, or None when it is missing or unreadable (the broker then starts without it)."""
        path = self.folder / f"{stem}.msgpack"
        if not path.is_file():
            return None
        try:
            return msgpack.unpackb(path.read_bytes(), raw=False)
        except Exception as exc:  # a damaged file must not keep the broker down
            log.warning("ignoring %s: %s", path, exc)
            return None

    def write(self, stem: str, content: Any) -> None:
        """Queue `content` for `stem`.msgpack (packed by the writer, off the broker's loop); an older
        queued content for the same file is dropped."""
        with self._lock:
            self._pending[stem] = content
            if self._writer is None:  # the writer clears this, under the lock, when it runs out of work
                self._writer = threading.Thread(target=self._drain_writes, name="broker-state", daemon=True)
                self._writer.start()

    def flush(self) -> None:
        """Wait until everything queued is on disk (at shutdown)."""
        writer = self._writer
        if writer is not None:
            writer.join()

    def _drain_writes(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._writer = None
                    return
                stem, content = self._pending.popitem()
            path = self.folder / f"{stem}.msgpack"
            tmp = path.with_name(path.name + ".tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(msgpack.packb(content, use_bin_type=True))
                    f.flush()
                    os.fsync(f.fileno())
                replace_durably(tmp, path)
            except Exception as exc:  # the writer must outlive one failed write
                log.error("cannot write %s: %s", path, exc)
