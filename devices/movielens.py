"""MovieLens ratings files as fleet interaction streams, and the timeline that replays them.

One MovieLens user is one simulated device; every rating is an implicit-feedback
interaction. ``load_ratings`` reads the three on-disk formats (ml-100k ``u.data``, ml-1m /
ml-10m ``ratings.dat``, ml-latest(-small) / ml-20m / ml-25m ``ratings.csv``) into an
``Interactions`` object whose times are rebased to the earliest rating;
``movielens_timeline`` cuts that span into history and equal simulated rounds.
"""
from __future__ import annotations

import io
import math
import numbers
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from devices.data import MAX_ROUNDS, DataSource, Interactions, Timeline
from devices.errors import ConfigError, DataError

__all__ = ["load_ratings", "load_ratings_with_epoch", "movielens_timeline"]

SECONDS_PER_DAY = 86400.0
CSV_HEADER = ("userid", "movieid", "rating", "timestamp")


@dataclass(frozen=True)
class _Format:
    """How one MovieLens file format lays out a rating line."""

    name: str
    sep: str  # field separator as written in the file
    header: bool  # first non-blank line is a column header


_UDATA = _Format("ml-100k u.data", "\t", header=False)
_DAT = _Format("ml-1m ratings.dat", "::", header=False)
_CSV = _Format("ml-latest ratings.csv", ",", header=True)
_BY_NAME = {"u.data": _UDATA, "ratings.dat": _DAT, "ratings.csv": _CSV}

_INT = re.compile(r"\s*[+-]?\d+\s*")
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min
_DTYPES = {"user": np.int64, "item": np.int64, "rating": np.float64, "timestamp": np.float64}
# Timestamps are Unix seconds of years 1 to 9999 (Python's datetime range): beyond them a
# file holds no real date, and one such time stretches the timeline until its rounds are
# empty (a run that scores nothing).
_TIME_MIN, _TIME_MAX = -62_135_596_800.0, 253_402_300_799.0
_TIME_RANGE = "not a Unix time in seconds of the years 1 to 9999"


def load_ratings(path: str | Path) -> Interactions:
    """Read a MovieLens ratings file into per-user, time-ordered interaction streams.

    The format is chosen by file name (``u.data``, ``ratings.dat``, ``ratings.csv``) or,
    for any other name, from the first non-blank line (a header -> csv, ``::`` -> dat,
    a tab -> u.data). Users and items get dense ids in order of their original ids
    (kept in ``user_ids`` / ``item_ids``); each user's interactions are sorted by
    timestamp, ties keeping file order; times are seconds since the earliest rating.
    Use ``load_ratings_with_epoch`` to also get the absolute epoch of t = 0.

    Raises ``DataError`` (one line naming the file, and the 1-based line number for a
    malformed line) if the file is missing, empty, of unknown format or malformed.
    """
    return load_ratings_with_epoch(path)[0]


