"""All tunable settings in one typed place.

Every process (simulate, broker, worker, node) builds its settings from these dataclasses, so a
default is changed here once and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from collafuse.common.cut import Cut


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise process both sides of the cut must agree on (DESIGN.md §2)."""

    levels: int = 100  # T
    cosine_offset: float = 0.008  # s in Nichol & Dhariwal's cosine schedule
    max_beta: float = 0.999
    clip_sample: float = 1.0  # samplers clip x̂₀ to [-clip, clip], the data range (0: no clipping)

    def cut(self, cut_ratio: float) -> Cut:
        """The cut of ratio c on this chain: t_c = round(c·T)."""
        return Cut.from_ratio(cut_ratio, self.levels)


@dataclass(frozen=True)
class ModelPreset:
    """A U-Net size. The server variant adds t_c as a second conditioning input."""

    name: str
    base_channels: int
    multipliers: tuple[int, ...]
    layers_per_block: int
    norm_groups: int = 8
    attention_head_dim: int = 8

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.multipliers)


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # Fast CPU runs and tests (about 0.29 M parameters).
        ModelPreset("tiny", base_channels=16, multipliers=(1, 2, 2), layers_per_block=1),
        # The paper's U-Net: channel base 16, multipliers 1,2,4,8, attention innermost (3.9 M).
        ModelPreset("paper", base_channels=16, multipliers=(1, 2, 4, 8), layers_per_block=2),
        # A larger server model for a real GPU (about 62 M parameters).
        ModelPreset("large", base_channels=64, multipliers=(1, 2, 4, 8), layers_per_block=2, norm_groups=32),
    )
}


def preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split among clients."""

    spec: str = "mni"  # mni | brats:PATH | images:PATH
    clients: int = 3
    image_size: int = 32
    images_per_client: int = 512  # augmented copies drawn from each client's shard (embedded data)
    holdout_images: int = 256
    seed: int = 0
    brats_slices: tuple[int, int] = (60, 100)  # inclusive range along axis 2, as in the paper
    brats_modality: str = "t1"
    holdout_fraction: float = 0.1  # share of patients / files kept out of every client


# Images per client per step in the experiment commands (simulate, demo, sweep): three clients and a
# server share a small CPU there. A node on its own machine (`collafuse-node join`) uses TrainConfig's.
EXPERIMENT_BATCH = 16


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings for both parties (the paper: lr 1e-3, batch 150)."""

    learning_rate: float = 1e-3
    batch_size: int = 32
    grad_clip: float = 1.0
    # The server's guard against hostile rows (DESIGN.md §7): no client carries more than this share
    # of one optimiser step (when enough clients share it), and a message whose loss is beyond
    # max(floor, factor × the median of recent accepted messages' losses) is refused, not applied.
    # An honest message's ε₂-prediction loss is about 1 at the start (predicting nothing) and falls.
    max_client_share: float = 0.5
    loss_bound_floor: float = 2.0
    loss_bound_factor: float = 4.0


@dataclass(frozen=True)
class SamplerConfig:
    """How the server and the client walk down their levels."""

    kind: str = "ancestral"  # ancestral | ddim
    ddim_steps: int = 20  # total steps over T..0 when kind == "ddim", shared in proportion
    eta: float = 0.0  # DDIM's stochasticity; ancestral is always eta = 1

    def __post_init__(self) -> None:
        if self.kind not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be 'ancestral' or 'ddim', got {self.kind!r}")
        if self.ddim_steps < 1:
            raise ValueError("ddim_steps must be at least 1")


def one_per_client(cut_ratios: tuple[float, ...], clients: int) -> list[float]:
    """The cut ratio of each client: one given for all, or one given per client."""
    if len(cut_ratios) == 1:
        return list(cut_ratios) * clients
    if len(cut_ratios) != clients:
        raise ValueError(f"give one cut ratio or one per client ({clients}), got {len(cut_ratios)}")
    return list(cut_ratios)


