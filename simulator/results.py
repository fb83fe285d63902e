"""Results on disk: written round by round while strategies run, read back for reports.

Layout of a run directory::

    DIR/config.toml                    resolved experiment
    DIR/fleet.json                     drift events, history cut, bucket thresholds
    DIR/fleet_devices.parquet          one row per device: history activity, bucket, hardware
    DIR/<strategy>/devices.parquet/    one part file per round (a parquet dataset:
                                       ``pandas.read_parquet`` reads the directory)
    DIR/<strategy>/rounds.parquet/     one row per round: online, selected, ok, dropped, ...
    DIR/<strategy>/error.log           tracebacks of a failed strategy / of recorded code errors
    DIR/summary.json                   per strategy: status, rounds_completed, fleet metrics
                                       (rewritten atomically after every round)
    DIR/.fleetsim-run.pid              the driver's pid while the run is in progress

``simulator.writer.RunWriter`` writes it. Each part file is written to a temporary name and renamed, so a crash loses at most
the round in flight and never leaves a half-written file. Every file is readable by
all (0644 under the usual umask), like any other file the user writes.

A strategy's ``status`` is ``pending`` until it starts, ``running`` while it runs, then
``complete``, ``failed`` (with an ``error`` entry) or ``interrupted`` (Ctrl-C). A run whose driver was killed leaves
``running``; ``load_run`` reports such a strategy as ``interrupted`` once no process
holds the run.

``load_run(DIR)`` reads a whole run back (config, summary, per-device records of every
strategy, drift events) for reports and notebooks.
"""
from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from devices.reaper import proc_stat
from simulator.errors import FleetsimError

LAYOUT_VERSION = 2  # 2: strategy status, errors / quarantined counts, nonfinite scores
STATUSES = ("pending", "running", "complete", "failed", "interrupted")
PID_FILE = ".fleetsim-run.pid"


def config_digest(toml_text: str) -> str:
    """The digest of a run's ``config.toml`` that ``summary.json`` records (``config_sha256``)."""
    return hashlib.sha256(toml_text.encode()).hexdigest()


