"""The worker's training batcher: which waiting rows become the next optimiser step, and when.

Merging the rows of several train jobs into one step keeps the server model's batches large;
waiting at most `train_wait` for more keeps a lone job's latency bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import msgpack
import torch

from collafuse.common.config import ProtocolLimits
from collafuse.diffusion.split import ServerMessage
from collafuse.protocol import wire

# Applied train jobs whose ack is kept, per client (PROTOCOL.md promises these): a job comes again
# when a node replays after a crash (at most its --checkpoint-every steps plus its window, which a
# node keeps within ACKS_PER_CLIENT) or after a broker's restart, so it is one of that client's
# last. Per client, so that other clients' traffic does not push a client's jobs out while the
# memory stays below ACKS_TOTAL jobs and ACK_CLIENTS clients; beyond, whole clients go, the least
# recently applied first.
ACKS_PER_CLIENT = ProtocolLimits.acks_per_client
ACKS_TOTAL = ProtocolLimits.acks_total
ACK_CLIENTS = ProtocolLimits.ack_clients

Pending = tuple[dict, ServerMessage]  # a train job's envelope and its rows


def row_count(jobs: list[Pending]) -> int:
    """How many rows these jobs carry in all (a job carries several)."""
    return sum(msg.t.shape[0] for _, msg in jobs)


class TrainBatcher:
    """Holds train jobs until they are due as one step (enough rows, the oldest has waited
    `wait` seconds, or a flush), and remembers the acks of applied jobs, so that a job the
    broker sends again after its restart is acknowledged again, not applied twice."""

    def __init__(self, max_rows: int, wait: float) -> None:
        self.max_rows = max_rows
        self.wait = wait
        self.pending: list[Pending] = []  # oldest first
        self.pending_since = 0.0  # when the oldest waiting job came, or the last step ended
        # client → job → its ack's (step, loss), least recently applied client first, each oldest first
        self.applied: OrderedDict[str, OrderedDict[str, tuple[int, float]]] = OrderedDict()
        self.total = 0  # jobs remembered in `applied`
        self.held: dict[tuple[str, str], tuple[bytes, tuple[dict, ServerMessage | None]]] = {}  # acks that wait (and rows), oldest first
        self.held_since = 0.0

    def add(self, env: dict, msg: ServerMessage) -> None:
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((env, msg))

    def due(self) -> bool:
        """Whether a step is due: enough rows wait, or the oldest has waited `wait`."""
        return bool(self.pending) and (row_count(self.pending) >= self.max_rows or time.monotonic() - self.pending_since >= self.wait)

    def take(self, flush: bool = False) -> list[Pending]:
        """The next step's jobs, oldest first: at most `max_rows` rows but at least one job (a job
        is never split). None until they are due, unless `flush`."""
        if not self.pending or not (flush or self.due()):
            return []
        batch: list[Pending] = []
        while self.pending and (not batch or row_count(batch) + self.pending[0][1].t.shape[0] <= self.max_rows):
            batch.append(self.pending.pop(0))
        return batch

    def stepped(self) -> None:
        """The jobs left after a step wait afresh from its end, not from their arrival."""
        self.pending_since = time.monotonic()

    def ack_of(self, env: dict) -> bytes | None:
        """The ack this job got when it was applied, or None if it was not."""
        kept = self.applied.get(env["client"], {}).get(env["job"])
        return None if kept is None else wire.encode("ack", job=env["job"], client=env["client"], step=kept[0], loss=kept[1])

    def is_held(self, env: dict) -> bool:
        """Whether this job's ack waits for a checkpoint (it goes out then, to whoever holds the job)."""
        return (env["client"], env["job"]) in self.held

    def remember(self, env: dict, ack: bytes, hold: bool, msg: ServerMessage | None = None) -> None:
        """An applied job's ack, kept to answer the job again; with `hold`, also kept back until
        `release` (its step is not durable yet), in a trainer group with its rows (`msg`), which go
        back to the pending jobs if the step turns out lost (`reconcile_held`)."""
        key = (env["client"], env["job"])
        fields = msgpack.unpackb(ack, raw=False)
        if hold:  # first: the caps below never drop a held ack
            self.held_since = self.held_since if self.held else time.monotonic()
            self.held[key] = (ack, (env, msg))
        self._remember(*key, fields["step"], fields["loss"])

    def _remember(self, client: str, job: str, step: int, loss: float) -> None:
        jobs = self.applied.setdefault(client, OrderedDict())
        self.applied.move_to_end(client)
        self.total += job not in jobs
        jobs[job] = (step, loss)
        jobs.move_to_end(job)
        self._trim(client)
        self._evict(keep=client)

    def _trim(self, client: str) -> None:
        """This client's oldest acks beyond ACKS_PER_CLIENT, but a held ack stays until it is sent."""
        jobs = self.applied[client]
        while len(jobs) > ACKS_PER_CLIENT:
            old = next((j for j in jobs if (client, j) not in self.held), None)  # the first, unless held
            if old is None:
                return
            del jobs[old]
            self.total -= 1

    def _evict(self, keep: str = "") -> None:
        """Whole clients, least recently applied first, while the memory is beyond ACKS_TOTAL jobs or
        ACK_CLIENTS clients (a checkpoint packs one row per client); never one with a held ack."""
        if self.total <= ACKS_TOTAL and len(self.applied) <= ACK_CLIENTS:
            return
        holding = {c for c, _ in self.held}
        while self.total > ACKS_TOTAL or len(self.applied) > ACK_CLIENTS:
            idle = next((c for c in self.applied if c not in holding and c != keep), None)
            if idle is None:
                return
            self.total -= len(self.applied.pop(idle))

    def commit_due(self, wait: float) -> bool:
        """Whether held acks should be made durable now: unless a full step's rows already wait for
        the next step (then one checkpoint after it serves both: group commit), or when the oldest
        has waited `wait`. Clients that wait for their acks are never kept waiting for company."""
        return bool(self.held) and (row_count(self.pending) < self.max_rows or time.monotonic() - self.held_since >= wait)

    def release(self) -> list[bytes]:
        """The held acks, now durable, to send."""
        acks, self.held = [ack for ack, _ in self.held.values()], {}
        return acks

    def drop_held(self) -> None:
        self.held = {}

    def reconcile_held(self) -> int:
        """After taking another rank's state (its `applied`): the held jobs that state did not apply
        (this rank's last step was lost with a peer) wait again to be applied; the others keep the
        ack that state gives them. How many went back."""
        lost = [key for key in self.held if key[1] not in self.applied.get(key[0], {})]
        self.put_back([self.held.pop(key)[1] for key in lost])  # type: ignore[misc]  # a group's held jobs keep their rows
        for (client, job_id), (_, job) in self.held.items():
            self.held[(client, job_id)] = (self.ack_of({"client": client, "job": job_id}), job)  # type: ignore[assignment]
        return len(lost)

    def applied_tensor(self) -> torch.Tensor:
        """The remembered acks as a checkpoint's tensor: uint8 bytes of msgpack, one row per client,
        [client, [job, ...], [step, ...], [loss, ...]] (columns: a tenth of the time of a row per job)."""
        rows = [[client, list(jobs), [s for s, _ in jobs.values()], [loss for _, loss in jobs.values()]] for client, jobs in self.applied.items()]
        blob = msgpack.packb(rows, use_bin_type=True)
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    def restore(self, saved: torch.Tensor) -> None:
        """The remembered acks from `applied_tensor`'s output, in place of the current ones (also
        from older checkpoints, whose entries carry the ack itself)."""
        self.applied.clear()
        self.total = 0
        for row in msgpack.unpackb(saved.numpy().tobytes(), raw=False):
            if len(row) == 3:  # [client, job, ack]
                fields = msgpack.unpackb(row[2], raw=False)
                self._remember(row[0], row[1], fields["step"], fields["loss"])
                continue
            client, jobs, steps, losses = row
            self.applied[client] = OrderedDict(zip(jobs, zip(steps, losses)))
            self.total += len(jobs)
            self._trim(client)
        self._evict()

    def put_back(self, jobs: list[Pending]) -> None:
        """Jobs taken for a step that was not taken (a trainer group's collective failed): first again."""
        self.pending[:0] = jobs

    def settle_applied(self) -> list[tuple[Pending, bytes]]:
        """Waiting jobs that turn out to be applied already (another rank of the group stepped with
        them), taken out with their acks."""
        done = [(job, ack) for job in self.pending if (ack := self.ack_of(job[0])) is not None]
        self.pending = [job for job in self.pending if self.ack_of(job[0]) is None]
        return done
