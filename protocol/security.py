"""CURVE keys, key folders, and who may do what (DESIGN.md §7).

Every connection is encrypted and authenticated with ZeroMQ's CURVE; pyzmq's ZAP authenticator asks
the broker's key store whether a connecting key may use that socket at all, and the broker checks
the key every message carries (its User-Id) against the role the message needs. Key files are
pyzmq's certificate files (`zmq.auth.create_certificates`): NAME.key (public) and NAME.key_secret.

Folders:
- the broker's (`collafuse keys init DIR`): broker.key, broker.key_secret, and one allow-list folder
  per role — nodes/, admins/, workers/, trainers/ — holding the public key files of those allowed.
  Removing a file revokes the key; the broker re-reads the folders every heartbeat.
- a peer's (`collafuse keys add NAME --role ROLE --broker DIR --out PEER_DIR`): its own NAME.key
  and NAME.key_secret, and broker.key (the broker's public key, to know it talks to the right one).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("collafuse.security")

ROLES = ("node", "admin", "worker", "trainer")
BROKER = "broker"
FRONTEND, BACKEND = "frontend", "backend"  # ZAP domains of the broker's two sockets
SOCKET_ROLES = {FRONTEND: {"node", "admin"}, BACKEND: {"worker", "trainer"}}


class KeyFolderError(Exception):
    """A key folder or file that cannot be used; the message says what to do."""


def role_folder(broker_dir: Path, role: str) -> Path:
    return Path(broker_dir) / f"{role}s"


def init_broker_keys(folder: Path) -> Path:
    """The broker's key pair and empty allow-lists; refuses to overwrite an existing pair."""
    folder = Path(folder)
    if (folder / f"{BROKER}.key_secret").exists():
        raise KeyFolderError(f"{folder} already holds a broker key pair")
    folder.mkdir(parents=True, exist_ok=True)
    for role in ROLES:
        role_folder(folder, role).mkdir(exist_ok=True)
    _create_pair(folder, BROKER)
    return folder


def add_peer_key(name: str, role: str, broker_dir: Path, out: Path) -> Path:
    """A new key pair for a peer in `out` (with the broker's public key beside it), allowed in the
    broker's folder for `role`."""
    if role not in ROLES:
        raise KeyFolderError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or "/" in name or name.startswith(".") or name == BROKER:
        raise KeyFolderError(f"{name!r} cannot name a key")
    broker_public = Path(broker_dir) / f"{BROKER}.key"
    if not broker_public.is_file():
        raise KeyFolderError(f"{broker_dir} is not a broker key folder (no {BROKER}.key): run `collafuse keys init {broker_dir}` first")
    out = Path(out)
    if (out / f"{name}.key_secret").exists():
        raise KeyFolderError(f"{out} already holds a key named {name}")
    out.mkdir(parents=True, exist_ok=True)
    public = _create_pair(out, name)
    shutil.copyfile(broker_public, out / f"{BROKER}.key")
    shutil.copyfile(public, role_folder(broker_dir, role) / f"{name}.key")
    return out


def revoke(name: str, broker_dir: Path) -> list[str]:
    """Remove the key from every allow-list; the roles it had."""
    removed = []
    for role in ROLES:
        path = role_folder(broker_dir, role) / f"{name}.key"
        if path.is_file():
            path.unlink()
            removed.append(role)
    return removed


def _create_pair(folder: Path, name: str) -> Path:
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return Path(public)


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85
    secret: bytes  # z85


@dataclass(frozen=True)
class PeerKeys:
    """What a node, worker or admin needs: its own pair and the broker's public key."""

    own: KeyPair
    broker: bytes

    @classmethod
    def load(cls, folder: Path) -> PeerKeys:
        folder = Path(folder)
        secrets = [p for p in folder.glob("*.key_secret") if p.stem != BROKER] if folder.is_dir() else []
        if len(secrets) != 1 or not (folder / f"{BROKER}.key").is_file():
            raise KeyFolderError(f"{folder} must hold one NAME.key_secret and {BROKER}.key (made by `collafuse keys add`)")
        public, secret = zmq.auth.load_certificate(str(secrets[0]))
        broker, _ = zmq.auth.load_certificate(str(folder / f"{BROKER}.key"))
        return cls(KeyPair(public, secret), broker)

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the broker (before connect)."""
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.own.public, self.own.secret, self.broker


class KeyStore:
    """The broker's side: its pair and the allow-lists, re-read when a folder changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        pair = self.folder / f"{BROKER}.key_secret"
        if not pair.is_file():
            raise KeyFolderError(f"{self.folder} has no {BROKER}.key_secret: run `collafuse keys init {self.folder}`")
        public, secret = zmq.auth.load_certificate(str(pair))
        self.own = KeyPair(public, secret)
        self.stamp: tuple = ()
        self.allowed: dict[str, frozenset[str]] = {}  # z85 public key → its roles
        self.names: dict[str, str] = {}  # z85 public key → its file name, for logs and status
        self.reload()

    def _stamp(self) -> tuple:
        return tuple(os.stat(role_folder(self.folder, r)).st_mtime_ns if role_folder(self.folder, r).is_dir() else 0 for r in ROLES)

    def reload(self) -> bool:
        """Re-read the allow-lists if a folder changed; whether they did."""
        stamp = self._stamp()
        if stamp == self.stamp:
            return False
        allowed: dict[str, set[str]] = {}
        names: dict[str, str] = {}
        for role in ROLES:
            folder = role_folder(self.folder, role)
            for path in sorted(folder.glob("*.key")) if folder.is_dir() else []:
                try:
                    public, _ = zmq.auth.load_certificate(str(path))
                except (OSError, ValueError) as exc:
                    log.warning("ignoring key file %s: %s", path, exc)
                    continue
                key = public.decode()
                allowed.setdefault(key, set()).update({role, "worker"} if role == "trainer" else {role})  # a trainer also denoises
                names[key] = path.stem
        self.allowed = {k: frozenset(v) for k, v in allowed.items()}
        self.names = names
        self.stamp = stamp
        log.info("allow-lists: %d keys", len(self.allowed))
        return True

    def roles(self, user_id: str) -> frozenset[str]:
        return self.allowed.get(user_id, frozenset())

    def serve(self, sock: zmq.Socket, domain: str) -> None:
        """Make `sock` a CURVE server whose connections the authenticator checks in `domain` (before bind)."""
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.own.public, self.own.secret
        sock.zap_domain = domain.encode()

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: may this key connect to this socket at all (a key of a role that socket serves)?"""
        self.reload()
        return bool(self.roles(key.decode()) & SOCKET_ROLES.get(domain, set()))

    def authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        auth = ThreadAuthenticator(context, log=logging.getLogger("collafuse.security.zap"))
        auth.start()
        for domain in SOCKET_ROLES:
            auth.configure_curve_callback(domain, credentials_provider=self)
        return auth


def user_id(frame: zmq.Frame) -> str:
    """The CURVE public key (z85) that sent this frame; '' on a plain connection."""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:
        return ""
