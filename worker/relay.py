"""The weight relay: the trainer's model and optimiser state, carried to the other workers by the broker.

The trainer publishes its weights (and its optimiser's moments) in parts that each fit a frame; the
broker relays the latest version to every other worker (the moments to those that may take over
training), which puts the parts together and loads the whole between iterations.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import zmq

from collafuse.engine.checkpoint import flatten_optimizer, load_optimizer
from collafuse.engine.server import ServerParty
from collafuse.protocol import tensors, wire
from collafuse.protocol.wire import ErrorCode, ProtocolError

log = logging.getLogger("collafuse.worker")


def moments_problem(param_shapes: list[tuple[int, ...]], arrays: dict[str, np.ndarray]) -> str | None:
    """Why relayed optimiser state does not fit these parameters (None: it fits): every parameter
    needs the same keys, each tensor shaped like its parameter or a scalar (a step count)."""
    keys: dict[int, set[str]] = {}
    for name, arr in arrays.items():
        prefix, _, rest = name.partition(".")
        index, _, key = rest.partition(".")
        if prefix != "optim" or not index.isdigit() or int(index) >= len(param_shapes) or not key:
            return f"unexpected tensor {name!r}"
        if arr.shape not in (param_shapes[int(index)], ()):
            return f"{name!r} has shape {list(arr.shape)}, its parameter {list(param_shapes[int(index)])}"
        keys.setdefault(int(index), set()).add(key)
    if len(keys) != len(param_shapes) or len({frozenset(k) for k in keys.values()}) != 1:
        return "not every parameter has the same state"
    return None


class WeightRelay:
    """Publishes this worker's model state when it trains, and loads the versions the broker relays
    from the trainer; a version is the optimiser step it was taken at (`party.step`)."""

    def __init__(self, party: ServerParty, max_frame_bytes: int, send: Callable[..., None]) -> None:
        self.party = party
        self.max_frame_bytes = max_frame_bytes
        self.send = send
        # The weights travel in parts that each fit a frame; fixed by the model, so checked at start.
        self.weight_parts = [list(group) for group in tensors.split(self._state_arrays(), max_frame_bytes)]
        self.incoming: dict[str, tuple[int, dict[str, np.ndarray]]] = {}  # relayed kind → (version, parts so far)
        self.published = -1  # the version this worker last published
        self.loaded = -1  # the version this worker last loaded from a relay

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() for k, v in self.party.model.state_dict().items()}

    # ---- the trainer's side -----------------------------------------------------------------
    def unrelayed(self) -> bool:
        """Whether this model holds steps no relay carried: taken here, or restored from this
        worker's own checkpoint (which may hold steps acknowledged after its last relay)."""
        return self.party.step > 0 and self.party.step not in (self.published, self.loaded)

    def publish(self) -> None:
        """The model's state as `weights` parts, then the optimiser's as `moments` parts (for
        workers that may take over training); the broker relays them in order."""
        self.published = self.party.step
        state = self._state_arrays()
        self._publish("weights", [{k: state[k] for k in names} for names in self.weight_parts])
        moments = {k: v.float().numpy() for k, v in flatten_optimizer(self.party.optimizer)[0].items()}
        if moments:
            self._publish("moments", tensors.split(moments, self.max_frame_bytes))

    def _publish(self, kind: str, parts: list[dict[str, np.ndarray]]) -> None:
        for i, part in enumerate(parts):
            self.send(wire.encode(kind, version=self.party.step, part=i, parts=len(parts)), tensors.encode(part))

    # ---- every other worker's side ----------------------------------------------------------
    def on_relayed(self, env: dict, frames: list[zmq.Frame]) -> None:
        """Collect one version's parts of the trainer's weights or moments and load the whole after
        the last (a new version or a part 0 starts over, so a version cut short by a trainer's
        failure is never half-loaded). A part without its tensor frame is ignored."""
        if len(frames) != 2:
            return
        kind = env["type"]
        if env["part"] >= env["parts"]:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{kind}: part {env['part']} of {env['parts']}")
        version, arrays = self.incoming.pop(kind, (None, {}))
        if env["part"] == 0 or env["version"] != version:
            arrays = {}
        decoded = tensors.decode(frames[1].buffer, None, self.max_frame_bytes)
        arrays.update({k: v.copy() for k, v in decoded.items()})  # copies: the frame is released after this
        if env["part"] < env["parts"] - 1:
            self.incoming[kind] = (env["version"], arrays)
        elif kind == "weights":
            self.load_weights(env["version"], arrays)
        else:
            self.load_moments(env["version"], arrays)

    def load_weights(self, version: int, arrays: dict[str, np.ndarray]) -> None:
        """Load a relayed version unless this model is as new or newer: a trainer restarted from its
        own checkpoint (which holds acknowledged steps) may register while the broker still relays an
        older version, and must not be rolled back to it."""
        if version <= self.party.step:
            log.info("ignoring weights version %d: this model is at step %d", version, self.party.step)
            return
        current = self.party.model.state_dict()
        if set(arrays) != set(current) or any(tuple(arrays[k].shape) != tuple(current[k].shape) for k in current):
            log.error("ignoring weights version %d: incomplete, or not this worker's model", version)
            return
        self.party.model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        self.party.step = self.loaded = version
        log.info("loaded weights version %d from the trainer", version)

    def load_moments(self, version: int, arrays: dict[str, np.ndarray]) -> None:
        """The trainer's optimiser state, so that this worker continues it if it takes over training."""
        if version != self.party.step:
            log.error("ignoring moments version %d: this worker's weights are at version %d", version, self.party.step)
            return
        problem = moments_problem([tuple(p.shape) for p in self.party.model.parameters()], arrays)
        if problem:
            log.error("ignoring moments version %d: %s", version, problem)
            return
        load_optimizer(self.party.optimizer, {k: torch.from_numpy(v) for k, v in arrays.items()})
        log.info("loaded optimiser moments version %d from the trainer", version)
