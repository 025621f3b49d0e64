"""Who speaks for which client (broker/identity.py), at the broker's own state: names bound to keys,
welcomed connections and their bounds."""

from __future__ import annotations

import itertools
import time

from collafuse.broker.broker import Broker, ClientState
from collafuse.broker.identity import Identities
from collafuse.common.config import BrokerConfig

_names = itertools.count()


def test_a_name_belongs_to_the_first_key_and_a_key_binds_a_bounded_number():
    ids = Identities(BrokerConfig(max_names_per_key=2), None)
    assert ids.bind("a", "K1") and ids.bind("a", "K1")
    assert not ids.bind("a", "K2")
    assert ids.bind("b", "K1") and not ids.bind("c", "K1")  # K1's third name
    assert ids.bind("c", "K2") and ids.owner("c") == "K2"


def test_one_keys_connections_evict_only_its_own():
    ids = Identities(BrokerConfig(max_connections_per_key=2), None)
    ids.welcome(b"other", "o", "K2")
    for route in (b"r1", b"r2", b"r3"):
        ids.welcome(route, "a", "K1")
    assert not ids.welcomed(b"r1") and ids.welcomed(b"r2") and ids.welcomed(b"r3") and ids.welcomed(b"other")


def test_a_connection_stays_welcomed_while_any_of_its_names_is_known():
    """One connection that said hello as several names (the load test's sockets do) keeps its
    welcome when one name is forgotten; a heartbeat on it keeps every name alive. Before, the
    connection remembered only the last name and was forgotten with it: the others' next job was
    answered not_joined."""
    i = next(_names)
    broker = Broker(BrokerConfig(frontend=f"inproc://id-front-{i}", backend=f"inproc://id-back-{i}", client_idle_expiry=10))
    now = time.monotonic()
    for name in ("a", "b"):
        broker.clients[name] = ClientState(name, (1, 8, 8), now)
        broker.identities.welcome(b"conn", name, None)
    broker.clients["b"].last_seen = now - 60  # "b", the last hello, idle past the expiry
    broker.expire_idle(now)
    assert "b" not in broker.clients and broker.identities.welcomed(b"conn") and broker.identities.names(b"conn") == ["a"]
    broker.identities.welcome(b"conn", "b", None)
    broker.clients["b"] = ClientState("b", (1, 8, 8), now - 60)
    broker.clients["a"].last_seen = now - 60
    broker.on_node_heartbeat(b"conn")
    assert all(c.last_seen >= now for c in broker.clients.values())
    broker.expire_idle(time.monotonic())
    assert set(broker.clients) == {"a", "b"}
    broker.expire_idle(time.monotonic() + 60)
    assert not broker.clients and not broker.identities.welcomed(b"conn")
    broker.close()


def test_the_names_connections_said_hello_as_are_capped_in_all():
    """Without keys one connection may say hello as many names and many connections as one name:
    the pairs kept (what every heartbeat tick walks) stay within 4 × max_clients, the least
    recently used connection forgotten first."""
    ids = Identities(BrokerConfig(max_clients=4), None)
    for i in range(40):
        ids.welcome(b"many", f"n{i}", None)
    assert ids.entries == sum(len(n) for n in ids.routes.values()) <= 16
    for i in range(20):
        ids.welcome(f"c{i}".encode(), "n0", None)
    assert ids.entries == sum(len(n) for n in ids.routes.values()) <= 16 and ids.welcomed(b"c19") and not ids.welcomed(b"many")
    ids.forget_names({"n1"})
    assert ids.entries == 0 and not ids.routes
