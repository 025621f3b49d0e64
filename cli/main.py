"""`collafuse`: the server-side and whole-system commands. One command per role.

Heavy modules are imported inside each command, so `collafuse broker` never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from collafuse.cli.options import DEVICE, INSECURE, MAX_FRAME, Connection, Keys, ServerModel, command_line, fail, key_folder, parse_ratios, takes, user_errors
from collafuse.common.config import (
    BrokerConfig, DataConfig, DemoConfig, DiffusionConfig, LoadConfig, SamplerConfig, SimulateConfig, SweepConfig, TrainConfig, WorkerConfig,
)

app = command_line(
    "CollaFuse: collaborative split diffusion. Edge nodes keep their data and the last "
    "denoising steps; a shared server model does the noisy first steps for everybody.",
    "Log connection and scheduling events.",
)


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, samples.png and checkpoints/."),
    clients: int = typer.Option(DataConfig.clients, help="Number of clients."),
    cut_ratio: str = typer.Option(",".join(map(str, SimulateConfig.cut_ratios)), "--cut-ratio", help="c in [0,1]: one for all clients, or a comma list, one per client. The client owns levels 1..round(c*T)."),
    image_size: int = typer.Option(DataConfig.image_size, help="Image side: 32, 64 or 128."),
    steps: int = typer.Option(SimulateConfig.steps, help="Training steps (each: one local step per client, one merged server step)."),
    data: str = typer.Option(DataConfig.spec, help="'mni' (embedded MNI152 slices), 'brats:PATH' or 'images:PATH'."),
    client_model: str = typer.Option(SimulateConfig.client_model, help="Client U-Net preset: tiny, paper or large."),
    server_model: str = typer.Option(SimulateConfig.server_model, help="Server U-Net preset: tiny, paper or large."),
    batch_size: int = typer.Option(SimulateConfig().train.batch_size, help="Images per client per step."),
    lr: float = typer.Option(TrainConfig.learning_rate, help="Adam learning rate (both parties)."),
    images_per_client: int = typer.Option(DataConfig.images_per_client, help="Augmented images per client (embedded data)."),
    samples: int = typer.Option(SimulateConfig.samples_per_client, help="Images generated per client at the end."),
    sampler: str = typer.Option(SamplerConfig.kind, help="'ancestral' (every level) or 'ddim'."),
    ddim_steps: int = typer.Option(SamplerConfig.ddim_steps, help="Total DDIM steps over T..0, shared by the parties in proportion."),
    cut_noise: str = typer.Option(SimulateConfig.cut_noise, help="'keyed': one secret ε₁ per image (each client's secret in OUT/secrets/); 'fresh': one per message, for comparison (the server gets a view per message)."),
    levels: int = typer.Option(DiffusionConfig.levels, help="T, the number of noise levels."),
    seed: int = typer.Option(DataConfig.seed, help="Seed for data shards, augmentation and training."),
    device: str = typer.Option(SimulateConfig.device, help="'auto' (CUDA when present), 'cpu' or 'cuda:N'."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints."),
) -> None:
    """Run every party in one process, with the distributed system's exact math."""
    from collafuse.datasets import DataError
    from collafuse.engine.simulate import run_simulation

    with user_errors(DataError, ValueError, FileNotFoundError):
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
    wall = metrics["wall_seconds"]
    typer.echo(f"done in {wall['total']:.0f} s (train {wall['train']:.0f} s, sampling {wall['sample']:.0f} s) on {metrics['device']}")
    for name, curve in metrics["losses"].items():
        typer.echo(f"  {name:8s} loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f}")
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'samples.png'}, {out / 'real.png'}, {out / 'checkpoints'}/")


