"""Data-parallel trainers (issue 14) at the engine level: ranks on gloo, here as threads of one process."""

from __future__ import annotations

import threading

import pytest
import torch

from collafuse.engine.collective import Collective, StoreHost
from collafuse.engine.server import ServerParty
from collafuse.system.launch import free_port
from tests.test_training import _message


def _ranks(world: int, work, timeout: float = 30.0) -> list:
    """Run `work(collective)` on `world` ranks at once (threads), each with its own group handle."""
    hosts = [StoreHost(f"127.0.0.1:{free_port()}", timeout) for _ in range(world)]  # as each worker serves its own
    results: list = [None] * world
    errors: list = []

    def rank(r: int) -> None:
        try:
            results[r] = work(Collective("test-1", r, world, hosts[0].address, timeout, hosts[r]))
        except Exception as exc:  # surfaced below, with the rank
            errors.append((r, exc))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    assert not errors, errors
    return results


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_ranks_step_as_one_trainer_with_the_union_of_their_rows(device):
    """Three steps: rank 0 and rank 1 hold different clients' messages (in step 2 rank 1 holds none,
    in step 3 one of rank 0's is hostile and refused); the ranks' weights equal, within float
    tolerance, those of one trainer given the union in rank order, and equal each other exactly.
    The tolerance: summing gradients in another order changes their last bits, and Adam divides
    each gradient by its own magnitude, so a parameter whose gradient is near zero can move by a
    fraction of the learning rate (1e-3) either way; nearly all parameters agree to 1e-6."""
    steps = [
        ([_message(6, seed=1)], ["a"], [_message(10, seed=2), _message(4, seed=3)], ["b", "c"]),
        ([_message(8, seed=4), _message(8, seed=5)], ["a", "b"], [], []),
        ([_message(4, seed=6, eps_scale=50.0), _message(5, seed=7)], ["m", "a"], [_message(20, seed=8)], ["flood"]),
    ]
    single = ServerParty((1, 32, 32), seed=7, device=device)
    expected = [single.train_step(m0 + m1, o0 + o1) for m0, o0, m1, o1 in steps]

    parties = [ServerParty((1, 32, 32), seed=7, device=device) for _ in range(2)]  # built here: seeding is not thread-safe

    def work(group: Collective):
        party = parties[group.rank]
        outcomes = []
        for m0, o0, m1, o1 in steps:
            mine, owners = (m0, o0) if group.rank == 0 else (m1, o1)
            outcomes.append(party.train_step(mine, owners, group, tags=[f"{group.rank}/{i}" for i in range(len(mine))]))
        return party, outcomes

    (p0, out0), (p1, out1) = _ranks(2, work)
    assert p0.step == p1.step == single.step == 3
    for a, b in zip(p0.model.parameters(), p1.model.parameters()):
        assert torch.equal(a, b)
    gap = torch.cat([(a - c).abs().reshape(-1) for a, c in zip(p0.model.parameters(), single.model.parameters())])
    assert gap.max() < 1e-4 and (gap > 1e-6).float().mean() < 1e-3 and gap.mean() < 1e-7
    for mine, theirs, one in zip(out0, out1, expected):
        assert mine.loss is not None and abs(mine.loss - one.loss) < 1e-5 and mine.loss == theirs.loss
    assert set(out0[2].refused) == {0} and not out1[2].refused  # the hostile message is refused where it lies
    assert out0[0].applied_elsewhere == ["1/0", "1/1"] and out1[0].applied_elsewhere == ["0/0"]
    assert out0[2].applied_elsewhere == ["1/0"] and out1[2].applied_elsewhere == ["0/1"]  # refused rows are not applied


def test_eight_ranks_step_as_one_trainer_with_the_union_of_their_rows():
    """Beyond the four ranks of the benchmarks: eight ranks, each with one client's message of its
    own size (one rank with none), two steps; every rank ends bit-identical to the others and,
    within the float tolerance above, equal to one trainer given the union in rank order."""
    world = 8
    held = [[(_message(2 + r, seed=10 * step + r), f"c{r}")] if r != 5 else [] for step in range(2) for r in range(world)]
    steps = [held[i * world:(i + 1) * world] for i in range(2)]
    single = ServerParty((1, 32, 32), seed=11)
    for step in steps:
        union = [pair for rank in step for pair in rank]
        single.train_step([m for m, _ in union], [o for _, o in union])
    parties = [ServerParty((1, 32, 32), seed=11) for _ in range(world)]

    def work(group: Collective):
        party = parties[group.rank]
        for step in steps:
            mine = step[group.rank]
            party.train_step([m for m, _ in mine], [o for _, o in mine], group, tags=[f"{group.rank}/{i}" for i in range(len(mine))])
        return party

    ranks = _ranks(world, work, timeout=60.0)
    assert all(p.step == 2 for p in ranks)
    for other in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ranks[0].model.parameters(), other.model.parameters()))
    gap = torch.cat([(a - c).abs().reshape(-1) for a, c in zip(ranks[0].model.parameters(), single.model.parameters())])
    assert gap.max() < 1e-4 and gap.mean() < 1e-7