def strategy_dirname(name: str) -> str:
    """A folder name for a strategy (import paths contain ':' and '.')."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _start_time(pid: int) -> int:
    """A process's start time in clock ticks (Linux ``/proc``; 0 elsewhere)."""
    st = proc_stat(pid)
    return st[2] if st else 0


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
        strategies: names of every strategy in ``summary.json`` (finished or not), in run order.
        status: per strategy, ``complete``, ``failed``, ``interrupted``, ``pending`` (never started) or ``running``
            (``running`` only while a live process still writes the run).
    """

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    fleet: dict[str, Any]
    fleet_devices: pd.DataFrame
    devices: pd.DataFrame
    rounds: pd.DataFrame
    strategies: list[str]
    status: dict[str, str] = None  # type: ignore[assignment]

    @property
    def incomplete(self) -> list[str]:
        """Strategies that did not complete (failed, interrupted or still running)."""
        return [s for s in self.strategies if self.status.get(s) != "complete"]

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
    kept = [f for f in frames if len(f.columns)]
    df = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(index=range(0))
    df.insert(0, "strategy", col)
    return df


def load_run(run_dir: str | Path) -> Run:
    """Read a fleet run directory written by ``fleetsim run``.

    A paper-protocol (``leave_last``) run has the same layout: each method is a strategy
    with one round, its evaluated users' test samples.

    Raises ``FleetsimError`` (one line, naming the folder) when ``run_dir`` is not a run
    directory, was written with another result
    layout (``layout_version`` other than ``LAYOUT_VERSION``), or is missing a file.
    Strategies that did not complete are included with their ``status`` and the rounds
    they completed (a failed strategy's records of the round it failed in stay on disk,
    for ``read_devices``, but are not in ``devices``/``rounds``: they are partial, and a
    report over them would show numbers of a round the strategy never finished); a
    strategy whose run was killed (``running`` in ``summary.json``, no live
    process) is ``interrupted``, and its summary metrics are computed from its records
    (its pooled ``overall_auc``, kept only in memory during the run, is then None).
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
    if summary.get("protocol") == "leave_last" and "layout_version" not in summary:
        raise FleetsimError(f"{path}: a leave_last run written before it had the fleet layout (summary.json only); "
                            f"re-run it with this version")
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
        raise FleetsimError(f"{path}: summary.json lists no strategy")
    try:
        config_text = (path / "config.toml").read_text()
        config = tomllib.loads(config_text)
        fleet = json.loads((path / "fleet.json").read_text())
    except FileNotFoundError as exc:
        raise FleetsimError(f"{path}: {Path(exc.filename).name} is missing; not a complete fleetsim run") from None
    except (OSError, ValueError) as exc:
        raise FleetsimError(f"{path}: config.toml or fleet.json unreadable ({str(exc).splitlines()[0]})") from None
    if summary.get("config_sha256") not in (None, config_digest(config_text)):  # files of two runs, mixed
        raise FleetsimError(f"{path}: summary.json does not belong to config.toml (the config digest it recorded "
                            f"differs): one of them comes from another run or was edited")
    _check_fleet(path, fleet, config)
    _check_entries(path, finished)
    # run order: the experiment's strategy list, restricted to those in the summary
    listed = [s for s in (config.get("experiment", {}).get("strategies") or []) if s in finished]
    if summary.get("protocol") == "leave_last":  # its methods, not experiment.strategies
        listed = []
    strategies = listed + [s for s in finished if s not in listed]
    live = _driver_alive(path)
    n_devices = fleet["n_devices"]
    status: dict[str, str] = {}
    devices, rounds = [], []
    for s in strategies:
        entry = finished[s]
        st = entry["status"]
        status[s] = "interrupted" if st == "running" and not live else st
        folder = path / strategy_dirname(s)
        if st == "complete" or (folder / "devices.parquet").exists():
            devices.append(_read_parquet(folder / "devices.parquet", f"devices of {s}"))
            rounds.append(_read_parquet(folder / "rounds.parquet", f"rounds of {s}"))
            _check_columns(folder)
            devices[-1] = devices[-1].sort_values(["round", "device_id"], kind="stable") if len(devices[-1]) else devices[-1]
            rounds[-1] = rounds[-1].sort_values("round") if len(rounds[-1]) else rounds[-1]
            _check_records(folder, devices[-1], rounds[-1], n_devices)
        else:  # failed or stopped before its first round
            devices.append(pd.DataFrame())
            rounds.append(pd.DataFrame())
        completed = int(entry.get("rounds_completed") or 0)
        _check_rounds(folder, devices[-1], rounds[-1], completed)
        if st == "failed" and len(rounds[-1]):  # the round it failed in is partial: on disk, not in its numbers
            devices[-1] = devices[-1][devices[-1]["round"] <= completed] if len(devices[-1]) else devices[-1]
            rounds[-1] = rounds[-1][rounds[-1]["round"] <= completed]
        if st != "pending" and "uauc" not in entry and "overall_auc" not in entry:  # killed mid-strategy
            finished[s] = {**_summary_from_records(devices[-1], rounds[-1], fleet), **entry, "status": status[s]}
        elif status[s] != st:
            finished[s] = {**entry, "status": status[s]}
    return Run(
        path=path, config=config, summary=summary, fleet=fleet,
        fleet_devices=_check_fleet_devices(path, _read_parquet(path / "fleet_devices.parquet", "per-device fleet facts"),
                                           n_devices),
        devices=_with_strategy(devices, strategies), rounds=_with_strategy(rounds, strategies),
        strategies=strategies, status=status,
    )


STATUSES = ("complete", "failed", "interrupted", "pending", "running")
# summary.json: what each strategy's entry holds (numbers may be null: NaN, or not measured)
_NUMBERS = ("overall_auc", "uauc", "user_auc_p10", "user_auc_p50", "user_auc_p90", "user_auc_worst10", "n_users_auc",
            "ndcg10", "hr10", "logloss", "n_users_evaluated", "n_positives", "bytes_down", "bytes_up",
            "mb_down_per_device_round", "mb_up_per_device_round", "device_flops", "gflops_per_device_round",
            "device_seconds", "selected_device_rounds", "nonfinite_score_device_rounds", "errors", "quarantined",
            "round_latency_s", "simulated_seconds", "wall_seconds", "prepare_seconds", "rounds_completed")
_TABLES = ("by_bucket", "status_counts", "strategy_metrics", "strategy_eval_metrics", "bucket_thresholds", "error")


