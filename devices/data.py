"""Interaction streams in CSR form and the fleet timeline that cuts them into rounds.

Every data source (synthetic drifting fleet, MovieLens files) produces an
``Interactions`` object; ``Timeline`` says which interactions are history (they train
the cloud model) and which fall in each simulated round.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# Most rounds a fleet is cut into (data.n_rounds of every built-in source): each round is a
# Flower round and a record per strategy, so more is a typo, not an experiment.
MAX_ROUNDS = 100_000


@dataclass
class Interactions:
    """Per-user, time-ordered interaction streams (one user = one device).

    Users are ``0..n_users-1``; user ``u``'s interactions are
    ``items[indptr[u]:indptr[u+1]]`` at ``times[indptr[u]:indptr[u+1]]`` (seconds,
    non-decreasing within a user). Items are dense ids ``0..n_items-1``.
    """

    n_users: int
    n_items: int
    indptr: np.ndarray  # int64, shape (n_users + 1,)
    items: np.ndarray  # int32, shape (n_interactions,)
    times: np.ndarray  # float64 seconds, shape (n_interactions,)
    user_ids: np.ndarray | None = None  # original user ids (real data), int64
    item_ids: np.ndarray | None = None  # original item id of each dense id, int64

    def __post_init__(self) -> None:
        self.indptr = np.asarray(self.indptr, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int32)
        self.times = np.asarray(self.times, dtype=np.float64)
        if self.indptr.shape != (self.n_users + 1,):
            raise ValueError("indptr must have n_users + 1 entries")
        if self.items.shape != self.times.shape or self.indptr[-1] != len(self.items):
            raise ValueError("items, times and indptr disagree in length")

    @property
    def counts(self) -> np.ndarray:
        """Number of interactions per user."""
        return np.diff(self.indptr)

    def user_of(self) -> np.ndarray:
        """User index of every interaction (int64, same length as ``items``)."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.counts)


@dataclass(frozen=True)
class DriftEvent:
    """A change of user tastes, recorded so results and plots can mark it."""

    round: int  # first round whose window is affected (1-based); 0 = during history
    kind: str  # "sudden" | "recurring" | "gradual"
    fraction: float  # fraction of users affected
    note: str = ""


@dataclass(frozen=True)
class Timeline:
    """Where history ends and how simulated time is cut into rounds.

    Round ``r`` (1-based) covers ``[history_end + (r-1)*round_seconds,
    history_end + r*round_seconds)``. ``start`` is the simulated epoch: time-of-day for
    device availability is ``(start_clock + t) mod 1 day``.
    """

    history_end: float
    round_seconds: float
    n_rounds: int
    start_clock: float = 0.0  # seconds past UTC midnight at t = 0
    drift_events: tuple[DriftEvent, ...] = field(default_factory=tuple)

    def window(self, r: int) -> tuple[float, float]:
        """Start and end (exclusive) of round ``r``'s window in simulated seconds."""
        lo = self.history_end + (r - 1) * self.round_seconds
        return lo, lo + self.round_seconds

    def round_of(self, times: np.ndarray) -> np.ndarray:
        """Round of each timestamp: 0 = history, 1..n_rounds, or n_rounds+1 = after the end."""
        t = np.asarray(times, dtype=np.float64)
        r = np.floor((t - self.history_end) / self.round_seconds).astype(np.int64) + 1
        r = np.where(t < self.history_end, 0, r)
        return np.minimum(r, self.n_rounds + 1)


@dataclass(frozen=True)
class DataSource:
    """Where a fleet's interactions come from: ``[data] source = "<name>"``.

    Attributes:
        name: the ``source`` value (a built-in short name, or the import path
            ``package.module:NAME`` of this object for any other source).
        config: a frozen dataclass of the source's ``[data]`` keys (validated by
            ``devices.settings.build``; rules raise ``ConfigError``).
        load: ``load(config, seed) -> (Interactions, Timeline)``; bad data files raise
            ``DataError`` naming the file.
        reads_files: whether ``load`` reads input that may be bad (files). A run starts
            Ray and its hosts beside the load only if not (a generated fleet, whose input
            is the validated config); else after it, so bad data fails at once.
    """

    name: str
    config: type
    load: Callable[[Any, int], tuple[Interactions, Timeline]]
    reads_files: bool = True
