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
    env = {"v": wire.PROTOCOL_VERSION, "type": "train", "job": "j1", "client": "a", "rows": 2, "t_c": 60, **over}
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
        (msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "launch_missiles"}), ErrorCode.UNKNOWN_TYPE),
        (msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "train", "job": "j", "client": "a", "rows": 2}), ErrorCode.BAD_FIELD),
        (train_env(rows="two"), ErrorCode.BAD_FIELD),
        (train_env(rows=True), ErrorCode.BAD_FIELD),
        (train_env(rows=10**9), ErrorCode.BAD_FIELD),
        (train_env(t_c=100), ErrorCode.BAD_FIELD),  # a client with t_c = T never talks to the server
        (train_env(t_c=-1), ErrorCode.BAD_FIELD),
        (train_env(t_c=60.0), ErrorCode.BAD_FIELD),
        (train_env(t_c=True), ErrorCode.BAD_FIELD),
        (train_env(t_c=[[[60]]]), ErrorCode.BAD_FIELD),
        (train_env(type="denoise", count=2, seed=0, first_row=0, sampler="ddim", steps=4, eta=0.0, t_c=100), ErrorCode.BAD_FIELD),
        (msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "hello", "client": "a", "t_c": 101, "image_shape": [1, 32, 32], "levels": 100}), ErrorCode.BAD_FIELD),
        (train_env(job=""), ErrorCode.BAD_FIELD),
        (train_env(job="x" * 500), ErrorCode.BAD_FIELD),
        (msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "status", "pad": "x" * 70000}), ErrorCode.TOO_LARGE),
        # type confusion: each once raised TypeError instead of a coded error
        (msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": ["train"]}), ErrorCode.UNKNOWN_TYPE),
        (msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": {"a": 1}}), ErrorCode.UNKNOWN_TYPE),
        (msgpack.packb({"v": float(wire.PROTOCOL_VERSION), "type": "status"}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": True, "type": "status"}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": [2], "type": "status"}), ErrorCode.BAD_VERSION),
        (msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "denoise", "job": ["x"], "client": "a"}), ErrorCode.BAD_FIELD),
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
        (struct.pack("<Q", 200_000) + b"[" * 200_000, ErrorCode.BAD_TENSOR),  # once a RecursionError
        (_header_blob({"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
        (_header_blob({"x": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
        (_header_blob({"x": [1, 2, 3]}), ErrorCode.BAD_TENSOR),
        (_header_blob({"x": {"dtype": "F32", "shape": [1], "data_offsets": {"a": 0, "b": 4}}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
        # safetensors' __metadata__ is a map of strings to strings
        (_header_blob({"__metadata__": [1, 2], "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
        (_header_blob({"__metadata__": {"k": {"deep": 1}}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), ErrorCode.BAD_TENSOR),
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


def test_error_replies_echo_only_a_valid_job_id():
    assert wire.job_of({"job": "j1"}) == "j1"
    assert wire.job_of({"job": "x" * 500}) == "" and wire.job_of({"job": 7}) == "" and wire.job_of([1]) == ""
    with pytest.raises(ProtocolError) as info:
        wire.decode(train_env(job="x" * 500), LIM)
    assert info.value.job == ""
    assert wire.loose_decode(msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "ack", "job": "j", "client": "c", "loss": float("nan")}), LIM) == {"job": "j", "client": "c"}
    assert wire.loose_decode(b"\xc1", LIM) == {}


def _rows(rows=4, seed=0, **over):
    rng = np.random.default_rng(seed)
    arrays = {"x_t": rng.standard_normal((rows, *SHAPE)).astype(np.float32), "t": np.full(rows, 70, np.int64),
              "eps": rng.standard_normal((rows, *SHAPE)).astype(np.float32)}
    return {**arrays, **over}


def test_honest_training_rows_pass_the_value_checks():
    env = wire.decode(train_env(rows=64), LIM)
    for seed in range(20):  # 1,280 rows of N(0, I) noise; a false refusal has probability ~1e-12
        wire.check_train_values(env, _rows(64, seed), LIM)
    x0 = np.clip(np.random.default_rng(1).standard_normal((64, *SHAPE)), -1, 1)
    extreme = np.sqrt(0.5) * np.sign(x0) + np.sqrt(0.5) * _rows(64)["eps"]  # x_t with a² + b² = 1, |x_0| = 1
    wire.check_train_values(env, _rows(64, x_t=extreme.astype(np.float32)), LIM)


@pytest.mark.parametrize(
    "over, why",
    [
        ({"x_t": np.full((4, *SHAPE), np.nan, np.float32)}, "NaN or infinity"),
        ({"eps": np.full((4, *SHAPE), np.inf, np.float32)}, "NaN or infinity"),
        ({"x_t": np.full((4, *SHAPE), 1e30, np.float32)}, "beyond"),
        ({"eps": np.full((4, *SHAPE), 100.0, np.float32)}, "beyond"),
        ({"eps": np.full((4, *SHAPE), 1e16, np.float32)}, "beyond"),
        ({"eps": np.full((4, *SHAPE), 1.0, np.float32)}, "mean or variance"),  # within bounds, but not noise
        ({"eps": np.tile(np.array([3.0, -3.0], np.float32), 2048).reshape(4, *SHAPE)}, "mean or variance"),
        ({"t": np.full(4, 60, np.int64)}, "levels"),  # t must exceed t_c
        ({"t": np.full(4, 101, np.int64)}, "levels"),
    ],
)
def test_hostile_training_rows_are_refused(over, why):
    env = wire.decode(train_env(rows=4), LIM)
    with pytest.raises(ProtocolError, match=why) as info:
        wire.check_train_values(env, _rows(4, **over), LIM)
    assert info.value.code == ErrorCode.BAD_TENSOR and info.value.job == "j1"


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


def test_drain_handles_every_message_survives_a_bad_one_and_stops_when_the_handler_reconnects():
    import time

    import zmq

    from collafuse.protocol.sockets import drain

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        for i in range(5):
            dealer.send(b"%d" % i)
        seen: list[bytes] = []

        def handle(frames):
            seen.append(frames[-1].bytes)
            if frames[-1].bytes == b"1":
                raise RuntimeError("one bad message")

        deadline = time.monotonic() + 5
        while len(seen) < 5 and time.monotonic() < deadline:
            router.poll(100)
            drain(router, handle)
        assert seen == [b"0", b"1", b"2", b"3", b"4"]  # the bad one was logged, the rest handled
        dealer.send(b"who")  # learn the dealer's route at the router
        router.poll(2000)
        route = router.recv_multipart()[0]
        for i in range(3):
            router.send_multipart([route, b"r%d" % i])
        dealer.poll(2000)
        time.sleep(0.2)
        assert drain(dealer, lambda frames: dealer.close(0)) == 1  # the handler replaced the connection: no read on the closed socket
    finally:
        for sock in (router, dealer):
            sock.close(0)
        ctx.term()



def test_trainer_group_messages_are_checked():
    """The trainer group's messages: a generation with a rank beyond its bounds or a store address
    that is not a string is refused with a code; `ready` may name a rendezvous, within bounds."""
    good = wire.decode(wire.encode("group", id="e-1", rank=1, world=2, store="127.0.0.1:29500"), LIM)
    assert (good["rank"], good["world"]) == (1, 2)
    assert wire.decode(wire.encode("group_failed", id=""), LIM)["id"] == ""
    for bad in (dict(id="e-1", rank=-1, world=2, store="h:1"), dict(id="e-1", rank=0, world=0, store="h:1"),
                dict(id="e-1", rank=0, world=2, store=["h", 1]), dict(id="x" * 65, rank=0, world=2, store="h:1")):
        with pytest.raises(ProtocolError) as exc:
            wire.decode(wire.encode("group", **bad), LIM)
        assert exc.value.code == ErrorCode.BAD_FIELD
    ready = dict(worker="w", denoise_credit=8, train_credit=8, trainer=True, image_shape=[1, 32, 32], levels=100, model="tiny")
    assert wire.decode(wire.encode("ready", **ready, group="127.0.0.1:29500"), LIM)["group"] == "127.0.0.1:29500"
    for bad in ("h" * 300, "no-port", "h:0", "h:99999", ":80", 5):
        with pytest.raises(ProtocolError):
            wire.decode(wire.encode("ready", **ready, group=bad), LIM)


def test_the_cut_is_checked_by_its_own_rule_at_the_wire():
    """hello may announce t_c = T (a purely local node); a job for the server needs t_c < T; the
    reason names the range and never echoes what a peer sent; the accepted value comes out typed."""
    hello = {"v": wire.PROTOCOL_VERSION, "type": "hello", "client": "a", "image_shape": [1, 32, 32], "levels": 100}
    assert wire.cut_of(wire.decode(msgpack.packb({**hello, "t_c": 100}), LIM), LIM).uses_server is False
    for t_c, kind in ((100, "train"), (101, "hello"), ("x" * 900, "train")):
        frame = train_env(t_c=t_c) if kind == "train" else msgpack.packb({**hello, "t_c": t_c})
        with pytest.raises(ProtocolError) as err:
            wire.decode(frame, LIM)
        assert err.value.code == ErrorCode.BAD_FIELD and "t_c" in err.value.reason and "xxx" not in err.value.reason
    assert "[0, 99]" in str(pytest.raises(ProtocolError, wire.decode, train_env(t_c=100), LIM).value)
    assert wire.cut_of(wire.decode(train_env(t_c=99), LIM), LIM).t_c == 99
