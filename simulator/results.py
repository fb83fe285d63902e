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
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
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
