"""Checkpoints of a fleet run: what ``fleetsim run --resume DIR`` continues from.

Inside the run folder::

    checkpoints/cloud.pkl                        the cloud model every strategy starts from
    checkpoints/<strategy>/round-00003/
        driver.pkl                               the strategy's server state (``state()``),
                                                 the arrays and Flower ``Result`` so far, the
                                                 grid (clock, round, online devices, counters),
                                                 each finished round's facts and score histogram,
                                                 the random streams that are not derived
        host-000.pkl, host-001.pkl, ...          each host's device state, for its own shard

A checkpoint is written into ``.partial-round-NNNNN`` and renamed when complete, so a
kill while writing leaves the previous one intact. Only the latest is kept; a strategy's
folder goes when it finishes (unless ``experiment.keep_checkpoints``). The per-device
records of finished rounds are not copied: they are already in ``devices.parquet``, and a
resume reads them back from there.

Most random streams are derived from (seed, round, device) and need no saving: sample
negatives, availability, failures, evaluation samples. What is saved is what advances
with use: Flower's node sampler and the process-wide torch / numpy / ``random`` states.
"""
from __future__ import annotations

import hashlib
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from devices.scoring import ScoreHistogram
from simulator.grid import FleetGrid, RoundResult
from simulator.results import strategy_dirname
from simulator.writer import _atomic_write_bytes

CHECKPOINTS = "checkpoints"
CLOUD_FILE = "cloud.pkl"
DRIVER_FILE = "driver.pkl"
# FleetGrid attributes that are references to the run (rebuilt with the grid), or the
# finished round's scores (replaced when the next round opens): not saved
_GRID_REFS = frozenset({"fleet", "pool", "app", "profiles", "on_round", "on_code_error", "results", "_pending", "_run",
                        "scored", "histogram"})


def config_digest(toml_text: str) -> str:
    return hashlib.sha256(toml_text.encode()).hexdigest()


def folder(run_dir: Path, strategy: str) -> Path:
    return Path(run_dir) / CHECKPOINTS / strategy_dirname(strategy)


# -- the cloud model ---------------------------------------------------------------------


def save_cloud(run_dir: Path, initial: dict[str, np.ndarray], losses: list[float]) -> None:
    (Path(run_dir) / CHECKPOINTS).mkdir(exist_ok=True)
    _atomic_write_bytes(Path(run_dir) / CHECKPOINTS / CLOUD_FILE, pickle.dumps((initial, losses), protocol=4))


def load_cloud(run_dir: Path) -> tuple[dict[str, np.ndarray], list[float]] | None:
    path = Path(run_dir) / CHECKPOINTS / CLOUD_FILE
    if not path.exists():
        return None
    return pickle.loads(path.read_bytes())


# -- one strategy's checkpoint -------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    import flwr.serverapp.strategy.strategy_utils as su

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "flower": su.random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back ``rng_states()`` (Flower's sampler: inside ``flower_patched``)."""
    import flwr.serverapp.strategy.strategy_utils as su

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])
    su.random.setstate(states["flower"])


def grid_state(grid: FleetGrid) -> dict[str, Any]:
    """The grid between two rounds: its own attributes, each finished round's facts, and
    their score histograms merged into one (integer counts: merging is exact in any order;
    the run summary needs only the merged one), kept as its non-empty bins."""
    merged = ScoreHistogram()
    for r in grid.results:
        merged = merged.merge(r.histogram)
    nz = np.flatnonzero(merged.pos | merged.neg)
    return {"attrs": {k: v for k, v in vars(grid).items() if k not in _GRID_REFS},
            "results": [(r.round, r.info) for r in grid.results],
            "histogram": ((merged.n_bins, merged.lo, merged.hi), nz, merged.pos[nz], merged.neg[nz])}


