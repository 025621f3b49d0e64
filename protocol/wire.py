"""Envelopes: message types, fields, error codes and their validation (PROTOCOL.md).

Every message is [envelope] or [envelope, tensors]; the envelope is a msgpack map with at least
`v` (protocol version) and `type`. Each type's fields are checked here, by one table, before the
receiver acts on them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import msgpack
import numpy as np

from collafuse.common.config import ProtocolLimits
from collafuse.common.cut import Cut

PROTOCOL_VERSION = 3


class ErrorCode:
    BAD_ENVELOPE = "bad_envelope"  # not a msgpack map, too large, missing v/type
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"  # a field missing, of the wrong type or out of range
    BAD_TENSOR = "bad_tensor"  # tensor frame malformed or not the shapes the envelope announces
    TOO_LARGE = "too_large"
    BUSY = "busy"  # the client's queue is full: retry later
    INCOMPATIBLE = "incompatible"  # image shape or T differ from the server model's
    UNAVAILABLE = "unavailable"  # no worker can take this (yet): hello before any worker, or a job that waited too long
    TIMEOUT = "timeout"  # a worker held the job longer than the broker's job timeout
    CONFLICT = "conflict"  # a job id re-sent with different content (or kind) than the first time
    REFUSED = "refused"  # the trainer did not apply these rows: their loss or the step's gradient was out of bounds
    FORBIDDEN = "forbidden"  # this key may not do this: wrong role, revoked, or another key's client name
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


def _cut(for_server: bool) -> Check:
    """t_c as a `Cut` of the chain T = limits.levels; a job for the server needs a cut below T."""

    def check(v: Any, limits: ProtocolLimits) -> str | None:
        highest = limits.levels - 1 if for_server else limits.levels  # a client with t_c = T sends the server nothing
        if type(v) is not int:  # the value itself is never echoed: it may be anything a peer invents
            return "must be an integer"
        try:
            cut = Cut(v, limits.levels)
        except ValueError:
            return f"must lie in [0, {highest}]"
        return None if cut.t_c <= highest else f"must lie in [0, {highest}]"

    return check


def cut_of(env: dict[str, Any], limits: ProtocolLimits) -> Cut:
    """The typed cut of an envelope `decode` has accepted."""
    return Cut(env["t_c"], limits.levels)


ROWS = _int(lambda _: 1, lambda lim: lim.max_rows)
SERVER_CUT = _cut(for_server=True)
JOB, CLIENT = _str(128), _str(64)
COUNT = _int(lambda _: 0, lambda _: 2**62)
# The trainer's state in parts that each fit a frame: `weights` to every other worker, `moments`
# (optimiser state) to those that may take over training.
RELAYED = ("weights", "moments")
RELAY_FIELDS = {"version": COUNT, "part": _int(lambda _: 0, lambda _: 65_535), "parts": _int(lambda _: 1, lambda _: 65_536)}

GENERATION = _str(64, allow_empty=True)  # a trainer group's generation: the broker's epoch and a counter
def _address(v: Any, limits: ProtocolLimits) -> str | None:
    """HOST:PORT of a trainer group's rendezvous."""
    problem = _str(256)(v, limits)
    if problem:
        return problem
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT"
    return None


ADDRESS = _address
MAX_RANKS = 1024
EPOCH = _str(32)  # one broker run: a peer that sees another one re-registers and re-sends (PROTOCOL.md)

# type → {field: check}. Every type also carries v and type.
FIELDS: dict[str, dict[str, Check]] = {
    # node → broker
    "hello": {"client": CLIENT, "t_c": _cut(for_server=False), "image_shape": _shape, "levels": _int(lambda _: 1, lambda _: 10_000)},
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
    "welcome": {"epoch": EPOCH, "image_shape": _shape, "levels": _int(lambda _: 1, lambda _: 10_000), "max_rows": ROWS, "max_frame_bytes": COUNT, "heartbeat_interval": _float(0.001, 3600)},
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
    # broker → trainer in a data-parallel group: a new generation; trainer → broker: one failed
    "group": {"id": GENERATION, "rank": _int(lambda _: 0, lambda _: MAX_RANKS - 1), "world": _int(lambda _: 1, lambda _: MAX_RANKS), "store": ADDRESS},
    "group_failed": {"id": GENERATION},
}

# type → {field: check} for fields a message may carry: the broker's heartbeats carry its epoch.
# A worker's error names the job's client as its ack or result do; without it the broker finds the
# job by its id among those the worker holds.
OPTIONAL: dict[str, dict[str, Check]] = {"heartbeat": {"epoch": EPOCH}, "ready": {"group": ADDRESS}, "error": {"client": CLIENT}}

KINDS_WITH_REPLY = ("train", "denoise")  # the job kinds a node submits; each gets exactly one final reply
REPLIES = ("ack", "result", "error")  # the final replies a worker sends for them

