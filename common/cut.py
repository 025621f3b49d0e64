"""The cut: the level t_c where a client's chain hands over to the server's (DESIGN.md §2).

A cut enters the system in two places, as a ratio c from a person (the command line, a config) and
as an integer t_c from the wire; each is checked once, here, into a `Cut`, and everything after
takes the typed value instead of checking an integer again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def check_ratio(ratio: float) -> float:
    """A cut ratio c in [0, 1] (NaN is not), or ValueError."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"cut ratio must lie in [0, 1], got {ratio}")
    return float(ratio)


@dataclass(frozen=True)
class Cut:
    """t_c of a chain of T = `levels`: the client owns levels 1..t_c, the server t_c+1..T."""

    t_c: int
    levels: int

    def __post_init__(self) -> None:
        for name, value in (("t_c", self.t_c), ("levels", self.levels)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.levels < 1:
            raise ValueError(f"T must be at least 1, got {self.levels}")
        if not 0 <= self.t_c <= self.levels:
            raise ValueError(f"t_c must lie in [0, {self.levels}], got {self.t_c}")

    @classmethod
    def from_ratio(cls, ratio: float, levels: int) -> Cut:
        """t_c = round(c·T) (half to even: c = 0.25 of T = 10 is t_c = 2)."""
        return cls(int(round(check_ratio(ratio) * levels)), levels)

    @property
    def local_model(self) -> bool:
        """The client keeps a model of its own: c = 0 (t_c = 0) leaves every level to the server."""
        return self.t_c > 0

    @property
    def uses_server(self) -> bool:
        """The server has levels above the cut: c = 1 (t_c = T) is purely local."""
        return self.t_c < self.levels
