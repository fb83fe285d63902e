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
kill while writing leaves the previous one intact. Its last file, ``manifest.json``, holds
each file's size and SHA-256 (``cloud.pkl`` has ``cloud.manifest.json``): ``--resume``
verifies the checkpoint it would restore from and the cloud model before it changes
anything (``check_resumable``; a checkpoint written before manifests: each file must
unpickle). Only the latest is kept; a strategy's
folder goes when it finishes (unless ``experiment.keep_checkpoints``). The per-device
records of finished rounds are not copied: they are already in ``devices.parquet``, and a
resume reads them back from there.

Most random streams are derived from (seed, round, device) and need no saving: sample
negatives, availability, failures, evaluation samples. What is saved is what advances
with use: Flower's node sampler and the process-wide torch / numpy / ``random`` states.
"""
from __future__ import annotations

import hashlib
import json
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
from simulator.results import config_digest, strategy_dirname  # noqa: F401 (config_digest: re-exported)
from simulator.writer import _atomic_write_bytes, writing

CHECKPOINTS = "checkpoints"
CLOUD_FILE = "cloud.pkl"
CLOUD_MANIFEST = "cloud.manifest.json"
DRIVER_FILE = "driver.pkl"
MANIFEST = "manifest.json"
# FleetGrid attributes that are references to the run (rebuilt with the grid), or the
# finished round's scores (replaced when the next round opens): not saved
_GRID_REFS = frozenset({"fleet", "pool", "app", "profiles", "on_round", "on_code_error", "results", "_pending", "_run",
                        "scored", "histogram"})


def folder(run_dir: Path, strategy: str) -> Path:
    return Path(run_dir) / CHECKPOINTS / strategy_dirname(strategy)


# -- the cloud model ---------------------------------------------------------------------


def save_cloud(run_dir: Path, initial: dict[str, np.ndarray], losses: list[float]) -> None:
    d = Path(run_dir) / CHECKPOINTS
    with writing(d / CLOUD_FILE):
        d.mkdir(exist_ok=True)
        (d / CLOUD_MANIFEST).unlink(missing_ok=True)  # a stale one would not describe the new file
    data = pickle.dumps((initial, losses), protocol=4)
    _atomic_write_bytes(d / CLOUD_FILE, data)
    _atomic_write_bytes(d / CLOUD_MANIFEST, json.dumps({CLOUD_FILE: _entry(data)}).encode())


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
    final = parent / f"round-{round:05d}"
    tmp = parent / f".partial-{final.name}"
    with writing(final):  # a full disk: one line; the earlier checkpoint stays the latest
        parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            files = {DRIVER_FILE: pickle.dumps(driver, protocol=4),
                     **{f"host-{h:03d}.pkl": data for h, data in enumerate(hosts)}}
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            (tmp / MANIFEST).write_text(json.dumps({"round": round, "files": {n: _entry(d) for n, d in files.items()}}))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    for old in parent.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _all(parent: Path) -> list[Path]:
    """A strategy's checkpoints, oldest first: every ``round-NNNNN`` folder (each was
    renamed into place complete, so one that lacks a file is damaged, not unfinished)."""
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.name.startswith("round-") and p.is_dir())


def latest(parent: Path) -> Path | None:
    """The newest checkpoint of a strategy, if any (``verify`` tells whether it is whole)."""
    done = _all(parent)
    return done[-1] if done else None


def restart_point(path: Path) -> str:
    """Where a strategy starts if its checkpoint ``path`` is deleted: an older one, or round 1."""
    older = [p for p in _all(path.parent) if p.name < path.name]
    return f"its {older[-1].name} checkpoint" if older else "round 1"


def host_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("host-*.pkl"))


def _entry(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _file_problem(path: Path, expected: dict[str, Any] | None) -> str | None:
    """What is wrong with one file: missing, another size or digest than ``expected``, or
    (no manifest) a pickle that does not load; None if it is whole."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        if expected is None:
            pickle.loads(path.read_bytes())
            return None
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path.name} has {size} bytes, {expected['bytes']} were written"
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != expected["sha256"]:
            return f"{path.name} does not match its SHA-256 in the manifest"
    except Exception as exc:  # noqa: BLE001 -- unreadable or not a pickle
        first = (str(exc).splitlines() or [""])[0][:200]
        return f"{path.name} cannot be read ({type(exc).__name__}: {first})"
    return None