@app.command()
@takes(Connection)
def broker(
    conn: Connection,
    frontend: str = typer.Option(BrokerConfig.frontend, "--frontend", help="Address nodes connect to (bind)."),
    backend: str = typer.Option(BrokerConfig.backend, "--backend", help="Address workers connect to (bind)."),
    max_queue: int = typer.Option(BrokerConfig.max_queue_per_client, "--max-queue", min=1, help="Jobs queued per client; beyond, the client is answered 'busy'."),
    max_clients: int = typer.Option(BrokerConfig.max_clients, "--max-clients", min=1, help="Client names known at once; a hello beyond is answered 'busy'."),
    group_settle: float = typer.Option(BrokerConfig.group_settle, "--group-settle", min=0.0, help="Seconds after a trainer joins, leaves or reports a failed collective before the trainer group re-forms (several events make one new generation)."),
    group_report_wait: float = typer.Option(BrokerConfig.group_report_wait, "--group-report-wait", min=0.0, help="Seconds a failed generation's re-form waits, beyond --group-settle, for every live member's report (a member busy when the failure came reports late; one that never reports is left out of the next generation): the price of a stalled rank."),
    group_max_failures: int = typer.Option(BrokerConfig.group_max_failures, "--group-max-failures", min=1, help="Failed trainer-group generations in a row after which trainers that never held one (formed and took a step) beside another are suspects, left out in turn to find one that breaks every generation; found, it only denoises until it restarts."),
    max_connections_per_key: int = typer.Option(BrokerConfig.max_connections_per_key, "--max-connections-per-key", min=1, help="Connections one node key keeps known at once (with keys); beyond, its oldest is forgotten and answered 'not_joined'."),
    client_idle_expiry: float = typer.Option(BrokerConfig.client_idle_expiry, "--client-idle-expiry", min=0.0, help="Seconds of silence (nothing queued or in flight) after which a client is forgotten."),
    no_worker_wait: float = typer.Option(BrokerConfig.no_worker_wait, "--no-worker-wait", min=0.0, help="Seconds a queued job may wait while no live worker can take it; then it is answered 'unavailable'."),
    job_timeout: float = typer.Option(BrokerConfig.job_timeout, "--job-timeout", min=0.0, help="Seconds a worker may hold a job; then it is answered 'timeout'."),
    elect_trainer_for: float = typer.Option(BrokerConfig.elect_trainer_for, "--elect-trainer-for", min=0.0, help="Seconds after start before a lone trainer is named (train jobs wait): every worker that was the trainer before a restart registers meanwhile and reports its step, and the one with the highest step is chosen, not the first to register."),
    reserve_after: float = typer.Option(BrokerConfig.reserve_after, "--reserve-after", min=0.0, help="Seconds smaller jobs may pass a queued job that no worker's free credit covers yet; then the worker closest to covering it is kept for it, so a large job cannot starve."),
    state: str = typer.Option(BrokerConfig.state, "--state", help="Folder for the trainer's latest relayed weights and moments and the client-name registry, written as they change and read at start, so a restarted broker serves late workers at once and no name changes hands. Queued jobs are not kept: nodes re-send them. The folder also fixes the model (image shape, T) the broker serves: another model needs another folder."),
    max_frame_bytes: int = MAX_FRAME,
) -> None:
    """Route jobs from nodes to workers: fair queues, credit-based dispatch, heartbeats, one final
    reply per accepted job within the bounds set below. No torch."""
    if elect_trainer_for >= no_worker_wait:
        fail(f"--elect-trainer-for {elect_trainer_for:g} s must be below --no-worker-wait {no_worker_wait:g} s, or train jobs "
             f"sent during the election are answered unavailable")
    import zmq

    from collafuse.broker.broker import Broker
    from collafuse.protocol.security import KeyFolderError

    config = BrokerConfig(
        frontend=frontend,
        backend=backend,
        keys=conn.folder(),
        max_queue_per_client=max_queue,
        max_clients=max_clients,
        max_connections_per_key=max_connections_per_key,
        group_settle=group_settle,
        group_report_wait=group_report_wait,
        group_max_failures=group_max_failures,
        client_idle_expiry=client_idle_expiry,
        no_worker_wait=no_worker_wait,
        job_timeout=job_timeout,
        reserve_after=reserve_after,
        elect_trainer_for=elect_trainer_for,
        state=state,
        heartbeat=conn.heartbeat(),
        limits=conn.limits(max_frame_bytes),
    )
    with user_errors(KeyFolderError):
        try:
            b = Broker(config)
        except zmq.ZMQError as exc:
            fail(f"cannot bind {frontend} / {backend}: {exc}")
    b.install_signal_handlers()
    typer.echo(f"broker: nodes -> {frontend}, workers -> {backend}" + (f", keys {conn.keys}" if conn.keys else ", plain TCP"), err=True)
    b.run()
    typer.echo("broker: stopped", err=True)