@dataclass(frozen=True)
class SimulateConfig:
    """One in-process run: every party in one process, exactly the distributed math."""

    cut_ratios: tuple[float, ...] = (0.6,)  # one for all clients, or one per client
    steps: int = 600
    client_model: str = "tiny"
    server_model: str = "tiny"
    samples_per_client: int = 16
    device: str = "auto"
    log_every: int = 25
    checkpoint_every: int = 200
    cut_noise: str = "keyed"  # keyed: one secret ε₁ per image; fresh: one per message (more views for the server)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=EXPERIMENT_BATCH))
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def client_cut_ratios(self) -> list[float]:
        return one_per_client(self.cut_ratios, self.data.clients)


@dataclass(frozen=True)
class ProtocolLimits:
    """What a receiver accepts; checked before any allocation the sender controls."""

    levels: int = DiffusionConfig.levels  # T
    max_envelope_bytes: int = 64 * 1024
    max_frame_bytes: int = 64 * 1024 * 1024
    max_rows: int = 1024  # rows (images) in one train or denoise job
    max_image_side: int = 512
    max_channels: int = 4
    # What an honest node's training rows can hold (x_0 in [-1, 1], ε₂ ~ N(0, I)); beyond is hostile.
    # |ε₂| > 8 has probability 1e-15 per value; x_t = a·x_{t_c} + b·ε₂ with a² + b² ≤ 1 stays within 1 + 8 + 3.
    max_abs_eps: float = 8.0
    max_abs_x_t: float = 12.0
    eps_moment_se: float = 8.0  # each row's ε₂ mean and variance within this many standard errors of N(0, 1)'s
    # A trainer remembers the acks of this many applied train jobs per client, and this many jobs and
    # clients in all (whole clients forgotten, least recently applied first: every checkpoint carries them), so
    # that a job sent again is answered, not applied twice; a node replays at most
    # checkpoint_every + window jobs after a crash.
    acks_per_client: int = 256
    acks_total: int = 131072
    ack_clients: int = 4096


@dataclass(frozen=True)
class HeartbeatConfig:
    """Paranoid-Pirate style liveness, both ways: a peer silent for interval × liveness is dead."""

    interval: float = 1.0  # seconds between heartbeats
    liveness: int = 10  # generous: a CPU worker's optimiser step can take seconds


@dataclass(frozen=True)
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"  # nodes connect here
    backend: str = "tcp://127.0.0.1:5556"  # workers connect here
    keys: str = ""  # the broker's key folder (CURVE pair and allow-lists, `collafuse keys init`); '' = plain TCP
    state: str = ""  # folder for the relayed weights and the client-name registry, kept across restarts ('' = memory only)
    max_names_per_key: int = 4096  # client names one node key may bind (a name stays bound to the first key that used it)
    max_queue_per_client: int = 64  # jobs; a full queue answers "busy" at once
    reply_cache_per_client: int = 32  # recent final replies kept so a retried job id is answered, not redone
    # Memory stays bounded whatever names and jobs peers invent (DESIGN.md §7):
    max_clients: int = 4096  # names known at once; a hello beyond answers "busy"
    max_connections_per_key: int = 256  # connections one node key keeps known at once; its oldest is forgotten beyond (with keys only)
    client_idle_expiry: float = 300.0  # seconds without a message, job or reply after which a client is forgotten
    max_queued_bytes: int = 1 << 30  # all clients' queued jobs together; beyond, "busy"
    reply_cache_bytes: int = 256 << 20  # all clients' cached replies together; the oldest go first
    max_status_clients: int = 128  # clients (and workers) listed in a status reply (the total is always given)
    # Every accepted job gets one final reply within a bound (PROTOCOL.md):
    no_worker_wait: float = 60.0  # a queued job that no live worker can take is answered "unavailable" after this
    job_timeout: float = 900.0  # a job a worker holds longer than this is answered "timeout"
    # A queued job larger than any worker's free credit lets smaller jobs pass it for this long;
    # then the worker closest to holding it takes no job of its kind until it fits (no starvation).
    reserve_after: float = 5.0
    # Seconds after start before a lone trainer is named: a (re)started broker does not know which
    # worker holds the acknowledged steps, so every worker that was one registers and reports its step
    # meanwhile, and the highest wins (train jobs wait). As long as a worker restart takes to reach it.
    elect_trainer_for: float = 10.0
    group_settle: float = 0.5  # seconds after a trainer joins, leaves or reports a failed collective before the group re-forms
    group_max_failures: int = 3  # failed generations in a row after which a trainer that never held one beside another is a suspect (broker/group.py)
    group_report_wait: float = 2.0  # seconds a failed generation's re-form waits beyond the settle for every live member's report
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)


