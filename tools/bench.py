"""Benchmarks behind BENCHMARKS.md: `python -m collafuse.tools.bench COMMAND --help`.

Every figure that BENCHMARKS.md claims as a ratio is measured side by side in one run here.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import typer

app = typer.Typer(
    help="CollaFuse benchmarks.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _party(model: str, size: int, device: str, bf16: bool, cuda_graphs: bool = False, compile: bool = False, compile_train: bool = False,
           compile_static: bool = False):
    from collafuse.diffusion.models import resolve_device
    from collafuse.engine.server import ServerParty

    return ServerParty((1, size, size), model, device=resolve_device(device), autocast_bf16=bf16, cuda_graphs=cuda_graphs, compile=compile,
                       compile_train=compile_train, compile_static=compile_static)


def _forward_inputs(party, batch: int):
    """A random batch of (x_t, t, t_c) on the party's device, t_c = 60 and t above it."""
    import torch

    x = torch.randn(batch, 1, *party.image_shape[1:], device=party.device)
    return x, torch.randint(61, 101, (batch,), device=party.device), torch.full((batch,), 60, device=party.device)


def forward_rate(party, batch: int, seconds: float = 5.0) -> float:
    """Image-steps/s of the bare server model: one forward per iteration at a fixed batch (the same
    forward the sampler calls: eager or compiled, or either replayed as a CUDA graph)."""
    import torch

    party.model.eval()
    forward = party.denoiser(batch)
    x, t, tc = _forward_inputs(party, batch)
    with torch.no_grad():
        for _ in range(3):
            forward(x, t, tc)
        _sync(party.device)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            forward(x, t, tc)
            n += 1
        _sync(party.device)
    return n * batch / (time.perf_counter() - start)


def raw_forward_rate(
    model_name: str, size: int, batch: int, device_name: str, bf16: bool, seconds: float = 5.0, cuda_graphs: bool = False,
    compile: bool = False,
) -> float:
    """forward_rate of a fresh server model (compiled: from the cache that an earlier compile left)."""
    party = _party(model_name, size, device_name, bf16, cuda_graphs, compile)
    party.warm_up(batch)
    return forward_rate(party, batch, seconds)


def _largest_difference(a, b, batch: int) -> float:
    """max |ε̂_a − ε̂_b| over one random batch (the two parties hold the same weights)."""
    import torch

    x, t, tc = _forward_inputs(a, batch)
    with torch.no_grad():
        return float((a.denoiser(batch)(x, t, tc).float() - b.denoiser(batch)(x, t, tc).float()).abs().max())


@app.command()
def raw(
    model: str = "paper", size: int = 128, batch: str = "1,64,256", device: str = "auto", bf16: bool = False, seconds: float = 5.0,
    cuda_graphs: bool = False, compile: bool = False, static: bool = False,
) -> None:
    """The raw model forward rate per batch size (image-steps/s). With --compile, the compiled
    forward beside the same forward eager, measured eager, compiled, eager again (the ratio is to the
    faster eager figure), with the compile time and the largest difference of their outputs. With
    --static too, compiled with one graph per batch size (as the worker does not: its batch dimension
    is dynamic), to see what kernels specialised to a batch would gain."""
    eager = _party(model, size, device, bf16, cuda_graphs)
    compiled = _party(model, size, device, bf16, cuda_graphs, compile=True, compile_static=static) if compile else None
    for b in (int(x) for x in batch.split(",")):
        eager.warm_up(b)
        rate = forward_rate(eager, b, seconds)
        row = {"what": "raw_forward", "model": model, "size": size, "batch": b, "bf16": bf16, "cuda_graphs": cuda_graphs,
               "image_steps_per_s": round(rate, 1), **({"compile_shapes": "static" if static else "dynamic"} if compile else {})}
        if compiled is not None:
            reports = compiled.warm_up(b)
            fast = forward_rate(compiled, b, seconds)
            rate = max(rate, forward_rate(eager, b, seconds))
            row.update({"image_steps_per_s": round(rate, 1), "compiled_image_steps_per_s": round(fast, 1), "ratio": round(fast / rate, 2),
                        "compile_s": round(sum(r.seconds for r in reports), 1), "compile": [r.line() for r in reports],
                        "max_abs_diff": float(f"{_largest_difference(eager, compiled, b):.3g}")})
        typer.echo(json.dumps(row))