def _manifest(path: Path, table: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """A manifest's file table (its ``table`` entry, or the whole file for None): None if
    there is no manifest; or the problem with it."""
    if not path.exists():
        return None, None
    try:
        files = json.loads(path.read_text())
        if table is not None:
            files = files[table] if isinstance(files, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                                  for v in files.values()):
            raise ValueError("not a file table")
        return files, None
    except (OSError, ValueError, KeyError) as exc:
        return None, f"{path.name} cannot be read ({type(exc).__name__})"


def verify(path: Path) -> str | None:
    """What is wrong with the checkpoint folder ``path`` (None: it is whole). With a
    manifest, every file it lists must have its size and SHA-256; without (written by an
    older fleetsim), ``driver.pkl`` and each ``host-NNN.pkl`` must unpickle."""
    files, problem = _manifest(path / MANIFEST, "files")
    if problem is None and files is not None and DRIVER_FILE not in files:
        problem = f"{MANIFEST} lists no {DRIVER_FILE}"
    if files is None and problem is None and (path.parent.parent / CLOUD_MANIFEST).exists():
        problem = f"{MANIFEST} is missing (this run writes one with every checkpoint)"  # not an older fleetsim's
    if problem is not None:
        return problem
    if files is not None:
        extra = sorted(set(host_files(path)) - set(files))
        if extra:
            return f"{extra[0]} is not in {MANIFEST}"
        names = list(files)
    else:
        names = [DRIVER_FILE, *host_files(path)]
        if len(names) == 1:
            return "it holds no host-NNN.pkl"
        expected = [f"host-{h:03d}.pkl" for h in range(len(names) - 1)]
        if names[1:] != expected:
            return f"{next(n for n in expected if n not in names)} is missing"
    for name in names:
        problem = _file_problem(path / name, files[name] if files is not None else None)
        if problem is not None:
            return problem
    return None


def verify_cloud(run_dir: Path) -> str | None:
    """What is wrong with ``checkpoints/cloud.pkl`` (None: whole, or absent)."""
    d = Path(run_dir) / CHECKPOINTS
    if not (d / CLOUD_FILE).exists():
        return None
    files, problem = _manifest(d / CLOUD_MANIFEST, None)
    if problem is None and files is not None and CLOUD_FILE not in files:
        problem = f"{CLOUD_MANIFEST} does not list {CLOUD_FILE}"
    return problem or _file_problem(d / CLOUD_FILE, files[CLOUD_FILE] if files is not None else None)


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
    ``config.toml``, a run still being written, a run with nothing left to do, or a
    damaged checkpoint or cloud model that the resumed run would read (``verify``)."""
    from simulator import config
    from simulator.errors import FleetsimError
    from simulator.results import LAYOUT_VERSION, _check_columns, _driver_alive, strategy_dirname

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
    strategies = summary.get("strategies", {})
    if not isinstance(strategies, dict) or not all(isinstance(s, dict) for s in strategies.values()):
        raise FleetsimError(f"{where}: summary.json's strategies are not fleetsim's (an object of one object per "
                            f"strategy); the file was edited or damaged")
    statuses = {n: s.get("status") for n, s in strategies.items()}
    cfg = config.load(d / "config.toml")
    if list(statuses) != list(cfg.experiment.strategies):
        raise FleetsimError(f"{where}: summary.json's strategies do not match config.toml's")
    if all(st in FINISHED for st in statuses.values()):
        raise FleetsimError(f"{where}: the run is complete (every strategy finished); nothing to resume")
    # what the resumed run will read back, and the rounds it keeps: whole, or a refusal before anything is changed
    for name in statuses:
        try:
            _check_columns(d / strategy_dirname(name))
        except FleetsimError as exc:
            raise FleetsimError(f"{where}: {exc}; the run's results are damaged (restore the file, or run again "
                                f"into a new --out)") from None
    problem = verify_cloud(d)
    if problem is not None:
        raise FleetsimError(f"{where}: {d / CHECKPOINTS / CLOUD_FILE} is damaged: {problem}; delete it and "
                            f"--resume again to train the cloud model again (same seed, same model)")
    for name, st in statuses.items():
        path = latest(folder(d, name)) if st not in FINISHED else None
        problem = verify(path) if path is not None else None
        if problem is not None:
            raise FleetsimError(f"{where}: checkpoint {path} is damaged: {problem}; delete that folder and --resume "
                                f"again to play {name} from {restart_point(path)}")
    return cfg
