"""A trainer's membership in the data-parallel trainer group (DESIGN.md §8).

The broker announces generations (who is in the group, in which rank order, where rank 0 serves the
rendezvous); this object joins them, starts every rank from the most advanced rank's state, and
holds the collective that the worker's loop calls once per iteration to agree whether a step is due
and whether to move to an announced generation together. A collective that fails (a rank died or
stalled past `group_timeout`) ends the generation here; the worker tells the broker, which re-forms
the group from the ranks that reported, and the jobs of the step go back to the batcher.
"""

from __future__ import annotations

import logging

import torch

from collafuse.common.config import WorkerConfig
from collafuse.engine.checkpoint import checkpoint_bytes, load_checkpoint_bytes
from collafuse.engine.collective import Collective, CollectiveError, StoreHost
from collafuse.engine.server import ServerParty
from collafuse.worker.training import TrainBatcher

log = logging.getLogger("collafuse.worker")


class GroupMember:
    """This worker's place in the trainer group: the generation it is in (or none) and the next one announced."""

    def __init__(self, config: WorkerConfig, party: ServerParty, batcher: TrainBatcher) -> None:
        self.party, self.batcher = party, batcher
        self.timeout = config.group_timeout
        self.host = StoreHost(config.group)
        self.collective: Collective | None = None
        self.announced: dict | None = None  # the broker's latest `group` message, not yet joined
        self.generation = ""  # the generation joined last (or tried)

    @property
    def world(self) -> int:
        return self.collective.world if self.collective is not None else 0

    @property
    def rank(self) -> int | None:
        return self.collective.rank if self.collective is not None else None

    def on_group(self, env: dict) -> None:
        if env["id"] != self.generation:
            self.announced = env

    def agree(self, due: bool) -> bool:
        """The loop's collective: whether any rank has a step due. If any rank has seen a new
        generation announced, every rank leaves this one here, together (so none waits on a rank
        that already left), and joins the next. Raises a CollectiveError when the group broke."""
        assert self.collective is not None
        flags = torch.tensor([1 if due else 0, 1 if self.announced is not None else 0], dtype=torch.int64)
        self.collective.group.allreduce([flags]).wait()
        if int(flags[1]):
            self.collective = None
            return False
        return bool(int(flags[0]))

    def join(self) -> str | None:
        """Join the announced generation and take the most advanced rank's state; why it failed, or None."""
        env, self.announced = self.announced, None
        assert env is not None
        self.generation = env["id"]
        try:
            collective = Collective(env["id"], env["rank"], env["world"], env["store"], self.timeout, self.host)
            self.sync(collective)
        except (*CollectiveError, ValueError) as exc:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.collective = collective
        log.info("trainer group %s: rank %d of %d, at step %d", env["id"], env["rank"], env["world"], self.party.step)
        return None

    def sync(self, collective: Collective) -> None:
        """Every rank continues from the state of the rank with the most steps (ranks that saw a
        peer die may be a step apart; a newcomer has none): weights, optimiser, step, the loss
        bound's history and the acks of applied jobs, so that no job is applied twice. Sent even
        when the steps agree: a newcomer at step 0 may have other initial weights."""
        steps = [int(blob) for blob in collective.gather_bytes(str(self.party.step).encode())]
        root = steps.index(max(steps))
        if collective.world == 1:
            return
        mine = b""
        if collective.rank == root:
            applied = torch.frombuffer(bytearray(self.batcher.applied_blob()), dtype=torch.uint8)
            mine = checkpoint_bytes(self.party.model, self.party.optimizer,
                                    {"step": self.party.step, "rows": self.party.rows_applied, "losses": list(self.party.accepted_losses)}, {"applied": applied})
        blob = collective.broadcast_bytes(mine, root)
        if collective.rank != root:
            meta, extra = load_checkpoint_bytes(blob, self.party.model, self.party.optimizer, self.party.device)
            self.party.step, self.party.rows_applied = int(meta["step"]), int(meta["rows"])
            self.party.accepted_losses.clear()
            self.party.accepted_losses.extend(meta["losses"])
            self.batcher.applied.clear()
            self.batcher.restore(extra["applied"].numpy().tobytes())