@app.command()
@takes(ServerModel, Connection)
def worker(
    served: ServerModel,
    conn: Connection,
    broker: str = typer.Option(WorkerConfig.broker, "--broker", help="The broker's backend address."),
    name: str = typer.Option(WorkerConfig.name, "--name", help="Worker name shown in status."),
    queue_rows: int = typer.Option(WorkerConfig.queue_rows, "--queue-rows", min=0, help="Denoising rows held beyond the pool so it stays full (credit = max batch + this)."),
    train: bool = typer.Option(WorkerConfig.trainer, "--train/--no-train", help="Offer to be the trainer (one trainer is active at a time, unless they form a --group)."),
    max_train_rows: int = typer.Option(WorkerConfig.max_train_rows, "--max-train-rows", min=1, help="Training rows merged into one optimiser step."),
    train_wait: float = typer.Option(WorkerConfig.train_wait, "--train-wait", min=0.0, help="Seconds the first waiting training row waits for company."),
    lr: float = typer.Option(TrainConfig.learning_rate, "--lr", help="Adam learning rate of the server model."),
    sync_every: int = typer.Option(WorkerConfig.sync_every, "--sync-every", min=1, help="The trainer publishes weights every N optimiser steps."),
    checkpoint: str = typer.Option(WorkerConfig.checkpoint, "--checkpoint", help="Server checkpoint (safetensors): loaded at start, written periodically and at shutdown. A trainer with a checkpoint acknowledges a train job only once a checkpoint contains its step, so acknowledged updates survive its death; without, acknowledgements are not durable."),
    checkpoint_every: int = typer.Option(WorkerConfig.checkpoint_every, "--checkpoint-every", min=1, help="Optimiser steps between checkpoints (at most; acknowledgements waiting make them sooner)."),
    durable_wait: float = typer.Option(WorkerConfig.durable_wait, "--durable-wait", min=0.0, help="With --checkpoint: seconds an acknowledgement may wait for its checkpoint while training rows keep coming (an idle trainer checkpoints at once)."),
    bf16: bool = typer.Option(WorkerConfig.bf16, "--bf16", help="bfloat16 autocast on CUDA."),
    cuda_graphs: Optional[bool] = typer.Option(
        WorkerConfig.cuda_graphs, "--cuda-graphs/--no-cuda-graphs", show_default="on for CUDA devices",
        help="Replay the denoising forward as CUDA graphs, one per batch-size bucket (CUDA only; a small model is launch-bound without)."),
    compiled: Optional[bool] = typer.Option(
        WorkerConfig.compile, "--compile/--no-compile", show_default="on for CUDA devices",
        help="Compile the denoising forward with torch.compile (inductor), captured in the CUDA-graph buckets when those are on. "
             "The worker compiles at start, before it registers, and says what it compiled and how long it took; a model that "
             "fails to compile is served eagerly."),
    compile_train: bool = typer.Option(
        WorkerConfig.compile_train, "--compile-train/--no-compile-train",
        help="A trainer compiles its training step (forward and backward) too, at start. Equal to eager; not yet measured to pay on a GPU."),
    compile_cache: str = typer.Option(
        WorkerConfig.compile_cache, "--compile-cache", metavar="DIR",
        help="Keep the compiled artifacts in DIR and reuse them at the next start (a warm start takes seconds, a cold one minutes). "
             "Default: torch's own folder under the system's temporary directory."),
    seed: int = typer.Option(WorkerConfig.seed, "--seed", help="Seed of the initial server weights (when no checkpoint)."),
    energy_report: str = typer.Option(WorkerConfig.energy_report, "--energy-report", help="Write the energy per phase (codecarbon, offline) to this JSON file at shutdown."),
    group: str = typer.Option(
        WorkerConfig.group, "--group", metavar="HOST:PORT",
        help="Join the data-parallel trainer group: every trainer started with --group trains the one model together (gloo), "
             "the broker spreads train jobs over them and re-forms the group when one joins or dies. HOST:PORT is where this "
             "worker serves the group's rendezvous when it is rank 0 (reachable by the other trainers; one free port per worker)."),
    group_timeout: float = typer.Option(WorkerConfig.group_timeout, "--group-timeout", min=0.1, help="Seconds a trainer group's collective waits for a slow or dead rank before the group re-forms without it: above any rank's longest pause between steps (a denoising iteration, a checkpoint), below the heartbeat interval × liveness."),
    max_frame_bytes: int = MAX_FRAME,
) -> None:
    """Serve the shared server model: batched training and continuous-batching denoising."""
    from collafuse.protocol.security import KeyFolderError
    from collafuse.worker.worker import Worker

    config = WorkerConfig(
        broker=broker, keys=conn.folder(), name=name, device=served.device, model=served.model, image_size=served.image_size, max_batch=served.max_batch,
        queue_rows=queue_rows, trainer=train, max_train_rows=max_train_rows, train_wait=train_wait, sync_every=sync_every,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, durable_wait=durable_wait, bf16=bf16, cuda_graphs=cuda_graphs, compile=compiled,
        compile_train=compile_train, compile_cache=compile_cache, energy_report=energy_report,
        seed=seed, group=group, group_timeout=group_timeout, heartbeat=conn.heartbeat(), train=TrainConfig(learning_rate=lr),
        limits=conn.limits(max_frame_bytes),
    )
    with user_errors(ValueError, KeyFolderError):
        w = Worker(config)
    w.install_signal_handlers()
    typer.echo(f"worker {name}: {served.model} model on {w.device}, max batch {served.max_batch}, broker {broker}", err=True)
    w.run(say=lambda line: typer.echo(f"worker {name}: {line}", err=True))
    typer.echo(f"worker {name}: stopped after {w.party.step} optimiser steps", err=True)


