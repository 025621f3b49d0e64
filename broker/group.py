"""The data-parallel trainer group as the broker keeps it: who is in it, in which rank order, and
when it must re-form.

The broker is the group's membership service (its heartbeats already say who is alive); the ranks
reduce among themselves on torch.distributed. Each generation has an id that names this broker run
and a counter; a re-form is due `settle` seconds after a member joins, leaves or reports that the
current generation failed (a collective timed out or lost a peer), so that several events make one
new generation. After a failure only the members that reported it (and newcomers) are kept: a dead
rank never reports, and a slow one that reports later joins the next generation as a newcomer.

A member that breaks every generation it is in (an address the others cannot reach, a rank too
slow for the collective timeout) would make the group re-form without end, and every rank reports
such a failure, so no report names it. The group looks for it by exclusion, and leaves it out only
on evidence. A generation has formed once each member says so in its heartbeat, and held once it
has also taken a step (an ack from a member that said so): a rank that joins but breaks every step
forms generations and holds none. Each member's failed generations in a row are counted; once
members that have never held a generation of two reach `max_failures`, the newest of them is put
on trial: the next generations leave it out. If one fails, it returns and the next suspect, older,
is tried. If every suspect has been tried so (two at fault at once), all suspects are out together
(if all members are suspects, all but the oldest: a generation of one needs no peer). Once a
generation of every member not out holds, the newest member out is let back in, alone, into
exactly that generation (newcomers wait until it decides): if that generation fails with every
other member reporting it, the member is left out for good, and the next one out is let back in;
if it holds, it is cleared; anything else (a member goes silent or leaves) ends the check
undecided. Beside one untrusted member a failed check names neither: the checked member is
doubted, and once every check beside that member failed, the next member is tried alone; once
every member was, no two hold together and nothing says who is at fault: the oldest trains alone
and the others are parked until a member joins, when the search starts again. Members of a
generation of two or more that held are trusted: never suspects again.

What it does not find: a trusted member that later breaks every generation (the group re-forms
until an operator stops it; `collafuse status` shows the generations). What it may get wrong: a
check cannot tell a member's fault from a network outage during it. A search costs a generation per
try (settle plus --group-timeout), and a check decides only when train jobs come to make a step.
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
    left_out: list[bytes] = field(default_factory=list)  # members this re-form left out for good (found breaking every generation)

    def message(self, route: bytes) -> dict:
        return {"id": self.id, "rank": self.members.index(route), "world": len(self.members), "store": self.store}


@dataclass
class TrainerGroup:
    settle: float  # seconds to wait after an event before re-forming
    max_failures: int = 3  # failed generations in a row after which a member never in a held generation of two is a suspect
    candidates: dict[bytes, str] = field(default_factory=dict)  # every live member → its rendezvous address, oldest first
    current: Generation = field(default_factory=lambda: Generation("", [], ""))
    count: int = 0  # generations formed in this broker run
    reported: set[bytes] = field(default_factory=set)  # members that reported the current generation failed
    reform_at: float | None = None
    model: str = ""  # the model preset every member trains
    failures: dict[bytes, int] = field(default_factory=dict)  # member → failed generations in a row it was in
    proven: set[bytes] = field(default_factory=set)  # members of a held generation of two or more
    claims: set[bytes] = field(default_factory=set)  # members that said the current generation formed
    stepped: bool = False  # a member that said so acknowledged a step of the current generation
    held: bool = False  # the current generation formed and took a step
    out: list[bytes] = field(default_factory=list)  # members the generations leave out until they are checked, newest last
    checking: bytes | None = None  # a member let back into the generation that held without it
    cleared_with: list[bytes] = field(default_factory=list)  # that generation's members
    tried: set[bytes] = field(default_factory=set)  # suspects tried alone and returned in this round
    doubted: list[bytes] = field(default_factory=list)  # members whose check beside one untrusted member failed
    lone: set[bytes] = field(default_factory=set)  # untrusted members that others were checked beside, alone, in this search
    parked: list[bytes] = field(default_factory=list)  # members of a search that found no two to hold together, out until one joins

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
        """A newcomer makes a re-form due, but waits for a check to decide (a re-form would end it);
        the members parked by a search that found no two to hold together are tried again with it."""
        self.candidates[route] = address
        self.model = model
        self.parked = []
        if not self._checking_now():
            self._due(now)

    def leave(self, route: bytes, now: float) -> None:
        """A member is gone; one of the current generation makes a re-form due (its peers'
        collectives fail and they report; a newcomer that leaves before joining changes nothing),
        and so does any while members are out (the candidates without them may now be complete)."""
        self._forget(route)
        if route in self.current.members or self.out:
            self._due(now)

    def left_out_now(self) -> list[bytes]:
        """The members a search leaves out of the current generation (not those parked)."""
        waiting = self.out + self.doubted + ([self.checking] if self.checking is not None else [])
        return [r for r in waiting if r not in self.current.members]

    def _checking_now(self) -> bool:
        """The current generation is a check: the member it checks is in it."""
        return self.checking is not None and self.checking in self.current.members

    def _forget(self, route: bytes) -> None:
        self.candidates.pop(route, None)
        self.failures.pop(route, None)
        for members in (self.proven, self.tried, self.lone):
            members.discard(route)
        for members in (self.out, self.doubted, self.parked):  # type: ignore[assignment]
            if route in members:
                members.remove(route)
        if self.checking == route:
            self.checking = None

    def formed(self, route: bytes, generation: str, now: float) -> None:
        """A member says it is in `generation`. Once every member of the current one has, newcomers
        (and members back from a failure) that waited for it to form make a re-form due, unless it
        is a check, which must first hold or fail."""
        if generation != self.current.id or route not in self.current.members or route in self.claims:
            return
        self.claims.add(route)
        if len(self.claims) < len(self.current.members):
            return
        if not self._checking_now():
            self._wait_for_newcomers(now)
        self._hold(now)

    def _wait_for_newcomers(self, now: float) -> None:
        if any(r not in self.current.members and r not in self.out + self.doubted + self.parked and r != self.checking
               for r in self.candidates):
            self._due(now)

    def acknowledged(self, route: bytes, now: float) -> None:
        """A member acknowledged a step. Its acks after it said it is in the current generation are
        that generation's (a worker's messages arrive in order): the generation took a step."""
        if route in self.claims:
            self.stepped = True
            self._hold(now)

    def _hold(self, now: float) -> None:
        """Once the current generation has formed and stepped: its members' runs of failures end
        and (two or more) they are trusted, which ends a search beside one untrusted member (those
        doubted there are checked again); the member it checked is cleared; if it is every
        candidate but those out, the newest out is let back in, to check."""
        if self.held or not self.stepped or len(self.claims) < len(self.current.members):
            return
        self.held = True
        members = self.current.members
        for member in members:
            self.failures.pop(member, None)
        if len(members) >= 2:
            self.proven.update(members)
            self.out += self.doubted
            self.doubted, self.lone = [], set()
        self.tried.clear()
        if self.checking in members:
            self.checking = None
        if self.out and set(members) == set(self.candidates) - set(self.out) - set(self.doubted):
            if len(members) == 1 and members[0] not in self.proven:
                self.lone.add(members[0])
            self.checking, self.cleared_with = self.out.pop(), list(members)
            self._due(now)
        else:
            self._wait_for_newcomers(now)

    def failed(self, route: bytes, generation: str, now: float) -> None:
        """A member says a generation failed. For the current one, it is kept in the next; a stale
        report from a member of the current generation is old news; from anyone else, a wish to join
        (not from a member out: it is left out on purpose)."""
        if route not in self.candidates or route in self.out + self.doubted + self.parked:
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
        rank order (rank 0 stays rank 0 while it lives), then the newcomers, none of those out; a
        check generation is the one that held and the member it checks."""
        if self.reform_at is None or now < self.reform_at:
            return None
        checked = self.checking if self._checking_now() else None
        if checked is not None:
            self.checking = None  # a check ends with its generation
        left_out = self._failed_generation(checked) if self.reported else []
        if not self.reported:
            for member in self.current.members:
                self.failures.pop(member, None)  # a generation that did not fail ends every run
            self.tried.clear()
        self.count += 1
        generation_id = f"{epoch}-{self.count}"
        cleared = [r for r in self.cleared_with if r in self.candidates]
        if self.checking is not None and cleared:
            members = cleared + [self.checking]
        else:
            self.checking = None  # the generation that cleared it is gone: it is a member like any other
            self.out += self.doubted
            self.doubted = []
            kept = [r for r in self.current.members if r in self.candidates and (not self.reported or r in self.reported)]
            members = kept + [r for r in self.candidates if r not in self.current.members]
            if all(r in self.out + self.parked for r in members):
                self.out, self.parked = [], []  # nobody would be left: leave nobody out
            members = [r for r in members if r not in self.out + self.parked]
        self.current = Generation(generation_id, members, self.candidates[members[0]] if members else "", left_out)
        self.reported.clear()
        self.claims.clear()
        self.stepped = self.held = False
        self.reform_at = None
        return self.current

    def _failed_generation(self, checked: bytes | None) -> list[bytes]:
        """Count the failure against the members it had; a failed check decides (`_judge`).
        Otherwise those out return (the group failed without them too) and the next try is
        chosen: the newest suspect not tried alone in this round, or, once all were, every suspect
        at once (of all suspects, the oldest member not yet alone in this search)."""
        members = [r for r in self.current.members if r in self.candidates]
        for member in members:
            self.failures[member] = self.failures.get(member, 0) + 1
        if checked is not None:
            if checked in members and set(self.current.members) - {checked} <= self.reported:
                return self._judge(checked)
            return []  # undecided: someone else went silent; it is a member like any other
        if len(self.out) == 1:
            self.tried.add(self.out[0])
        self.out = []
        suspects = [r for r in self.candidates if r not in self.proven and self.failures.get(r, 0) >= self.max_failures]
        untried = [r for r in suspects if r not in self.tried]
        if untried:
            self.out = [untried[-1]]
        elif suspects:
            keep = [r for r in self.candidates if r not in suspects] or self._next_lone() or [next(iter(self.candidates))]
            self.out = [r for r in self.candidates if r not in keep]
            self.tried.clear()
        return []

    def _judge(self, checked: bytes) -> list[bytes]:
        """A check failed with every other member reporting it. Beside trusted members (or two or
        more that held), the checked member is the culprit: left out for good, and the next one out
        is checked. Beside one untrusted member, either may be: the checked is doubted, and once
        every check beside that member failed, the next member not yet alone is tried alone, the
        others out; once every member was, no two hold together and nothing says who is at fault:
        the oldest trains alone and the others are parked until a member joins."""
        base = [r for r in self.cleared_with if r in self.candidates]
        if len(base) >= 2 or (base and base[0] in self.proven):
            self._forget(checked)
            left = [checked]
        else:
            self.doubted.append(checked)
            left = []
        if self.out:
            self.checking = self.out.pop()
        elif self.doubted:
            lone = self._next_lone()
            if lone:
                self.out, self.doubted = [r for r in self.candidates if r not in lone], []
            else:
                self.parked = [r for r in self.candidates if r != next(iter(self.candidates))]
                self.doubted, self.lone = [], set()
        return left

    def _next_lone(self) -> list[bytes]:
        """The oldest member not yet alone in this search, as a list ([] once every one was)."""
        lone = next((r for r in self.candidates if r not in self.lone), None)
        return [] if lone is None else [lone]
