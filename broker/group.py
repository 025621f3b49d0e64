"""The data-parallel trainer group as the broker keeps it: who is in it, in which rank order, and
when it must re-form.

The broker is the group's membership service (its heartbeats already say who is alive); the ranks
reduce among themselves on torch.distributed. Each generation has an id that names this broker run
and a counter; a re-form is due `settle` seconds after a member joins, leaves or reports that the
current generation failed (a collective timed out or lost a peer), so that several events make one
new generation. After a failure the re-form waits up to `report_wait` more for every member's
report, and only the members that reported it (and newcomers) are kept: a dead or stalled rank
never reports, and a slower one joins the next generation as a newcomer.

A member that breaks every generation it is in (an address the others cannot reach, a rank too
slow for the collective timeout) would make the group re-form without end, and every rank reports
such a failure, so no report names it. The group looks for it by exclusion, and leaves it out only
on evidence. A generation has formed once each member says so in its heartbeat, and held once it
has also taken a step (an ack from a member that said so): a rank that joins but breaks every step
forms generations and holds none. Members of a held generation of two or more are trusted. Each
member's failed generations in a row are counted; members that never held a generation of two
reach `max_failures` are suspects. With trusted members, every suspect is left out at once; in a
fresh group, the newest half of the members is left out, then the oldest half, then each quarter,
eighth, ... is kept alone in turn (several at fault: a part without any), and once the parts are
smaller than two, the oldest member alone (a generation of one needs no peer). Once a generation of every member not out holds, it is the base of a check: the newest half
of those out is let back in (beside a lone untrusted base, one member). If that generation holds,
they are cleared; if it fails with every base member reporting it, a culprit is among them: one
member is left out for good; of several, the newer half is checked next, then the older half (a
binary search; the half left is checked, not inferred, since a fault that strikes only sometimes
would mislead an inference). A base member that reports late still completes
a one-member verdict; otherwise (a base member goes silent or leaves) those checked wait for the
next base. Beside one untrusted member a failed check names neither: the checked member is
doubted, and once every check beside that member failed, the next member is tried alone; once
every member was, no two hold together and nothing says who is at fault: the oldest trains alone
and the others are parked until a member joins or the lone one fails alone, when the search starts
again. A member that leaves and registers again is a new process: a newcomer, not a silent member. Newcomers wait for
the current generation to form and for a check to decide, so that neither is cut short.

What it does not find: a trusted member that later breaks every generation (the group re-forms
until an operator stops it; `collafuse status` shows the generations). What it may get wrong: a
check cannot tell a member's fault from a network outage, or from a fault elsewhere that strikes
only sometimes, during it; reports later than `report_wait` make their member look stalled. A search costs a generation per
try (settle plus --group-timeout), about 2 log2 of the members per culprit, and a check decides
only when train jobs come to make a step.
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
class LateCheck:
    """A failed check that some base members had not reported by the re-form: their later reports
    still complete its verdict (a busy member starts its join late and times out late)."""

    checked: bytes
    generation: str
    waiting: set[bytes]


@dataclass
class TrainerGroup:
    settle: float  # seconds to wait after an event before re-forming
    max_failures: int = 3  # failed generations in a row after which a member never in a held generation of two is a suspect
    report_wait: float = 2.0  # seconds a failure's re-form waits, beyond the settle, for every live member's report
    candidates: dict[bytes, str] = field(default_factory=dict)  # every live member → its rendezvous address, oldest first
    current: Generation = field(default_factory=lambda: Generation("", [], ""))
    count: int = 0  # generations formed in this broker run
    reported: set[bytes] = field(default_factory=set)  # members that reported the current generation failed
    first_report: float = 0.0  # when the first of them did
    reform_at: float | None = None
    model: str = ""  # the model preset every member trains
    failures: dict[bytes, int] = field(default_factory=dict)  # member → failed generations in a row it was in
    proven: set[bytes] = field(default_factory=set)  # members of a held generation of two or more
    claims: set[bytes] = field(default_factory=set)  # members that said the current generation formed
    stepped: bool = False  # a member that said so acknowledged a step of the current generation
    held: bool = False  # the current generation formed and took a step
    out: list[bytes] = field(default_factory=list)  # members the generations leave out until they are checked, newest last
    checking: list[bytes] = field(default_factory=list)  # members let back into the generation that held without them
    suspect: list[bytes] = field(default_factory=list)  # the older half of a failed check, checked once the newer half is decided
    cleared_with: list[bytes] = field(default_factory=list)  # that generation's members: the check's base
    tries: int = 0  # generations a search in a fresh group (none trusted) has tried, each without some members
    doubted: list[bytes] = field(default_factory=list)  # members whose check beside one untrusted member failed
    lone: set[bytes] = field(default_factory=set)  # untrusted members that others were checked beside, alone, in this search
    parked: list[bytes] = field(default_factory=list)  # members of a search that found no two to hold together, out until one joins
    trying: list[bytes] = field(default_factory=list)  # the members a search's next generation keeps (reported or not)
    departed: set[bytes] = field(default_factory=set)  # members of the current generation that left it (back, they are newcomers)
    late: LateCheck | None = None
    verdicts: list[bytes] = field(default_factory=list)  # members late reports found at fault, left out at the next re-form

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

    def left_out_now(self) -> list[bytes]:
        """The members a search leaves out of the current generation (not those parked)."""
        return [r for r in self.out + self.doubted + self.checking + self.suspect + self.verdicts if r not in self.current.members]

    def _excluded(self) -> set[bytes]:
        return set(self.out + self.doubted + self.parked + self.suspect + self.verdicts)

    def _live(self) -> list[bytes]:
        """The current generation's members still in it: a member that left and registered again
        is a new process, outside it."""
        return [r for r in self.current.members if r in self.candidates and r not in self.departed]

    def _checking_now(self) -> bool:
        """The current generation is a check: the members it checks are in it."""
        return bool(self.checking) and set(self.checking) <= set(self.current.members)

    def join(self, route: bytes, address: str, model: str, now: float) -> None:
        """A newcomer; the members parked by a search that found no two to hold together are tried
        again with it."""
        self.candidates[route] = address
        self.model = model
        if self.parked:
            self.parked, self.tries = [], 0
        self._newcomer(now)

    def _newcomer(self, now: float) -> None:
        """A member outside the current generation wants in: a re-form is due once the current one
        has formed and is not a check (else `formed`, `_hold` or its failure brings it in)."""
        if not self.current.members or (len(self.claims) == len(self.current.members) and not self._checking_now()):
            self._due(now)

    def leave(self, route: bytes, now: float) -> None:
        """A member is gone. One of the current generation makes a re-form due (its peers'
        collectives fail and they report); another may complete the candidates a held generation
        lacks for a check."""
        member = route in self.current.members
        self._forget(route)
        if member:
            self.departed.add(route)
            self._due(now)
        elif self.held:
            self._next_check(now)

    def _forget(self, route: bytes) -> None:
        self.candidates.pop(route, None)
        self.failures.pop(route, None)
        for routes in (self.proven, self.lone, self.reported, self.claims):
            routes.discard(route)
        for listed in (self.out, self.doubted, self.parked, self.checking, self.suspect, self.verdicts, self.trying):
            if route in listed:
                listed.remove(route)
        if self.late is not None and route in (self.late.checked, *self.late.waiting):
            self.late = None  # a base member that left may have caused the failure: no verdict

    def formed(self, route: bytes, generation: str, now: float) -> None:
        """A member says it is in `generation`. Once every member of the current one has, newcomers
        (and members back from a failure) that waited for it to form make a re-form due, unless it
        is a check, which must first hold or fail."""
        if generation != self.current.id or route not in self.current.members or route in self.claims | self.departed:
            return
        self.claims.add(route)
        if len(self.claims) < len(self.current.members):
            return
        if not self._checking_now():
            self._wait_for_newcomers(now)
        self._hold(now)

    def _wait_for_newcomers(self, now: float) -> None:
        excluded = self._excluded()
        live = self._live()
        if any(r not in live and r not in excluded and r not in self.checking for r in self.candidates):
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
        doubted there are checked again); the members it checked are cleared; then the next check."""
        if self.held or not self.stepped or len(self.claims) < len(self.current.members):
            return
        self.held = True
        members = self.current.members
        for member in members:
            self.failures.pop(member, None)
        if len(members) >= 2:
            self.proven.update(members)
            self.out += self.doubted
            self.doubted, self.lone, self.tries = [], set(), 0
        if self._checking_now():
            self.checking = []
            if self.suspect:  # the older half of a failed check is checked next (a fault that struck once would mislead an inference)
                self.checking, self.suspect, self.cleared_with = self.suspect, [], list(members)
                self._due(now)
                return
        self._next_check(now)

    def _next_check(self, now: float) -> None:
        """If the current generation held and is every candidate but those out, it is the base of a
        check: the next of them are let back in (else: newcomers, if any, are due)."""
        base = self.current.members
        if self.held and not self.checking and self.out and set(base) == set(self.candidates) - self._excluded():
            if len(base) == 1 and base[0] not in self.proven:
                self.lone.add(base[0])
            self.checking, self.cleared_with = self._take(base), list(base)
            self.late = None
            self._due(now)
        else:
            self._wait_for_newcomers(now)

    def _culprit_in(self, known: list[bytes], now: float) -> None:
        """A culprit is among these members (a check of them failed beside a trusted base): one is
        left out for good at the next re-form; of several, the newer half is checked next, then
        the older half."""
        if len(known) == 1:
            self.verdicts += known
        else:
            half = len(known) // 2
            self.suspect, self.checking = known[:half], known[half:]
        self._due(now)

    def _take(self, base: list[bytes]) -> list[bytes]:
        """The next members out to check beside `base`: the newest half, or, beside a lone untrusted
        member, the newest one (a failure beside it names neither)."""
        count = 1 if len(base) == 1 and base[0] not in self.proven else (len(self.out) + 1) // 2
        taken, self.out = self.out[-count:], self.out[:-count]
        return taken

    def failed(self, route: bytes, generation: str, now: float) -> None:
        """A member says a generation failed. For the current one, it is kept in the next; a late
        report may complete a check's verdict; other stale news from a member of the current
        generation is ignored; from anyone else, a wish to join (not from a member out: it is left
        out on purpose)."""
        if route not in self.candidates or route in self._excluded() or (route in self.checking and not self._checking_now()):
            return
        late = self.late
        if late is not None and generation == late.generation and route in late.waiting:
            late.waiting.discard(route)
            if not late.waiting and late.checked in self.out:
                self.out.remove(late.checked)
                self.verdicts.append(late.checked)
                self.late = None
                self._due(now)
            return
        live = self._live()
        if generation == self.current.id and route in live:
            if not self.reported:
                self.first_report = now
            self.reported.add(route)
            self._due(now)
        elif route not in live:
            self._newcomer(now)

    def _due(self, now: float) -> None:
        if self.reform_at is None:
            self.reform_at = now + self.settle

    def reform(self, epoch: str, now: float) -> Generation | None:
        """The next generation once a re-form is due (None until then): the survivors in their old
        rank order (rank 0 stays rank 0 while it lives), then the newcomers, none of those out; a
        check generation is its base and the members it checks."""
        if self.reform_at is None or now < self.reform_at:
            return None
        silent = [r for r in self._live() if r not in self.reported]
        if self.reported and silent and now < self.first_report + self.settle + self.report_wait:
            return None  # a failure: the members busy when it came report late (a dead or stalled one never does)
        checked = list(self.checking) if self._checking_now() else []
        if self.reported:
            self._failed_generation(checked, now)
        elif checked:  # a check re-formed without failing (a member left): they wait for the next base
            self.out += checked + self.suspect
            self.checking, self.suspect = [], []
        left_out, self.verdicts = self.verdicts, []
        for route in left_out:
            self._forget(route)
        self.count += 1
        generation_id = f"{epoch}-{self.count}"
        base = [r for r in self.cleared_with if r in self.candidates]
        if self.checking and base:
            members = base + self.checking
        elif self.trying:
            members, self.trying = [r for r in self.candidates if r in self.trying], []
        else:
            self.out += self.checking + self.suspect  # a check whose base is gone: they wait for the next
            self.checking, self.suspect = [], []
            live = self._live()
            kept = [r for r in live if not self.reported or r in self.reported]
            members = kept + [r for r in self.candidates if r not in live]
            if all(r in self._excluded() for r in members):
                self.out, self.doubted, self.parked = [], [], []  # nobody would be left: leave nobody out
            excluded = self._excluded()
            members = [r for r in members if r not in excluded]
        self.current = Generation(generation_id, members, self.candidates[members[0]] if members else "", left_out)
        self.reported.clear()
        self.claims.clear()
        self.departed.clear()
        self.stepped = self.held = False
        self.reform_at = None
        return self.current

    def _failed_generation(self, checked: list[bytes], now: float) -> None:
        """Count the failure against the members it had; a failed check decides (`_judge`) when
        every base member reported it, and waits otherwise. Any other failure ends a search under
        way (those out return) and starts the next try: with trusted members, every suspect out at
        once; in a fresh group, the next part of it (`_fresh_try`), and once none is left, the oldest
        member not yet alone in this search, alone."""
        for member in self._live():
            self.failures[member] = self.failures.get(member, 0) + 1
        if checked:
            base = [r for r in self.current.members if r not in checked]
            if set(base) <= self.reported:  # (a base member that left is no longer among those that reported)
                self._judge(checked, base, now)
                return
            self.out += checked + self.suspect  # undecided: a base member went silent, left, or reports late
            self.checking, self.suspect = [], []
            trusted = len(base) >= 2 or base[0] in self.proven
            if len(checked) == 1 and trusted and set(base) <= set(self._live()):  # late, not gone: it may still say
                self.late = LateCheck(checked[0], self.current.id, set(base) - self.reported)
            return
        if len(self.current.members) != 1:
            self.lone = set()  # a lone member's own failure keeps the rotation going
        self.out, self.doubted, self.checking, self.suspect = [], [], [], []  # a check announced for the next generation too
        self.parked = []  # the lone member a parked search left failed alone: search again, everyone in
        suspects = [r for r in self.candidates if r not in self.proven and self.failures.get(r, 0) >= self.max_failures]
        if suspects and any(r in self.proven for r in self.candidates):
            self.out = suspects
        elif suspects:
            self.trying = self._fresh_try() or self._next_lone() or [next(iter(self.candidates))]
            self.out = [r for r in self.candidates if r not in self.trying]

    def _fresh_try(self) -> list[bytes]:
        """The members the next try of a fresh group keeps, in age order: the older part without the
        newest half, then the newer part without the oldest half (one member at fault is in one of
        them), then each quarter, eighth, ... alone (several at fault: a part without any); [] once
        the parts are smaller than two."""
        order, attempt = list(self.candidates), self.tries
        self.tries += 1
        n, half = len(order), len(order) // 2
        if n - half >= 2:
            if attempt < 2:
                return order[: n - half] if attempt == 0 else order[half:]
            attempt -= 2
        parts = 4
        while n // parts >= 2:
            if attempt < parts:
                return order[attempt * n // parts : (attempt + 1) * n // parts]
            attempt, parts = attempt - parts, parts * 2
        return []

    def _judge(self, checked: list[bytes], base: list[bytes], now: float) -> None:
        """A check failed with every base member reporting it. Beside trusted members (or two or
        more that held), a culprit is among those checked (`_culprit_in`; a suspect half waiting
        is no longer known to hold one). Beside one untrusted member, either may be at fault: the
        checked is doubted, and once every check beside that member failed, the next member not
        yet alone is tried alone, the others out; once every member was, no two hold together: the
        oldest trains alone and the others are parked until a member joins. Then the next check."""
        self.checking = []
        if len(base) >= 2 or (base and base[0] in self.proven):
            self.out += self.suspect
            self.suspect = []
            self._culprit_in(checked, now)
        else:
            self.doubted += checked
        if self.checking:
            return
        if self.out:
            self.checking = self._take(base)
        elif self.doubted:
            lone = self._next_lone()
            if lone:
                self.out, self.doubted, self.trying = [r for r in self.candidates if r not in lone], [], lone
            else:
                self.parked = [r for r in self.candidates if r != next(iter(self.candidates))]
                self.doubted, self.lone, self.tries = [], set(), 0

    def _next_lone(self) -> list[bytes]:
        """The oldest member not yet alone in this search, as a list ([] once every one was)."""
        lone = next((r for r in self.candidates if r not in self.lone), None)
        return [] if lone is None else [lone]
