"""The fleet of one experiment: streams, timeline, hardware profiles and activity buckets.

Built once per experiment and shared by every strategy, so all strategies see the same
devices, data, availability draws and evaluation samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.data import Interactions, Timeline
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
    from devices.sources import resolve_source

    seed = cfg.experiment.seed
    inter, timeline = resolve_source(cfg.source).load(cfg.data, seed)
    profiles = make_profiles(inter.n_users, cfg.profiles, seed)
    fleet = assemble(inter, timeline, profiles, cfg.source)
    fleet.eval_users = cfg.experiment.eval_users
    fleet.evaluated = eval_sample(fleet.n_devices, fleet.eval_users, seed)
    return fleet


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
