"""The fleet of one experiment: streams, timeline, hardware profiles and activity buckets.

Built once per experiment and shared by every strategy, so all strategies see the same
devices, data, availability draws and evaluation samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.data import Interactions, Timeline
from devices.errors import DataError, FleetsimError
from devices.profiles import Profiles, make_profiles
from simulator import metrics


@dataclass
class Fleet:
    """Everything about the devices that does not change while strategies run."""

    interactions: Interactions
    timeline: Timeline
    profiles: Profiles
    buckets: np.ndarray  # "head" | "torso" | "tail" per device, by history activity
    bucket_thresholds: dict
    source: str
    # which devices prequential scoring evaluates (``experiment.eval_users``); None = all
    evaluated: np.ndarray | None = None
    eval_users: int | str = "all"

    @property
    def evaluated_devices(self) -> int:
        """How many devices prequential scoring evaluates."""
        return self.n_devices if self.evaluated is None else int(self.evaluated.sum())

    @property
    def n_devices(self) -> int:
        return self.interactions.n_users

    @property
    def history_counts(self) -> np.ndarray:
        counts = np.zeros(self.n_devices, dtype=np.int64)
        hist = self.interactions.times < self.timeline.history_end
        np.add.at(counts, self.interactions.user_of()[hist], 1)
        return counts


def assemble(inter: Interactions, timeline: Timeline, profiles: Profiles, source: str) -> Fleet:
    """A fleet from its parts; buckets follow from the history activity."""
    counts = np.bincount(inter.user_of()[inter.times < timeline.history_end], minlength=inter.n_users)
    labels, thresholds = metrics.activity_buckets(counts)
    return Fleet(inter, timeline, profiles, np.asarray(labels, dtype=object), thresholds, source)


def build_fleet(cfg) -> Fleet:
    """The fleet an ``ExperimentConfig`` describes (its ``[data]`` source, ``devices.sources``)."""
    from devices.sources import BUILTIN, resolve_source

    seed = cfg.experiment.seed
    try:
        try:
            inter, timeline = resolve_source(cfg.source).load(cfg.data, seed)
        except (FleetsimError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 -- a plug-in source that failed on its data: one line
            if cfg.source in BUILTIN:
                raise
            first = (str(exc).splitlines() or [""])[0]
            raise DataError(f"data.source {cfg.source}: its load raised {type(exc).__name__}: {first}") from None
        check_fleet(inter, timeline, cfg)
        profiles = make_profiles(inter.n_users, cfg.profiles, seed)
        fleet = assemble(inter, timeline, profiles, cfg.source)
    except MemoryError:  # sizes within their bounds, but too much together for this machine
        sizes = [f"data.{k} = {getattr(cfg.data, k)!r}" for k in _SIZE_KEYS if hasattr(cfg.data, k)]
        if not sizes and hasattr(cfg.data, "path"):
            sizes = [f"data.path = {cfg.data.path!r}"]
        sizes = ", ".join(sizes) or "its [data] settings"
        raise FleetsimError(f"not enough memory to build the fleet ({sizes}); make it smaller") from None
    fleet.eval_users = cfg.experiment.eval_users
    fleet.evaluated = eval_sample(fleet.n_devices, fleet.eval_users, seed)
    return fleet


# The [data] settings that size a fleet (named when it does not fit in memory).
_SIZE_KEYS = ("n_devices", "n_items", "latent_dim", "n_rounds", "mean_daily_interactions", "history_days",
              "round_hours")


def check_fleet(inter: Interactions, timeline: Timeline, cfg) -> None:
    """``DataError`` for a fleet a run cannot score or sample, before any run folder exists:

    - no interaction falls in rounds 1..n_rounds (prequential scoring would score nothing,
      and the run would still end "complete");
    - ``cloud.epochs > 0`` and no history sample (the cloud model would keep its random
      start, "loss 0.000 -> 0.000", and every strategy would score about 0.5);
    - a user has interacted with every item (no negative can be drawn for its samples:
      each pairs an interaction with items the user never interacted with)."""
    lo, hi = timeline.history_end, timeline.history_end + timeline.n_rounds * timeline.round_seconds
    if not np.any((inter.times >= lo) & (inter.times < hi)):
        hint = ("the timestamps of data.path" if hasattr(cfg.data, "path") else
                "data.round_hours, data.n_rounds, data.n_devices or data.mean_daily_interactions")
        raise DataError(f"no interaction falls in rounds 1..{timeline.n_rounds} (from {lo:g} s to {hi:g} s): "
                        f"nothing would be scored; look at {hint}")
    two = inter.counts >= 2  # streams are in time order: a history sample is a user's 2nd item before history_end
    if cfg.cloud.epochs and not np.any(inter.times[inter.indptr[:-1][two] + 1] < timeline.history_end):
        hint = "data.history_fraction" if hasattr(cfg.data, "history_fraction") else "data.history_days"
        raise DataError(f"the cloud model has no history to train on: no device has two interactions before the "
                        f"first round ({int((inter.times < timeline.history_end).sum())} history interactions in "
                        f"all); give the fleet more history ({hint}), or set cloud.epochs = 0 to start from an "
                        f"untrained model")
    counts = inter.counts
    heavy = np.flatnonzero(counts >= inter.n_items)  # only these can have seen every item
    if len(heavy):
        c = counts[heavy]
        user = np.repeat(heavy, c)
        rows = np.repeat(inter.indptr[heavy] - (np.cumsum(c) - c), c) + np.arange(len(user))
        pairs = np.unique(user * inter.n_items + inter.items[rows].astype(np.int64))
        seen_all = np.flatnonzero(np.bincount(pairs // inter.n_items, minlength=inter.n_users) >= inter.n_items)
        if len(seen_all):
            u = int(seen_all[0])
            uid = int(inter.user_ids[u]) if inter.user_ids is not None else u
            where = f"{cfg.data.path}: " if hasattr(cfg.data, "path") else ""
            raise DataError(f"{where}user {uid} has interacted with every one of the {inter.n_items} items "
                            f"({len(seen_all)} such user(s)): no negative can be drawn for its samples; "
                            "samples need items a user never interacted with")


_EVAL_SAMPLE_TAG = 0xE7A1


def eval_sample(n_devices: int, eval_users: int | str, seed: int) -> np.ndarray | None:
    """The devices scored each round: None for "all" (or a sample as large as the fleet),
    else a bool mask of ``eval_users`` devices drawn uniformly without replacement from
    (seed, a fixed tag), so each activity bucket keeps its share in expectation."""
    if eval_users == "all" or eval_users >= n_devices:
        return None
    rng = np.random.default_rng([seed, _EVAL_SAMPLE_TAG])
    mask = np.zeros(n_devices, dtype=bool)
    mask[rng.choice(n_devices, size=int(eval_users), replace=False)] = True
    return mask
