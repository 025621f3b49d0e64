"""Who speaks for which client at the broker: each client name is bound to the key that first said
hello with it (kept across restarts in --state), and the node connections that said hello are
remembered with the names they said it as, bounded so that no key can crowd out another's.

Without keys, names are not bound (anyone on the network may use any name; DESIGN.md §7) and a
connection is only a return address.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from collafuse.common.config import BrokerConfig
from collafuse.broker.state import OWNERS, BrokerState


class Identities:
    """Names bound to keys, and welcomed connections (least recently used first)."""

    def __init__(self, config: BrokerConfig, state: BrokerState | None) -> None:
        self.config = config
        self.state = state
        self.owners: dict[str, str] = {}  # client name → the key (z85) that first said hello with it
        self.names_per_key: dict[str, int] = {}
        self.routes: OrderedDict[bytes, dict[str, None]] = OrderedDict()  # connection → the names it said hello as
        self.entries = 0  # (connection, name) pairs in `routes`, capped: what a heartbeat tick walks
        self.key_routes: dict[str, OrderedDict[bytes, None]] = {}  # node key → its connections in `routes`

    def restore(self, owners: dict[str, str]) -> None:
        for name, key in owners.items():
            self.owners[name] = key
            self.names_per_key[key] = self.names_per_key.get(key, 0) + 1

    def clear(self) -> None:
        self.owners.clear()
        self.names_per_key.clear()

    def bind(self, name: str, key: str) -> bool:
        """A client name is the key's that first said hello with it; whether `key` may use it."""
        owner = self.owners.get(name)
        if owner is not None:
            return owner == key
        if self.names_per_key.get(key, 0) >= self.config.max_names_per_key:
            return False
        self.owners[name] = key
        self.names_per_key[key] = self.names_per_key.get(key, 0) + 1
        if self.state is not None:
            self.state.write(OWNERS, self.owners)
        return True

    def owner(self, name: str) -> str | None:
        return self.owners.get(name)

    def welcome(self, route: bytes, name: str, key: str | None) -> None:
        """This connection said hello as `name` (with this key, when keys are in use). Beyond
        4 × max_clients (connection, name) pairs the least recently used connection is forgotten,
        and beyond `max_connections_per_key` of one key that key's own oldest: a forgotten live
        node is answered `not_joined` and says hello again."""
        names = self.routes.setdefault(route, {})
        if name not in names:
            names[name] = None
            self.entries += 1
        self.routes.move_to_end(route)
        while self.entries > 4 * self.config.max_clients:
            self.drop(next(iter(self.routes)))
        if key is not None:
            mine = self.key_routes.setdefault(key, OrderedDict())
            mine[route] = None
            mine.move_to_end(route)
            while len(mine) > self.config.max_connections_per_key:
                old, _ = mine.popitem(last=False)
                self.drop(old)

    def drop(self, route: bytes) -> None:
        self.entries -= len(self.routes.pop(route, {}))

    def welcomed(self, route: bytes) -> bool:
        """Whether this connection said hello (as any name); it counts as used."""
        if route not in self.routes:
            return False
        self.routes.move_to_end(route)
        return True

    def names(self, route: bytes) -> list[str]:
        """The names this connection said hello as (none: it is not welcomed); it counts as used."""
        names = self.routes.get(route)
        if names is None:
            return []
        self.routes.move_to_end(route)
        return list(names)

    def forget_names(self, known: Container[str]) -> None:
        """Forget, on every connection, the names not in `known` (clients the broker forgot), and
        the connections left with no name."""
        for route, names in list(self.routes.items()):
            for name in [n for n in names if n not in known]:
                del names[name]
                self.entries -= 1
            if not names:
                del self.routes[route]
        for key, mine in list(self.key_routes.items()):  # connections forgotten above, or by the caps
            for route in [r for r in mine if r not in self.routes]:
                del mine[route]
            if not mine:
                del self.key_routes[key]
