"""Results on disk: written round by round while strategies run, read back for reports.

Layout of a run directory::

    DIR/config.toml                    resolved experiment
    DIR/fleet.json                     drift events, history cut, bucket thresholds
    DIR/fleet_devices.parquet          one row per device: history activity, bucket, hardware
    DIR/<strategy>/devices.parquet/    one part file per round (a parquet dataset:
                                       ``pandas.read_parquet`` reads the directory)
    DIR/<strategy>/rounds.parquet/     one row per round: online, selected, ok, dropped, ...
    DIR/summary.json                   per strategy fleet metrics (written atomically)

Each part file is written to a temporary name and renamed, so a crash loses at most
the round in flight and never leaves a half-written file.

``load_run(DIR)`` reads a whole run back (config, summary, per-device records of every
strategy, drift events) for reports and notebooks.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.errors import FleetsimError

LAYOUT_VERSION = 1


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def write_json(path: Path, obj: Any) -> None:
    """JSON with NaN written as null, replaced atomically."""
    _atomic_write_bytes(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False).encode())


def _write_part(folder: Path, name: str, table: pa.Table) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, folder / name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def strategy_dirname(name: str) -> str:
    """A folder name for a strategy (import paths contain ':' and '.')."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class RunWriter:
    """Owns one run directory; refuses to write into one that already holds results."""

    def __init__(self, out: str | Path) -> None:
        self.dir = Path(out)
        self._created = not self.dir.exists()
        if self.dir.exists() and not self.dir.is_dir():
            raise FleetsimError(f"--out {self.dir}: exists and is not a directory")
        if (self.dir / "config.toml").exists() or (self.dir / "summary.json").exists():
            raise FleetsimError(f"--out {self.dir}: already holds results; choose another directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".fleetsim-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise FleetsimError(f"--out {self.dir}: not writable ({exc.strerror or exc})") from None
        self.summary: dict[str, Any] = {"layout_version": LAYOUT_VERSION, "strategies": {}}

    def discard_if_empty(self) -> None:
        """Remove the run folder again if this writer created it and wrote nothing."""
        if self._created and self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()

    def write_config(self, toml_text: str) -> None:
        _atomic_write_bytes(self.dir / "config.toml", toml_text.encode())

    def write_fleet(self, fleet) -> None:
        tl = fleet.timeline
        write_json(self.dir / "fleet.json", {
            "source": fleet.source, "n_devices": fleet.n_devices, "n_items": fleet.interactions.n_items,
            "history_end_s": tl.history_end, "round_seconds": tl.round_seconds, "n_rounds": tl.n_rounds,
            "start_clock_s": tl.start_clock, "drift_events": [asdict(e) for e in tl.drift_events],
            "bucket_thresholds": fleet.bucket_thresholds,
        })
        pr = fleet.profiles
        table = pa.table({
            "device_id": np.arange(fleet.n_devices, dtype=np.int64),
            "history_interactions": fleet.history_counts,
            "interactions": fleet.interactions.counts,
            "bucket": np.asarray(fleet.buckets, dtype=str),
            "tier": np.asarray(pr.tier, dtype=np.int8), "flops": pr.flops, "down_bps": pr.down_bps,
            "up_bps": pr.up_bps, "rtt_s": pr.rtt_s, "tz_offset_h": pr.tz_offset_h, "failure_p": pr.failure_p,
        })
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".", suffix=".tmp")
        os.close(fd)
        pq.write_table(table, tmp)
        os.replace(tmp, self.dir / "fleet_devices.parquet")

    def write_round(self, strategy: str, result) -> None:
        """Append one round of one strategy (device rows + the round's fleet facts)."""
        folder = self.dir / strategy_dirname(strategy)
        df = pd.DataFrame(result.devices)
        _write_part(folder / "devices.parquet", f"round-{result.round:05d}.parquet",
                    pa.Table.from_pandas(df, preserve_index=False))
        _write_part(folder / "rounds.parquet", f"round-{result.round:05d}.parquet",
                    pa.Table.from_pylist([result.info]))

    def write_summary(self, strategy: str, summary: dict[str, Any]) -> None:
        self.summary["strategies"][strategy] = summary
        write_json(self.dir / "summary.json", self.summary)


def read_devices(run_dir: str | Path, strategy: str) -> pd.DataFrame:
    """All per-device rows of one strategy, ordered by round and device."""
    folder = Path(run_dir) / strategy_dirname(strategy) / "devices.parquet"
    df = pd.read_parquet(folder)
    return df.sort_values(["round", "device_id"], kind="stable").reset_index(drop=True)


