"""A seeded fuzzer against a real broker (DESIGN.md §7, PROTOCOL.md): thousands of structured and
mutated requests from one node; every request gets exactly one reply, a polite node interleaved
with them is served, the broker lives and its memory stays bounded. `python -m tests.test_fuzz N`
runs a longer soak and prints the counts."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter

import msgpack
import numpy as np

from collafuse.protocol import tensors, wire
from collafuse.system.launch import Fleet
from tests.netclient import RawClient, RawWorker
from tests.test_system import _status, start_broker, start_worker

SHAPE = (1, 8, 8)  # the echo worker's; a real worker's model takes (1, 32, 32)
ODD_VALUES = [None, True, -1, 0, 2**64 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 300, b"\xff\x00", [], [1, [2, [3]]], {}, {"a": {"b": 1}}]


def _hello(name: str, shape: tuple[int, ...]) -> dict:
    return {"v": wire.PROTOCOL_VERSION, "type": "hello", "client": name, "t_c": 60, "image_shape": list(shape), "levels": 100}


def _train(job: str, shape: tuple[int, ...], rows: int = 2) -> tuple[dict, bytes]:
    rng = np.random.default_rng(len(job))
    blob = tensors.encode({"x_t": rng.standard_normal((rows, *shape), dtype=np.float32), "t": np.full(rows, 80, np.int64),
                           "eps": rng.standard_normal((rows, *shape), dtype=np.float32)})
    return {"v": wire.PROTOCOL_VERSION, "type": "train", "job": job, "client": "fuzz", "rows": rows, "t_c": 60}, blob


def _denoise(job: str) -> dict:
    return {"v": wire.PROTOCOL_VERSION, "type": "denoise", "job": job, "client": "fuzz", "count": 2, "t_c": 60, "seed": 1,
            "first_row": 0, "sampler": "ddim", "steps": 4, "eta": 0.0}


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"  # fixarray of one, `depth` times: deeper than msgpack's own stack


def case(rng: random.Random, i: int, shape: tuple[int, ...]) -> tuple[str, list[bytes]]:
    """(category, frames) of one request; job ids are unique per case, so every case expects one reply."""
    job = f"c{i}"
    kind = rng.choice(["train", "denoise", "hello", "status", "heartbeat", "junk", "tensor", "frames"])
    if kind == "junk":
        return kind, [rng.choice([bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))), _nested(rng.choice([10, 5000])),
                                   msgpack.packb(rng.choice(ODD_VALUES), use_bin_type=True)])]
    if kind == "frames":
        env, blob = _train(job, shape)
        return kind, [msgpack.packb(env), blob, b"extra"] if rng.random() < 0.5 else [msgpack.packb(_denoise(job)), blob]
    if kind == "tensor":
        env, blob = _train(job, shape)
        mutated = bytearray(blob)
        for _ in range(rng.randrange(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        cut = rng.choice([len(mutated), rng.randrange(len(mutated) + 1)])
        return kind, [msgpack.packb(env), bytes(mutated[:cut])]
    if kind == "train":
        env, blob = _train(job, shape, rng.choice([1, 2, 3]))
    elif kind == "denoise":
        env, blob = _denoise(job), None
    elif kind == "hello":
        env, blob = _hello("fuzz", shape), None
    else:
        env, blob = {"v": wire.PROTOCOL_VERSION, "type": kind}, None
    if rng.random() < 0.7:  # mutate a field: another type, an odd value, or gone
        key = rng.choice(sorted(env))
        if rng.random() < 0.2:
            del env[key]
        else:
            env[key] = rng.choice(ODD_VALUES)
        kind += "/mutated"
    frames = [msgpack.packb(env, use_bin_type=True)]
    return kind, frames + ([blob] if blob is not None else [])


class EchoWorker(threading.Thread):
    """A worker by hand (its own socket, in its own thread) that answers every job validly at once."""

    def __init__(self, back: str) -> None:
        super().__init__(daemon=True)
        self.worker = RawWorker(back, "echo", shape=SHAPE)
        self.stop = threading.Event()

    def run(self) -> None:
        self.worker.ready(denoise_credit=64, train_credit=64)
        while not self.stop.is_set():
            try:
                env, _ = self.worker.recv(0.1)
            except TimeoutError:
                continue
            if env["type"] == "heartbeat":
                self.worker.send(wire.encode("heartbeat"))
            elif env["type"] == "train":
                self.worker.send(wire.encode("ack", job=env["job"], client=env["client"], step=1, loss=0.5))
            elif env["type"] == "denoise":
                x = np.zeros((env["count"], *SHAPE), np.float32)
                self.worker.send(wire.encode("result", job=env["job"], client=env["client"], count=env["count"]), tensors.encode({"x": x}))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fuzz(fleet: Fleet, cases: int, seed: int = 0, real_worker: bool = False) -> dict:
    """With `real_worker`, a worker process (CPU, tiny model) takes the jobs instead of the echo."""
    front, back = start_broker(fleet)
    shape = (1, 32, 32) if real_worker else SHAPE
    echo = None
    if real_worker:
        start_worker(fleet, back, front, "w0", "--max-train-rows", "8")
    else:
        echo = EchoWorker(back)
        echo.start()
    deadline = time.monotonic() + 10
    while not (_status(front) or {}).get("workers") and time.monotonic() < deadline:
        time.sleep(0.05)
    fuzzer, polite = RawClient(front, "fuzz", shape=shape), RawClient(front, "polite", shape=shape)
    fuzzer.send(msgpack.packb(_hello("fuzz", shape)))
    assert fuzzer.recv()[0]["type"] == "welcome"
    polite.send(msgpack.packb(_hello("polite", shape)))
    assert polite.recv()[0]["type"] == "welcome"
    processes = ["broker", "w0"] if real_worker else ["broker"]
    rss_before = {p: _rss_kb(fleet.procs[p].pid) for p in processes}
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    missing = extra = polite_served = 0
    trace = []  # (cases done, RSS in kB per process) ten times over the run: flat, or growing?
    try:
        for i in range(cases):
            if i % max(1, cases // 10) == 0:
                trace.append((i, {p: _rss_kb(fleet.procs[p].pid) for p in processes}))
            category, frames = case(rng, i, shape)
            fuzzer.send(*frames)
            try:
                env, _ = fuzzer.recv(30.0 if real_worker else 5.0)
            except TimeoutError:
                missing += 1
                outcomes[(category, "no reply")] += 1
                continue
            outcomes[(category, env.get("code", env["type"]))] += 1
            if i % 100 == 0:
                polite.send(msgpack.packb(_denoise(f"p{i}") | {"client": "polite"}))
                reply, _ = polite.recv(60.0)
                polite_served += reply["type"] == "result" and reply["job"] == f"p{i}"
        while True:
            try:
                fuzzer.recv(1.0)
                extra += 1
            except TimeoutError:
                break
    finally:
        if echo is not None:
            echo.stop.set()
            echo.join(5)
    return {"cases": cases, "missing": missing, "extra": extra, "polite_served": polite_served, "polite_sent": (cases + 99) // 100,
            "alive": {p: fleet.alive(p) for p in processes}, "rss_kb_before": rss_before,
            "rss_kb_after": {p: _rss_kb(fleet.procs[p].pid) for p in processes}, "rss_kb_trace": trace, "outcomes": outcomes}


def test_every_fuzzed_request_gets_exactly_one_reply(tmp_path):
    fleet = Fleet(tmp_path / "logs", threads=1)
    try:
        result = fuzz(fleet, 2000, seed=7)
    finally:
        fleet.stop_all(timeout=20)
    assert result["missing"] == 0 and result["extra"] == 0, {k: v for k, v in result["outcomes"].items() if k[1] == "no reply"}
    assert result["polite_served"] == result["polite_sent"] and all(result["alive"].values())
    assert result["rss_kb_after"]["broker"] - result["rss_kb_before"]["broker"] < 64 * 1024, result
    codes = {code for _, code in result["outcomes"]}
    assert {"bad_envelope", "bad_field", "bad_tensor", "ack", "result", "welcome"} <= codes  # the fuzzer reached every layer


if __name__ == "__main__":  # the soak: python -m tests.test_fuzz CASES [SEED] [real]
    import json
    import tempfile
    from pathlib import Path

    fleet = Fleet(Path(tempfile.mkdtemp(prefix="collafuse-soak-")) / "logs", threads=1)
    try:
        started = time.monotonic()
        out = fuzz(fleet, int(sys.argv[1]) if len(sys.argv) > 1 else 20000, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0,
                   real_worker=sys.argv[3:4] == ["real"])
    finally:
        fleet.stop_all(timeout=20)
    out["seconds"] = round(time.monotonic() - started, 1)
    out["outcomes"] = {f"{c} -> {o}": n for (c, o), n in sorted(out["outcomes"].items())}
    print(json.dumps(out, indent=2))
