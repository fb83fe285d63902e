"""Shared fixtures: small fleets built from typed configs (no TOML, no Ray unless asked)."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from simulator import config  # noqa: E402
from simulator.fleetrun import FleetRun  # noqa: E402


def small_config(**sections) -> config.ExperimentConfig:
    """A tiny synthetic experiment; ``sections`` override TOML-like tables."""
    raw = {
        "experiment": {"seed": 3, "strategies": ["cloud_only", "local_finetune", "fedavg"]},
        "data": {"n_devices": 40, "n_items": 150, "n_rounds": 3, "mean_daily_interactions": 4.0, "history_days": 7.0},
        "cloud": {"epochs": 1},
    }
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    return config.from_dict(raw)


class SmallWorld:
    """A fleet, its cloud model and an in-process host pool: a ``FleetRun`` without a
    run folder, taken up to its first strategy."""

    def __init__(self, cfg: config.ExperimentConfig, n_hosts: int = 2) -> None:
        self.cfg = cfg
        self.run = FleetRun(cfg, use_ray=False, n_hosts=n_hosts)
        self.fleet = self.run.build_fleet()
        self.run.train_cloud()
        self.spec, self.initial = self.run.spec, self.run.initial
        self.pool = self.run.start_pool()
        self.pool.reset(self.initial)


@pytest.fixture
def always_online_world() -> SmallWorld:
    return SmallWorld(small_config(profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}))


@pytest.fixture
def world() -> SmallWorld:
    return SmallWorld(small_config())


def numbers_equal(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def hosts_in_process(monkeypatch) -> None:
    """Runs through ``run_experiment`` / the CLI with in-process hosts: Ray is never started
    (neither the pool's hosts nor the processes ``FleetRun.connect`` starts ahead)."""
    from devices.pool import HostPool

    monkeypatch.setattr("simulator.fleetrun.HostPool", lambda *a, **k: HostPool(*a, **{**k, "use_ray": False}))
    monkeypatch.setattr("simulator.fleetrun.HostProcesses", lambda *a, **k: None)