@app.command()
def sampler(
    model: str = "paper", size: int = 128, max_batch: int = 64, jobs: int = 64, rows: int = 4, t_c: int = 0, device: str = "auto",
    bf16: bool = False, cuda_graphs: bool = False, compile: bool = False,
) -> None:
    """The in-process continuous-batching sampler (what `simulate` and the worker run) against the raw model."""
    from collafuse.common.config import SamplerConfig
    from collafuse.common.cut import Cut

    party = _party(model, size, device, bf16, cuda_graphs, compile)
    party.warm_up(max_batch)
    engine = party.sampler(max_batch)
    cfg = SamplerConfig()
    levels = party.scheduler.levels
    engine.run([party.denoise_job("warm", max_batch, Cut(levels - 10, levels), 0, cfg)])
    _sync(party.device)
    start, before = time.perf_counter(), engine.rows_processed
    engine.run([party.denoise_job(f"j{i}", rows, Cut(t_c, levels), i, cfg) for i in range(jobs)])
    _sync(party.device)
    rate = (engine.rows_processed - before) / (time.perf_counter() - start)
    raw_rate = forward_rate(party, max_batch)
    typer.echo(json.dumps({"what": "in_process_sampler", "model": model, "size": size, "bf16": bf16, "cuda_graphs": cuda_graphs,
                           "compile": compile, "max_batch": max_batch,
                           "image_steps_per_s": round(rate, 1), "raw_image_steps_per_s": round(raw_rate, 1),
                           "ratio_to_raw": round(rate / raw_rate, 3)}))


