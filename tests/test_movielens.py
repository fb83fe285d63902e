"""Tests for devices/movielens.py: the three MovieLens formats, errors, and the timeline."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from devices.data import Interactions
from devices.movielens import load_ratings, load_ratings_with_epoch, movielens_timeline
from simulator.errors import ConfigError, DataError

REAL_ML_SMALL = Path("/work/shared/data/ml-latest-small/ratings.csv")

# (user, item, rating, timestamp) in file order. User 10 has a tie at t=1000 written as
# item 200 before item 50, user 3 a tie at t=1200 written as 50 before 7: a stable sort
# keeps file order, sorting by item would not.
ROWS = [
    (10, 200, 4, 1000),
    (3, 50, 3, 1200),
    (10, 7, 5, 900),
    (3, 7, 1, 1200),
    (10, 50, 2, 1000),
    (25, 7, 3, 1500),
    (3, 200, 4, 1100),
]
# Dense ids: users 3, 10, 25 -> 0, 1, 2; items 7, 50, 200 -> 0, 1, 2; epoch = 900.
EXPECTED_INDPTR = [0, 3, 6, 7]
EXPECTED_ITEMS = [2, 1, 0, 0, 2, 1, 0]  # user 3: 200@1100, 50@1200, 7@1200; user 10: 7, 200, 50
EXPECTED_TIMES = [200, 300, 300, 0, 100, 100, 600]
EPOCH = 900.0


def _lines(fmt: str, rows) -> list[str]:
    if fmt == "u.data":
        return [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in rows]
    if fmt == "ratings.dat":
        return [f"{u}::{i}::{r}::{t}" for u, i, r, t in rows]
    return ["userId,movieId,rating,timestamp"] + [f"{u},{i},{float(r)},{t}" for u, i, r, t in rows]


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


FORMATS = ["u.data", "ratings.dat", "ratings.csv"]


def _check_expected(inter: Interactions) -> None:
    assert (inter.n_users, inter.n_items) == (3, 3)
    assert inter.user_ids.tolist() == [3, 10, 25]
    assert inter.item_ids.tolist() == [7, 50, 200]
    assert inter.indptr.tolist() == EXPECTED_INDPTR
    assert inter.items.tolist() == EXPECTED_ITEMS
    assert inter.times.tolist() == EXPECTED_TIMES
    assert inter.items.dtype == np.int32 and inter.times.dtype == np.float64


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_parses_to_the_hand_computed_streams(tmp_path, fmt):
    inter, epoch = load_ratings_with_epoch(_write(tmp_path, fmt, _lines(fmt, ROWS)))
    _check_expected(inter)
    assert epoch == EPOCH


def test_formats_agree_and_load_ratings_matches_with_epoch(tmp_path):
    loaded = []
    for fmt in FORMATS:
        d = tmp_path / fmt.replace(".", "_")
        d.mkdir()
        p = _write(d, fmt, _lines(fmt, ROWS))
        loaded.append(load_ratings(p))
        assert load_ratings(str(p)).times.tolist() == load_ratings_with_epoch(p)[0].times.tolist()
    for other in loaded[1:]:
        for field in ("indptr", "items", "times", "user_ids", "item_ids"):
            assert np.array_equal(getattr(other, field), getattr(loaded[0], field))


@pytest.mark.parametrize(
    "name, fmt",
    [("u1.base", "u.data"), ("ratings-1m.txt", "ratings.dat"), ("small.csv", "ratings.csv")],
)
def test_other_names_detect_format_from_first_line(tmp_path, name, fmt):
    _check_expected(load_ratings(_write(tmp_path, name, _lines(fmt, ROWS))))


def test_blank_lines_crlf_and_half_star_ratings_are_accepted(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_bytes(b"userId,movieId,rating,timestamp\r\n1,5,3.5,20\r\n\r\n2,5,0.5,10\r\n")
    inter, epoch = load_ratings_with_epoch(p)
    assert inter.indptr.tolist() == [0, 1, 2] and inter.times.tolist() == [10.0, 0.0]
    assert epoch == 10.0


def test_sparse_original_ids_map_densely_in_id_order(tmp_path):
    rows = [(900, 31, 1, 5), (-2, 1000000007, 1, 6), (17, 31, 1, 7), (900, 4, 1, 8)]
    inter = load_ratings(_write(tmp_path, "u.data", _lines("u.data", rows)))
    assert inter.user_ids.tolist() == [-2, 17, 900]
    assert inter.item_ids.tolist() == [4, 31, 1000000007]
    assert inter.items.tolist() == [2, 1, 1, 0]  # -2: 1000000007; 17: 31; 900: 31@5, 4@8
    assert inter.times.tolist() == [1.0, 2.0, 0.0, 3.0]


# Each case: the bad line 3 (the csv header is line 1, so its rows 2 and 4 are good).
BAD_FIELDS = {
    "too many fields": ("1", "2", "3", "4", "5"),
    "too few fields": ("1", "2", "3"),
    "non-integer user": ("x1", "2", "3", "4"),
    "fractional item": ("1", "2.5", "3", "4"),
    "user id overflows int64": ("99999999999999999999", "2", "3", "4"),
    "non-numeric rating": ("1", "2", "good", "4"),
    "empty timestamp": ("1", "2", "3", ""),
    "nan timestamp": ("1", "2", "3", "nan"),
}
SEPARATORS = {"u.data": "\t", "ratings.dat": "::", "ratings.csv": ","}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_malformed_line_reports_file_and_line(tmp_path, fmt, case):
    lines = _lines(fmt, ROWS[:3])
    lines[2] = SEPARATORS[fmt].join(BAD_FIELDS[case])
    p = _write(tmp_path, fmt, lines)
    with pytest.raises(DataError) as err:
        load_ratings(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}:3: ") and "\n" not in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_line_number_counts_blank_lines(tmp_path, fmt):
    lines = _lines(fmt, ROWS)
    lines[1:1] = [""]  # a blank line 2 shifts everything below by one
    lines[5] = SEPARATORS[fmt].join(("1", "2", "3", "later"))
    p = _write(tmp_path, fmt, lines)
    with pytest.raises(DataError, match=r":6: timestamp 'later' is not a number$"):
        load_ratings(p)


def test_every_line_with_an_extra_field_is_not_silently_truncated(tmp_path):
    # pandas would otherwise read the first column as an index and drop data.
    p = _write(tmp_path, "u.data", ["1\t2\t3\t4\t5", "1\t2\t3\t4\t5"])
    with pytest.raises(DataError, match=r":1: expected 4 fields separated by '\\t', got 5"):
        load_ratings(p)


def test_single_colons_in_dat_are_malformed(tmp_path):
    p = _write(tmp_path, "ratings.dat", ["1::2::3::4", "1:2:3:4"])
    expected = r"ratings\.dat:2: expected 4 fields separated by '::', got 1"
    with pytest.raises(DataError, match=expected):
        load_ratings(p)


def test_wrong_csv_header_is_reported_on_line_1(tmp_path):
    p = _write(tmp_path, "ratings.csv", ["1,2,3.0,4", "1,3,3.0,5"])
    with pytest.raises(DataError, match=r"ratings\.csv:1: expected the header"):
        load_ratings(p)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "no-such-dir" / "ratings.csv"
    with pytest.raises(DataError, match=r"^data file not found: .*no-such-dir/ratings\.csv$"):
        load_ratings(missing)
    with pytest.raises(DataError, match=r"^data file not found: .* is a directory"):
        load_ratings(tmp_path)
    import os

    os.mkfifo(tmp_path / "ratings.csv")  # reading it would wait for a writer forever
    with pytest.raises(DataError, match=r"ratings\.csv: not a regular file \(a pipe or a device\?\)"):
        load_ratings(tmp_path / "ratings.csv")


@pytest.mark.parametrize("name", FORMATS + ["mystery.txt"])
@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=r"empty file, no ratings$") as err:
        load_ratings(p)
    assert str(err.value).startswith(str(p))


def test_header_only_csv_has_no_ratings(tmp_path):
    p = _write(tmp_path, "ratings.csv", ["userId,movieId,rating,timestamp"])
    with pytest.raises(DataError, match=r"ratings\.csv: no ratings after the header$"):
        load_ratings(p)


@pytest.mark.parametrize("first", ["1 2 3 4", "1,2,3,4", "hello world"])
def test_unknown_format_names_the_file(tmp_path, first):
    p = _write(tmp_path, "ratings.txt", [first])
    with pytest.raises(DataError, match=r"ratings\.txt: unknown ratings format") as err:
        load_ratings(p)
    assert "\n" not in str(err.value)


def _inter(times) -> Interactions:
    times = np.asarray(times, dtype=np.float64)
    return Interactions(1, 1, [0, len(times)], np.zeros(len(times)), times)


def test_timeline_hand_computed():
    epoch = 3 * 86400 + 3600 + 25.0  # 01:00:25 UTC
    tl = movielens_timeline(_inter([0, 10, 50, 80, 84.9, 85, 100]), epoch, n_rounds=4)
    assert tl.history_end == 80.0
    assert tl.round_seconds == pytest.approx(5.0, rel=1e-12) and tl.round_seconds >= 5.0
    assert tl.n_rounds == 4 and tl.start_clock == 3625.0
    # Windows are [80, 85), [85, 90), ... widened by ulps so that t = 100 is in round 4.
    t = np.array([0, 10, 50, 79.9, 80, 84.9, 85.1, 94.9, 95.1, 100])
    assert tl.round_of(t).tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 4, 4]


@pytest.mark.parametrize("n_rounds", [1, 3, 7, 10, 49, 1000])
@pytest.mark.parametrize("frac", [0.1, 0.8, 0.9, 0.95])
def test_timeline_history_share_rounds_and_equal_windows(n_rounds, frac):
    rng = np.random.default_rng(n_rounds)
    times = np.sort(rng.uniform(0, 3.1e8, size=500))
    times[0], times[-1] = 0.0, 3.1e8 + rng.uniform(0, 1) * 0.7  # awkward span for rounding
    tl = movielens_timeline(_inter(times), 1.0e9, n_rounds, frac)
    span = times[-1] - times[0]
    assert tl.history_end == pytest.approx(frac * span, rel=1e-12)
    rounds = tl.round_of(times)
    assert np.array_equal(rounds == 0, times < tl.history_end)
    post = rounds[times >= tl.history_end]
    assert post.min() >= 1 and post.max() == n_rounds
    assert tl.round_of(times[-1:])[0] == n_rounds
    ends = np.array([tl.window(r) for r in range(1, n_rounds + 1)])
    assert np.allclose(ends[:, 1] - ends[:, 0], tl.round_seconds, rtol=1e-9, atol=0)
    assert np.allclose(ends[1:, 0], ends[:-1, 1], rtol=1e-12, atol=0)
    assert ends[0, 0] == tl.history_end
    assert tl.round_seconds == pytest.approx((span - tl.history_end) / n_rounds, rel=1e-12)


def test_timeline_from_loaded_file_keeps_real_time_of_day(tmp_path):
    inter, epoch = load_ratings_with_epoch(_write(tmp_path, "u.data", _lines("u.data", ROWS)))
    tl = movielens_timeline(inter, epoch, n_rounds=2, history_fraction=0.5)
    assert tl.start_clock == 900.0 and tl.history_end == 300.0 and tl.round_seconds >= 150.0
    assert tl.round_of(inter.times).tolist() == [0, 1, 1, 0, 0, 0, 2]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_timeline_rejects_bad_n_rounds(bad):
    with pytest.raises(ConfigError, match=r"data\.n_rounds"):
        movielens_timeline(_inter([0, 1]), 0.0, bad)


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.2, 1.5, math.nan, None])
def test_timeline_rejects_bad_history_fraction(bad):
    with pytest.raises(ConfigError, match=r"data\.history_fraction"):
        movielens_timeline(_inter([0, 1]), 0.0, 3, bad)


def test_timeline_needs_a_time_span():
    with pytest.raises(DataError, match="same time"):
        movielens_timeline(_inter([5, 5, 5]), 0.0, 3)
    with pytest.raises(DataError, match="no interactions"):
        movielens_timeline(_inter([]), 0.0, 3)


@pytest.mark.skipif(
    not REAL_ML_SMALL.is_file(), reason=f"real MovieLens data not present at {REAL_ML_SMALL}"
)
def test_real_ml_latest_small_counts():
    start = time.perf_counter()
    inter, epoch = load_ratings_with_epoch(REAL_ML_SMALL)
    elapsed = time.perf_counter() - start
    print(f"loaded {REAL_ML_SMALL} in {elapsed:.3f} s")
    assert inter.n_users == 610
    assert inter.n_items == 9724
    assert len(inter.items) == 100836


@pytest.mark.parametrize("stamp", ["1e300", "-1e12", "253402300800"])
def test_timestamp_outside_the_years_1_to_9999_is_reported_on_its_line(tmp_path, stamp):
    p = tmp_path / "ratings.csv"
    p.write_text(f"userId,movieId,rating,timestamp\n1,10,4.0,100\n2,11,3.0,{stamp}\n")
    problem = f"ratings.csv:3: timestamp '{stamp}' is not a Unix time in seconds of the years 1 to 9999"
    with pytest.raises(DataError, match=problem):
        load_ratings(p)


def test_timestamps_of_the_years_1_to_9999_are_accepted(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,10,4.0,-62135596800\n2,11,3.0,253402300799\n")
    assert sorted(load_ratings(p).times) == [0.0, 253402300799.0 + 62135596800.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_cut_off_in_its_last_timestamp_is_refused_on_that_line(tmp_path, fmt):
    # the drill's case: a copy that stopped after "...,11" of the last line's 1100
    text = "".join(line + "\n" for line in _lines(fmt, ROWS))
    p = tmp_path / fmt
    p.write_text(text[:-3])
    last = len(text.splitlines())
    with pytest.raises(DataError) as info:
        load_ratings(p)
    assert str(info.value) == (f"{p}:{last}: the file looks cut off: its last line has no line end and its timestamp "
                               f"'11' has fewer digits than any other line's (copy the file again; if the line is "
                               f"whole, end it with a newline)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_whole_last_line_without_a_line_end_is_read(tmp_path, fmt):
    p = tmp_path / fmt
    p.write_text("\n".join(_lines(fmt, ROWS)))  # no final newline; the last timestamp has all its digits
    inter, epoch = load_ratings_with_epoch(p)
    _check_expected(inter)
    assert epoch == EPOCH
    p.write_text("\n".join(_lines(fmt, ROWS)) + "\n")  # cut by hand, then ended: the user vouched for it
    cut = p.read_text()[:-4] + "\n"
    p.write_text(cut)
    assert load_ratings(p).n_users == 3