def load_ratings_with_epoch(path: str | Path) -> tuple[Interactions, float]:
    """Like ``load_ratings``, also returning the Unix time (seconds) of t = 0."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {path}")
    if p.is_dir():
        raise DataError(
            f"data file not found: {path} is a directory; "
            "give the ratings file (u.data, ratings.dat or ratings.csv)"
        )
    if not p.is_file():  # a FIFO or a device: reading it could wait forever
        raise DataError(f"{path}: not a regular file (a pipe or a device?); give the ratings file")
    first = _first_line(p, path)
    if first is None:
        raise DataError(f"{path}: empty file, no ratings")
    first_lineno, first_text = first
    fmt = _BY_NAME.get(p.name) or _sniff(first_text, path)
    skip = 0
    if fmt.header:
        _check_header(first_text, first_lineno, path)
        skip = first_lineno
    users, items, times = _read_fast(p, path, fmt, skip)
    if len(users) == 0:
        raise DataError(f"{path}: no ratings" + (" after the header" if fmt.header else ""))
    _check_not_cut_off(p, path, fmt, times)
    return _to_interactions(users, items, times)


def filter_min_ratings(inter: Interactions, min_item: int, min_user: int) -> Interactions:
    """Only items with >= ``min_item`` ratings, then only users with >= ``min_user`` of the
    ratings left (one pass each), re-indexed densely; original ids and the time order are kept."""
    user = inter.user_of()
    keep = np.bincount(inter.items, minlength=inter.n_items)[inter.items] >= min_item
    keep &= np.bincount(user[keep], minlength=inter.n_users)[user] >= min_user
    if keep.all():
        return inter
    if not keep.any():
        raise DataError(f"no ratings left with data.min_item_ratings = {min_item} and data.min_user_ratings = {min_user}")
    users = inter.user_ids[user[keep]] if inter.user_ids is not None else user[keep]
    items = inter.item_ids[inter.items[keep]] if inter.item_ids is not None else inter.items[keep]
    out, _ = _to_interactions(users, items, inter.times[keep])  # times from the first kept rating
    return out


def movielens_timeline(
    inter: Interactions, epoch: float, n_rounds: int, history_fraction: float = 0.8
) -> Timeline:
    """Cut the span of ``inter`` into history and ``n_rounds`` rounds of equal length.

    The first ``history_fraction`` of the time from the first to the last interaction is
    history (round 0, trains the cloud model); the rest is split into ``n_rounds`` equal
    windows, the last interaction falling in round ``n_rounds``: the window length is
    ``rest / n_rounds`` widened by the few ulps needed so that the last interaction is
    not on the (exclusive) end of round ``n_rounds``. ``epoch`` is the Unix time of t = 0, so
    ``start_clock = epoch mod 1 day`` makes device time-of-day real (UTC).
    """
    if isinstance(n_rounds, bool) or not isinstance(n_rounds, numbers.Integral) or n_rounds < 1:
        raise ConfigError("data.n_rounds", n_rounds, "an integer >= 1")
    if (
        isinstance(history_fraction, bool)
        or not isinstance(history_fraction, numbers.Real)
        or not 0.0 < float(history_fraction) < 1.0
    ):
        raise ConfigError("data.history_fraction", history_fraction, "a number with 0 < x < 1")
    if not math.isfinite(float(epoch)):
        raise ValueError(f"epoch must be a finite Unix time, got {epoch!r}")
    if len(inter.times) == 0:
        raise DataError("cannot build a timeline: there are no interactions")
    first, last = float(inter.times.min()), float(inter.times.max())
    history_end = first + float(history_fraction) * (last - first)
    rest = last - history_end
    if not rest > 0.0:
        raise DataError(
            f"cannot build a timeline: all {len(inter.times)} interactions happen at "
            f"the same time ({first} s)"
        )
    timeline = Timeline(
        history_end=history_end,
        round_seconds=rest / int(n_rounds),
        n_rounds=int(n_rounds),
        start_clock=float(epoch) % SECONDS_PER_DAY,
    )
    # rest / n puts the last interaction on the end of round n, i.e. in round n + 1 when
    # rounding is exact; widen by single ulps (a few at most) until it falls inside.
    last_t = np.array([last])
    while timeline.round_of(last_t)[0] > timeline.n_rounds:
        wider = float(np.nextafter(timeline.round_seconds, np.inf))
        timeline = replace(timeline, round_seconds=wider)
    return timeline


def _first_line(p: Path, shown: str | Path) -> tuple[int, str] | None:
    """The first non-blank line and its 1-based number, or None if the file has none."""
    try:
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                text = _decode(raw)
                if text:
                    return lineno, text
    except OSError as e:
        raise DataError(f"{shown}: cannot read: {e.strerror or e}") from e
    return None


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r\n").lstrip("\ufeff")


def _sniff(line: str, shown: str | Path) -> _Format:
    """Guess the format of a file with a non-standard name from its first line."""
    if "," in line and not _NUMBER.fullmatch(line.split(",", 1)[0]):
        return _CSV
    if "::" in line:
        return _DAT
    if "\t" in line:
        return _UDATA
    raise DataError(
        f"{shown}: unknown ratings format: name is not u.data, ratings.dat or ratings.csv "
        f"and the first line {_clip(line)!r} is not a csv header, '::'- or tab-separated"
    )


def _check_header(line: str, lineno: int, shown: str | Path) -> None:
    fields = tuple(f.strip().strip('"').lower() for f in line.split(","))
    if fields != CSV_HEADER:
        raise DataError(
            f"{shown}:{lineno}: expected the header userId,movieId,rating,timestamp, "
            f"got {_clip(line)!r}"
        )


def _read_fast(
    p: Path, shown: str | Path, fmt: _Format, skip: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse the whole file with pandas' C reader; on any problem, find the bad line."""
    source: Path | io.BytesIO = p
    sep = fmt.sep
    if fmt is _DAT:
        # The C reader takes single-character separators only (the python engine is ~10x
        # slower); "a::b".split("::") and replacing "::" left to right agree exactly.
        source = io.BytesIO(p.read_bytes().replace(b"::", b"\t"))
        sep = "\t"
    try:
        with warnings.catch_warnings():
            # Rows that all have too many fields only warn (and drop data): make it fail.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(
                source,
                sep=sep,
                header=None,
                skiprows=skip,
                names=["user", "item", "rating", "timestamp"],
                index_col=False,
                dtype=_DTYPES,
                na_filter=False,
                engine="c",
            )
    except (ValueError, OverflowError, pd.errors.ParserWarning) as e:
        raise _locate_error(p, shown, fmt, e) from e
    rating = df["rating"].to_numpy()
    times = df["timestamp"].to_numpy()
    # Short rows parse with NaN in the missing float columns, "inf" parses as a number.
    if not (np.isfinite(rating).all() and np.isfinite(times).all()):
        raise _locate_error(p, shown, fmt, ValueError("missing or non-finite rating or timestamp"))
    if len(times) and not (_TIME_MIN <= times.min() and times.max() <= _TIME_MAX):
        raise _locate_error(p, shown, fmt, ValueError(f"a timestamp is {_TIME_RANGE}"))
    return df["user"].to_numpy(), df["item"].to_numpy(), times


