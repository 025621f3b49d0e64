"""The one way a node, worker, admin or load generator opens its connection to the broker."""

from __future__ import annotations

import zmq

from collafuse.protocol.security import PeerKeys


def dealer(ctx: zmq.Context, address: str, max_frame_bytes: int, keys: PeerKeys | None, **options: int) -> zmq.Socket:
    """A connected DEALER: no linger, a transport cap far above any valid message, CURVE with
    `keys` (None: plain TCP), and any further socket options (e.g. sndhwm=0)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_frame_bytes)
    for name, value in options.items():
        setattr(sock, name, value)
    if keys is not None:
        keys.apply(sock)
    sock.connect(address)
    return sock
