"""Envelopes and tensor frames: round trips, and a clear error code for each kind of bad input."""

import json
import struct

import msgpack
import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from collafuse.common.config import ProtocolLimits
from collafuse.protocol import tensors, wire
from collafuse.protocol.wire import ErrorCode, ProtocolError

LIM = ProtocolLimits()
SHAPE = (1, 32, 32)


def train_env(**over):
    env = {"v": 1, "type": "train", "job": "j1", "client": "a", "rows": 2, "t_c": 60, **over}
    return msgpack.packb(env)


def train_blob(rows=2, shape=SHAPE):
    return tensors.encode(
        {"x_t": np.zeros((rows, *shape), np.float32), "t": np.full(rows, 70, np.int64), "eps": np.ones((rows, *shape), np.float32)}
    )


def test_tensor_frames_are_real_safetensors_both_ways():
    blob = train_blob()
    loaded = st_load(blob)  # the reference implementation reads ours
    assert loaded["t"].tolist() == [70, 70] and loaded["eps"].shape == (2, *SHAPE)
    ours = tensors.decode(st_save({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}), None, LIM.max_frame_bytes)
    assert ours["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    scalar = tensors.encode({"step": np.array(4.0, np.float32), "w": np.arange(6, dtype=np.float32).reshape(2, 3).T})
    assert st_load(scalar)["step"].shape == () and tensors.decode(scalar, None, LIM.max_frame_bytes)["step"].shape == ()
    assert tensors.decode(scalar, None, LIM.max_frame_bytes)["w"].tolist() == [[0, 3], [1, 4], [2, 5]]  # a transposed view, made contiguous


def test_valid_train_message_passes():
    env = wire.decode(train_env(), LIM)
    tensors.check(train_blob(), wire.tensor_spec(env, SHAPE), LIM.max_frame_bytes)


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"\xc1\xff garbage", ErrorCode.BAD_ENVELOPE),
        (msgpack.packb([1, 2, 3]), ErrorCode.BAD_ENVELOPE),
        (msgpack.packb({"v": 99, "type": "train"}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": 1, "type": "launch_missiles"}), ErrorCode.UNKNOWN_TYPE),
        (msgpack.packb({"v": 1, "type": "train", "job": "j", "client": "a", "rows": 2}), ErrorCode.BAD_FIELD),
        (train_env(rows="two"), ErrorCode.BAD_FIELD),
        (train_env(rows=True), ErrorCode.BAD_FIELD),
        (train_env(rows=10**9), ErrorCode.BAD_FIELD),
        (train_env(t_c=100), ErrorCode.BAD_FIELD),  # a client with t_c = T never talks to the server
        (train_env(t_c=-1), ErrorCode.BAD_FIELD),
        (train_env(job=""), ErrorCode.BAD_FIELD),
        (train_env(job="x" * 500), ErrorCode.BAD_FIELD),
        (msgpack.packb({"v": 1, "type": "status", "pad": "x" * 70000}), ErrorCode.TOO_LARGE),
    ],
)
def test_bad_envelopes_get_codes(frame, code):
    with pytest.raises(ProtocolError) as info:
        wire.decode(frame, LIM)
    assert info.value.code == code and info.value.reason


def _header_blob(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "blob, code",
    [
        (b"\x01\x02", ErrorCode.BAD_TENSOR),  # truncated before the header length
        (struct.pack("<Q", 10**12) + b"{}", ErrorCode.BAD_TENSOR),  # claims a terabyte header
        (train_blob()[:-100], ErrorCode.BAD_TENSOR),  # truncated data
        (_header_blob({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
        (_header_blob({"x": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
        (_header_blob({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
        # a shape whose element count wraps to 0 in 64-bit arithmetic must not pass as an empty tensor
        (_header_blob({"x": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, b""), ErrorCode.BAD_TENSOR),
        (_header_blob({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
        (struct.pack("<Q", 4) + b"nope", ErrorCode.BAD_TENSOR),
        (b"\0" * (LIM.max_frame_bytes + 1), ErrorCode.TOO_LARGE),
    ],
)
def test_bad_tensor_frames_get_codes(blob, code):
    with pytest.raises(ProtocolError) as info:
        tensors.decode(blob, None, LIM.max_frame_bytes)
    assert info.value.code == code


def test_tensor_frame_must_match_the_envelope():
    env = wire.decode(train_env(rows=3), LIM)
    with pytest.raises(ProtocolError, match="expected F32"):
        tensors.check(train_blob(rows=2), wire.tensor_spec(env, SHAPE), LIM.max_frame_bytes)
    with pytest.raises(ProtocolError, match="expected F32"):
        tensors.check(train_blob(rows=3, shape=(1, 16, 16)), wire.tensor_spec(env, SHAPE), LIM.max_frame_bytes)
    wrong_dtype = tensors.encode({"x_t": np.zeros((3, *SHAPE), np.float16), "t": np.zeros(3, np.int64), "eps": np.zeros((3, *SHAPE), np.float32)})
    with pytest.raises(ProtocolError, match="expected F32"):
        tensors.check(wrong_dtype, wire.tensor_spec(env, SHAPE), LIM.max_frame_bytes)
    missing = tensors.encode({"x_t": np.zeros((3, *SHAPE), np.float32)})
    with pytest.raises(ProtocolError, match="expected tensors"):
        tensors.check(missing, wire.tensor_spec(env, SHAPE), LIM.max_frame_bytes)


def test_broker_side_needs_no_torch():
    import subprocess
    import sys

    code = "import sys; import collafuse.broker.broker, collafuse.protocol.tensors, collafuse.protocol.link, collafuse.cli.main; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_split_keeps_every_array_in_order_within_the_frame_limit():
    arrays = {f"w{i}": np.full((i + 1, 10), i, dtype=np.float32) for i in range(20)}
    groups = tensors.split(arrays, 4096)
    assert len(groups) > 1
    assert [k for g in groups for k in g] == list(arrays)
    assert all(len(tensors.encode(g)) <= 4096 for g in groups)
    with pytest.raises(ValueError, match="does not fit"):
        tensors.split({"big": np.zeros(2000, np.float32)}, 4096)
