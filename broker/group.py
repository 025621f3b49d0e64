"""The data-parallel trainer group as the broker keeps it: who is in it, in which rank order, and
when it must re-form.

The broker is the group's membership service (its heartbeats already say who is alive); the ranks
reduce among themselves on torch.distributed. Each generation has an id that names this broker run
and a counter; a re-form is due `settle` seconds after a member joins, leaves or reports that the
current generation failed (a collective timed out or lost a peer), so that several events make one
new generation. After a failure only the members that reported it (and newcomers) are kept: a dead
rank never reports, and a slow one that reports later joins the next generation as a newcomer.

A member that breaks every generation it is in (an address the others cannot reach) would make the
group re-form without end, and every rank reports such a failure, so reports cannot name it. The
group counts each member's failed generations in a row; once a member that has never been in a
generation that stepped reaches `max_failures`, the newest such member is left out (one per
re-form, so an older culprit is found after the newer innocents). Members of a generation that
stepped are trusted from then on: their failures are the network's, and they are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collafuse.protocol.wire import MAX_RANKS


@dataclass
class Generation:
    """One formed group: what each member is told in its `group` message."""

    id: str
    members: list[bytes]  # routes, in rank order
    store: str  # rank 0's rendezvous address
    left_out: list[bytes] = field(default_factory=list)  # members this re-form left out for failing every generation

    def message(self, route: bytes) -> dict:
        return {"id": self.id, "rank": self.members.index(route), "world": len(self.members), "store": self.store}


@dataclass
class TrainerGroup:
    settle: float  # seconds to wait after an event before re-forming
    max_failures: int = 3  # failed generations in a row after which a member that never stepped is left out
    candidates: dict[bytes, str] = field(default_factory=dict)  # every live member → its rendezvous address, oldest first
    current: Generation = field(default_factory=lambda: Generation("", [], ""))
    count: int = 0  # generations formed in this broker run
    reported: set[bytes] = field(default_factory=set)  # members that reported the current generation failed
    reform_at: float | None = None
    model: str = ""  # the model preset every member trains
    failures: dict[bytes, int] = field(default_factory=dict)  # member → failed generations in a row it was in
    proven: set[bytes] = field(default_factory=set)  # members that have been in a generation that stepped

    def rank(self, route: bytes) -> int | None:
        return self.current.members.index(route) if route in self.current.members else None

    def refuses(self, route: bytes, model: str) -> str | None:
        """Why this trainer may not join (None: it may): all members train one model, and a
        generation has at most MAX_RANKS ranks."""
        others = [r for r in self.candidates if r != route]
        if others and model != self.model:
            return f"the trainer group trains a {self.model} model, this worker a {model} one"
        if len(others) >= MAX_RANKS:
            return f"the trainer group has {MAX_RANKS} members already"
        return None

    def join(self, route: bytes, address: str, model: str, now: float) -> None:
        self.candidates[route] = address
        self.model = model
        self._due(now)

    def leave(self, route: bytes, now: float) -> None:
        """A member is gone; only one of the current generation makes a re-form due (its peers'
        collectives fail and they report; a newcomer that leaves before joining changes nothing)."""
        self.candidates.pop(route, None)
        self.failures.pop(route, None)
        self.proven.discard(route)
        if route in self.current.members:
            self._due(now)

    def stepped(self, route: bytes) -> None:
        """A member acknowledged a step: its generation works, so all its members are trusted."""
        if route in self.current.members:
            self.proven.update(self.current.members)
            for member in self.current.members:
                self.failures.pop(member, None)

    def failed(self, route: bytes, generation: str, now: float) -> None:
        """A member says a generation failed. For the current one, it is kept in the next; a stale
        report from a member of the current generation is old news; from anyone else, a wish to join."""
        if route not in self.candidates:
            return
        if generation == self.current.id and route in self.current.members:
            self.reported.add(route)
            self._due(now)
        elif route not in self.current.members:
            self._due(now)

    def _due(self, now: float) -> None:
        if self.reform_at is None:
            self.reform_at = now + self.settle

    def reform(self, epoch: str, now: float) -> Generation | None:
        """The next generation once a re-form is due (None until then): the survivors in their old
        rank order (rank 0 stays rank 0 while it lives), then the newcomers."""
        if self.reform_at is None or now < self.reform_at:
            return None
        left_out = self._count_failures()
        kept = [r for r in self.current.members if r in self.candidates and (not self.reported or r in self.reported)]
        members = kept + [r for r in self.candidates if r not in self.current.members]
        self.count += 1
        self.current = Generation(f"{epoch}-{self.count}", members, self.candidates[members[0]] if members else "", left_out)
        self.reported.clear()
        self.reform_at = None
        return self.current

    def _count_failures(self) -> list[bytes]:
        """Add the generation that ends now to its members' runs of failures (a generation that did
        not fail ends every run), and leave out the newest member that never stepped and has failed
        `max_failures` times in a row: taken from the candidates, it is in no generation again."""
        for member in self.current.members:
            self.failures[member] = self.failures.get(member, 0) + 1 if self.reported else 0
        suspects = [r for r in self.candidates if r not in self.proven and self.failures.get(r, 0) >= self.max_failures]
        if not suspects:
            return []
        culprit = suspects[-1]
        del self.candidates[culprit]
        del self.failures[culprit]
        return [culprit]