@dataclass(frozen=True)
class PeerConfig:
    """What every process that connects to the broker (a worker, a node) needs."""

    broker: str = ""  # the broker's address (the backend for a worker, the frontend for a node)
    keys: str = ""  # this peer's key folder (`collafuse keys add`); '' = plain TCP
    name: str = ""
    device: str = "auto"  # 'auto' (CUDA when present), 'cpu' or 'cuda:N'
    model: str = "tiny"  # U-Net preset
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    limits: ProtocolLimits = field(default_factory=ProtocolLimits)


@dataclass(frozen=True)
class WorkerConfig(PeerConfig):
    broker: str = "tcp://127.0.0.1:5556"
    name: str = "worker"
    image_size: int = 32
    channels: int = 1
    max_batch: int = 64  # rows in one denoising model call
    queue_rows: int = 64  # denoising rows queued beyond the pool (credit = max_batch + queue_rows)
    trainer: bool = True  # offer to be the trainer
    max_train_rows: int = 256  # rows merged into one optimiser step
    train_wait: float = 0.05  # seconds the first waiting train row may wait for company
    sync_every: int = 20  # the trainer publishes weights every this many optimiser steps
    checkpoint: str = ""  # path of the server checkpoint ('' = none; then acknowledgements are not durable)
    checkpoint_every: int = 100  # optimiser steps
    durable_wait: float = 1.0  # with a checkpoint, seconds an ack may wait for the checkpoint that makes its step durable
    bf16: bool = False
    cuda_graphs: bool | None = None  # replay the denoising forward as CUDA graphs; None: on when the device is CUDA
    compile: bool | None = None  # compile the denoising forward with inductor (engine/compiled.py); None: on when the device is CUDA
    compile_train: bool = False  # compile the training step too (equal to eager on the CPU; its speed on a GPU is not measured yet)
    compile_cache: str = ""  # folder for the compiled artifacts, reused at the next start ('' = torch's default under the temp folder)
    energy_report: str = ""  # where to write the worker's energy per phase at shutdown ('' = nowhere)
    seed: int = 0  # of the initial server weights (when no checkpoint)
    # Data-parallel training: HOST:PORT where this trainer serves the group's rendezvous when it is
    # rank 0 ('' = no group: one trainer is active, the others stand by).
    group: str = ""
    group_timeout: float = 5.0  # seconds a collective waits for a rank; below heartbeat interval × liveness, so a waiting rank is not declared dead
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class NodeConfig(PeerConfig):
    """One edge node (`collafuse-node join` and `generate`)."""

    broker: str = "tcp://127.0.0.1:5555"
    name: str = "node"
    cut_ratio: float = 0.6
    shard: int = 0  # which client shard of the data this node holds
    shards: int = 3
    state: str = ""  # folder for the secret, checkpoint and progress ('' = ~/.collafuse/node-NAME, wherever the node starts)
    clean_noise: float = 0.1  # a cut whose noise at t_c (√(1−ᾱ_{t_c})) is below this is logged as sending near-clean images
    steps: int = 600
    window: int = 4  # train jobs in flight at most; local training never waits for them
    lockstep: bool = False  # wait for room in the window instead of skipping a step's message (reproducible runs)
    cut_noise: str = "keyed"  # keyed: one secret ε₁ per image; fresh: one per message (more views for the server)
    share_clean_images: bool = False  # a cut of t_c = 0 sends the clean images: refused unless asked for
    checkpoint_every: int = 100
    retry_after: float = 0.5  # seconds before a "busy" job is sent again
    ack_timeout: float = 60.0  # at the end, how long to wait for outstanding acknowledgements
    samples: int = 64  # generate: images
    sample_seed: int = 1234  # generate: the same seed gives the same images
    server_timeout: float = 600.0  # generate: seconds to wait for the server's part
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def state_dir(self) -> str:
        return self.state or str(Path.home() / ".collafuse" / f"node-{self.name}")

    @property
    def shard_data(self) -> DataConfig:
        """The data settings, split into this node's `shards` (it holds the one numbered `shard`)."""
        return replace(self.data, clients=self.shards)

    @property
    def cut(self) -> Cut:
        """This node's cut on the chain it shares with the broker (T = limits.levels)."""
        return Cut.from_ratio(self.cut_ratio, self.limits.levels)


