"""Progress lines for long work: rate, ETA and the latest figures, on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, every: int = 1) -> None:
        self.total, self.label, self.every = total, label, max(1, every)
        self.start = time.monotonic()

    def update(self, done: int, **figures: float | str) -> None:
        if done % self.every and done != self.total:
            return
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        print(
            f"[{self.label}] {done}/{self.total}  {rate:.2f}/s  eta {int(eta) // 60}:{int(eta) % 60:02d}  {shown}",
            file=sys.stderr,
            flush=True,
        )