def read_rounds(run_dir: str | Path, strategy: str) -> pd.DataFrame:
    folder = Path(run_dir) / strategy_dirname(strategy) / "rounds.parquet"
    return pd.read_parquet(folder).sort_values("round").reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Reading a whole run back (the results API for reports and notebooks)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Run:
    """One run directory read back from disk (see ``load_run``).

    Attributes:
        path: the run directory.
        config: ``config.toml`` (the resolved experiment) parsed with ``tomllib``.
        summary: ``summary.json`` (``layout_version`` and per-strategy metrics).
        fleet: ``fleet.json`` (history cut, round length, drift events, bucket thresholds).
        fleet_devices: ``fleet_devices.parquet``, one row per device.
        devices: every strategy's ``devices.parquet`` rows, with a first column
            ``strategy`` (categorical, categories in run order), ordered by strategy,
            round and device.
        rounds: every strategy's ``rounds.parquet`` rows, with a ``strategy`` column.
        strategies: names of the finished strategies (those in ``summary.json``), in run order.
    """

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    fleet: dict[str, Any]
    fleet_devices: pd.DataFrame
    devices: pd.DataFrame
    rounds: pd.DataFrame
    strategies: list[str]

    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.path.resolve().name

    @property
    def drift_events(self) -> list[dict[str, Any]]:
        """Drift events from ``fleet.json``: dicts with ``round`` (first affected round,
        0 = during history), ``kind``, ``fraction`` of users and ``note``."""
        return list(self.fleet.get("drift_events") or [])


def _read_parquet(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise FleetsimError(f"{path.parent}: {path.name} is missing; not a complete fleetsim run ({what})")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FleetsimError(f"{path}: unreadable ({first})") from None


def _with_strategy(frames: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    col = pd.Categorical(np.repeat(names, [len(f) for f in frames]), categories=names)
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "strategy", col)
    return df


def load_run(run_dir: str | Path) -> Run:
    """Read a fleet run directory written by ``fleetsim run``.

    Raises ``FleetsimError`` (one line, naming the folder) when ``run_dir`` is not a run
    directory, holds a leave-last (paper protocol) run, was written with another result
    layout (``layout_version`` other than ``LAYOUT_VERSION``), or is missing a file.
    Strategies still in flight when a run stopped (rounds on disk but not in
    ``summary.json``) are left out.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FleetsimError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FleetsimError(f"{path}: not a fleetsim run directory (no summary.json)")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise FleetsimError(f"{summary_path}: not readable as JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(summary, dict):
        raise FleetsimError(f"{summary_path}: not a fleetsim summary (expected a JSON object)")
    if summary.get("protocol") == "leave_last":
        raise FleetsimError(f"{path}: a leave_last run (summary.json only); reports need a fleet run")
    version = summary.get("layout_version")
    if version != LAYOUT_VERSION:
        if isinstance(version, int) and version > LAYOUT_VERSION:
            age = f"a newer result layout (layout_version {version})"
        else:
            age = f"an older result layout (layout_version {version if version is not None else 'missing'})"
        raise FleetsimError(f"{path}: written with {age}; this fleetsim reads layout_version {LAYOUT_VERSION} "
                            f"-- re-run the experiment with this version")
    finished = summary.get("strategies")
    if not isinstance(finished, dict) or not finished:
        raise FleetsimError(f"{path}: summary.json lists no finished strategy")
    try:
        config = tomllib.loads((path / "config.toml").read_text())
        fleet = json.loads((path / "fleet.json").read_text())
    except FileNotFoundError as exc:
        raise FleetsimError(f"{path}: {Path(exc.filename).name} is missing; not a complete fleetsim run") from None
    except (OSError, ValueError) as exc:
        raise FleetsimError(f"{path}: config.toml or fleet.json unreadable ({str(exc).splitlines()[0]})") from None
    # run order: the experiment's strategy list, restricted to finished strategies
    listed = [s for s in (config.get("experiment", {}).get("strategies") or []) if s in finished]
    strategies = listed + [s for s in finished if s not in listed]
    devices, rounds = [], []
    for s in strategies:
        folder = path / strategy_dirname(s)
        devices.append(_read_parquet(folder / "devices.parquet", f"devices of {s}")
                       .sort_values(["round", "device_id"], kind="stable"))
        rounds.append(_read_parquet(folder / "rounds.parquet", f"rounds of {s}").sort_values("round"))
    return Run(
        path=path, config=config, summary=summary, fleet=fleet,
        fleet_devices=_read_parquet(path / "fleet_devices.parquet", "per-device fleet facts"),
        devices=_with_strategy(devices, strategies), rounds=_with_strategy(rounds, strategies),
        strategies=strategies,
    )