@app.command()
def train(model: str = "paper", size: int = 128, batch: int = 150, steps: int = 20, device: str = "auto", bf16: bool = False,
          compile: bool = False) -> None:
    """Server optimiser steps on merged rows: images/s. With --compile, the compiled step beside the
    eager one in the same run (with the compile time and both steps' losses)."""
    import torch

    from collafuse.common.config import DiffusionConfig
    from collafuse.diffusion.schedule import Scheduler
    from collafuse.diffusion.split import server_message

    diffusion = DiffusionConfig()
    msg = server_message(Scheduler(diffusion), torch.randn(batch, 1, size, size), diffusion.cut(0.6), torch.Generator().manual_seed(0))

    def images_per_s(party) -> tuple[float, float]:
        for _ in range(3):
            party.train_step([msg])
        _sync(party.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = party.train_step([msg]).loss
        _sync(party.device)
        return batch * steps / (time.perf_counter() - start), loss

    rate, loss = images_per_s(_party(model, size, device, bf16))
    out = {"what": "server_train", "model": model, "size": size, "batch": batch, "bf16": bf16, "step_s": round(batch / rate, 4),
           "images_per_s": round(rate, 1)}
    if compile:
        party = _party(model, size, device, bf16, compile_train=True)
        reports = party.warm_up(batch, train_rows=batch)
        fast, fast_loss = images_per_s(party)
        out.update({"compiled_images_per_s": round(fast, 1), "ratio": round(fast / rate, 2),
                    "compile_s": round(sum(r.seconds for r in reports), 1),
                    "last_loss_eager_compiled": [round(loss, 5), round(fast_loss, 5)]})
    typer.echo(json.dumps(out))


@app.command()
def system(
    model: str = "paper", size: int = 128, max_batch: int = 64, clients: int = 64, rows: int = 4, duration: float = 20.0,
    device: str = "auto", bf16: bool = False, ddim_steps: int = 100, single: bool = True, logs: Path = Path("/tmp/collafuse-bench"),
    cuda_graphs: bool = False, compile: bool = False, warmup: float = 3.0,
) -> None:
    """Denoising through the broker (one denoising worker, many clients) against the raw model at the
    same batch, and (with --single) the same worker serving one row at a time: the batching gain.
    With --cuda-graphs and --compile the worker and the raw figure both replay graphs or run compiled;
    the raw rate without them is given too. The CPU share of the broker, the worker and the load
    generator during the counted window says which of them limits it (1.0 = one core busy all the
    time; a process waiting for CUDA spins, so a GPU worker's share is high whatever it waits for)."""
    import psutil

    from collafuse.system.demo import start_server_side
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import Fleet
    from collafuse.tools.loadtest import LoadConfig, run_load

    def through_broker(batch: int, n_clients: int, n_rows: int) -> dict:
        fleet = Fleet(logs / f"b{batch}")
        keyring = Keyring(logs / f"b{batch}" / "keys")
        try:
            args = ["--model", model, "--image-size", str(size), "--device", device, "--max-batch", str(batch), "--queue-rows", str(batch),
                    "--no-train", "--cuda-graphs" if cuda_graphs else "--no-cuda-graphs", "--compile" if compile else "--no-compile"]
            front, _ = start_server_side(fleet, 1, args + (["--bf16"] if bf16 else []), None, keyring)
            load = dict(broker=front, clients=n_clients, image_size=size, rows=n_rows, ddim_steps=ddim_steps,
                        keys=str(keyring.peer("load", "node")), admin_keys=str(keyring.peer("admin", "admin")))
            procs = {"broker": psutil.Process(fleet.procs["broker"].pid), "worker": psutil.Process(fleet.procs["worker0"].pid),
                     "load_generator": psutil.Process()}
            shares: dict[str, float] = {}

            def sample_the_window() -> None:  # CPU seconds per second over the counted window only
                time.sleep(warmup)
                try:
                    before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
                    began = time.monotonic()
                    time.sleep(duration)
                    wall = time.monotonic() - began
                    shares.update({name: round((sum(p.cpu_times()[:2]) - before[name]) / wall, 2) for name, p in procs.items()})
                except psutil.Error as exc:  # a process that exited: no share, and the result says why
                    shares["error"] = f"{type(exc).__name__}: {exc}"

            sampler = threading.Thread(target=sample_the_window, daemon=True)
            sampler.start()
            result = run_load(LoadConfig(**load, warmup=warmup, duration=duration, drain=120), say=lambda _: None)
            sampler.join()
            return {**result, "cpu_share": shares, "compile_failed": "compiled model failed" in fleet.tail("worker0", 200)}
        finally:
            fleet.stop_all()

    raw_before = raw_forward_rate(model, size, max_batch, device, bf16, cuda_graphs=cuda_graphs, compile=compile)
    batched = through_broker(max_batch, clients, rows)
    raw_after = raw_forward_rate(model, size, max_batch, device, bf16, cuda_graphs=cuda_graphs, compile=compile)
    raw_rate = max(raw_before, raw_after)  # a GPU's clocks drift between runs: compare with the faster raw figure
    out = {"what": "system_denoise", "model": model, "size": size, "bf16": bf16, "cuda_graphs": cuda_graphs, "compile": compile,
           "max_batch": max_batch, "clients": clients, "rows_per_job": rows, "ddim_steps": ddim_steps,
           "raw_image_steps_per_s": round(raw_rate, 1), "raw_before_after": [round(raw_before, 1), round(raw_after, 1)],
           "broker_image_steps_per_s": batched["image_steps_per_s"], "ratio_to_raw": round(batched["image_steps_per_s"] / raw_rate, 3),
           "jobs_per_s": batched.get("jobs_per_s"), "mean_batch_fill": batched["mean_batch_fill"], "latency_ms": batched["latency_ms"],
           "lost": batched["lost"], "cpu_share": batched["cpu_share"], "compile_failed": batched["compile_failed"], "warmup_s": warmup}
    if cuda_graphs or compile:
        plain = raw_forward_rate(model, size, max_batch, device, bf16)
        out.update({"raw_eager_image_steps_per_s": round(plain, 1), "ratio_to_raw_eager": round(batched["image_steps_per_s"] / plain, 3)})
    if single:
        one = through_broker(1, 1, 1)
        out.update({"one_at_a_time_image_steps_per_s": one["image_steps_per_s"],
                    "batching_gain": round(batched["image_steps_per_s"] / max(one["image_steps_per_s"], 1e-9), 1)})
    typer.echo(json.dumps(out))


@app.command()
def start(model: str = "paper", size: int = 128, device: str = "auto", bf16: bool = False, max_batch: int = 64, train: bool = True,
          cache: Path = Path("/tmp/collafuse-bench-start/compile-cache"), logs: Path = Path("/tmp/collafuse-bench-start")) -> None:
    """A compiled worker's start to its first served denoise job: first with an empty compile cache
    (cold: CACHE is emptied first), then with the cache the first start left (warm). With --train the
    worker is a trainer that compiles its training step too (`--compile-train`). The worker's log
    lines about compiling are given."""
    import shutil

    from collafuse.protocol import wire
    from collafuse.system.demo import start_server_side
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import Fleet

    shutil.rmtree(cache, ignore_errors=True)
    out: dict = {"what": "worker_start", "model": model, "size": size, "bf16": bf16, "max_batch": max_batch, "train": train}
    for label in ("cold", "warm"):
        fleet, keyring = Fleet(logs / label), Keyring(logs / label / "keys")
        args = ["--model", model, "--image-size", str(size), "--device", device, "--max-batch", str(max_batch), "--compile",
                "--compile-cache", str(cache), *(["--bf16"] if bf16 else []), *(["--compile-train"] if train else ["--no-train"])]
        try:
            began = time.monotonic()
            front, _ = start_server_side(fleet, 1, args, None, keyring)
            registered = time.monotonic() - began
            link = _probe_link(front, keyring, "probe", size)
            link.connect()
            link.submit("first", "denoise", [wire.encode("denoise", job="first", client="probe", count=1, t_c=60, seed=0, first_row=0,
                                                         sampler="ddim", steps=10, eta=0.0)])
            replies = []
            while not replies and time.monotonic() - began < 1800:
                replies = link.poll(0.05)
            link.close()
            out[label] = {"to_registered_s": round(registered, 1), "to_first_job_s": round(time.monotonic() - began, 1),
                          "reply": replies[0].env["type"] if replies else "none",
                          "compile_failed": "compiled model failed" in fleet.tail("worker0", 200),
                          "log": [line for line in fleet.tail("worker0", 40).splitlines() if "compil" in line]}
        finally:
            fleet.stop_all()
    typer.echo(json.dumps(out))


def _bench_keys(keys: str, name: str):
    """A peer's keys from the benchmark's keyring folder ('' = plain TCP)."""
    from pathlib import Path

    from collafuse.protocol.security import PeerKeys

    return PeerKeys.load(Path(keys) / name) if keys else None


def _proxy_process(fp: int, bp: int, keys: str) -> None:
    """zmq.proxy between a ROUTER and a DEALER; with keys both are CURVE servers (encryption, and
    no allow-list: the cost of CURVE itself)."""
    from pathlib import Path

    import zmq

    from collafuse.protocol.security import BACKEND, FRONTEND, KeyStore

    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (front, back):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    if keys:
        store = KeyStore(Path(keys) / "broker")
        store.serve(front, FRONTEND)
        store.serve(back, BACKEND)
    front.bind(f"tcp://127.0.0.1:{fp}")
    back.bind(f"tcp://127.0.0.1:{bp}")
    zmq.proxy(front, back)


def _proxy_echo_process(bp: int, keys: str) -> None:
    import zmq

    from collafuse.protocol.sockets import dealer

    s = dealer(zmq.Context(), f"tcp://127.0.0.1:{bp}", 1 << 26, _bench_keys(keys, "echo"))
    while True:
        frames = s.recv_multipart(copy=False)
        s.send_multipart([frames[0], frames[1]], copy=False)  # routing id, then a small reply


def _broker_process(fp: int, bp: int, keys: str) -> None:
    from collafuse.broker.broker import Broker
    from collafuse.common.config import BrokerConfig, HeartbeatConfig

    Broker(BrokerConfig(frontend=f"tcp://127.0.0.1:{fp}", backend=f"tcp://127.0.0.1:{bp}", max_queue_per_client=10**6,
                        max_names_per_key=10**6, keys=f"{keys}/broker" if keys else "",
                        heartbeat=HeartbeatConfig(interval=0.2, liveness=5), elect_trainer_for=1.0)).run()


def _echo_worker_process(bp: int, keys: str, credit: int) -> None:
    """A protocol peer that acknowledges every train job at once (it applies nothing), holding at
    most `credit` rows (0: no limit, so nothing waits in the broker's queues)."""
    import zmq

    from collafuse.common.config import ProtocolLimits
    from collafuse.protocol import wire
    from collafuse.protocol.sockets import dealer

    limits = ProtocolLimits()
    s = dealer(zmq.Context(), f"tcp://127.0.0.1:{bp}", limits.max_frame_bytes, _bench_keys(keys, "echo"))
    s.send(wire.encode("ready", worker="echo", denoise_credit=credit or 10**6, train_credit=credit or 10**9, trainer=True,
                       image_shape=[1, 32, 32], levels=100, model="none"))
    while True:
        frames = s.recv_multipart(copy=False)
        env = wire.decode(frames[0].buffer, limits)
        if env["type"] == "train":
            s.send(wire.encode("ack", job=env["job"], client=env["client"], step=0, loss=0.0))
        elif env["type"] == "heartbeat":  # alive, and at step 0, so the broker names it the trainer after its election
            s.send(wire.encode("heartbeat", stats={"step": 0}))


@app.command()
def broker(messages: int = 20000, size_kib: int = 64, window: int = 64, clients: int = 1, credit: int = 0) -> None:
    """Forwarding rate of 64 KiB tensor jobs: our broker against zmq.proxy, both on plain TCP and both
    with CURVE (keys made in a temporary folder). Each setup is three processes (client, middle,
    echo peer) on loopback; the client keeps `window` jobs in flight, spread over `clients` client
    names (one connection says hello for each). With `credit` rows (0: no limit) the echo peer
    holds only that many at once, so the rest wait in the broker's queues, one queue per client:
    the cost of dispatching with many clients waiting (zmq.proxy has no queues to compare)."""
    import multiprocessing as mp
    import tempfile
    from pathlib import Path

    import msgpack
    import numpy as np
    import zmq

    from collafuse.protocol import tensors, wire
    from collafuse.protocol.sockets import dealer
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import free_port

    rows = max(1, size_kib * 1024 // (2 * 4 * 32 * 32))
    blob = tensors.encode({"x_t": np.zeros((rows, 1, 32, 32), np.float32), "t": np.full(rows, 100, np.int64),
                           "eps": np.zeros((rows, 1, 32, 32), np.float32)})
    ring = Keyring(Path(tempfile.mkdtemp(prefix="collafuse-bench-keys-")))
    ring.peer("bench", "node"), ring.peer("echo", "trainer")
    names = [f"bench{i}" for i in range(clients)]

    def run(middle, echo, make_frames, hello: bool, keys: str, *echo_extra) -> float:
        fp, bp = free_port(), free_port()
        procs = [mp.Process(target=middle, args=(fp, bp, keys), daemon=True), mp.Process(target=echo, args=(bp, keys, *echo_extra), daemon=True)]
        for p in procs:
            p.start()
        try:
            # Unbounded queues, as the load test's: a window above ZeroMQ's high-water mark (1000) made
            # zmq.proxy's ROUTER drop replies now and then, and the bench wait for them.
            sock = dealer(zmq.Context.instance(), f"tcp://127.0.0.1:{fp}", 1 << 26, _bench_keys(keys, "bench"), sndhwm=0, rcvhwm=0)

            def recv(what: str) -> None:
                """One reply, or a clear failure after 60 s of silence (a bench must not hang)."""
                if not sock.poll(60_000):
                    alive = ", ".join(f"{p.name} {'alive' if p.is_alive() else 'exited ' + str(p.exitcode)}" for p in procs)
                    state = ""
                    if hello:  # our broker says what it holds
                        sock.send(wire.encode("status"))
                        state = f"; broker: {msgpack.unpackb(sock.recv_multipart()[0]) if sock.poll(5_000) else 'no status'}"
                    raise TimeoutError(f"{middle.__name__}, {keys and 'curve' or 'plain'}: no reply for 60 s waiting for {what} ({alive}){state}")
                sock.recv_multipart(copy=False)

            time.sleep(1.0)
            for name in names if hello else ():
                sock.send(wire.encode("hello", client=name, t_c=60, image_shape=[1, 32, 32], levels=100))
                recv(f"the welcome of {name}")
            for i in range(200):  # warm-up
                sock.send_multipart(make_frames(-1 - i), copy=False)
                recv(f"warm-up job {i}")
            sent = received = 0
            start = time.perf_counter()
            while received < messages:
                while sent < messages and sent - received < window:
                    sock.send_multipart(make_frames(sent), copy=False)
                    sent += 1
                recv(f"reply {received} of {messages}")
                received += 1
            rate = messages / (time.perf_counter() - start)
            sock.close(0)
            return rate
        finally:
            for p in procs:
                p.terminate()
                p.join()

    rates = {}
    for mode, keys in (("plain", ""), ("curve", str(ring.folder))):
        rates[f"zmq_proxy_{mode}"] = run(_proxy_process, _proxy_echo_process, lambda i: [b"job", blob], False, keys)
        rates[f"broker_{mode}"] = run(_broker_process, _echo_worker_process,
                                      lambda i: [wire.encode("train", job=f"j{i}", client=names[i % clients], rows=rows, t_c=60), blob], True, keys, credit)
    typer.echo(json.dumps({"what": "broker_forwarding", "frame_bytes": len(blob), "messages": messages, "window": window,
                           "clients": clients, "credit_rows": credit,
                           **{f"{k}_msgs_per_s": round(v, 1) for k, v in rates.items()},
                           "ratio_plain": round(rates["broker_plain"] / rates["zmq_proxy_plain"], 3),
                           "ratio_curve": round(rates["broker_curve"] / rates["zmq_proxy_curve"], 3),
                           "curve_cost_broker": round(rates["broker_curve"] / rates["broker_plain"], 3)}))


@app.command()
def cpu(size: str = "32,64", models: str = "tiny,paper", batch: int = 32, samples: int = 8) -> None:
    """Training-step time and sampling time per image on this machine's CPU."""
    import secrets

    import torch

    from collafuse.common.config import SamplerConfig, TrainConfig
    from collafuse.diffusion.cutnoise import CutNoise
    from collafuse.engine.client import ClientParty
    from collafuse.engine.server import ServerParty

    for s in (int(x) for x in size.split(",")):
        for m in models.split(","):
            data = torch.rand(batch * 4, 1, s, s) * 2 - 1
            client = ClientParty("bench", 0.6, data, m, train=TrainConfig(batch_size=batch), cut_noise=CutNoise(secrets.token_bytes(32)))
            server = ServerParty((1, s, s), m, train=TrainConfig(batch_size=batch))
            drawn = client.batch()
            client.train_local(drawn.x0)
            server.train_step([client.server_message(drawn)])
            start = time.perf_counter()
            for _ in range(3):
                client.train_local(drawn.x0)
            local_step = (time.perf_counter() - start) / 3
            start = time.perf_counter()
            for _ in range(3):
                server.train_step([client.server_message(drawn)])
            server_step = (time.perf_counter() - start) / 3
            start = time.perf_counter()
            x_tc = server.sampler(samples).run([server.denoise_job("j", samples, client.cut, 0, SamplerConfig())])["j"]
            server_sample = (time.perf_counter() - start) / samples
            start = time.perf_counter()
            client.finish(x_tc, samples, 0, SamplerConfig())
            client_sample = (time.perf_counter() - start) / samples
            typer.echo(json.dumps({"what": "cpu", "model": m, "size": s, "batch": batch, "threads": torch.get_num_threads(),
                                   "client_train_step_s": round(local_step, 3), "server_train_step_s": round(server_step, 3),
                                   "server_sample_s_per_image_c0.6": round(server_sample, 3),
                                   "client_sample_s_per_image_c0.6": round(client_sample, 3)}))


@app.command()
def cutnoise(sizes: str = "32,64,128", batch: int = 32, model: str = "tiny", repeats: int = 5) -> None:
    """What the keyed cut noise costs a node: ε₁ per image (SHAKE-256 + Box–Muller) and the image ids,
    against one local training step on the same batch (the work the node does anyway)."""
    import secrets

    import torch

    from collafuse.common.config import TrainConfig
    from collafuse.diffusion.cutnoise import CutNoise, image_ids
    from collafuse.engine.client import ClientParty

    for size in (int(x) for x in sizes.split(",")):
        data = torch.rand(batch, 1, size, size) * 2 - 1
        noise = CutNoise(secrets.token_bytes(32))
        ids = image_ids(data)
        start = time.perf_counter()
        for _ in range(repeats):
            noise(ids, range(batch), (1, size, size))
        per_image = (time.perf_counter() - start) / (repeats * batch)
        start = time.perf_counter()
        image_ids(data)
        id_per_image = (time.perf_counter() - start) / batch
        party = ClientParty("bench", 0.6, data, model, train=TrainConfig(batch_size=batch), cut_noise=noise)
        x0 = party.batch().x0
        party.train_local(x0)
        start = time.perf_counter()
        for _ in range(repeats):
            party.train_local(x0)
        step = (time.perf_counter() - start) / repeats
        typer.echo(json.dumps({"what": "cut_noise", "size": size, "batch": batch, "model": model, "threads": torch.get_num_threads(),
                               "eps1_ms_per_image": round(per_image * 1e3, 3), "image_id_ms_per_image": round(id_per_image * 1e3, 4),
                               "local_step_s": round(step, 3), "eps1_share_of_local_step": round(per_image * batch / step, 4)}))


@app.command()
def recovery(before: float = 15.0, down: float = 1.0, after: float = 15.0, state: bool = True,
             logs: Path = Path("/tmp/collafuse-bench-recovery")) -> None:
    """What a broker restart costs its clients: a training node (one train job in flight at a time)
    and a generating client (one denoise job at a time) keep working through a SIGKILL of the
    broker and its restart `down` seconds later on the same ports; for each, the gap between the
    last reply before the kill and the first after, and the replies lost (must be 0). With `state`
    (as `up` and `demo` run) the broker and the trainer keep theirs, and the restarted broker names
    the trainer as soon as the worker that sent the last ack is back; without, after its whole
    trainer election. `before` covers the first start's election (10 s)."""
    import os
    import signal

    import numpy as np

    from collafuse.protocol import wire
    from collafuse.system.demo import start_server_side
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import Fleet, cli

    fleet, keyring = Fleet(logs / "logs"), Keyring(logs / "keys")
    rng = np.random.default_rng(0)
    try:
        folder = logs / "state" if state else None
        front, back = start_server_side(fleet, 1, ["--device", "cpu", "--max-train-rows", "4", "--train-wait", "0"], folder, keyring)
        links = {name: _probe_link(front, keyring, name) for name in ("trainer", "waiter")}
        replies: dict[str, list[float]] = {name: [] for name in links}
        sent = dict.fromkeys(links, 0)

        def submit(name: str) -> None:
            sent[name] += 1
            job = f"{name}-{sent[name]}"
            if name == "trainer":
                links[name].submit(job, "train", _train_frames(rng, job, name))
            else:
                links[name].submit(job, "denoise", [wire.encode("denoise", job=job, client=name, count=1, t_c=60, seed=sent[name],
                                                                first_row=0, sampler="ddim", steps=10, eta=0.0)])

        def work(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for name, link in links.items():
                    for reply in link.poll(0.01):
                        if reply.env["type"] != "error":
                            replies[name].append(time.monotonic())
                    if not link.outstanding:
                        submit(name)

        for link in links.values():
            link.connect()
        work(before)
        killed = time.monotonic()
        os.kill(fleet.procs["broker"].pid, signal.SIGKILL)
        fleet.procs.pop("broker").wait()
        time.sleep(down)
        fleet.start("broker-again", cli("broker", "--frontend", front, "--backend", back, *keyring.broker_args(),
                                        *(["--state", str(folder / "broker")] if folder else [])))
        restarted = time.monotonic()
        work(after)
        end = time.monotonic() + 30  # the jobs still in flight get their answers; none may be missing
        while any(link.outstanding for link in links.values()) and time.monotonic() < end:
            for name, link in links.items():
                replies[name] += [time.monotonic() for r in link.poll(0.05) if r.env["type"] != "error"]
        out: dict = {"what": "broker_restart_recovery", "state": state, "down_s": round(restarted - killed, 2)}
        for name, times in replies.items():
            last = max(t for t in times if t < killed)
            first = min(t for t in times if t > killed)
            out[name] = {"gap_s": round(first - last, 2), "after_restart_s": round(first - restarted, 2), "replies": len(times),
                         "sent": sent[name], "unanswered": len(links[name].outstanding), "reconnects": links[name].reconnects}
        typer.echo(json.dumps(out))
    finally:
        fleet.stop_all()


@app.command()
def memory(clients: str = "1024,4096") -> None:
    """What a trainer's memory of applied jobs costs when full (131,072 jobs, spread over N clients):
    per ack remembered, and the checkpoint's copy (size, time to pack and to restore)."""
    from collafuse.common.config import ProtocolLimits
    from collafuse.protocol import wire
    from collafuse.worker.training import TrainBatcher

    for n in (int(c) for c in clients.split(",")):
        batcher = TrainBatcher(64, 0.0)
        start = time.perf_counter()
        for j in range(ProtocolLimits.acks_total // n):
            for c in range(n):
                name = f"client{c:04d}"
                batcher.remember({"client": name, "job": f"{name}-0123456789ab-{j}"}, wire.encode("ack", job="x", client=name, step=j, loss=0.1234), hold=False)
        packing = time.perf_counter()
        blob = batcher.applied_tensor()
        restoring = time.perf_counter()
        TrainBatcher(64, 0.0).restore(blob)
        end = time.perf_counter()
        typer.echo(json.dumps({"what": "ack_memory", "clients": n, "jobs": batcher.total, "us_per_ack": round((packing - start) / batcher.total * 1e6, 1),
                               "checkpoint_mb": round(blob.numel() / 1e6, 2), "pack_ms": round((restoring - packing) * 1e3),
                               "restore_ms": round((end - restoring) * 1e3)}))


@app.command()
def acks(clients: int = 16, rows: int = 4, duration: float = 15.0, model: str = "tiny", logs: Path = Path("/tmp/collafuse-bench-acks")) -> None:
    """What durable acknowledgements cost: train jobs from simulated clients through one trainer
    with --checkpoint (an ack waits for the checkpoint that contains its step) and the same trainer
    without (acks at once, not durable), one after the other in one run."""
    from collafuse.common.config import LoadConfig
    from collafuse.system.demo import start_server_side
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import Fleet
    from collafuse.tools.loadtest import run_load

    import shutil

    out: dict = {"what": "durable_acks", "model": model, "clients": clients, "rows_per_job": rows}
    shutil.rmtree(logs, ignore_errors=True)  # a checkpoint left by another run would be resumed
    for durable in (False, True):
        folder = logs / ("durable" if durable else "immediate")
        fleet, keyring = Fleet(folder / "logs"), Keyring(folder / "keys")
        try:
            args = ["--device", "cpu", "--model", model, "--max-train-rows", str(clients * rows)]
            front, _ = start_server_side(fleet, 1, args, folder if durable else None, keyring)
            load = LoadConfig(broker=front, clients=clients, duration=duration, mode="train", rows=rows,
                              keys=str(keyring.peer("load", "node")), admin_keys=str(keyring.peer("admin", "admin")))
            result = run_load(load, say=lambda _: None)
        finally:
            fleet.stop_all()
        out["durable" if durable else "immediate"] = {k: result[k] for k in ("jobs_per_s", "latency_ms", "train_steps", "lost", "errors")}
    out["throughput_ratio"] = round(out["durable"]["jobs_per_s"] / out["immediate"]["jobs_per_s"], 3)
    typer.echo(json.dumps(out))


@app.command()
def group(ranks: str = "1,2,4", model: str = "tiny", size: int = 32, device: str = "cpu", bf16: bool = False, clients: int = 32, rows: int = 8,
          max_train_rows: int = 64, duration: float = 20.0, logs: Path = Path("/tmp/collafuse-bench-group")) -> None:
    """Data-parallel training: train jobs from simulated clients through a trainer group of N ranks
    (one process and one torch thread each, gloo, on CUDA tensors with --device cuda: the ranks
    share the card; --max-train-rows per rank; the denoising forward is neither compiled nor
    graphed, which only denoising uses), the rows applied per second and the scaling efficiency
    against one rank, one run each; then, in the largest group, one rank SIGKILLed while a probe
    client trains: the time from the death to the probe's next acknowledged step, and whether any
    probe job went unanswered."""
    import os

    from collafuse.common.config import LoadConfig
    from collafuse.system.demo import start_server_side
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import Fleet
    from collafuse.tools.loadtest import run_load

    sizes = [int(n) for n in ranks.split(",")]
    out: dict = {"what": "trainer_group", "model": model, "size": size, "device": device, "bf16": bf16, "clients": clients,
                 "rows_per_job": rows, "max_train_rows_per_rank": max_train_rows, "threads_per_rank": 1, "cpus": os.cpu_count()}
    args = ["--device", device, "--model", model, "--image-size", str(size), "--max-train-rows", str(max_train_rows)]
    args += (["--bf16"] if bf16 else []) + (["--no-compile", "--no-cuda-graphs"] if device.startswith("cuda") else [])
    for n in sizes:
        fleet, keyring = Fleet(logs / f"ranks{n}" / "logs", threads=1), Keyring(logs / f"ranks{n}" / "keys")
        try:
            front, _ = start_server_side(fleet, n, args, None, keyring, trainers=n)
            load = LoadConfig(broker=front, clients=clients, duration=duration, mode="train", rows=rows, image_size=size,
                              keys=str(keyring.peer("load", "node")), admin_keys=str(keyring.peer("admin", "admin")))
            result = run_load(load, say=lambda _: None)
            out[f"ranks_{n}"] = {"rows_per_s": round(result["jobs_per_s"] * rows, 1), "train_steps": result["train_steps"],
                                 "latency_ms": result["latency_ms"], "lost": result["lost"], "errors": result["errors"]}
            if n == max(sizes) and n > 1:
                out["rank_killed"] = _kill_a_rank(fleet, front, keyring, n, size)
        finally:
            fleet.stop_all()
    base = out[f"ranks_{sizes[0]}"]["rows_per_s"] / sizes[0]
    for n in sizes:
        out[f"ranks_{n}"]["efficiency"] = round(out[f"ranks_{n}"]["rows_per_s"] / (n * base), 3)
    typer.echo(json.dumps(out))


@app.command()
def allreduce(model: str = "paper", size: int = 128, ranks: int = 2, repeats: int = 20) -> None:
    """What one data-parallel step's gradient exchange costs: the summed gradient of `model` (one
    flat float32 buffer, as `Collective.sum_` sends it) over `ranks` gloo ranks on loopback, here
    threads of one process; the median of `repeats` calls."""
    import statistics
    import threading

    import torch

    from collafuse.diffusion.models import build_unet
    from collafuse.engine.collective import Collective, StoreHost
    from collafuse.system.launch import free_port

    params = sum(p.numel() for p in build_unet(model, size, conditioned_on_cut=True, channels=1).parameters())
    hosts, times = [StoreHost(f"127.0.0.1:{free_port()}", 60.0) for _ in range(ranks)], [[] for _ in range(ranks)]

    def rank(r: int) -> None:
        group = Collective("bench", r, ranks, hosts[0].address, 60.0, hosts[r])
        grads = [torch.ones(params)]
        group.sum_(grads)  # warm the connections
        for _ in range(repeats):
            start = time.perf_counter()
            group.sum_(grads)
            times[r].append(time.perf_counter() - start)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = statistics.median(times[0]) * 1000
    typer.echo(json.dumps({"what": "gradient_allreduce", "model": model, "parameters": params, "megabytes": round(params * 4 / 1e6, 1),
                           "ranks": ranks, "median_ms": round(ms, 1), "gb_per_s_per_rank": round(2 * (ranks - 1) / ranks * params * 4 / ms / 1e6, 2)}))


def _probe_link(front: str, keyring, name: str, size: int = 32):
    """A probe client's connection to the broker (t_c = 60, T = 100), with a node key of its name."""
    from collafuse.common.config import HeartbeatConfig, ProtocolLimits
    from collafuse.protocol.link import BrokerLink
    from collafuse.protocol.security import PeerKeys

    return BrokerLink(front, {"client": name, "t_c": 60, "image_shape": [1, size, size], "levels": 100}, ProtocolLimits(), HeartbeatConfig(), 0.2,
                      keys=PeerKeys.load(keyring.peer(name, "node")))


def _train_frames(rng, job: str, client: str, size: int = 32) -> list[bytes]:
    """A valid 4-row train job at size×size with t_c = 60 (the probes' jobs)."""
    import numpy as np

    from collafuse.protocol import tensors, wire

    blob = tensors.encode({"x_t": rng.standard_normal((4, 1, size, size), dtype=np.float32), "t": np.full(4, 80, dtype=np.int64),
                           "eps": rng.standard_normal((4, 1, size, size), dtype=np.float32)})
    return [wire.encode("train", job=job, client=client, rows=4, t_c=60), blob]


def _kill_a_rank(fleet, front: str, keyring, n: int, size: int, before: float = 3.0, after: float = 15.0) -> dict:
    """A probe client trains through the group with 2 × n 4-row jobs in flight (so that every rank
    holds some); the last rank is SIGKILLed. Two times from the death: to the group's next
    acknowledged step (the survivors re-formed), and to the answer of the last job that was in
    flight then (the dead rank's jobs come back only when the broker declares it dead)."""
    import os
    import signal

    import numpy as np


    rng = np.random.default_rng(0)
    link = _probe_link(front, keyring, "probe", size)
    acks: list[tuple[float, int, str]] = []
    sent = 0

    def heard(timeout: float) -> None:
        acks.extend((time.monotonic(), r.env["step"], r.env["job"]) for r in link.poll(timeout) if r.env["type"] == "ack")

    def work(seconds: float) -> None:
        nonlocal sent
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            heard(0.01)
            while len(link.outstanding) < 2 * n:
                sent += 1
                link.submit(f"probe-{sent}", "train", _train_frames(rng, f"probe-{sent}", "probe", size))

    link.connect()
    work(before)
    killed, in_flight = time.monotonic(), set(link.outstanding)
    os.kill(fleet.procs[f"worker{n - 1}"].pid, signal.SIGKILL)
    fleet.procs.pop(f"worker{n - 1}").wait()
    work(after)
    end = time.monotonic() + 30
    while link.outstanding and time.monotonic() < end:
        heard(0.05)
    last_step = max(step for t, step, _ in acks if t < killed)
    first = min(t for t, step, _ in acks if t > killed and step > last_step)
    last_of_those = max(t for t, _, job in acks if job in in_flight)
    return {"death_to_next_step_s": round(first - killed, 2), "death_to_last_in_flight_answered_s": round(last_of_those - killed, 2),
            "probe_jobs": sent, "probe_acked": len(acks), "unanswered": len(link.outstanding)}


if __name__ == "__main__":
    app()
