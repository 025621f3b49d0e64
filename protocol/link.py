"""A node's link to the broker: hello, jobs under their ids, retries, heartbeats, reconnects.

Every job stays in `outstanding` until its one final reply (ack, result or error) arrives. A `busy`
answer schedules a resend; a broker that goes silent, or answers `not_joined` after a restart,
gets a fresh connection, a hello, and every outstanding job again under the same id. A hello
answered `unavailable` (no worker yet) is said again after `retry_after`, as is a reconnect that
the broker keeps refusing.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import zmq

from collafuse.common.config import HeartbeatConfig, ProtocolLimits
from collafuse.protocol import wire
from collafuse.protocol.security import PeerKeys
from collafuse.protocol.sockets import dealer, drain
from collafuse.protocol.wire import ErrorCode, ProtocolError

log = logging.getLogger("collafuse.node")


class BrokerRefused(Exception):
    """The broker answered hello with an error (e.g. an incompatible image shape)."""


@dataclass
class Outstanding:
    kind: str
    frames: list[bytes]
    retry_at: float = 0.0


@dataclass
class Reply:
    env: dict[str, Any]
    blob: zmq.Frame | None


class BrokerLink:
    def __init__(
        self,
        address: str,
        hello: dict[str, Any],
        limits: ProtocolLimits = ProtocolLimits(),
        heartbeat: HeartbeatConfig = HeartbeatConfig(),
        retry_after: float = 0.5,
        context: zmq.Context | None = None,
        keys: PeerKeys | None = None,
    ) -> None:
        self.keys = keys
        self.address, self.hello_fields, self.limits, self.hb, self.retry_after = address, hello, limits, heartbeat, retry_after
        self.ctx = context or zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.outstanding: OrderedDict[str, Outstanding] = OrderedDict()
        self.welcome: dict[str, Any] | None = None
        self.epoch = ""  # the broker run that welcomed us ('' until then)
        self.last_heard = self.next_heartbeat = 0.0
        self.reconnects = 0
        self.busy_replies = 0
        self.rejoin_at = 0.0  # no second reconnect before this (one per refusal burst)
        self.refused = ""  # the broker's last reason for not taking this node yet

    @property
    def client(self) -> str:
        return self.hello_fields["client"]

    def _open(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = dealer(self.ctx, self.address, self.limits.max_frame_bytes, self.keys)
        self.sock.send(wire.encode("hello", **self.hello_fields))
        self.last_heard = time.monotonic()

    def connect(self, timeout: float = 30.0) -> dict[str, Any]:
        """Say hello and wait for the welcome; raise BrokerRefused or TimeoutError."""
        self._open()
        deadline = time.monotonic() + timeout
        while self.welcome is None:
            if time.monotonic() > deadline:
                why = f" (last answer: {self.refused})" if self.refused else ""
                why = why or (" (with keys, a broker that does not know this node's key does not answer at all)" if self.keys else "")
                raise TimeoutError(f"not welcomed by the broker at {self.address} within {timeout:.0f} s{why}")
            self.poll(0.2)
        return self.welcome

    def submit(self, job_id: str, kind: str, frames: list[bytes]) -> None:
        if job_id in self.outstanding:
            raise ValueError(f"job id {job_id} is already outstanding")
        self.outstanding[job_id] = Outstanding(kind, frames)
        self._send(frames)

    def _send(self, frames: list[bytes]) -> None:
        assert self.sock is not None
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.debug("send buffer full; the job will be re-sent on reconnect")

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outstanding.values() if o.kind == kind)

    def _reconnect(self, why: str) -> None:
        log.warning("%s: reconnecting to %s and re-sending %d jobs", why, self.address, len(self.outstanding))
        self.reconnects += 1
        self._open()
        for o in self.outstanding.values():
            self._send(o.frames)

    def poll(self, timeout: float) -> list[Reply]:
        """Wait up to `timeout` s for traffic; return the final replies that arrived."""
        assert self.sock is not None
        replies: list[Reply] = []
        if self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            drain(self.sock, lambda frames: self._on_message(frames, replies), cap=10_000, passes=(BrokerRefused,))
        now = time.monotonic()
        for job_id, o in self.outstanding.items():
            if o.retry_at and now >= o.retry_at:
                o.retry_at = 0.0
                self._send(o.frames)
        if now >= self.next_heartbeat:
            self.sock.send(wire.encode("heartbeat"))
            self.next_heartbeat = now + self.hb.interval
        if now - self.last_heard > self.hb.interval * self.hb.liveness:
            self._reconnect(f"broker silent for {now - self.last_heard:.1f} s")
        return replies

    def _on_message(self, frames: list[zmq.Frame], replies: list[Reply]) -> None:
        self.last_heard = time.monotonic()
        reply = self._reply(frames)
        if reply is not None:
            replies.append(reply)

    def _reply(self, frames: list[zmq.Frame]) -> Reply | None:
        try:
            env = wire.decode(frames[0].buffer, self.limits)
        except ProtocolError as exc:
            log.warning("bad message from the broker: %s", exc)
            return None
        kind = env["type"]
        if kind == "welcome":
            self.welcome = env
            self.epoch = env["epoch"]
            return None
        if kind == "heartbeat" and self.epoch and env.get("epoch", self.epoch) != self.epoch:
            self.epoch = ""
            self._reconnect("the broker restarted (a new epoch)")
            return None
        if kind == "error" and (env["code"] == ErrorCode.NOT_JOINED or (env["code"] == ErrorCode.UNAVAILABLE and not env["job"])):
            self.refused = f"{env['code']}: {env['reason']}"
            if time.monotonic() >= self.rejoin_at:
                self.rejoin_at = time.monotonic() + self.retry_after
                self._reconnect(f"the broker does not take this node ({self.refused})")
            return None
        if kind == "error" and self.welcome is None and not env["job"]:
            raise BrokerRefused(f"{env['code']}: {env['reason']}")
        if kind == "error" and env["code"] == ErrorCode.BUSY and env["job"] in self.outstanding:
            self.busy_replies += 1
            self.outstanding[env["job"]].retry_at = time.monotonic() + self.retry_after
            return None
        if kind in ("ack", "result", "error") and env.get("job") in self.outstanding:
            del self.outstanding[env["job"]]
            return Reply(env, frames[1] if len(frames) > 1 else None)
        if kind == "status_reply":
            return Reply(env, None)
        return None  # heartbeats, duplicates of answered jobs

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