@app.command()
@takes(Keys)
def status(
    keys: Keys,
    broker: str = typer.Option(BrokerConfig.frontend, "--broker", help="The broker's frontend address."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw status as JSON."),
) -> None:
    """Show the broker's queues, in-flight jobs, workers and per-client counts (needs an admin key)."""
    import json

    from collafuse.protocol.admin import fetch_status
    from collafuse.protocol.security import KeyFolderError, PeerKeys

    folder = keys.folder()
    with user_errors(TimeoutError, ConnectionError, KeyFolderError):
        st = fetch_status(broker, keys=PeerKeys.load(Path(folder)) if folder else None)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"broker {broker}: up {st['uptime_s']} s, {st['queued']} queued, {st['in_flight']} in flight, {st['forwarded']} forwarded")
    group = st["trainer_group"]
    typer.echo(f"workers ({len(st['workers'])}){'; trainer group ' + group['generation'] + ' of ' + str(group['world']) if group['world'] else ''}:")
    if group.get("out") or group.get("parked"):
        typer.echo(f"  (searching the trainer group for a member at fault: out {', '.join(group['out']) or '-'}; "
                   f"parked {', '.join(group['parked']) or '-'})")
    for w in st["workers"]:
        role = f" rank {w['rank']}" if w["rank"] is not None else " trainer" if w["trainer"] else ""
        typer.echo(f"  {w['name']:<12}{role:<8} credit denoise {w['credit']['denoise']:>4} train {w['credit']['train']:>4}  in flight {w['in_flight']:>3}  done {w['completed']:>6}  seen {w['last_seen_s']} s ago")
    typer.echo(f"clients ({st['clients_total']}{', first ' + str(len(st['clients'])) + ' shown' if st['clients_total'] > len(st['clients']) else ''}):")
    for name, c in st["clients"].items():
        typer.echo(f"  {name:<12} t_c {c['t_c']:>3}  queued {c['queued']:>3}  in flight {c['in_flight']:>3}  submitted {c['submitted']:>6}  completed {c['completed']:>6}  errors {c['errors']:>3}  busy {c['busy']:>3}")


