"""An admin client: one `status` request to a broker's frontend (`collafuse status`, the demo, the load test)."""

from __future__ import annotations

from typing import Any

import zmq

from collafuse.common.config import ProtocolLimits
from collafuse.protocol import wire
from collafuse.protocol.security import PeerKeys
from collafuse.protocol.sockets import dealer


def fetch_status(address: str, timeout: float = 5.0, keys: PeerKeys | None = None) -> dict[str, Any]:
    """One status request to a broker's frontend, with an admin key (None: plain TCP)."""
    limits = ProtocolLimits()
    sock = dealer(zmq.Context.instance(), address, limits.max_frame_bytes, keys)
    try:
        sock.send(wire.encode("status"))
        if not sock.poll(int(timeout * 1000)):
            hint = " (a broker with keys ignores keys it does not know, and plain TCP)" if keys is None else " (is this key allowed as admin?)"
            raise TimeoutError(f"no answer from the broker at {address} within {timeout:.0f} s{hint}")
        env = wire.decode(sock.recv(), limits)
        if env["type"] == "error":
            raise ConnectionError(f"{env['code']}: {env['reason']}")
        if env["type"] != "status_reply":
            raise ConnectionError(f"unexpected answer {env['type']!r} from {address}")
        return env["status"]
    finally:
        sock.close(0)
