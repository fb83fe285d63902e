"""The simulated clock: device compute and network turn into round latency.

Times are simulated seconds since the fleet epoch (t = 0 at the first interaction).
A device's time in one exchange is its download + compute + upload; the exchange lasts
until the slowest device that met the deadline replied, or the deadline if anyone was
late. Nothing here waits on wall time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices import profiles as prof


@dataclass
class ExchangeTiming:
    """Per-device seconds and lateness of one exchange, and how long it lasted."""

    seconds: np.ndarray
    late: np.ndarray
    latency: float


class SimClock:
    """Simulated time, advanced by exchanges and by waiting for devices."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = float(t)

    def set(self, t: float) -> None:
        # A round starts when its window closes; a slow previous round may run past that.
        self.t = max(self.t, float(t))

    def advance(self, seconds: float) -> None:
        self.t += float(seconds)

    @staticmethod
    def exchange(profiles: "prof.Profiles", bytes_down: np.ndarray, bytes_up: np.ndarray,
                 flops: np.ndarray, deadline: float) -> ExchangeTiming:
        """Timing of one exchange for the devices of ``profiles`` (same order as arrays)."""
        seconds = prof.transfer_seconds(profiles, bytes_down, bytes_up) + prof.compute_seconds(profiles, flops)
        late = seconds > deadline
        if late.any():
            latency = float(deadline)
        else:
            latency = float(seconds.max()) if len(seconds) else 0.0
        return ExchangeTiming(seconds, late, latency)
