"""Keys for the processes a launcher starts on one machine (`collafuse demo`, `up`, `loadtest`, the
tests): the broker's folder and one folder per peer, made on first use. A keyring without a folder
runs everything on plain TCP (`--insecure`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from collafuse.protocol.security import BROKER, PeerKeys, add_peer_key, init_broker_keys


@dataclass(frozen=True)
class Keyring:
    folder: Path | None  # None: plain TCP

    @property
    def broker(self) -> Path:
        assert self.folder is not None
        return self.folder / BROKER

    def broker_args(self) -> list[str]:
        if self.folder is None:
            return ["--insecure"]
        if not (self.broker / f"{BROKER}.key_secret").is_file():
            init_broker_keys(self.broker)
        return ["--keys", str(self.broker)]

    def peer(self, name: str, role: str) -> Path:
        """The key folder of peer `name`, allowed as `role` (made if missing)."""
        assert self.folder is not None
        folder = self.folder / name
        if not folder.is_dir():
            self.broker_args()
            add_peer_key(name, role, self.broker, folder)
        return folder

    def args(self, name: str, role: str) -> list[str]:
        """What a peer's command line needs: --keys FOLDER, or --insecure."""
        return ["--keys", str(self.peer(name, role))] if self.folder is not None else ["--insecure"]

    def admin(self) -> PeerKeys | None:
        """Keys for status requests from this process."""
        return PeerKeys.load(self.peer("admin", "admin")) if self.folder is not None else None
