"""The broker's dispatch rules, at its own state: workers and jobs are put in place by hand and the
broker's sockets are in-process with no peers (what it sends to a worker is dropped), so each test
sees exactly which worker took which job and what credit is left."""

from __future__ import annotations

import itertools
import time
from collections import Counter

import zmq

from collafuse.broker.broker import Broker, ClientState, Job, WorkerState
from collafuse.common.config import BrokerConfig
from collafuse.protocol.wire import ErrorCode

SHAPE = (1, 8, 8)
_names = itertools.count()


def _broker() -> Broker:
    i = next(_names)
    broker = Broker(BrokerConfig(frontend=f"inproc://dispatch-front-{i}", backend=f"inproc://dispatch-back-{i}", reserve_after=1.0))
    broker.model_shape, broker.levels = SHAPE, 100
    return broker


def _worker(broker: Broker, name: str, credit: int) -> WorkerState:
    worker = WorkerState(name.encode(), name, {"denoise": credit, "train": 0}, {"denoise": credit, "train": 0}, False, time.monotonic())
    broker.workers[worker.route] = worker
    return worker


def _job(broker: Broker, client: str, job_id: str, rows: int, age: float = 0.0) -> Job:
    if client not in broker.clients:
        broker.clients[client] = ClientState(client, SHAPE, time.monotonic())
        broker.identities.welcome(client.encode(), client, None)
    job = Job(client, job_id, "denoise", rows, [zmq.Frame(b"job")], time.monotonic() - age, 0, 1, client.encode())
    broker.jobs[(client, job_id)] = job
    broker.enqueue(job)
    return job


def _answer(broker: Broker, worker: WorkerState, count: int) -> None:
    """The worker answers its `count` oldest unanswered jobs."""
    for key in [k for k, j in worker.jobs.items() if broker.jobs.get(k) is j][:count]:
        broker.answer(broker.release(worker, key), [zmq.Frame(b"result")], failed=False)


def test_an_old_large_job_keeps_one_worker_and_the_others_fill():
    broker = _broker()
    workers = [_worker(broker, f"w{i}", 4) for i in range(3)]
    for w in workers:
        w.credit["denoise"] = 3  # each holds a row elsewhere
    _job(broker, "big", "b0", 4, age=10)
    for i in range(20):
        _job(broker, "a", f"a{i}", 1), _job(broker, "c", f"c{i}", 1)
    broker.dispatch()
    assert sorted(w.credit["denoise"] for w in workers) == [0, 0, 3]  # one kept for b0, not one per pass
    assert broker.forwarded == 6
    broker.close()


def test_a_worker_holding_a_timed_out_job_is_not_the_one_kept():
    """A job answered `timeout` may never come back, nor its credit: a large job kept waiting on
    that worker would wait for ever while the other serves a stream of small jobs."""
    broker = _broker()
    stuck, live = _worker(broker, "stuck", 4), _worker(broker, "live", 4)
    lost = _job(broker, "a", "lost", 1)
    broker.dispatch()
    held_by = stuck if lost in stuck.jobs.values() else live
    broker.fail(lost, ErrorCode.TIMEOUT, "held too long")  # stays held by that worker, its row of credit with it
    if held_by is live:
        stuck, live = live, stuck
    for i in range(3):
        _job(broker, "a", f"a{i}", 1)
    broker.dispatch()
    _job(broker, "big", "b0", 4, age=10)
    for i in range(3, 60):
        _job(broker, "a", f"a{i}", 1), _job(broker, "c", f"c{i}", 1)
        broker.dispatch()
        if any(j.job_id == "b0" for j in live.jobs.values()):
            break
        _answer(broker, live, 2)
        _answer(broker, stuck, 2)  # everything but the lost job
    assert any(j.job_id == "b0" for j in live.jobs.values()), "the 4-row job starved"
    broker.close()


class _Counting(dict):
    """The broker's clients, counting each look-up by name: dispatch's work per call."""

    looks = 0

    def __getitem__(self, key):
        self.looks += 1
        return super().__getitem__(key)


def _heads(broker: Broker) -> Counter:
    return Counter(c.queues["denoise"][0].rows for c in broker.clients.values() if c.queues["denoise"])


def test_credit_below_every_waiting_job_costs_no_look_at_the_line():
    """A worker with 2 rows free and 1,000 clients waiting with 4-row jobs: nothing fits, and a
    dispatch call looks at no client (it looked at all 1,000 on every call). A 2-row job that
    arrives then is sent; the sizes the broker keeps of the waiting jobs stay those of the queues'
    heads through sends, answers and a worker's death (its jobs back to the front of their queues)."""
    broker = _broker()
    worker = _worker(broker, "w", 130)
    for i in range(1000):
        _job(broker, f"c{i}", "j0", 4), _job(broker, f"c{i}", "j1", 4)
    broker.dispatch()
    assert worker.credit["denoise"] == 2 and broker.forwarded == 32
    counting = broker.clients = _Counting(broker.clients)
    for _ in range(10):
        broker.dispatch()
    assert counting.looks == 0 and broker.forwarded == 32
    _job(broker, "small", "s0", 2)
    broker.dispatch()
    assert worker.credit["denoise"] == 0 and broker.forwarded == 33
    assert broker.heads["denoise"] == _heads(broker) == Counter({4: 1000})
    _answer(broker, worker, 10)
    other = _worker(broker, "other", 8)
    broker.dispatch()
    assert broker.heads["denoise"] == _heads(broker)
    broker.remove_worker(worker, "a test")
    broker.dispatch()
    assert other.credit["denoise"] == 0 and broker.heads["denoise"] == _heads(broker)
    assert sum(broker.heads["denoise"].values()) == len(broker.turns["denoise"])
    broker.close()
