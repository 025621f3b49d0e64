"""An admin client: one `status` request to a broker's frontend (`collafuse status`, the demo, the load test)."""

from __future__ import annotations

from typing import Any

import zmq

from collafuse.common.config import ProtocolLimits
from collafuse.protocol import wire


def fetch_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """One status request to a broker's frontend (used by `collafuse status`)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(wire.encode("status"))
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no answer from the broker at {address} within {timeout:.0f} s")
        env = wire.decode(sock.recv(), ProtocolLimits(max_envelope_bytes=64 * 1024 * 1024))  # status grows with the clients
        if env["type"] != "status_reply":
            raise ConnectionError(f"unexpected answer {env['type']!r} from {address}")
        return env["status"]
    finally:
        sock.close(0)