def restore_grid(grid: FleetGrid, state: dict[str, Any], run_dir: Path, strategy: str) -> None:
    """Set ``grid`` back to ``grid_state``; per-device records come from ``devices.parquet``
    (the merged histogram goes with the first round)."""
    vars(grid).update(state["attrs"])
    (n_bins, lo, hi), nz, pos, neg = state["histogram"]
    merged = ScoreHistogram(n_bins, lo, hi)
    merged.pos[nz], merged.neg[nz] = pos, neg
    parts = Path(run_dir) / strategy_dirname(strategy) / "devices.parquet"
    grid.results = []
    for i, (rnd, info) in enumerate(state["results"]):
        df: pd.DataFrame = pq.read_table(parts / f"round-{rnd:05d}.parquet").to_pandas()
        hist = merged if i == 0 else ScoreHistogram(n_bins, lo, hi)
        grid.results.append(RoundResult(rnd, {c: df[c].to_numpy() for c in df.columns}, info, hist))


def write(parent: Path, round: int, driver: dict[str, Any], hosts: list[bytes]) -> Path:
    """Write one checkpoint atomically (a folder renamed when complete); drop older ones.
    Returns the folder."""
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"round-{round:05d}"
    tmp = parent / f".partial-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / DRIVER_FILE).write_bytes(pickle.dumps(driver, protocol=4))
    for h, data in enumerate(hosts):
        (tmp / f"host-{h:03d}.pkl").write_bytes(data)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in parent.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(parent: Path) -> Path | None:
    """The newest complete checkpoint of a strategy, if any."""
    if not parent.is_dir():
        return None
    done = sorted(p for p in parent.iterdir() if p.name.startswith("round-") and (p / DRIVER_FILE).exists())
    return done[-1] if done else None


def read(path: Path) -> dict[str, Any]:
    return pickle.loads((path / DRIVER_FILE).read_bytes())


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- what --resume checks ------------------------------------------------------------------

FINISHED = ("complete", "failed")


def check_resumable(run_dir: str | Path):
    """The config of the run in ``run_dir`` if it can be resumed; else ``FleetsimError``
    with one line: no run there, another result layout, a paper-protocol run, an edited
    ``config.toml``, a run still being written, or a run with nothing left to do."""
    import json

    from simulator import config
    from simulator.errors import FleetsimError
    from simulator.results import LAYOUT_VERSION, _driver_alive

    d = Path(run_dir)
    where = f"--resume {d}"
    if not d.is_dir():
        raise FleetsimError(f"{where}: no such directory")
    if not (d / "summary.json").is_file() or not (d / "config.toml").is_file():
        raise FleetsimError(f"{where}: holds no fleetsim run (no summary.json and config.toml)")
    try:
        summary = json.loads((d / "summary.json").read_text())
        if not isinstance(summary, dict):
            raise ValueError
    except (OSError, ValueError):
        raise FleetsimError(f"{where}: summary.json is not a fleetsim summary") from None
    if summary.get("protocol") is not None:
        raise FleetsimError(f"{where}: a {summary['protocol']} (paper protocol) run has no checkpoints; run it again")
    version = summary.get("layout_version")
    if version != LAYOUT_VERSION or "config_sha256" not in summary:
        raise FleetsimError(f"{where}: written with result layout {version} by a fleetsim without resume; this one "
                            f"resumes layout {LAYOUT_VERSION} runs with a config digest")
    if config_digest((d / "config.toml").read_text()) != summary["config_sha256"]:
        raise FleetsimError(f"{where}: config.toml was edited after the run started; a resumed run needs the config it "
                            f"started with (run the edited config into a new --out)")
    if _driver_alive(d):
        raise FleetsimError(f"{where}: another fleetsim process is still writing this run")
    statuses = {n: s.get("status") for n, s in summary.get("strategies", {}).items()}
    cfg = config.load(d / "config.toml")
    if list(statuses) != list(cfg.experiment.strategies):
        raise FleetsimError(f"{where}: summary.json's strategies do not match config.toml's")
    if all(st in FINISHED for st in statuses.values()):
        raise FleetsimError(f"{where}: the run is complete (every strategy finished); nothing to resume")
    return cfg
