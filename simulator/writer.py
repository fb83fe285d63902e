"""Writing a run directory (the layout is described in ``simulator.results``): every file
goes to a temporary name and is renamed, readable by all (0666 less the umask)."""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.errors import FleetsimError, ResultsWriteError
from simulator.results import LAYOUT_VERSION, PID_FILE, _start_time, strategy_dirname


def _file_mode() -> int:
    """0666 less the process umask: what ``open()`` would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def writing(path: Path):
    """An ``OSError`` while writing ``path`` (ENOSPC, EDQUOT, EFBIG, EROFS, EACCES ...;
    pyarrow's carry no file name) becomes a one-line ``ResultsWriteError`` naming it."""
    try:
        yield
    except ResultsWriteError:
        raise
    except OSError as exc:
        reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
        cause = f"cannot write {path} ({reason})"
        raise ResultsWriteError(f"{cause}; the files written before it are whole", cause) from None


def _replace_atomically(path: Path, write: Any) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it to ``path``
    (readable by all, 0666 less the umask); an ``OSError`` is a ``ResultsWriteError``."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _replace_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


# -- one process per run folder ------------------------------------------------------------

_LOCKS: dict[str, list[int]] = {}  # run folder (real path) -> [fd, holders in this process]


def _lock_holder(path: Path, fd: int) -> int | None:
    """The pid holding the flock on the open directory ``fd`` (``/proc/locks``), else
    the pid in the folder's ``PID_FILE``, else None."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()
            if len(f) > 5 and f[1] == "FLOCK" and f[5] == key and f[4].isdigit():
                return int(f[4])
    except OSError:
        pass
    try:
        return int((path / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def lock_run_dir(path: str | Path, flag: str) -> None:
    """Take the run folder ``path`` (an existing directory) for this process: an exclusive,
    non-blocking ``flock`` on the directory itself (no file is added; the kernel drops it
    when the process ends, however it ends). Re-entrant within a process (each call needs
    an ``unlock_run_dir``). Another process holding it: ``FleetsimError`` naming its pid
    (``flag`` is the option that named the folder, for the message)."""
    import fcntl

    path = Path(path)
    key = os.path.realpath(path)
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise FleetsimError(f"{flag} {path}: cannot open the run folder ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            pid = _lock_holder(path, fd)
            os.close(fd)
            raise FleetsimError(f"{flag} {path}: another fleetsim process is running in {path} "
                                f"(pid {pid if pid is not None else 'unknown'})") from None
        # a file system without flock (some network mounts): run unlocked, as before
    _LOCKS[key] = [fd, 1]


def unlock_run_dir(path: str | Path) -> None:
    """Undo one ``lock_run_dir``; the last one releases the folder (no-op if not held)."""
    key = os.path.realpath(path)
    held = _LOCKS.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _LOCKS[key]
        os.close(held[0])


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
    with writing(folder / name):
        folder.mkdir(parents=True, exist_ok=True)
    _replace_atomically(folder / name, lambda tmp: pq.write_table(table, tmp))


class RunWriter:
    """Owns one run directory; refuses to write into one that already holds results.

    The constructor only checks ``out`` (nothing is written); ``create()`` makes the
    folder once the run is sure to start, so bad input never leaves anything behind.

    The folder is locked for this process (``lock_run_dir``) as soon as it exists: by the
    constructor if it exists already, else by ``create()``, and by ``reopen()``; a second
    fleetsim process on the same folder stops with one line. ``unlock()`` releases it.
    """

    def __init__(self, out: str | Path) -> None:
        self.dir = Path(out)
        self._created = not self.dir.exists()
        if self.dir.exists() and not self.dir.is_dir():
            raise FleetsimError(f"--out {self.dir}: exists and is not a directory")
        if (self.dir / "config.toml").exists() or (self.dir / "summary.json").exists():
            raise FleetsimError(f"--out {self.dir}: already holds results; choose another directory")
        existing = self.dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise FleetsimError(f"--out {self.dir}: not writable ({existing} is not a writable directory)")
        self.summary: dict[str, Any] = {"layout_version": LAYOUT_VERSION, "strategies": {}}
        self._logged: set[tuple[str, str]] = set()
        self._locked = self._resumed = False
        if self.dir.is_dir():  # e.g. an empty folder made for the run: nobody else may start in it now
            self._lock()

    @classmethod
    def reopen(cls, out: str | Path) -> RunWriter:
        """The writer of an existing run folder (``--resume``), its summary read back once
        the folder is locked."""
        self = cls.__new__(cls)
        self.dir, self._created, self._locked, self._resumed = Path(out), False, False, True
        self._lock()
        try:
            self.summary = json.loads((self.dir / "summary.json").read_text())
        except BaseException:
            self.unlock()
            raise
        self._logged = set()
        return self

    def _lock(self) -> None:
        if not self._locked:
            lock_run_dir(self.dir, "--resume" if self._resumed else "--out")
            self._locked = True

    def unlock(self) -> None:
        """Release the folder's lock taken by this writer (idempotent)."""
        if self._locked:
            self._locked = False
            unlock_run_dir(self.dir)

    def discard_rounds(self, strategy: str, after: int, error_log_bytes: int | None = None) -> None:
        """Drop a strategy's round files past round ``after`` (written after its last
        checkpoint) and cut its ``error.log`` back to ``error_log_bytes`` (None: remove it)."""
        folder = self.dir / strategy_dirname(strategy)
        with writing(folder):
            for name in ("devices.parquet", "rounds.parquet"):
                parts = folder / name
                for part in parts.glob("round-*.parquet") if parts.is_dir() else []:
                    if int(part.stem.split("-")[1]) > after:
                        part.unlink()
            log = folder / "error.log"
            if log.exists():
                if error_log_bytes:
                    with open(log, "r+b") as f:
                        f.truncate(error_log_bytes)
                else:
                    log.unlink()

    def error_log_bytes(self, strategy: str) -> int:
        log = self.dir / strategy_dirname(strategy) / "error.log"
        return log.stat().st_size if log.exists() else 0

    def create(self, mark_running: bool = True) -> None:
        """Make the run folder and (``mark_running``) mark it as in progress (``PID_FILE``)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FleetsimError(f"--out {self.dir}: not writable ({exc.strerror or exc})") from None
        self._lock()
        if not self._resumed and ((self.dir / "config.toml").exists() or (self.dir / "summary.json").exists()):
            # another run started in the folder after this one checked it (and has finished)
            self.unlock()
            raise FleetsimError(f"--out {self.dir}: already holds results; choose another directory")
        try:
            if mark_running:
                _atomic_write_bytes(self.dir / PID_FILE, f"{os.getpid()} {_start_time(os.getpid())}".encode())
        except OSError as exc:
            raise FleetsimError(f"--out {self.dir}: not writable ({exc.strerror or exc})") from None

    def release(self) -> None:
        """The run is over (finished, failed or interrupted): drop the in-progress mark."""
        try:
            (self.dir / PID_FILE).unlink()
        except OSError:  # gone, or the folder turned read-only: the mark names a dead process
            pass

    def remove_opened(self) -> None:
        """Undo ``create()`` and the files written after it before any strategy ran
        (``config.toml``, the fleet's files, ``summary.json``, the in-progress mark), and
        the folder if this writer made it: what a write that failed there left behind
        would be refused by ``--resume`` and by a new run alike. Best effort."""
        for name in ("config.toml", "fleet.json", "fleet_devices.parquet", "summary.json", PID_FILE):
            try:
                (self.dir / name).unlink(missing_ok=True)
            except OSError:
                pass
        self.discard_if_empty()

    def discard_if_empty(self) -> None:
        """Remove the run folder again if this writer created it and wrote nothing."""
        self.unlock()
        if self._created and self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()

    def append_error_log(self, strategy: str, headline: str, tb: str, once_key: str | None = None) -> Path:
        """Append a headline and a traceback to ``<strategy>/error.log`` (each ``once_key``
        once); returns the log's path."""
        folder = self.dir / strategy_dirname(strategy)
        path = folder / "error.log"
        if once_key is not None:
            if (strategy, once_key) in self._logged:
                return path
            self._logged.add((strategy, once_key))
        with writing(path):
            folder.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"== {headline}\n{tb.rstrip()}\n\n" if tb else f"== {headline}\n\n")
        return path

    def write_config(self, toml_text: str) -> None:
        _atomic_write_bytes(self.dir / "config.toml", toml_text.encode())

    def write_fleet(self, fleet) -> None:
        tl = fleet.timeline
        pr = fleet.profiles
        # in summary.json from the first strategy state on
        self.summary.update(eval_users=fleet.eval_users, evaluated_devices=fleet.evaluated_devices)
        self.write_fleet_files({
            "source": fleet.source, "n_devices": fleet.n_devices, "n_items": fleet.interactions.n_items,
            "history_end_s": tl.history_end, "round_seconds": tl.round_seconds, "n_rounds": tl.n_rounds,
            "start_clock_s": tl.start_clock, "drift_events": [asdict(e) for e in tl.drift_events],
            "bucket_thresholds": fleet.bucket_thresholds, "eval_users": fleet.eval_users,
            "evaluated_devices": fleet.evaluated_devices,
        }, {
            "device_id": np.arange(fleet.n_devices, dtype=np.int64),
            "history_interactions": fleet.history_counts,
            "interactions": fleet.interactions.counts,
            "bucket": np.asarray(fleet.buckets, dtype=str),
            "evaluated": np.ones(fleet.n_devices, bool) if fleet.evaluated is None else fleet.evaluated,
            "tier": np.asarray(pr.tier, dtype=np.int8), "flops": pr.flops, "down_bps": pr.down_bps,
            "up_bps": pr.up_bps, "rtt_s": pr.rtt_s, "tz_offset_h": pr.tz_offset_h, "failure_p": pr.failure_p,
        })

    def write_fleet_files(self, facts: dict[str, Any], devices: dict[str, np.ndarray]) -> None:
        """``fleet.json`` (the fleet's facts) and ``fleet_devices.parquet`` (one row per device)."""
        write_json(self.dir / "fleet.json", facts)
        _write_part(self.dir, "fleet_devices.parquet", pa.table(devices))

    def write_round(self, strategy: str, result) -> None:
        """Append one round of one strategy (device rows + the round's fleet facts)."""
        folder = self.dir / strategy_dirname(strategy)
        df = pd.DataFrame(result.devices)
        _write_part(folder / "devices.parquet", f"round-{result.round:05d}.parquet",
                    pa.Table.from_pandas(df, preserve_index=False))
        _write_part(folder / "rounds.parquet", f"round-{result.round:05d}.parquet",
                    pa.Table.from_pylist([result.info]))

    def has_round(self, strategy: str, round: int) -> bool:
        """Whether ``write_round`` finished for this round (its second file is in place)."""
        return (self.dir / strategy_dirname(strategy) / "rounds.parquet" / f"round-{round:05d}.parquet").is_file()

    def write_summary(self, strategy: str, summary: dict[str, Any]) -> None:
        self.summary["strategies"][strategy] = summary
        write_json(self.dir / "summary.json", self.summary)
