"""`collafuse`: the server-side and whole-system commands. One command per role.

Heavy modules are imported inside each command, so `collafuse broker` never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from collafuse.cli.options import HB_INTERVAL, HB_LIVENESS, INSECURE, KEYS, LEVELS, MAX_FRAME, fail, key_folder, parse_ratios
from collafuse.common.config import BrokerConfig

app = typer.Typer(
    help="CollaFuse: collaborative split diffusion. Edge nodes keep their data and the last "
    "denoising steps; a shared server model does the noisy first steps for everybody.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log connection and scheduling events.")) -> None:
    """CollaFuse: collaborative split diffusion between edge nodes and a shared server model."""
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, samples.png and checkpoints/."),
    clients: int = typer.Option(3, help="Number of clients."),
    cut_ratio: str = typer.Option("0.6", "--cut-ratio", help="c in [0,1]: one for all clients, or a comma list, one per client. The client owns levels 1..round(c*T)."),
    image_size: int = typer.Option(32, help="Image side: 32, 64 or 128."),
    steps: int = typer.Option(600, help="Training steps (each: one local step per client, one merged server step)."),
    data: str = typer.Option("mni", help="'mni' (embedded MNI152 slices), 'brats:PATH' or 'images:PATH'."),
    client_model: str = typer.Option("tiny", help="Client U-Net preset: tiny, paper or large."),
    server_model: str = typer.Option("tiny", help="Server U-Net preset: tiny, paper or large."),
    batch_size: int = typer.Option(16, help="Images per client per step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (both parties)."),
    images_per_client: int = typer.Option(512, help="Augmented images per client (embedded data)."),
    samples: int = typer.Option(16, help="Images generated per client at the end."),
    sampler: str = typer.Option("ancestral", help="'ancestral' (every level) or 'ddim'."),
    ddim_steps: int = typer.Option(20, help="Total DDIM steps over T..0, shared by the parties in proportion."),
    cut_noise: str = typer.Option("keyed", help="'keyed': one secret ε₁ per image (each client's secret in OUT/secrets/); 'fresh': one per message, for comparison (the server gets a view per message)."),
    levels: int = typer.Option(100, help="T, the number of noise levels."),
    seed: int = typer.Option(0, help="Seed for data shards, augmentation and training."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu' or 'cuda:N'."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints."),
) -> None:
    """Run every party in one process, with the distributed system's exact math."""
    from collafuse.common.config import DataConfig, DiffusionConfig, SamplerConfig, SimulateConfig, TrainConfig
    from collafuse.datasets import DataError
    from collafuse.engine.simulate import run_simulation

    try:
        config = SimulateConfig(
            cut_ratios=parse_ratios(cut_ratio),
            steps=steps,
            client_model=client_model,
            server_model=server_model,
            samples_per_client=samples,
            device=device,
            cut_noise=cut_noise,
            log_every=max(1, min(25, steps // 20 or 1)),
            data=DataConfig(spec=data, clients=clients, image_size=image_size, images_per_client=images_per_client, seed=seed),
            train=TrainConfig(learning_rate=lr, batch_size=batch_size),
            sampler=SamplerConfig(kind=sampler, ddim_steps=ddim_steps),
            diffusion=DiffusionConfig(levels=levels),
        )
        config.client_cut_ratios()
        metrics = run_simulation(config, out, resume=resume)
    except (DataError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    wall = metrics["wall_seconds"]
    typer.echo(f"done in {wall['total']:.0f} s (train {wall['train']:.0f} s, sampling {wall['sample']:.0f} s) on {metrics['device']}")
    for name, curve in metrics["losses"].items():
        typer.echo(f"  {name:8s} loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f}")
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'samples.png'}, {out / 'real.png'}, {out / 'checkpoints'}/")




@app.command()
def broker(
    frontend: str = typer.Option("tcp://127.0.0.1:5555", "--frontend", help="Address nodes connect to (bind)."),
    backend: str = typer.Option("tcp://127.0.0.1:5556", "--backend", help="Address workers connect to (bind)."),
    max_queue: int = typer.Option(BrokerConfig.max_queue_per_client, "--max-queue", min=1, help="Jobs queued per client; beyond, the client is answered 'busy'."),
    max_clients: int = typer.Option(BrokerConfig.max_clients, "--max-clients", min=1, help="Client names known at once; a hello beyond is answered 'busy'."),
    client_idle_expiry: float = typer.Option(BrokerConfig.client_idle_expiry, "--client-idle-expiry", min=0.0, help="Seconds of silence (nothing queued or in flight) after which a client is forgotten."),
    no_worker_wait: float = typer.Option(BrokerConfig.no_worker_wait, "--no-worker-wait", min=0.0, help="Seconds a queued job may wait while no live worker can take it; then it is answered 'unavailable'."),
    job_timeout: float = typer.Option(BrokerConfig.job_timeout, "--job-timeout", min=0.0, help="Seconds a worker may hold a job; then it is answered 'timeout'."),
    keys: Optional[Path] = KEYS,
    insecure: bool = INSECURE,
    heartbeat_interval: float = HB_INTERVAL,
    heartbeat_liveness: int = HB_LIVENESS,
    max_frame_bytes: int = MAX_FRAME,
    levels: int = LEVELS,
) -> None:
    """Route jobs from nodes to workers: fair queues, credit-based dispatch, heartbeats, one final
    reply per accepted job within the bounds set below. No torch."""
    import zmq

    from collafuse.broker.broker import Broker
    from collafuse.common.config import HeartbeatConfig, ProtocolLimits

    config = BrokerConfig(
        frontend=frontend,
        backend=backend,
        keys=key_folder(keys, insecure),
        max_queue_per_client=max_queue,
        max_clients=max_clients,
        client_idle_expiry=client_idle_expiry,
        no_worker_wait=no_worker_wait,
        job_timeout=job_timeout,
        heartbeat=HeartbeatConfig(heartbeat_interval, heartbeat_liveness),
        limits=ProtocolLimits(levels=levels, max_frame_bytes=max_frame_bytes),
    )
    from collafuse.protocol.security import KeyFolderError

    try:
        b = Broker(config)
    except zmq.ZMQError as exc:
        fail(f"cannot bind {frontend} / {backend}: {exc}")
    except KeyFolderError as exc:
        fail(str(exc))
    b.install_signal_handlers()
    typer.echo(f"broker: nodes -> {frontend}, workers -> {backend}" + (f", keys {keys}" if keys else ", plain TCP"), err=True)
    b.run()
    typer.echo("broker: stopped", err=True)


@app.command()
def worker(
    broker: str = typer.Option("tcp://127.0.0.1:5556", "--broker", help="The broker's backend address."),
    name: str = typer.Option("worker", "--name", help="Worker name shown in status."),
    device: str = typer.Option("auto", "--device", help="'auto' (CUDA when present), 'cpu' or 'cuda:N'."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Rows in one denoising model call."),
    queue_rows: int = typer.Option(64, "--queue-rows", min=0, help="Denoising rows held beyond the pool so it stays full (credit = max batch + this)."),
    model: str = typer.Option("tiny", "--model", help="Server U-Net preset: tiny, paper or large."),
    image_size: int = typer.Option(32, "--image-size", help="Image side the server model takes."),
    train: bool = typer.Option(True, "--train/--no-train", help="Offer to be the trainer (one trainer is active at a time)."),
    max_train_rows: int = typer.Option(256, "--max-train-rows", min=1, help="Training rows merged into one optimiser step."),
    train_wait: float = typer.Option(0.05, "--train-wait", min=0.0, help="Seconds the first waiting training row waits for company."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate of the server model."),
    sync_every: int = typer.Option(20, "--sync-every", min=1, help="The trainer publishes weights every N optimiser steps."),
    checkpoint: str = typer.Option("", "--checkpoint", help="Server checkpoint (safetensors): loaded at start, written periodically and at shutdown."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=1, help="Optimiser steps between checkpoints."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast on CUDA."),
    cuda_graphs: Optional[bool] = typer.Option(
        None, "--cuda-graphs/--no-cuda-graphs", show_default="on for CUDA devices",
        help="Replay the denoising forward as CUDA graphs, one per batch-size bucket (CUDA only; a small model is launch-bound without)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial server weights (when no checkpoint)."),
    energy_report: str = typer.Option("", "--energy-report", help="Write the energy per phase (codecarbon, offline) to this JSON file at shutdown."),
    keys: Optional[Path] = KEYS,
    insecure: bool = INSECURE,
    heartbeat_interval: float = HB_INTERVAL,
    heartbeat_liveness: int = HB_LIVENESS,
    max_frame_bytes: int = MAX_FRAME,
    levels: int = LEVELS,
) -> None:
    """Serve the shared server model: batched training and continuous-batching denoising."""
    from collafuse.common.config import HeartbeatConfig, ProtocolLimits, TrainConfig, WorkerConfig
    from collafuse.worker.worker import Worker

    from collafuse.protocol.security import KeyFolderError

    config = WorkerConfig(
        broker=broker, keys=key_folder(keys, insecure), name=name, device=device, model=model, image_size=image_size, max_batch=max_batch, queue_rows=queue_rows, train=train,
        max_train_rows=max_train_rows, train_wait=train_wait, sync_every=sync_every, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, bf16=bf16, cuda_graphs=cuda_graphs, energy_report=energy_report, heartbeat=HeartbeatConfig(heartbeat_interval, heartbeat_liveness),
        train_config=TrainConfig(learning_rate=lr), limits=ProtocolLimits(levels=levels, max_frame_bytes=max_frame_bytes),
    )
    try:
        w = Worker(config, seed=seed)
    except (ValueError, KeyFolderError) as exc:
        fail(str(exc))
    w.install_signal_handlers()
    typer.echo(f"worker {name}: {model} model on {w.device}, max batch {max_batch}, broker {broker}", err=True)
    w.run()
    typer.echo(f"worker {name}: stopped after {w.party.step} optimiser steps", err=True)


@app.command()
def status(
    broker: str = typer.Option("tcp://127.0.0.1:5555", "--broker", help="The broker's frontend address."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw status as JSON."),
    keys: Optional[Path] = KEYS,
    insecure: bool = INSECURE,
) -> None:
    """Show the broker's queues, in-flight jobs, workers and per-client counts (needs an admin key)."""
    import json

    from collafuse.protocol.admin import fetch_status
    from collafuse.protocol.security import KeyFolderError, PeerKeys

    folder = key_folder(keys, insecure)
    try:
        st = fetch_status(broker, keys=PeerKeys.load(Path(folder)) if folder else None)
    except (TimeoutError, ConnectionError, KeyFolderError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"broker {broker}: up {st['uptime_s']} s, {st['queued']} queued, {st['in_flight']} in flight, {st['forwarded']} forwarded")
    typer.echo(f"workers ({len(st['workers'])}):")
    for w in st["workers"]:
        role = " trainer" if w["trainer"] else ""
        typer.echo(f"  {w['name']:<12}{role:<8} credit denoise {w['credit']['denoise']:>4} train {w['credit']['train']:>4}  in flight {w['in_flight']:>3}  done {w['completed']:>6}  seen {w['last_seen_s']} s ago")
    typer.echo(f"clients ({st['clients_total']}{', first ' + str(len(st['clients'])) + ' shown' if st['clients_total'] > len(st['clients']) else ''}):")
    for name, c in st["clients"].items():
        typer.echo(f"  {name:<12} queued {c['queued']:>3}  in flight {c['in_flight']:>3}  submitted {c['submitted']:>6}  completed {c['completed']:>6}  errors {c['errors']:>3}  busy {c['busy']:>3}")


@app.command()
def up(
    workers: int = typer.Option(1, "--workers", min=1, help="Workers to start; the first trains, all denoise."),
    device: str = typer.Option("auto", "--device", help="Device for every worker."),
    model: str = typer.Option("tiny", "--model", help="Server U-Net preset."),
    image_size: int = typer.Option(32, "--image-size", help="Image side the server model takes."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Rows in one denoising model call."),
    state: Path = typer.Option(Path("collafuse-server"), "--state", help="Folder for logs, keys (STATE/keys) and the server checkpoint."),
    insecure: bool = INSECURE,
) -> None:
    """Start a broker and workers on this machine and keep them running until Ctrl-C. The broker's
    keys and the workers' are made in STATE/keys on first start; add node keys with `collafuse keys add`."""
    import signal
    import time

    from collafuse.system.demo import start_server_side
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import Fleet

    keyring = Keyring(None if insecure else state / "keys")
    if insecure:
        key_folder(None, True)
    fleet = Fleet(state / "logs")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        frontend, backend = start_server_side(
            fleet, workers, ["--model", model, "--image-size", str(image_size), "--device", device, "--max-batch", str(max_batch)], state,
            keyring,
        )
        typer.echo(f"up: broker {frontend} (nodes) / {backend} (workers), {workers} worker(s); logs in {fleet.logs}")
        if keyring.folder is None:
            typer.echo(f"     join with: collafuse-node join --broker {frontend} --name NAME --image-size {image_size} --insecure")
        else:
            typer.echo(f"     add a node: collafuse keys add NAME --role node --broker {keyring.broker} --out NAME-keys")
            typer.echo(f"     join with:  collafuse-node join --broker {frontend} --name NAME --image-size {image_size} --keys NAME-keys")
            typer.echo(f"     status:     collafuse status --broker {frontend} --keys {keyring.peer('admin', 'admin')}")
        while not stop["now"] and all(fleet.alive(n) for n in list(fleet.procs)):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except TimeoutError as exc:
        fail(f"{exc}; see {fleet.logs}")
    finally:
        fleet.stop_all()
    typer.echo("up: stopped")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Report folder (report/ holds samples.png, real.png, metrics.json)."),
    clients: int = typer.Option(3, "--clients", min=1, help="Nodes to start."),
    cut_ratio: str = typer.Option("0.6", "--cut-ratio", help="One c for all nodes or a comma list, one per node."),
    steps: int = typer.Option(600, "--steps", min=1, help="Local training steps per node."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per node per step."),
    image_size: int = typer.Option(32, "--image-size", help="32, 64 or 128."),
    samples: int = typer.Option(16, "--samples", min=1, help="Images each node generates at the end."),
    client_model: str = typer.Option("tiny", "--client-model", help="Node U-Net preset."),
    server_model: str = typer.Option("tiny", "--server-model", help="Server U-Net preset."),
    device: str = typer.Option("auto", "--device", help="Device for the worker and nodes."),
    seed: int = typer.Option(0, "--seed", help="Seed for data shards and training."),
    lockstep: bool = typer.Option(True, "--lockstep/--async", help="Lockstep: nodes wait for the server (which shares this CPU) so it trains on every step's rows. Async: nodes never wait and skip messages while their window is full, as on a real deployment with a GPU server."),
    insecure: bool = INSECURE,
) -> None:
    """Broker, worker and nodes as separate processes on loopback: train, generate, report. Every
    connection is encrypted and authenticated with keys made in OUT/keys (unless --insecure)."""
    from collafuse.system.demo import DemoConfig, run_demo

    if insecure:
        key_folder(None, True)
    cfg = DemoConfig(out=out, clients=clients, cut_ratios=parse_ratios(cut_ratio), steps=steps, batch_size=batch_size,
                     image_size=image_size, samples=samples, client_model=client_model, server_model=server_model,
                     device=device, seed=seed, lockstep=lockstep, insecure=insecure)
    try:
        result = run_demo(cfg, say=lambda line: typer.echo(line, err=True))
    except (ValueError, RuntimeError, TimeoutError) as exc:
        fail(str(exc))
    report = result["report"]
    typer.echo(f"demo done in {result['metrics']['wall_seconds']:.0f} s")
    for name, c in result["metrics"]["clients"].items():
        local = c["local_loss"][-1][1] if c.get("local_loss") else float("nan")
        server = c["server_loss"][-1][1] if c.get("server_loss") else float("nan")
        typer.echo(f"  {name}: c={c['cut_ratio']} t_c={c['t_c']}  local loss {local:.4f}  server loss {server:.4f}  train jobs acked {c['acked']}/{c['sent']}")
    typer.echo(f"report: {report / 'samples.png'} (one row per client), {report / 'real.png'}, {report / 'metrics.json'}")


@app.command()
def loadtest(
    clients: int = typer.Option(64, "--clients", min=1, help="Simulated clients (many per process and per socket)."),
    duration: float = typer.Option(10.0, "--duration", min=0.1, help="Seconds of load; then outstanding jobs get --drain seconds."),
    mode: str = typer.Option("denoise", "--mode", help="denoise, train or mixed."),
    broker: str = typer.Option("", "--broker", help="A running broker's frontend; empty: start a broker and a worker here."),
    rows: int = typer.Option(1, "--rows", min=1, help="Images per job."),
    ddim_steps: int = typer.Option(10, "--ddim-steps", min=1, help="DDIM steps over T..0 per denoise job (the server does its share)."),
    image_size: int = typer.Option(32, "--image-size", help="Must match the worker's model."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="For the worker started here."),
    model: str = typer.Option("tiny", "--model", help="For the worker started here."),
    device: str = typer.Option("auto", "--device", help="For the worker started here."),
    drain: float = typer.Option(60.0, "--drain", min=0.0, help="Seconds outstanding jobs may take after the load ends."),
    json_out: Path = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="With --broker: a node key folder for the simulated clients (a broker started here makes its own keys)."),
    admin_keys: Optional[Path] = typer.Option(None, "--admin-keys", help="With --broker: an admin key folder, to read the workers' counters (batch fill)."),
    insecure: bool = INSECURE,
) -> None:
    """Load a broker with simulated clients; report jobs/s, image-steps/s, latency, batch fill, errors, lost jobs."""
    import json
    import tempfile

    from collafuse.system.demo import start_server_side
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import Fleet
    from collafuse.tools.loadtest import LoadConfig, run_load

    fleet = None
    try:
        if not broker:
            if keys or admin_keys:
                fail("--keys and --admin-keys are for a running --broker; a broker started here makes its own keys")
            here = Path(tempfile.mkdtemp(prefix="collafuse-loadtest-"))
            keyring = Keyring(None if insecure else here / "keys")
            fleet = Fleet(here / "logs")
            broker, _ = start_server_side(
                fleet, 1, ["--model", model, "--image-size", str(image_size), "--device", device, "--max-batch", str(max_batch),
                           "--queue-rows", str(max_batch), "--max-train-rows", str(max(max_batch, rows))], None, keyring)
            node_keys = str(keyring.peer("load", "node")) if keyring.folder else ""
            admin_folder = str(keyring.peer("admin", "admin")) if keyring.folder else ""
            typer.echo(f"[loadtest] started a broker and a worker (logs in {fleet.logs})", err=True)
        else:
            node_keys = key_folder(keys, insecure)
            admin_folder = str(admin_keys) if admin_keys else ""
        result = run_load(
            LoadConfig(broker=broker, clients=clients, duration=duration, mode=mode, image_size=image_size, rows=rows,
                       ddim_steps=ddim_steps, drain=drain, keys=node_keys, admin_keys=admin_folder),
            say=lambda line: typer.echo(line, err=True),
        )
    except (ValueError, TimeoutError) as exc:
        fail(str(exc))
    finally:
        if fleet is not None:
            fleet.stop_all()
    lat = result["latency_ms"]
    typer.echo(f"{result['clients']} clients, {result['mode']}, {result['duration_s']} s: {result['completed_in_window']} jobs in the window "
               f"({result['jobs_per_s']} jobs/s, {result['image_steps_per_s']} image-steps/s), {result['completed']} with the drain")
    fill = result["mean_batch_fill"]
    typer.echo(f"latency p50 {lat['p50']} ms  p95 {lat['p95']} ms  p99 {lat['p99']} ms;  "
               f"mean batch fill {'n/a (no denoising)' if fill is None else fill}")
    typer.echo(f"errors {result['errors'] or 'none'};  lost jobs {result['lost']}")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    if result["lost"]:
        raise typer.Exit(1)


@app.command()
def sweep(
    out: Path = typer.Option(..., "--out", help="Folder: MODE/seedS/cC run folders, results.csv, results.md, figure.png."),
    cut_ratios: str = typer.Option("0,0.2,0.4,0.6,0.8,1", "--cut-ratios", help="Comma list of cut ratios."),
    seeds: str = typer.Option("0", "--seeds", help="Comma list of seeds (data augmentation and training); tables give mean ± std over them."),
    cut_noise: str = typer.Option("keyed", "--cut-noise", help="Comma list of cut-noise modes to compare: keyed, fresh."),
    clients: int = typer.Option(3, "--clients", min=1, help="Clients per run."),
    steps: int = typer.Option(600, "--steps", min=1, help="Training steps per run."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per client per step."),
    image_size: int = typer.Option(32, "--image-size", help="32, 64 or 128."),
    samples: int = typer.Option(64, "--samples", min=4, help="Images generated per client."),
    real_images: int = typer.Option(512, "--real-images", min=4, help="Real images per client for KID (half as many hold-out images)."),
    nonmembers: int = typer.Option(1024, "--nonmembers", min=2, help="Hold-out images for the audit's membership inference."),
    disclosure_kid: bool = typer.Option(True, "--disclosure-kid/--no-disclosure-kid", help="Also the KID and nearest-image MSE of the server's output at t_c (twice the Inception work; the audit measures disclosure either way)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run each cut ratio in one process instead of through broker, worker and nodes (needed for the privacy audit)."),
    client_model: str = typer.Option("tiny", "--client-model", help="Client U-Net preset."),
    server_model: str = typer.Option("tiny", "--server-model", help="Server U-Net preset."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda:N'."),
    pack: Optional[Path] = typer.Option(None, "--pack", help="Only train and generate (with --in-process), packing each finished run into this folder for evaluation elsewhere: python -m collafuse.tools.runpack PACKS --out OUT, then this command without --pack."),
) -> None:
    """The paper's experiment across cut ratios, seeds and cut-noise modes: KID, the privacy audit and local energy; resumable."""
    from collafuse.evaluation.kid import EvaluationError
    from collafuse.tools.sweep import SweepConfig, pack_runs, run_sweep

    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        fail(f"seeds must be whole numbers, got {seeds!r}")
    modes = tuple(cut_noise.split(","))
    if not set(modes) <= {"keyed", "fresh"}:
        fail(f"cut-noise modes are keyed and fresh, got {cut_noise!r}")
    cfg = SweepConfig(out=out, cut_ratios=parse_ratios(cut_ratios), seeds=seed_list, cut_noise=modes, clients=clients, steps=steps,
                      batch_size=batch_size, image_size=image_size, samples=samples, real_images=real_images, nonmembers=nonmembers,
                      in_process=in_process, client_model=client_model, server_model=server_model, device=device,
                      disclosure_kid=disclosure_kid)

    def say(line: str) -> None:
        typer.echo(line, err=True)

    try:
        if pack is not None:
            pack_runs(cfg, pack, say)
            typer.echo(f"packed runs in {pack}")
            return
        run_sweep(cfg, say)
    except (EvaluationError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'figure.png'}")


@app.command()
def audit(
    run: Path = typer.Argument(..., help="A finished in-process run folder (`collafuse simulate --out RUN`, or one of a sweep's)."),
    nonmembers: int = typer.Option(1024, "--nonmembers", min=2, help="Hold-out images for membership inference (1,000 or more allow TPR at 0.1 % FPR)."),
) -> None:
    """What an honest-but-curious server can learn from a run: reconstruction attacks on what it saw, membership inference on its model."""
    from collafuse.evaluation.audit import AUDIT_FILE, audit_run

    if not (run / "metrics.json").is_file():
        fail(f"not a finished run folder (no metrics.json): {run}")
    try:
        report = audit_run(run, nonmembers, say=lambda line: typer.echo(line, err=True))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    typer.echo(f"{'client':<10}{'t_c':>4}  {'views':>6} {'images':>6}  {'attack':<10}{'MSE':>8} {'PSNR':>6} {'prior err removed':>18} {'re-id top-1':>12}")
    for c in report["clients"]:
        for attack in ("linear", "multiview"):
            s = c[attack]
            typer.echo(f"{c['client']:<10}{c['t_c']:>4}  {c['views']:>6} {c['images_sent']:>6}  {attack:<10}{s['mse']:>8.4f} {s['psnr']:>6.1f} "
                       f"{s['prior_error_removed']:>18.3f} {s['reid_top1']:>12.3f}")
    m = report["membership"]
    if m and "loss" in m:
        for kind in ("loss", "pia"):
            tpr = {k: "n/a" if m[kind][k] is None else f"{m[kind][k]:.3f}" for k in ("tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")}
            typer.echo(f"membership ({kind}): AUC {m[kind]['auc']:.3f}, TPR at 1% FPR {tpr['tpr_at_1pct_fpr']}, at 0.1% FPR {tpr['tpr_at_0.1pct_fpr']} "
                       f"({m['members']} members, {m['nonmembers']} non-members)")
    typer.echo(f"wrote {run / AUDIT_FILE}")


if __name__ == "__main__":
    app()


keys_app = typer.Typer(
    help="CURVE keys: the broker's key folder with one allow-list per role (node, admin, worker, trainer), and one key "
    "folder per peer. Every connection is encrypted and authenticated; removing a key's file from the broker's folder "
    "revokes it within a heartbeat, without a restart.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(folder: Path = typer.Argument(..., help="The broker's key folder to create.")) -> None:
    """Create the broker's key pair and its empty allow-lists (nodes/, admins/, workers/, trainers/)."""
    from collafuse.protocol.security import KeyFolderError, init_broker_keys

    try:
        init_broker_keys(folder)
    except KeyFolderError as exc:
        fail(str(exc))
    typer.echo(f"broker keys in {folder}/ (broker.key_secret stays here; give peers broker.key via `collafuse keys add`)")


@keys_app.command("add")
def keys_add(
    name: str = typer.Argument(..., help="The key's name (a node's key need not match its client name)."),
    role: str = typer.Option(..., "--role", help="node (train and generate), admin (status), worker (denoise) or trainer (denoise and train)."),
    broker_keys: Path = typer.Option(..., "--broker", help="The broker's key folder (from `collafuse keys init`)."),
    out: Path = typer.Option(..., "--out", help="The peer's key folder to write: its key pair and the broker's public key; give it to the peer as --keys."),
) -> None:
    """Create a peer's key pair and allow it in the broker's folder for ROLE."""
    from collafuse.protocol.security import KeyFolderError, add_peer_key

    try:
        add_peer_key(name, role, broker_keys, out)
    except KeyFolderError as exc:
        fail(str(exc))
    typer.echo(f"{role} key {name} in {out}/ (allowed by {broker_keys}/{role}s/{name}.key)")


@keys_app.command("revoke")
def keys_revoke(
    name: str = typer.Argument(..., help="The key's name."),
    broker_keys: Path = typer.Option(..., "--broker", help="The broker's key folder."),
) -> None:
    """Remove a key from every allow-list; a running broker refuses its next message."""
    from collafuse.protocol.security import revoke

    roles = revoke(name, broker_keys)
    if not roles:
        fail(f"no key named {name} in {broker_keys}")
    typer.echo(f"revoked {name} ({', '.join(roles)})")