def _check_not_cut_off(p: Path, shown: str | Path, fmt: _Format, times: np.ndarray) -> None:
    """A file cut off in its last line's timestamp (a copy or download that stopped) parses:
    ``...,1527007152`` cut to ``...,15`` is a rating of 1970 that stretches the whole
    timeline. Refused when the last line has no line end and its timestamp has fewer
    digits than every other line's; a whole last line without a line end is read as usual."""
    if len(times) < 2:
        return
    with p.open("rb") as f:
        f.seek(max(0, p.stat().st_size - 4096))
        tail = f.read()
    if not tail or tail.endswith((b"\n", b"\r")):
        return
    fields = _decode(tail.rsplit(b"\n", 1)[-1]).split(fmt.sep)
    stamp = fields[-1].strip().lstrip("+")
    others = float(times[:-1].min())
    if len(fields) != 4 or not re.fullmatch(r"\d+(\.\d*)?", stamp) or others < 1:
        return
    if len(stamp.split(".")[0]) < len(str(int(others))):
        with p.open("rb") as f:
            lineno = 1 + sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        raise DataError(f"{shown}:{lineno}: the file looks cut off: its last line has no line end and its timestamp "
                        f"{_clip(stamp)!r} has fewer digits than any other line's (copy the file again; if the "
                        f"line is whole, end it with a newline)")


def _locate_error(p: Path, shown: str | Path, fmt: _Format, cause: BaseException) -> DataError:
    """Scan line by line for the first malformed line (only after the fast path failed)."""
    seen_header = not fmt.header
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = _decode(raw)
            if not text:
                continue
            if not seen_header:
                seen_header = True
                continue
            problem = _line_problem(text, fmt)
            if problem:
                return DataError(f"{shown}:{lineno}: {problem}")
    reason = " ".join(str(cause).split()) or type(cause).__name__
    return DataError(f"{shown}: cannot parse as {fmt.name}: {reason}")


def _line_problem(text: str, fmt: _Format) -> str | None:
    """What is wrong with one rating line, or None if it is well-formed."""
    fields = text.split(fmt.sep)
    if len(fields) != 4:
        return f"expected 4 fields separated by {fmt.sep!r}, got {len(fields)} in {_clip(text)!r}"
    for name, value in zip(("user id", "item id"), fields[:2]):
        if not _is_int(value):
            return f"{name} {_clip(value)!r} is not an integer"
        as_int = int(value) if _INT.fullmatch(value) else int(float(value))
        if not _INT64_MIN <= as_int <= _INT64_MAX:
            return f"{name} {_clip(value)!r} is out of the 64-bit integer range"
    for name, value in zip(("rating", "timestamp"), fields[2:]):
        if not _NUMBER.fullmatch(value):
            return f"{name} {_clip(value)!r} is not a number"
    if not _TIME_MIN <= float(fields[3]) <= _TIME_MAX:
        return f"timestamp {_clip(fields[3].strip())!r} is {_TIME_RANGE}"
    return None


