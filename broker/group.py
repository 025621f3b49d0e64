"""The data-parallel trainer group as the broker keeps it: who is in it, in which rank order, and
when it must re-form.

The broker is the group's membership service (its heartbeats already say who is alive); the ranks
reduce among themselves on torch.distributed. Each generation has an id that names this broker run
and a counter; a re-form is due `settle` seconds after a member joins, leaves or reports that the
current generation failed (a collective timed out or lost a peer), so that several events make one
new generation. After a failure only the members that reported it (and newcomers) are kept: a dead
rank never reports, and a slow one that reports later joins the next generation as a newcomer.

A member that breaks every generation it is in (e.g. an address the others cannot reach) would
make the group re-form without end, and every rank reports such a failure, so no report names it.
The group looks for it by exclusion, and leaves it out only on evidence. Each member's failed
generations in a row are counted; once members that have never been in a generation that formed
reach `max_failures`, and the group has three candidates or more, the newest of them is put on
trial: the next generations leave it out. If one fails, it returns and the next suspect, older, is
tried (once all have been, each gets one generation back before the next round). If a generation
of every other candidate forms, the suspect is let back in at once into exactly that generation
(newcomers wait one re-form): if it fails and every other member reports the failure, the suspect
is left out for good; anything else (it forms, a member goes silent) clears the check. A
generation has formed once each of its members says so in its heartbeat. Members of a formed
generation of two or more are trusted: never suspects again.

What it does not find: a fault of two members at once (no generation without one of them forms),
one that lets generations form and then breaks them (a rank too slow for the collective timeout),
or one in a group of two (either alone forms a generation): those groups re-form until an
operator stops the member (`collafuse status` shows the generations).
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
    left_out: bytes | None = None  # the member this re-form left out for good (found breaking every generation)

    def message(self, route: bytes) -> dict:
        return {"id": self.id, "rank": self.members.index(route), "world": len(self.members), "store": self.store}


@dataclass
class TrainerGroup:
    settle: float  # seconds to wait after an event before re-forming
    max_failures: int = 3  # failed generations in a row after which a member that never formed one is a suspect
    candidates: dict[bytes, str] = field(default_factory=dict)  # every live member → its rendezvous address, oldest first
    current: Generation = field(default_factory=lambda: Generation("", [], ""))
    count: int = 0  # generations formed in this broker run
    reported: set[bytes] = field(default_factory=set)  # members that reported the current generation failed
    reform_at: float | None = None
    model: str = ""  # the model preset every member trains
    failures: dict[bytes, int] = field(default_factory=dict)  # member → failed generations in a row it was in
    proven: set[bytes] = field(default_factory=set)  # members of a formed generation of two or more
    claims: set[bytes] = field(default_factory=set)  # members that said the current generation formed
    trial: bytes | None = None  # the suspect the generations leave out until one fails (it returns) or forms
    checking: bytes | None = None  # a suspect let back into the generation that formed without it
    cleared_with: list[bytes] = field(default_factory=list)  # that generation's members
    check_id: str = ""  # the id of the generation that checks `checking`
    tried: set[bytes] = field(default_factory=set)  # suspects tried and returned in this round

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, got {self.max_failures}")

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
        """A member is gone; one of the current generation makes a re-form due (its peers'
        collectives fail and they report; a newcomer that leaves before joining changes nothing),
        and so does any while a suspect is out (the candidates without it may now be complete)."""
        self._forget(route)
        if route in self.current.members or self.trial is not None:
            self._due(now)

    def _forget(self, route: bytes) -> None:
        self.candidates.pop(route, None)
        self.failures.pop(route, None)
        self.proven.discard(route)
        self.tried.discard(route)
        if self.trial == route:
            self.trial = None
        if self.checking == route:
            self.checking = None

    def formed(self, route: bytes, generation: str, now: float) -> None:
        """A member says it is in `generation`. Once every member of the current one has: their runs
        of failures end and (two or more) they are trusted; a suspect it checked is cleared; if it
        is every candidate but the suspect on trial, that suspect is let back in, to check."""
        if generation != self.current.id or route not in self.current.members or route in self.claims:
            return
        if route == self.checking:
            self.checking = None  # its own join took a collective over every rank: it reached them all
        self.claims.add(route)
        if len(self.claims) < len(self.current.members):
            return
        members = self.current.members
        for member in members:
            self.failures.pop(member, None)
            if len(members) >= 2:
                self.proven.add(member)
        self.tried.clear()
        if self.checking in members:
            self.checking = None
        if self.trial is not None and set(members) == set(self.candidates) - {self.trial}:
            self.checking, self.cleared_with, self.trial = self.trial, list(members), None
            self._due(now)
        elif any(r not in members and r != self.trial for r in self.candidates):
            self._due(now)  # a newcomer (or a member back from a failure) waited for this generation to form

    def failed(self, route: bytes, generation: str, now: float) -> None:
        """A member says a generation failed. For the current one, it is kept in the next; a stale
        report from a member of the current generation is old news; from anyone else, a wish to join
        (not from the member on trial: it is left out on purpose)."""
        if route not in self.candidates or route == self.trial:
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
        rank order (rank 0 stays rank 0 while it lives), then the newcomers; the member on trial in
        neither; a check generation is the one that formed and the member it checks."""
        if self.reform_at is None or now < self.reform_at:
            return None
        left_out = self._failed_generation() if self.reported else None
        if not self.reported:
            for member in self.current.members:
                self.failures.pop(member, None)  # a generation that did not fail ends every run
            self.tried.clear()
        if self.current.id == self.check_id:
            self.checking = None  # a check ends with its generation, decided or not
        self.count += 1
        generation_id = f"{epoch}-{self.count}"
        cleared = [r for r in self.cleared_with if r in self.candidates]
        if self.checking is not None and len(cleared) < 2:
            self.checking = None  # the generation that cleared it has lost members: of two, no evidence names one
        if self.checking is not None:
            members = cleared + [self.checking]
            self.check_id = generation_id
        else:
            kept = [r for r in self.current.members if r in self.candidates and (not self.reported or r in self.reported)]
            members = kept + [r for r in self.candidates if r not in self.current.members]
            if self.trial is not None and len(members) - 1 < 2:
                self.trial = None  # a generation of one forms whoever is at fault: no trial
            members = [r for r in members if r != self.trial]
        self.current = Generation(generation_id, members, self.candidates[members[0]] if members else "", left_out)
        self.reported.clear()
        self.claims.clear()
        self.reform_at = None
        return self.current

    def _failed_generation(self) -> bytes | None:
        """Count the failure against the members it had. The suspect a check generation let back in
        is the culprit when that generation failed with everyone else reporting it: it is forgotten
        and returned. Otherwise a member on trial returns (the group failed without it too), and the
        newest suspect not tried in this round goes on trial."""
        members = [r for r in self.current.members if r in self.candidates]
        for member in members:
            self.failures[member] = self.failures.get(member, 0) + 1
        checked = self.checking if self.current.id == self.check_id else None
        if checked in members and set(self.current.members) - {checked} <= self.reported:
            self._forget(checked)
            return checked
        self.checking = None  # not decided: the generation that cleared it failed first, or someone else went silent
        if self.trial is not None:
            self.tried.add(self.trial)
            self.trial = None
        if len(self.candidates) < 3:
            return None  # of two, either alone forms a generation: no evidence can name one
        suspects = [r for r in self.candidates if r not in self.proven and self.failures.get(r, 0) >= self.max_failures]
        untried = [r for r in suspects if r not in self.tried]
        if suspects and not untried:
            self.tried.clear()  # every suspect returned: each gets this generation back, then a new round
        elif untried:
            self.trial = untried[-1]
        return None