@app.command()
@takes(ServerModel)
def up(
    served: ServerModel,
    workers: int = typer.Option(1, "--workers", min=1, help="Workers to start; the first --trainers of them train, all denoise."),
    trainers: int = typer.Option(1, "--trainers", min=1, help="How many of the workers train: two or more form one data-parallel trainer group (gloo) that trains the one model together."),
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

    if trainers > workers:
        fail(f"--trainers {trainers} exceeds --workers {workers}")
    keyring = Keyring(None if insecure else state / "keys")
    if insecure:
        key_folder(None, True)
    fleet = Fleet(state / "logs")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        frontend, backend = start_server_side(fleet, workers, served.worker_args(), state, keyring, trainers)
        group = f", a trainer group of {trainers}" if trainers > 1 else ""
        typer.echo(f"up: broker {frontend} (nodes) / {backend} (workers), {workers} worker(s){group}; logs in {fleet.logs}")
        if keyring.folder is None:
            typer.echo(f"     join with: collafuse-node join --broker {frontend} --name NAME --image-size {served.image_size} --insecure")
        else:
            typer.echo(f"     add a node: collafuse keys add NAME --role node --broker {keyring.broker} --out NAME-keys")
            typer.echo(f"     join with:  collafuse-node join --broker {frontend} --name NAME --image-size {served.image_size} --keys NAME-keys")
            typer.echo(f"     status:     collafuse status --broker {frontend} --keys {keyring.peer('admin', 'admin')}")
        while not stop["now"] and all(fleet.alive(n) for n in list(fleet.procs)):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except (TimeoutError, RuntimeError) as exc:  # a worker that never registered, or exited first
        fail(f"{exc}; see {fleet.logs}")
    finally:
        fleet.stop_all()
    typer.echo("up: stopped")


@app.command()
def demo(
    out: Path = typer.Option(DemoConfig.out, "--out", help="Report folder (report/ holds samples.png, real.png, metrics.json)."),
    clients: int = typer.Option(DemoConfig.clients, "--clients", min=1, help="Nodes to start."),
    cut_ratio: str = typer.Option(",".join(map(str, DemoConfig.cut_ratios)), "--cut-ratio", help="One c for all nodes or a comma list, one per node (a c with round(c*T) = 0 sends the embedded images unnoised, as asked)."),
    steps: int = typer.Option(DemoConfig.steps, "--steps", min=1, help="Local training steps per node."),
    batch_size: int = typer.Option(DemoConfig.batch_size, "--batch-size", min=1, help="Images per node per step."),
    image_size: int = typer.Option(DemoConfig.image_size, "--image-size", help="32, 64 or 128."),
    samples: int = typer.Option(DemoConfig.samples, "--samples", min=1, help="Images each node generates at the end."),
    client_model: str = typer.Option(DemoConfig.client_model, "--client-model", help="Node U-Net preset."),
    server_model: str = typer.Option(DemoConfig.server_model, "--server-model", help="Server U-Net preset."),
    device: str = typer.Option(DemoConfig.device, "--device", help="Device for the worker and nodes."),
    seed: int = typer.Option(DemoConfig.seed, "--seed", help="Seed for data shards and training."),
    lockstep: bool = typer.Option(DemoConfig.lockstep, "--lockstep/--async", help="Lockstep: nodes wait for the server (which shares this CPU) so it trains on every step's rows. Async: nodes never wait and skip messages while their window is full, as on a real deployment with a GPU server."),
    insecure: bool = INSECURE,
) -> None:
    """Broker, worker and nodes as separate processes on loopback: train, generate, report. Every
    connection is encrypted and authenticated with keys made in OUT/keys (unless --insecure)."""
    from collafuse.system.demo import run_demo

    if insecure:
        key_folder(None, True)
    cfg = DemoConfig(out=out, clients=clients, cut_ratios=parse_ratios(cut_ratio), steps=steps, batch_size=batch_size,
                     image_size=image_size, samples=samples, client_model=client_model, server_model=server_model,
                     device=device, seed=seed, lockstep=lockstep, insecure=insecure)
    with user_errors(ValueError, RuntimeError, TimeoutError):
        result = run_demo(cfg, say=lambda line: typer.echo(line, err=True))
    report = result["report"]
    typer.echo(f"demo done in {result['metrics']['wall_seconds']:.0f} s")
    for name, c in result["metrics"]["clients"].items():
        local = c["local_loss"][-1][1] if c.get("local_loss") else float("nan")
        server = c["server_loss"][-1][1] if c.get("server_loss") else float("nan")
        typer.echo(f"  {name}: c={c['cut_ratio']} t_c={c['t_c']}  local loss {local:.4f}  server loss {server:.4f}  train jobs acked {c['acked']}/{c['sent']}")
    typer.echo(f"report: {report / 'samples.png'} (one row per client), {report / 'real.png'}, {report / 'metrics.json'}")


@app.command()
@takes(ServerModel)
def loadtest(
    served: ServerModel,
    clients: int = typer.Option(LoadConfig.clients, "--clients", min=1, help="Simulated clients (many per process and per socket)."),
    duration: float = typer.Option(LoadConfig.duration, "--duration", min=0.1, help="Seconds of load that are counted; then outstanding jobs get --drain seconds."),
    warmup: float = typer.Option(LoadConfig.warmup, "--warmup", min=0.0, help="Seconds of load before the counted window opens, so that the pipeline is full at both of its ends (throughput and latency count only the window's replies)."),
    mode: str = typer.Option(LoadConfig.mode, "--mode", help="denoise, train or mixed."),
    broker: str = typer.Option(LoadConfig.broker, "--broker", help="A running broker's frontend; empty: start a broker and a worker here."),
    rows: int = typer.Option(LoadConfig.rows, "--rows", min=1, help="Images per job."),
    ddim_steps: int = typer.Option(LoadConfig.ddim_steps, "--ddim-steps", min=1, help="DDIM steps over T..0 per denoise job (the server does its share)."),
    drain: float = typer.Option(LoadConfig.drain, "--drain", min=0.0, help="Seconds outstanding jobs may take after the load ends."),
    json_out: Path = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="With --broker: a node key folder for the simulated clients (a broker started here makes its own keys)."),
    admin_keys: Optional[Path] = typer.Option(None, "--admin-keys", help="With --broker: an admin key folder, to read the workers' counters (batch fill)."),
    insecure: bool = INSECURE,
) -> None:
    """Load a broker with simulated clients; report jobs/s, image-steps/s, latency, batch fill, errors, lost jobs and jobs answered twice (exit 1 if any job is lost or answered twice)."""
    import json
    import tempfile

    from collafuse.system.demo import start_server_side
    from collafuse.system.keyring import Keyring
    from collafuse.system.launch import Fleet
    from collafuse.tools.loadtest import run_load

    fleet = None
    try:
        if not broker:
            if keys or admin_keys:
                fail("--keys and --admin-keys are for a running --broker; a broker started here makes its own keys")
            here = Path(tempfile.mkdtemp(prefix="collafuse-loadtest-"))
            keyring = Keyring(None if insecure else here / "keys")
            fleet = Fleet(here / "logs")
            broker, _ = start_server_side(
                fleet, 1, [*served.worker_args(), "--queue-rows", str(served.max_batch), "--max-train-rows", str(max(served.max_batch, rows))],
                None, keyring)
            node_keys = str(keyring.peer("load", "node")) if keyring.folder else ""
            admin_folder = str(keyring.peer("admin", "admin")) if keyring.folder else ""
            typer.echo(f"[loadtest] started a broker and a worker (logs in {fleet.logs})", err=True)
        else:
            node_keys = key_folder(keys, insecure)
            admin_folder = str(admin_keys) if admin_keys else ""
        result = run_load(
            LoadConfig(broker=broker, clients=clients, duration=duration, warmup=warmup, mode=mode, image_size=served.image_size, rows=rows,
                       ddim_steps=ddim_steps, drain=drain, keys=node_keys, admin_keys=admin_folder),
            say=lambda line: typer.echo(line, err=True),
        )
    except (ValueError, TimeoutError, RuntimeError) as exc:
        fail(str(exc))
    finally:
        if fleet is not None:
            fleet.stop_all()
    lat = result["latency_ms"]
    typer.echo(f"{result['clients']} clients, {result['mode']}, {result['duration_s']} s after {result['warmup_s']} s of warm-up: "
               f"{result['completed_in_window']} jobs in the window "
               f"({result['jobs_per_s']} jobs/s, {result['image_steps_per_s']} image-steps/s), {result['completed']} with the drain")
    fill = result["mean_batch_fill"]
    typer.echo(f"latency p50 {lat['p50']} ms  p95 {lat['p95']} ms  p99 {lat['p99']} ms;  "
               f"mean batch fill {'n/a (no denoising)' if fill is None else fill}")
    typer.echo(f"errors {result['errors'] or 'none'};  lost jobs {result['lost']}")
    if result["answered_twice"]:
        typer.echo(f"jobs answered twice: {result['answered_twice']}")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    if result["lost"] or result["answered_twice"]:
        raise typer.Exit(1)