def test_a_group_with_no_rows_anywhere_takes_no_step():
    parties = [ServerParty((1, 32, 32), seed=1) for _ in range(2)]

    def work(group: Collective):
        party = parties[group.rank]
        return party.train_step([], [], group).loss, party.step

    assert _ranks(2, work) == [(None, 0), (None, 0)]


def test_collective_bytes_travel_between_ranks():
    def work(group: Collective):
        mine = bytes([group.rank]) * (group.rank * 3)  # rank 0 sends nothing
        return group.gather_bytes(mine), group.broadcast_bytes(b"state of rank 2" if group.rank == 2 else b"", 2), \
            group.any_of(group.rank == 1, False)

    for gathered, state, flags in _ranks(3, work):
        assert gathered == [b"", b"\x01" * 3, b"\x02" * 6] and state == b"state of rank 2" and flags == [True, False]


def test_the_broker_re_forms_the_group_from_the_ranks_that_report():
    from collafuse.broker.group import TrainerGroup

    g = TrainerGroup(settle=0.5)
    g.join(b"a", "h:1", "tiny", now=0.0)
    assert g.refuses(b"b", "paper") and not g.refuses(b"a", "paper")  # one model for the group (a alone may change its own)
    g.join(b"b", "h:2", "tiny", now=0.2)
    assert g.reform("E", now=0.4) is None  # settling: two joins make one generation
    first = g.reform("E", now=0.6)
    assert first is not None and first.members == [b"a", b"b"] and first.message(b"b") == {"id": "E-1", "rank": 1, "world": 2, "store": "h:1"}
    g.join(b"c", "h:3", "tiny", now=1.0)
    assert g.reform("E", now=1.6).members == [b"a", b"b", b"c"]
    g.failed(b"a", "E-2", now=2.0)  # c stalls; only the ranks that report the failure are kept
    g.failed(b"b", "E-2", now=2.1)
    g.failed(b"b", "E-1", now=2.2)  # stale news from a member: ignored
    assert g.reform("E", now=2.6).members == [b"a", b"b"]
    g.failed(b"c", "E-2", now=3.0)  # c was only slow: it reports late and joins again as a newcomer
    assert g.reform("E", now=3.6).members == [b"a", b"b", b"c"]
    g.leave(b"a", now=4.0)
    third = g.reform("E", now=4.6)
    assert third.members == [b"b", b"c"] and third.store == "h:2"  # rank 0 left: the next oldest serves the rendezvous
    g.join(b"d", "h:4", "tiny", now=5.0)
    g.leave(b"d", now=5.1)  # a newcomer gone before it joined: the re-form it asked for still comes, unchanged
    assert g.reform("E", now=5.6).members == [b"b", b"c"]
    g.leave(b"x", now=6.0)  # never a member: nothing to re-form
    assert g.reform("E", now=7.0) is None
    g.failed(b"x", "E-5", now=5.0)  # not a member at all: nothing happens
    assert g.reform("E", now=9.0) is None