# Tensors each type carries: name → (dtype, shape as a function of the envelope and image shape).
TENSORS: dict[str, Callable[[dict, tuple[int, int, int]], dict[str, tuple[str, tuple[int, ...]]]]] = {
    "train": lambda env, shape: {"x_t": ("F32", (env["rows"], *shape)), "t": ("I64", (env["rows"],)), "eps": ("F32", (env["rows"], *shape))},
    "result": lambda env, shape: {"x": ("F32", (env["count"], *shape))},
}


def check_train_values(env: dict[str, Any], arrays: dict[str, np.ndarray], limits: ProtocolLimits) -> None:
    """Refuse (bad_tensor) training rows that no honest node sends: levels outside (t_c, T], values
    that are not finite or beyond the bounds in `limits`, and ε₂ rows whose mean or variance is
    not that of standard normal noise (a constant ε₂ = 100, or a pattern of ±8, is not noise)."""
    t, x_t, eps = arrays["t"], arrays["x_t"], arrays["eps"]
    cut = cut_of(env, limits)
    if ((t <= cut.t_c) | (t > cut.levels)).any():
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"train levels t must lie in ({cut.t_c}, {cut.levels}]", env["job"])
    for name, values, bound in (("x_t", x_t, limits.max_abs_x_t), ("eps", eps, limits.max_abs_eps)):
        lo, hi = float(values.min()), float(values.max())  # a NaN anywhere makes both NaN, an infinity one of them
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"train tensor {name} holds NaN or infinity", env["job"])
        if max(-lo, hi) > bound:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"train tensor {name} holds values beyond ±{bound}", env["job"])
    rows = eps.reshape(eps.shape[0], -1)
    size = rows.shape[1]
    mean, var = rows.mean(axis=1, dtype=np.float64), rows.var(axis=1, dtype=np.float64)
    if (np.abs(mean) > limits.eps_moment_se / np.sqrt(size)).any() or (np.abs(var - 1) > limits.eps_moment_se * np.sqrt(2 / size)).any():
        raise ProtocolError(ErrorCode.BAD_TENSOR, "train tensor eps: a row's mean or variance is not that of N(0, 1) noise", env["job"])


def encode(msg_type: str, **fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": msg_type, **fields}, use_bin_type=True)


def error(job: str, code: str, reason: str) -> bytes:
    return encode("error", job=job, code=code, reason=reason[:1024])


def decode(frame: bytes | memoryview, limits: ProtocolLimits, types: Iterable[str] | None = None) -> dict[str, Any]:
    """Parse and validate an envelope; raise ProtocolError with the code and reason. `types`: the
    types this side takes (None: any); another is `unknown_type` before its fields are read."""
    if len(frame) > limits.max_envelope_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"envelope of {len(frame)} bytes exceeds {limits.max_envelope_bytes}")
    try:
        # msgpack bounds every container and string by the frame's length, itself bounded above.
        env = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, f"envelope is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(env, dict):
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, "envelope must be a msgpack map")
    job = job_of(env)
    version = env.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and true are not 1
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {_show(version)} not supported; this side speaks {PROTOCOL_VERSION}", job)
    msg_type = env.get("type")
    if not isinstance(msg_type, str) or msg_type not in FIELDS:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {_show(msg_type)}", job)
    if types is not None and msg_type not in types:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg_type!r} is not taken from this side", job)
    optional = OPTIONAL.get(msg_type, {})
    for name, check in (FIELDS[msg_type] | optional).items():
        if name not in env:
            if name in optional:
                continue
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{msg_type}: missing field {name!r}", job)
        problem = check(env[name], limits)
        if problem:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{msg_type}: field {name!r} {problem}", job)
    return env


def job_of(env: Any) -> str:
    """The job id an error reply about this envelope names: the sender's id where it is a valid one,
    else "" (an over-long or non-string id is not echoed back)."""
    job = env.get("job") if isinstance(env, dict) else None
    return job if isinstance(job, str) and len(job) <= 128 else ""


def loose_decode(frame: bytes | memoryview, limits: ProtocolLimits) -> dict[str, Any]:
    """An envelope that failed validation, read only for its string `client` and `job` (to answer
    the job it was meant for); {} when even that is impossible."""
    if len(frame) > limits.max_envelope_bytes:
        return {}
    try:
        env = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception:
        return {}
    if not isinstance(env, dict):
        return {}
    return {k: env[k] for k in ("client", "job") if isinstance(env.get(k), str) and len(env[k]) <= 128}


def _show(value: Any) -> str:
    """A hostile value in an error reason, bounded."""
    return repr(value)[:64]


def tensor_frames(env: dict[str, Any]) -> int:
    """How many tensor frames follow this message's envelope: one for a train job, a result and a
    relayed part; none for the rest."""
    return int(env["type"] in TENSORS or env["type"] in RELAYED)


def tensor_spec(env: dict[str, Any], image_shape: tuple[int, int, int]) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """The exact tensors a message of this type must carry; None for types that carry none."""
    make = TENSORS.get(env["type"])
    return make(env, image_shape) if make else None