@app.command()
def sweep(
    out: Path = typer.Option(..., "--out", help="Folder: MODE/seedS/cC run folders, results.csv, results.md, figure.png."),
    cut_ratios: str = typer.Option(",".join(f"{c:g}" for c in SweepConfig.cut_ratios), "--cut-ratios", help="Comma list of cut ratios."),
    seeds: str = typer.Option(",".join(map(str, SweepConfig.seeds)), "--seeds", help="Comma list of seeds (data augmentation and training); tables give mean ± std over them."),
    cut_noise: str = typer.Option(",".join(SweepConfig.cut_noise), "--cut-noise", help="Comma list of cut-noise modes to compare: keyed, fresh."),
    clients: int = typer.Option(SweepConfig.clients, "--clients", min=1, help="Clients per run."),
    steps: int = typer.Option(SweepConfig.steps, "--steps", min=1, help="Training steps per run."),
    batch_size: int = typer.Option(SweepConfig.batch_size, "--batch-size", min=1, help="Images per client per step."),
    image_size: int = typer.Option(SweepConfig.image_size, "--image-size", help="32, 64 or 128."),
    samples: int = typer.Option(SweepConfig.samples, "--samples", min=4, help="Images generated per client."),
    real_images: int = typer.Option(SweepConfig.real_images, "--real-images", min=4, help="Real images per client for KID (half as many hold-out images)."),
    nonmembers: int = typer.Option(SweepConfig.nonmembers, "--nonmembers", min=2, help="Hold-out images for the audit's membership inference."),
    disclosure_kid: bool = typer.Option(SweepConfig.disclosure_kid, "--disclosure-kid/--no-disclosure-kid", help="Also the KID and nearest-image MSE of the server's output at t_c (twice the Inception work; the audit measures disclosure either way)."),
    in_process: bool = typer.Option(SweepConfig.in_process, "--in-process", help="Run each cut ratio in one process instead of through broker, worker and nodes (needed for the privacy audit)."),
    client_model: str = typer.Option(SweepConfig.client_model, "--client-model", help="Client U-Net preset."),
    server_model: str = typer.Option(SweepConfig.server_model, "--server-model", help="Server U-Net preset."),
    device: str = DEVICE,
    pack: Optional[Path] = typer.Option(None, "--pack", help="Only train and generate (with --in-process), packing each finished run into this folder for evaluation elsewhere: python -m collafuse.tools.runpack PACKS --out OUT, then this command without --pack."),
) -> None:
    """The paper's experiment across cut ratios, seeds and cut-noise modes: KID, the privacy audit and local energy; resumable."""
    from collafuse.evaluation.kid import EvaluationError
    from collafuse.tools.sweep import pack_runs, run_sweep

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

    with user_errors(EvaluationError, ValueError, RuntimeError):
        if pack is not None:
            pack_runs(cfg, pack, say)
            typer.echo(f"packed runs in {pack}")
            return
        run_sweep(cfg, say)
    typer.echo(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'figure.png'}")


@app.command()
def audit(
    run: Path = typer.Argument(..., help="A finished in-process run folder (`collafuse simulate --out RUN`, or one of a sweep's)."),
    nonmembers: int = typer.Option(SweepConfig.nonmembers, "--nonmembers", min=2, help="Hold-out images for membership inference (1,000 or more allow TPR at 0.1 % FPR)."),
) -> None:
    """What an honest-but-curious server can learn from a run: reconstruction attacks on what it saw, membership inference on its model."""
    from collafuse.evaluation.audit import AUDIT_FILE, audit_run

    if not (run / "metrics.json").is_file():
        fail(f"not a finished run folder (no metrics.json): {run}")
    with user_errors(ValueError, FileNotFoundError):
        report = audit_run(run, nonmembers, say=lambda line: typer.echo(line, err=True))
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

    with user_errors(KeyFolderError):
        init_broker_keys(folder)
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

    with user_errors(KeyFolderError):
        add_peer_key(name, role, broker_keys, out)
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


if __name__ == "__main__":
    app()
