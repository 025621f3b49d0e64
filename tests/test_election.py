"""Which worker the broker makes the lone trainer after it starts, and what it remembers of the
acknowledged steps (broker/succession.py, and the broker's elect), at the broker's own state; the
cases are those of a review of the election (each failed before its fix)."""

from __future__ import annotations

import itertools
import time

from collafuse.broker.broker import Broker, WorkerState
from collafuse.common.config import BrokerConfig

_names = itertools.count()


def _broker(**config) -> Broker:
    i = next(_names)
    broker = Broker(BrokerConfig(frontend=f"inproc://elect-front-{i}", backend=f"inproc://elect-back-{i}", **config))
    broker.model_shape, broker.levels = (1, 8, 8), 100
    return broker


def _worker(broker: Broker, name: str, step: object, durable: bool = True, group: str = "") -> WorkerState:
    worker = WorkerState(f"{name}-{next(_names)}".encode(), name, {"denoise": 8, "train": 8}, {"denoise": 8, "train": 8}, True,
                         time.monotonic(), stats={"step": step, "durable": durable}, group=group)
    broker.workers[worker.route] = worker
    return worker


def test_a_durable_trainer_after_one_that_was_not_counts_from_its_own_step():
    """A trainer without a checkpoint acks step 100 and dies; a standby with one takes over from the
    relay at 80 and acks 81: the acknowledged step is 81 (the 100 were never promises), so the
    standby may train again after a restart (before: 100, and nobody could ever train)."""
    broker = _broker()
    a, b = _worker(broker, "a", 100, durable=False), _worker(broker, "b", 81)
    broker.succession.note_ack(a, 100, replicated=False)
    broker.succession.note_ack(b, 81, replicated=False)
    assert (broker.succession.step, broker.succession.durable, broker.succession.by) == (81, True, "b") and broker.may_train(b)
    broker.close()


def test_a_groups_acks_count_and_no_rank_ends_the_election_alone():
    """A lone trainer acked 100, then a trainer group trained on to 310. After a restart the old
    lone trainer (step 100, its name in the state) must not end the election and train: the group's
    step is the one that counts, and a worker started from a rank's checkpoint (310) wins."""
    broker = _broker()
    lone = _worker(broker, "lone", 100)
    broker.succession.note_ack(lone, 100, replicated=False)
    member = _worker(broker, "rank0", 305, durable=False, group="127.0.0.1:1")
    broker.succession.note_ack(member, 305, replicated=True)
    assert (broker.succession.step, broker.succession.durable, broker.succession.by) == (305, True, "")
    del broker.workers[lone.route], broker.workers[member.route]
    broker.relayed_version = 300
    lone = _worker(broker, "lone", 100)
    broker.elect(time.monotonic())
    assert broker.succession.electing() and broker.trainer is None
    resumed = _worker(broker, "from-rank0", 310)
    broker.elect(broker.succession.elect_until)
    assert broker.trainer == resumed.route and not broker.may_train(lone)
    broker.close()


def test_a_name_alone_does_not_end_the_election():
    """The state says step 100 was acknowledged by "worker"; a standby of that name (names need not
    be unique) at step 0 registers first. The election goes on, and the real trainer (103) wins."""
    broker = _broker()
    broker.succession.step, broker.succession.by, broker.relayed_version = 100, "worker", 100
    _worker(broker, "worker", 0)
    broker.elect(time.monotonic())
    assert broker.succession.electing()
    trainer = _worker(broker, "worker", 103)
    broker.elect(time.monotonic())
    assert not broker.succession.electing() and broker.trainer == trainer.route
    broker.close()


def test_during_the_election_only_a_lone_worker_that_may_train_keeps_a_group_out():
    broker = _broker()
    broker.succession.step = 50
    _worker(broker, "behind", 0)  # may not train: it lacks the acknowledged steps
    ready = {"worker": "g", "denoise_credit": 8, "train_credit": 8, "trainer": True, "image_shape": [1, 8, 8], "levels": 100,
             "model": "tiny", "group": "127.0.0.1:2"}
    broker.on_ready(b"g-route", ready)
    assert b"g-route" in broker.workers and broker.workers[b"g-route"].group
    broker.close()


def test_a_step_that_is_not_a_count_is_step_zero():
    broker = _broker()
    broker.succession.step = 5
    junk = [_worker(broker, f"j{i}", step) for i, step in enumerate(("abc", -3, 2.5, None, [1]))]
    assert not any(broker.may_train(w) for w in junk)
    broker.elect(broker.succession.elect_until)
    assert broker.trainer is None
    broker.close()
