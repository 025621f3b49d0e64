"""Envelopes: message types, fields, error codes and their validation (PROTOCOL.md).

Every message is [envelope] or [envelope, tensors]; the envelope is a msgpack map with at least
`v` (protocol version) and `type`. Each type's fields are checked here, by one table, before the
receiver acts on them.
"""

from __future__ import annotations

from typing import Any, Callable

import msgpack

from collafuse.common.config import ProtocolLimits

PROTOCOL_VERSION = 1


class ErrorCode:
    BAD_ENVELOPE = "bad_envelope"  # not a msgpack map, too large, missing v/type
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"  # a field missing, of the wrong type or out of range
    BAD_TENSOR = "bad_tensor"  # tensor frame malformed or not the shapes the envelope announces
    TOO_LARGE = "too_large"
    BUSY = "busy"  # the client's queue is full: retry later
    INCOMPATIBLE = "incompatible"  # image shape or T differ from the server model's
    NO_TRAINER = "no_trainer"  # a train job while no worker trains (not an error while queued)
    NOT_JOINED = "not_joined"  # a job from a client that has not said hello on this connection's broker
    INTERNAL = "internal"


class ProtocolError(Exception):
    def __init__(self, code: str, reason: str, job: str = "") -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.job = code, reason, job


Check = Callable[[Any, ProtocolLimits], str | None]  # returns what is wrong, or None


def _str(max_len: int = 128, allowed: tuple[str, ...] = (), allow_empty: bool = False) -> Check:
    def check(v: Any, _: ProtocolLimits) -> str | None:
        if not isinstance(v, str) or not (0 if allow_empty else 1) <= len(v) <= max_len:
            return f"must be a string of at most {max_len} characters" + ("" if allow_empty else ", not empty")
        if allowed and v not in allowed:
            return f"must be one of {', '.join(allowed)}"
        return None

    return check


def _int(lo: Callable[[ProtocolLimits], int], hi: Callable[[ProtocolLimits], int]) -> Check:
    def check(v: Any, limits: ProtocolLimits) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return "must be an integer"
        if not lo(limits) <= v <= hi(limits):
            return f"must lie in [{lo(limits)}, {hi(limits)}]"
        return None

    return check


def _float(lo: float, hi: float) -> Check:
    def check(v: Any, _: ProtocolLimits) -> str | None:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
            return f"must be a number in [{lo}, {hi}]"
        return None

    return check


def _bool(v: Any, _: ProtocolLimits) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _shape(v: Any, limits: ProtocolLimits) -> str | None:
    if (
        not isinstance(v, list)
        or len(v) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in v)
        or not 1 <= v[0] <= limits.max_channels
        or not all(1 <= d <= limits.max_image_side for d in v[1:])
    ):
        return f"must be [channels<= {limits.max_channels}, height, width<= {limits.max_image_side}]"
    return None


def _map(v: Any, _: ProtocolLimits) -> str | None:
    return None if isinstance(v, dict) else "must be a map"


ROWS = _int(lambda _: 1, lambda lim: lim.max_rows)
SERVER_CUT = _int(lambda _: 0, lambda lim: lim.levels - 1)  # the server only serves clients with t_c < T
JOB, CLIENT = _str(128), _str(64)
COUNT = _int(lambda _: 0, lambda _: 2**62)
# The trainer's state in parts that each fit a frame: `weights` to every other worker, `moments`
# (optimiser state) to those that may take over training.
RELAYED = ("weights", "moments")
RELAY_FIELDS = {"version": COUNT, "part": _int(lambda _: 0, lambda _: 65_535), "parts": _int(lambda _: 1, lambda _: 65_536)}

# type → {field: check}. Every type also carries v and type.
FIELDS: dict[str, dict[str, Check]] = {
    # node → broker
    "hello": {"client": CLIENT, "t_c": _int(lambda _: 0, lambda lim: lim.levels), "image_shape": _shape, "levels": _int(lambda _: 1, lambda _: 10_000)},
    "train": {"job": JOB, "client": CLIENT, "rows": ROWS, "t_c": SERVER_CUT},
    "denoise": {
        "job": JOB,
        "client": CLIENT,
        "count": ROWS,
        "t_c": SERVER_CUT,
        "seed": _int(lambda _: 0, lambda _: 2**63 - 1),
        "first_row": _int(lambda _: 0, lambda _: 2**31),
        "sampler": _str(16, ("ancestral", "ddim")),
        "steps": _int(lambda _: 1, lambda lim: lim.levels),
        "eta": _float(0.0, 1.0),
    },
    "status": {},
    "heartbeat": {},
    # broker → node
    "welcome": {"image_shape": _shape, "levels": _int(lambda _: 1, lambda _: 10_000), "max_rows": ROWS, "max_frame_bytes": COUNT, "heartbeat_interval": _float(0.001, 3600)},
    "status_reply": {"status": _map},
    # worker → broker → node
    "ack": {"job": JOB, "client": CLIENT, "step": COUNT, "loss": _float(0.0, 1e30)},
    "result": {"job": JOB, "client": CLIENT, "count": ROWS},
    "error": {"job": _str(128, allow_empty=True), "code": _str(32), "reason": _str(1024)},
    # worker ↔ broker
    "ready": {
        "worker": _str(64),
        "denoise_credit": COUNT,
        "train_credit": COUNT,
        "trainer": _bool,
        "image_shape": _shape,
        "levels": _int(lambda _: 1, lambda _: 10_000),
        "model": _str(32),
    },
    "weights": RELAY_FIELDS,
    "moments": RELAY_FIELDS,
    "bye": {},
}

# Tensors each type carries: name → (dtype, shape as a function of the envelope and image shape).
TENSORS: dict[str, Callable[[dict, tuple[int, int, int]], dict[str, tuple[str, tuple[int, ...]]]]] = {
    "train": lambda env, shape: {"x_t": ("F32", (env["rows"], *shape)), "t": ("I64", (env["rows"],)), "eps": ("F32", (env["rows"], *shape))},
    "result": lambda env, shape: {"x": ("F32", (env["count"], *shape))},
}


def encode(msg_type: str, **fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": msg_type, **fields}, use_bin_type=True)


def error(job: str, code: str, reason: str) -> bytes:
    return encode("error", job=job, code=code, reason=reason[:1024])


def decode(frame: bytes | memoryview, limits: ProtocolLimits) -> dict[str, Any]:
    """Parse and validate an envelope; raise ProtocolError with the code and reason."""
    if len(frame) > limits.max_envelope_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"envelope of {len(frame)} bytes exceeds {limits.max_envelope_bytes}")
    try:
        # msgpack bounds every container and string by the frame's length, itself bounded above.
        env = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, f"envelope is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(env, dict):
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, "envelope must be a msgpack map")
    job = env.get("job") if isinstance(env.get("job"), str) else ""
    if env.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {env.get('v')!r} not supported; this side speaks {PROTOCOL_VERSION}", job[:128])
    msg_type = env.get("type")
    if msg_type not in FIELDS:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type!r}", job[:128])
    for name, check in FIELDS[msg_type].items():
        if name not in env:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{msg_type}: missing field {name!r}", job[:128])
        problem = check(env[name], limits)
        if problem:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{msg_type}: field {name!r} {problem}", job[:128])
    return env


def tensor_spec(env: dict[str, Any], image_shape: tuple[int, int, int]) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """The exact tensors a message of this type must carry; None for types that carry none."""
    make = TENSORS.get(env["type"])
    return make(env, image_shape) if make else None