def _number(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _check_entries(path: Path, strategies: dict[str, Any]) -> None:
    """Raise ``FleetsimError`` naming the strategy and key for a ``summary.json`` entry no
    fleetsim run writes (an edited or damaged file): a report would print it as a result."""
    where = path / "summary.json"
    for name, entry in strategies.items():
        if not isinstance(entry, dict):
            raise FleetsimError(f"{where}: strategy {name!r} is {type(entry).__name__}, not an object")
        if entry.get("status") not in STATUSES:  # fleetsim writes one for every strategy from the start
            raise FleetsimError(f"{where}: {name}: status {entry.get('status')!r} is not one of {', '.join(STATUSES)}")
        bad = next((k for k in _NUMBERS if k in entry and not _number(entry[k])), None)
        if bad is None and not isinstance(entry.get("rounds_completed", 0), int):
            bad = "rounds_completed"
        bad = bad or next((k for k in _TABLES if entry.get(k) is not None and not isinstance(entry[k], dict)), None)
        bad = bad or next((f"by_bucket/{b}" for b, v in (entry.get("by_bucket") or {}).items() if not isinstance(v, dict)
                           or not all(_number(x) for x in v.values() if not isinstance(x, (dict, list)))), None)
        if bad is not None:
            value = entry
            for part in bad.split("/"):
                value = value[part]
            raise FleetsimError(f"{where}: {name}: {bad} = {json.dumps(value)[:60]} is not what fleetsim writes "
                                f"(a number, or null)" if bad in _NUMBERS else
                                f"{where}: {name}: {bad} = {json.dumps(value)[:60]} is not what fleetsim writes")


def _check_fleet(path: Path, fleet: Any, config: Any) -> None:
    """``fleet.json`` and ``config.toml`` hold what the report reads, of the right kinds."""
    if not isinstance(fleet, dict):
        raise FleetsimError(f"{path / 'fleet.json'}: not a fleetsim fleet description (expected a JSON object)")
    n = fleet.get("n_devices")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise FleetsimError(f"{path / 'fleet.json'}: n_devices {n!r} is not a device count")
    for key in ("history_end_s", "round_seconds"):
        if not _number(fleet.get(key)):  # None: a paper-protocol run has no timeline
            raise FleetsimError(f"{path / 'fleet.json'}: {key} {fleet[key]!r} is not a number of seconds")
    events = fleet.get("drift_events")
    if events is not None and not (isinstance(events, list) and all(isinstance(e, dict) for e in events)):
        raise FleetsimError(f"{path / 'fleet.json'}: drift_events is not a list of events")
    if fleet.get("bucket_thresholds") is not None and not isinstance(fleet["bucket_thresholds"], dict):
        raise FleetsimError(f"{path / 'fleet.json'}: bucket_thresholds is not an object")
    for section in ("experiment", "data"):
        if not isinstance(config.get(section, {}), dict):
            raise FleetsimError(f"{path / 'config.toml'}: [{section}] is not a table")


def _check_fleet_devices(path: Path, fd: pd.DataFrame, n_devices: int) -> pd.DataFrame:
    where = path / "fleet_devices.parquet"
    missing = [c for c in ("device_id", "bucket", "history_interactions") if c not in fd.columns]
    if missing:
        raise FleetsimError(f"{where}: column(s) {', '.join(missing)} missing; not written by fleetsim")
    if len(fd) != n_devices or not np.array_equal(np.sort(fd["device_id"].to_numpy()), np.arange(n_devices)):
        raise FleetsimError(f"{where}: holds {len(fd)} rows, not devices 0..{n_devices - 1} of fleet.json "
                            f"(a cut or edited file)")
    return fd


# The columns every writer of this layout gives each record (FleetGrid, simulator.paper).
DEVICE_COLUMNS = ("round", "device_id", "online", "selected", "status", "auc", "ndcg10", "hr10", "logloss", "n_pos",
                  "n_neg", "nonfinite", "bytes_down", "bytes_up", "device_flops", "device_seconds", "bucket")
ROUND_COLUMNS = ("round", "t_start", "latency_s", "online", "active", "selected", "exchanges", "ok", "dropped", "late",
                 "quarantined", "errors", "nonfinite_scores", "host_restarts")
_RATES = ("auc", "ndcg10", "hr10")  # per-device metrics in [0, 1] (or NaN: nothing to rank)


def _check_columns(folder: Path) -> None:
    """Raise ``FleetsimError`` (one line naming the part file) if a round's records lack a
    column: read together, the parts' missing values would be filled in as nulls. Reads
    each part's schema only."""
    import pyarrow.parquet as pq

    for name, columns in (("devices.parquet", DEVICE_COLUMNS), ("rounds.parquet", ROUND_COLUMNS)):
        for part in sorted((folder / name).glob("round-*.parquet")):
            try:
                have = set(pq.read_schema(part).names)
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise FleetsimError(f"{part}: unreadable ({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
            if missing := [c for c in columns if c not in have]:
                raise FleetsimError(f"{part}: column(s) {', '.join(missing)} missing; not written by fleetsim (or by "
                                    f"another layout)")


def _check_records(folder: Path, devices: pd.DataFrame, rounds: pd.DataFrame, n_devices: int) -> None:
    """Raise ``FleetsimError`` (one line naming the part folder) for records no fleetsim
    run writes: a round or a device in one round twice, a device id outside the fleet, a
    rate outside [0, 1], a negative count. A report over them would show plausible
    numbers of another run. ``devices`` is sorted by round and device."""
    if len(rounds) and rounds["round"].duplicated().any():
        raise FleetsimError(f"{folder / 'rounds.parquet'}: round {int(rounds['round'][rounds['round'].duplicated()].iloc[0])} "
                            f"appears twice; a part file was copied or edited")
    if not len(devices):
        return
    r, d = devices["round"].to_numpy(), devices["device_id"].to_numpy()
    twice = (r[1:] == r[:-1]) & (d[1:] == d[:-1])
    problem = None
    if twice.any():
        i = int(np.flatnonzero(twice)[0])
        problem = f"device {int(d[i])} appears twice in round {int(r[i])}"
    elif d.min() < 0 or d.max() >= n_devices:
        problem = f"device id {int(d.max() if d.max() >= n_devices else d.min())} is not in the fleet of {n_devices}"
    else:
        for c in _RATES:
            x = devices[c].to_numpy(dtype=np.float64, na_value=np.nan)
            if ((x < 0) | (x > 1)).any():
                problem = f"{c} {float(x[(x < 0) | (x > 1)][0]):g} is outside [0, 1]"
                break
        else:
            if (devices["n_pos"].to_numpy() < 0).any() or (devices["n_neg"].to_numpy() < 0).any():
                problem = "a negative n_pos or n_neg"
    if problem:
        raise FleetsimError(f"{folder / 'devices.parquet'}: {problem}; not written by fleetsim (a part file was "
                            f"copied or edited)")


def _check_rounds(folder: Path, devices: pd.DataFrame, rounds: pd.DataFrame, completed: int) -> None:
    """Raise ``FleetsimError`` if a round's part file is missing: rounds.parquet must hold
    rounds 1..R with R >= the rounds summary.json says were completed, and devices.parquet
    every one of them that had an active or selected device (a report over the rest would
    be a report over another run)."""
    have = sorted(int(r) for r in rounds["round"]) if len(rounds) else []
    top = max(have[-1] if have else 0, completed)
    lacking = sorted(set(range(1, top + 1)) - set(have))
    if lacking:
        raise FleetsimError(f"{folder / 'rounds.parquet'}: round(s) {_spans(lacking)} missing (summary.json: "
                            f"{completed} completed); a part file was removed or never written")
    if len(rounds):
        used = rounds.loc[(rounds["active"] > 0) | (rounds["selected"] > 0), "round"]
        lacking = sorted(set(int(r) for r in used) - set(int(r) for r in (devices["round"] if len(devices) else [])))
        if lacking:
            raise FleetsimError(f"{folder / 'devices.parquet'}: round(s) {_spans(lacking)} missing although "
                                f"rounds.parquet has devices in them; a part file was removed or never written")


def _spans(rounds: list[int]) -> str:
    shown = ", ".join(map(str, rounds[:5]))
    return shown + (f" and {len(rounds) - 5} more" if len(rounds) > 5 else "")


def _driver_alive(path: Path) -> bool:
    """Whether the process that writes this run (``PID_FILE``: pid and start time, so a
    reused pid does not count) is still alive and not a zombie."""
    try:
        pid, start = (int(x) for x in (path / PID_FILE).read_text().split()[:2])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = proc_stat(pid)
    if st is None:
        return not start  # no /proc to look in: trust the pid
    return st[0] != "Z" and (not start or st[2] == start)  # a zombie (killed, unreaped) is not running


def _summary_from_records(devices: pd.DataFrame, rounds: pd.DataFrame, fleet: dict[str, Any]) -> dict[str, Any]:
    from simulator import metrics

    out = metrics.run_summary(devices, overall_auc=float("nan"), thresholds=fleet.get("bucket_thresholds"))
    out["overall_auc"] = None
    last = rounds.iloc[-1] if len(rounds) else None
    out.update(
        errors=int(rounds["errors"].sum()) if "errors" in rounds else 0,
        quarantined=int(rounds["quarantined"].sum()) if "quarantined" in rounds else 0,
        round_latency_s=float(rounds["latency_s"].sum()) if len(rounds) else 0.0,
        simulated_seconds=float(last["t_start"] + last["latency_s"] - fleet.get("history_end_s", 0.0))
        if last is not None else 0.0,
        wall_seconds=None,
    )
    return out