def _is_int(value: str) -> bool:
    # pandas reads "3.0" as the integer 3, so accept integral decimals too (else a scan
    # would blame such a line instead of the one that really failed).
    if _INT.fullmatch(value):
        return True
    return bool(_NUMBER.fullmatch(value)) and float(value).is_integer()


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_interactions(
    users: np.ndarray, items: np.ndarray, times: np.ndarray
) -> tuple[Interactions, float]:
    """Dense ids in order of original ids, per-user stable time order, times from 0."""
    user_ids, user_idx = np.unique(users, return_inverse=True)
    item_ids, item_idx = np.unique(items, return_inverse=True)
    order = np.lexsort((times, user_idx))  # stable: equal times keep file order
    epoch = float(times.min())
    indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_idx, minlength=len(user_ids)), out=indptr[1:])
    inter = Interactions(
        n_users=len(user_ids),
        n_items=len(item_ids),
        indptr=indptr,
        items=item_idx[order].astype(np.int32),
        times=times[order] - epoch,
        user_ids=user_ids.astype(np.int64),
        item_ids=item_ids.astype(np.int64),
    )
    return inter, epoch


PROTOCOLS = ("fleet", "leave_last")  # data.protocol of MovieLens experiments
# The strategies a leave_last run can report, as the paper's methods: base, finetune, duet.
PAPER_STRATEGIES = ("cloud_only", "local_finetune", "duet")
# The leave_last protocol's settings and their allowed values, the default first.
PAPER_SETTINGS = {"holdout": ("test", "validation"), "eval_candidates": ("uniform", "popularity", "all"),
                  "train_negatives": ("uniform", "popularity")}
# Every [data] key only the leave_last protocol uses (recorded in its summary as protocol_settings).
LEAVE_LAST_KEYS = (*PAPER_SETTINGS, "min_item_ratings", "min_user_ratings")


@dataclass(frozen=True)
class MovieLensConfig:
    """``[data]`` with ``source = "movielens"``: a ratings file cut into history and rounds."""

    path: str = ""
    n_rounds: int = 10
    history_fraction: float = 0.8
    # "fleet": history + prequential rounds; "leave_last": the DUET paper's protocol
    # (simulator.paper; n_rounds and history_fraction are then unused)
    protocol: str = "fleet"
    # The leave_last protocol's three settings (simulator.paper; docs/methods.md, "Paper protocol"):
    # which interaction is held out ("test": each user's last; "validation": the one before
    # it, the last dropped -- for choosing settings without touching the test split) ...
    holdout: str = "test"
    # ... what a held-out item is ranked against ("uniform": device.eval_negatives items the
    # user never interacted with, uniformly; "popularity": the same, drawn in proportion to
    # the items' training interactions; "all": every item the user never interacted with) ...
    eval_candidates: str = "uniform"
    # ... and how training negatives are drawn ("uniform" or "popularity", as above).
    train_negatives: str = "uniform"
    # leave_last: keep only items with at least this many ratings, then only users with at
    # least this many of the ratings left (one pass each; 0 = keep all). The DUET authors'
    # data folders are named "..._30u30i" (docs/methods.md, section 1.6).
    min_item_ratings: int = 0
    min_user_ratings: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data.path", self.path, "the path of a MovieLens ratings file (u.data, ratings.dat or ratings.csv)")
        if self.protocol not in PROTOCOLS:
            raise ConfigError("data.protocol", self.protocol, " or ".join(f'"{p}"' for p in PROTOCOLS))
        for key, allowed in PAPER_SETTINGS.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"data.{key}", value, " or ".join(f'"{a}"' for a in allowed))
            if value != allowed[0] and self.protocol != "leave_last":
                raise ConfigError(f"data.{key}", value, f'"{allowed[0]}" unless data.protocol = "leave_last"')
        for key in ("min_item_ratings", "min_user_ratings"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"data.{key}", value, "an integer >= 0 (0: keep all)")
            if value and self.protocol != "leave_last":
                raise ConfigError(f"data.{key}", value, '0 unless data.protocol = "leave_last"')
        if not 0 < self.n_rounds <= MAX_ROUNDS:
            raise ConfigError("data.n_rounds", self.n_rounds, f"a positive integer, at most {MAX_ROUNDS:,}")
        if not 0 < self.history_fraction < 1:
            raise ConfigError("data.history_fraction", self.history_fraction, "a number strictly between 0 and 1")


def load_source(cfg: MovieLensConfig, seed: int) -> tuple[Interactions, Timeline]:
    """The ratings file of ``cfg`` cut into history and rounds (``seed`` is not used)."""
    inter, epoch = load_ratings_with_epoch(cfg.path)
    return inter, movielens_timeline(inter, epoch, cfg.n_rounds, cfg.history_fraction)


SOURCE = DataSource("movielens", MovieLensConfig, load_source)
