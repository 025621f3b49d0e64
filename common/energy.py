"""Energy per phase with codecarbon's OfflineEmissionsTracker (never the online tracker).

One tracker runs for the whole process; each phase (named freely, e.g. "local_training/client0",
"server_denoising") accumulates its wall time, and the measured energy is split in proportion. codecarbon reads hardware counters where the machine exposes them (RAPL, NVML) and
otherwise estimates from the CPU's rated power and its load; `method` says which it used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterator

class PhaseEnergy:
    def __init__(self, enabled: bool = True, country: str = "DEU") -> None:
        self.seconds: dict[str, float] = {}
        self.tracker = None
        self.method = "disabled"
        if enabled:
            os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            try:
                from codecarbon import OfflineEmissionsTracker
            except ImportError:
                self.method = "codecarbon not installed"
                return
            try:  # a measurement problem must never stop the run it measures
                tracker = OfflineEmissionsTracker(
                    country_iso_code=country, save_to_file=False, log_level="error", measure_power_secs=5, tracking_mode="process"
                )
                tracker.start()
            except Exception as exc:  # noqa: BLE001 - codecarbon raises many kinds on odd hardware
                self.method = f"codecarbon failed to start: {type(exc).__name__}: {exc}"
                return
            self.tracker = tracker
            modes = [f"{type(h).__name__}:{getattr(h, '_mode', None) or 'counter'}" for h in getattr(self.tracker, "_hardware", [])]
            self.method = ", ".join(modes) or "unknown"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def stop(self) -> dict:
        """Total kWh, per-phase kWh and shares, and how it was measured."""
        total_kwh = 0.0
        if self.tracker is not None:
            self.tracker.stop()
            data = getattr(self.tracker, "final_emissions_data", None)
            total_kwh = float(getattr(data, "energy_consumed", 0.0) or 0.0)
        busy = sum(self.seconds.values()) or 1.0
        return {
            "total_kwh": total_kwh,
            "method": self.method,
            "phases": {
                p: {"seconds": round(s, 3), "kwh": total_kwh * s / busy, "share": round(s / busy, 4)} for p, s in self.seconds.items()
            },
        }
