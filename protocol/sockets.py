"""The one way a node, worker, admin or load generator opens its connection to the broker."""

from __future__ import annotations

import logging
from typing import Callable

import zmq

from collafuse.protocol.security import PeerKeys

log = logging.getLogger("collafuse.sockets")


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


def drain(sock: zmq.Socket, handle: Callable[[list[zmq.Frame]], None], cap: int = 1000,
          passes: tuple[type[Exception], ...] = ()) -> int:
    """Handle up to `cap` waiting messages without blocking, so one busy peer cannot starve the
    loop's other duties (heartbeats, dispatch). An exception in `handle` is logged and the next
    message is handled (one bad message must never stop a process), except those in `passes`,
    which the caller asked to see. Returns how many were read."""
    for count in range(cap):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return count
        try:
            handle(frames)
        except passes:
            raise
        except Exception:
            log.exception("unexpected error while handling a message")
        if sock.closed:  # the handler reconnected (a new socket): the caller polls that one next
            return count + 1
    return cap
