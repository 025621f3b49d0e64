"""Who may be the lone trainer (DESIGN.md §8): the latest acknowledged step, which a worker must
hold to train without losing an acknowledged update, and the election after the broker starts.

A standby continues from its own model or the latest relay, so it may take over only if one of
them holds the latest acknowledged step; otherwise it would lack acknowledged updates and number
steps a second time. That step is kept in --state (`acks.msgpack`). A (re)started broker does not
know which worker holds it either: for `elect_trainer_for` after it starts it names no lone
trainer, so that every worker that was one can register and report its step, and then the one
with the highest step that may train is chosen (at once, if the worker that sent the last ack is
back with it).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

from collafuse.broker.state import ACKS, BrokerState

if TYPE_CHECKING:
    from collafuse.broker.broker import WorkerState

log = logging.getLogger("collafuse.broker")


def reported_step(worker: WorkerState) -> int:
    """The optimiser step a worker's heartbeats report (0 until one does, or if it is not a count)."""
    step = worker.stats.get("step")
    return step if type(step) is int and step >= 0 else 0


class Succession:
    """The acknowledged step (None until an ack: a broker started without its state knows of
    none), whether it is durable, who acknowledged it, and the election's end."""

    def __init__(self, elect_for: float, state: BrokerState | None) -> None:
        self.state = state
        self.step: int | None = None
        self.durable = True  # acks of a trainer without a checkpoint were never promises
        self.by = ""  # the lone trainer that sent the latest ack: the election ends once it is back
        self.elect_until = time.monotonic() + elect_for  # 0 once the election has chosen

    def restore(self, saved: dict[str, Any]) -> None:
        self.step, self.durable, self.by = int(saved["step"]), bool(saved["durable"]), str(saved.get("by", ""))

    def note_ack(self, worker: WorkerState, step: int, replicated: bool) -> None:
        """An ack passed. A durable trainer after acks that were not durable counts from its own
        step; a trainer group's acks are durable once replicated and name no one (no single rank's
        return may end an election)."""
        durable = bool(worker.stats.get("durable", True)) or replicated
        previous = self.step if self.step is not None and self.durable else 0
        latest = (max(previous, step), durable, "" if worker.group else worker.name)
        if latest != (self.step, self.durable, self.by):
            self.step, self.durable, self.by = latest
            if self.state is not None:
                self.state.write(ACKS, {"step": self.step, "durable": self.durable, "by": self.by})

    def may_train(self, worker: WorkerState, relayed_version: int) -> bool:
        """Whether this worker's own model (the step its heartbeats report) or the latest relay,
        which it loads when newer, holds the latest acknowledged step."""
        if self.step is None or not self.durable:
            return True
        return max(reported_step(worker), relayed_version) >= self.step

    def standby(self, workers: Iterable[WorkerState], relayed_version: int) -> WorkerState | None:
        """Of the lone trainer-capable workers that may train, the one reporting the highest step
        (the first registered of equals); None: train jobs wait until one may (a trainer back from
        its checkpoint reports its step in its heartbeats), or `no_worker_wait`."""
        standbys = [w for w in workers if w.trainer and not w.group]
        chosen = max((w for w in standbys if self.may_train(w, relayed_version)), key=reported_step, default=None)
        if chosen is None and standbys:
            log.warning("no standby holds step %s, the latest acknowledged (relayed: step %d): train jobs wait for the trainer "
                        "to return from its checkpoint", self.step, relayed_version)
        return chosen

    def electing(self) -> bool:
        """Until the election has chosen (not merely until its time is up: a worker heard first then
        must not take the place the election gives the highest step)."""
        return self.elect_until > 0

    def election_ends(self, now: float, workers: Iterable[WorkerState]) -> bool:
        """Whether the election ends now: its time is up, or the worker that sent the latest ack
        is back and its own model holds that step (a name alone proves nothing: names need not be
        unique). True once."""
        if not self.elect_until:
            return False
        back = self.by and any(w.name == self.by and w.trainer and not w.group and "step" in w.stats and reported_step(w) >= (self.step or 0)
                               for w in workers)
        if now < self.elect_until and not back:
            return False
        self.elect_until = 0
        return True