@dataclass(frozen=True)
class ExperimentConfig:
    """What the multi-run experiments share (the demo on loopback, the sweep)."""

    out: Path = Path("runs/experiment")
    clients: int = 3
    steps: int = 600
    batch_size: int = EXPERIMENT_BATCH
    image_size: int = 32
    client_model: str = "tiny"
    server_model: str = "tiny"
    device: str = "auto"


@dataclass(frozen=True)
class DemoConfig(ExperimentConfig):
    """`collafuse demo`: broker, worker and nodes as processes on loopback."""

    out: Path = Path("runs/demo")
    cut_ratios: tuple[float, ...] = (0.6,)
    samples: int = 16
    data: str = "mni"
    seed: int = 0
    cut_noise: str = "keyed"
    threads: int = 1  # torch threads per process: five processes share a small CPU
    insecure: bool = False  # plain TCP instead of CURVE keys (made in OUT/keys)
    lockstep: bool = True  # nodes wait for room in their window, so the server sees every step's rows


@dataclass(frozen=True)
class SweepConfig(ExperimentConfig):
    """`collafuse sweep`: the paper's experiment over cut ratios, seeds and cut-noise modes."""

    out: Path = Path("runs/sweep")
    cut_ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    seeds: tuple[int, ...] = (0,)
    cut_noise: tuple[str, ...] = ("keyed",)
    samples: int = 64  # generated images per client
    real_images: int = 512  # real images per client that KID compares with (half as many hold-out images)
    nonmembers: int = 1024  # hold-out images for the audit's membership inference (1,000 allow TPR at 0.1 % FPR)
    disclosure_kid: bool = True  # KID of the server's output at t_c (doubles the Inception work of a run; the audit measures disclosure too)
    in_process: bool = False  # True: each run in one process (needed for the privacy audit); False: broker, worker and nodes


@dataclass(frozen=True)
class LoadConfig:
    """`collafuse loadtest`: simulated clients, one job outstanding each."""

    broker: str = ""  # a running broker's frontend ('' in the CLI: start a broker and a worker)
    clients: int = 64
    duration: float = 10.0  # seconds of load that are counted
    # Seconds of load before the counted window: the pipeline is full when it opens, so that the work
    # in flight at its start (counted) offsets the work in flight at its end (not counted).
    warmup: float = 0.0
    mode: str = "denoise"  # denoise | train | mixed
    image_size: int = 32
    rows: int = 1  # images per job
    ddim_steps: int = 10  # total DDIM steps over T..0 for denoise jobs (the server does its share)
    cut_levels: tuple[int, ...] = (20, 40, 60)
    drain: float = 60.0  # seconds outstanding jobs may take after the load ends
    retry_after: float = 0.2
    seed: int = 0
    levels: int = DiffusionConfig.levels
    keys: str = ""  # a node key folder for the simulated clients ('' = plain TCP)
    admin_keys: str = ""  # an admin key folder, to read the workers' counters ('' = plain TCP)