def test_the_group_finds_a_member_that_breaks_every_generation_by_leaving_suspects_out_in_turn():
    from collafuse.broker.group import TrainerGroup

    clock = iter(range(10, 10_000, 2))

    def fail(g: TrainerGroup, silent: tuple[bytes, ...] = ()):
        """The members (but the silent) report the current generation failed; the next one."""
        now = float(next(clock))
        for member in g.current.members:
            if member not in silent:
                g.failed(member, g.current.id, now)
        return g.reform("E", now + 1)

    def form(g: TrainerGroup):
        """Every member of the current generation says it formed; the re-form that may follow."""
        now = float(next(clock))
        for member in g.current.members:
            g.formed(member, g.current.id, now)
        return g.reform("E", now + 1)

    def group(*routes: bytes, max_failures: int = 2) -> TrainerGroup:
        g = TrainerGroup(settle=0.5, max_failures=max_failures)
        for i, route in enumerate(routes):
            g.join(route, f"h:{i}", "tiny", now=0.0)
        g.reform("E", now=1.0)
        return g

    g = group(b"a", b"b", b"c")  # fresh: nobody is trusted; a, rank 0, is the culprit
    assert fail(g).members == [b"a", b"b", b"c"]
    assert fail(g).members == [b"a", b"b"]  # two failures each: the newest suspect, c, on trial
    assert fail(g).members == [b"a", b"c"]  # failed without c too: c returns, b on trial
    g.failed(b"b", g.current.id, now=5000.0)  # the member on trial has nothing to report about it
    assert g.reform("E", now=5001.0) is None
    assert fail(g).members == [b"c", b"b"]  # and without b: a on trial
    g.formed(b"c", g.current.id, now=5002.0)
    assert g.reform("E", now=5003.0) is None  # one member's word is not a formed generation
    assert form(g).members == [b"c", b"b", b"a"]  # c and b formed without a: a let back into exactly that generation
    last = fail(g)
    assert last.left_out == b"a" and last.members == [b"c", b"b"] and list(g.candidates) == [b"b", b"c"]
    for _ in range(6):
        assert fail(g).members == [b"c", b"b"]  # the members of a formed generation are never suspects

    g = group(b"a", b"b", b"c")
    assert form(g) is None  # an idle group that formed: trusted without a step
    g.join(b"d", "h:3", "tiny", now=2.0)
    assert g.reform("E", now=3.0).members == [b"a", b"b", b"c", b"d"]
    fail(g)
    assert fail(g).members == [b"a", b"b", b"c"]  # d on trial
    g.join(b"n", "h:4", "tiny", now=3000.0)  # a newcomer while d is on trial
    assert g.reform("E", now=3001.0).members == [b"a", b"b", b"c", b"n"]
    assert form(g).members == [b"a", b"b", b"c", b"n", b"d"]  # every candidate but d formed: d checked
    silent = fail(g, silent=(b"a",))  # a went silent (a crash?): no evidence against d
    assert silent.left_out is None and silent.members == [b"b", b"c", b"n"] and b"d" in g.candidates
    assert fail(g).members == [b"b", b"c", b"n", b"a", b"d"]
    assert fail(g).members == [b"b", b"c", b"n", b"a"]  # d on trial again
    g.join(b"m", "h:5", "tiny", now=4000.0)
    assert g.reform("E", now=4001.0).members == [b"b", b"c", b"n", b"a", b"m"]
    for member in g.current.members:
        g.formed(member, g.current.id, now=4002.0)
    g.join(b"late", "h:6", "tiny", now=4002.0)  # joins as the check is made: it waits one re-form
    assert g.reform("E", now=4003.0).members == [b"b", b"c", b"n", b"a", b"m", b"d"]
    last = fail(g)
    assert last.left_out == b"d" and b"d" not in g.candidates and last.members == [b"b", b"c", b"n", b"a", b"m", b"late"]

    g = group(b"a", b"b", b"c")
    form(g)
    g.join(b"e", "h:4", "tiny", now=600.0)
    g.reform("E", now=601.0)
    fail(g)
    assert fail(g).members == [b"a", b"b", b"c"]  # e on trial, during a network outage
    assert fail(g).members == [b"a", b"b", b"c", b"e"]  # failed without e too: e returns for a generation
    assert fail(g).members == [b"a", b"b", b"c"]  # and is tried again
    assert form(g).members == [b"a", b"b", b"c", b"e"]  # the outage ends: e checked
    assert form(g) is None and b"e" in g.proven and g.checking is None  # formed with e: e stays, trusted

    two = group(b"x", b"y", max_failures=1)
    for _ in range(5):
        assert fail(two).members == [b"x", b"y"]  # of two, either alone forms a generation: nobody is suspected
    with pytest.raises(ValueError):
        TrainerGroup(settle=0.5, max_failures=0)


def test_a_rank_whose_last_step_the_group_lost_sends_no_ack_for_it():
    """Two ranks at the same step count but different histories (rank 1 took a step with job J
    that rank 0 never took: its peer died mid-step). Joining one generation, both take rank 0's
    state; rank 1's held ack for J is withdrawn and J waits again to be applied, so no ack leaves
    for a step the group does not hold."""
    from collafuse.common.config import WorkerConfig
    from collafuse.protocol import wire
    from collafuse.worker.group import GroupMember
    from collafuse.worker.training import TrainBatcher

    parties = [ServerParty((1, 32, 32), seed=3) for _ in range(2)]
    lost = _message(4, seed=9)
    parties[1].train_step([lost], ["c"])  # the step rank 0 never took
    parties[0].train_step([_message(4, seed=10)], ["d"])  # rank 0's own step: both at step 1
    batchers = [TrainBatcher(64, 0.0) for _ in range(2)]
    batchers[1].remember({"client": "c", "job": "J"}, wire.encode("ack", job="J", client="c", step=1, loss=1.0), hold=True, msg=lost)
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    members = [GroupMember(WorkerConfig(group=hosts[r], group_timeout=30), parties[r], batchers[r]) for r in range(2)]

    threads = [threading.Thread(target=lambda r=r: members[r].sync(Collective("g-1", r, 2, hosts[0], 30, members[r].host))) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert batchers[1].release() == [] and [env["job"] for env, _ in batchers[1].pending] == ["J"]
    for a, b in zip(parties[0].model.parameters(), parties[1].model.parameters()):
        assert torch.equal(a, b)
