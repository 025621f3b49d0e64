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
from typing import Callable

from collafuse.common.config import WorkerConfig
from collafuse.engine.checkpoint import checkpoint_bytes, load_checkpoint_bytes
from collafuse.engine.collective import Collective, StoreHost
from collafuse.engine.server import ServerParty
from collafuse.worker.training import TrainBatcher

log = logging.getLogger("collafuse.worker")


class GroupMember:
    """This worker's place in the trainer group: the generation it is in (or none) and the next one announced."""

    def __init__(self, config: WorkerConfig, party: ServerParty, batcher: TrainBatcher, keep_alive: Callable[[], None] = lambda: None) -> None:
        self.party, self.batcher = party, batcher
        self.keep_alive = keep_alive  # heartbeats the broker between a join's phases, each of which may wait a timeout
        self.timeout = config.group_timeout
        self.host = StoreHost(config.group, config.group_timeout)
        self.collective: Collective | None = None
        self.announced: dict | None = None  # the broker's latest `group` message, not yet joined
        self.generation = ""  # the generation joined last (or tried)

    @property
    def world(self) -> int:
        """Ranks in the generation this worker is in; 0 while it is in none."""
        return self.collective.world if self.collective is not None else 0

    @property
    def rank(self) -> int | None:
        return self.collective.rank if self.collective is not None else None

    def on_group(self, env: dict) -> None:
        if env["id"] != self.generation:
            self.announced = env

    def leave(self) -> None:
        self.collective = None
        self.announced = None

    def agree(self, due: bool) -> bool:
        """The loop's collective: whether any rank has a step due. If any rank has seen a new
        generation announced, every rank leaves this one here, together (so none waits on a rank
        that already left), and joins the next. Raises CollectiveFailed when the group broke."""
        assert self.collective is not None
        due_somewhere, switch = self.collective.any_of(due, self.announced is not None)
        if switch:
            self.collective = None
            return False
        return due_somewhere

    def join(self) -> None:
        """Join the announced generation and take the most advanced rank's state. Raises
        CollectiveFailed when the generation cannot form (a member is gone or late)."""
        env, self.announced = self.announced, None
        assert env is not None
        self.generation = env["id"]
        collective = Collective(env["id"], env["rank"], env["world"], env["store"], self.timeout, self.host)
        self.keep_alive()
        self.sync(collective)
        self.collective = collective
        log.info("trainer group %s: rank %d of %d, at step %d", env["id"], env["rank"], env["world"], self.party.step)

    def sync(self, collective: Collective) -> None:
        """Every rank continues from the state of the rank with the most steps, the lowest rank
        among equals (survivors come before newcomers): weights, optimiser, step, the loss bound's
        history and the acks of applied jobs, so that no job is applied twice. Sent even when the
        steps agree: a newcomer at step 0 may have other initial weights, and a rank whose last
        step was lost with a peer may have one the others never took; the jobs of such a step,
        whose acks it still holds, wait again to be applied (no ack leaves for a step that a
        later generation does not hold)."""
        steps = [int(blob) for blob in collective.gather_bytes(str(self.party.step).encode())]
        root = steps.index(max(steps))
        self.keep_alive()
        if collective.world == 1:
            return
        mine = b""
        if collective.rank == root:
            mine = checkpoint_bytes(self.party.model, self.party.optimizer,
                                    {"step": self.party.step, "rows": self.party.rows_applied, "losses": list(self.party.accepted_losses)},
                                    {"applied": self.batcher.applied_tensor()})
        blob = collective.broadcast_bytes(mine, root)
        if collective.rank != root:
            meta, extra = load_checkpoint_bytes(blob, self.party.model, self.party.optimizer, self.party.device)
            self.party.step, self.party.rows_applied = int(meta["step"]), int(meta["rows"])
            self.party.accepted_losses.clear()
            self.party.accepted_losses.extend(meta["losses"])
            self.batcher.restore(extra["applied"])
            lost = self.batcher.reconcile_held()
            if lost:
                log.warning("trainer group %s: %d jobs of a step the group does not hold wait to be applied again", collective.generation, lost)
