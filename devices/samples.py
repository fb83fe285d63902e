"""Samples from interaction streams: windows of the last L items, sampled negatives, padding.

A sample is (window of the L items before the target, candidates) where candidate 0 is
the item the user really interacted with next and the rest are sampled negatives the
user never interacted with (as in the DUET and DCCL papers: 4 for training, 99 for evaluation). Everything is
vectorised over interactions; randomness comes from generators the caller derives from
(seed, purpose, round, ...), so every strategy sees the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.data import Interactions
from devices.errors import DataError
from devices.models import PAD


@dataclass
class Samples:
    """Flat samples: ``owner[i]`` is the local user index of row i."""

    owner: np.ndarray  # int64 (n,)
    windows: np.ndarray  # int64 (n, L); int32 where said (cached evaluation samples)
    candidates: np.ndarray  # int64 (n, C), as ``windows``; column 0 is the positive

    def __len__(self) -> int:
        return len(self.owner)

    def take(self, idx: np.ndarray) -> "Samples":
        return Samples(self.owner[idx], self.windows[idx], self.candidates[idx])


NEGATIVES_BLOCK = 1 << 16  # negative draws hashed and checked together (see SampleBuilder.negatives)
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread uint64 hash of each element (a new array)."""
    x = np.array(x, dtype=np.uint64)  # a copy: hashed in place
    return mix64_inplace(x, np.empty_like(x))


def mix64_inplace(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """``mix64`` of a uint64 array computed in ``x`` itself, ``tmp`` (x's shape) as scratch:
    no temporaries, so blocks of a big batch stay in cache."""
    with np.errstate(over="ignore"):
        for shift, mult in ((30, _M1), (27, _M2), (31, None)):
            np.right_shift(x, np.uint64(shift), out=tmp)
            x ^= tmp
            if mult is not None:
                x *= mult
    return x


def stream_key(*parts: int) -> np.uint64:
    """One uint64 key from small integers (seed, purpose, round, ...)."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for p in parts:
            h = mix64(np.uint64(h) + _GOLD + np.uint64(p & 0xFFFFFFFFFFFFFFFF))
    return np.uint64(h)


class SeenPairs:
    """Membership of (user, item) pairs: which items each user ever interacted with.

    A bitmap of ``n_users x n_items`` bits when that is small (one memory access per test;
    62.5 MB for 500,000 users x 1,000 items), else the sorted unique pair keys (a binary
    search per test). Both answer exactly the same.
    """

    BITMAP_MAX_BYTES = 1 << 26

    def __init__(self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> None:
        self.n_items = int(n_items)
        keys = np.asarray(users, dtype=np.int64) * self.n_items + np.asarray(items, dtype=np.int64)
        n_bits = int(n_users) * self.n_items
        if (n_bits + 7) // 8 <= max(self.BITMAP_MAX_BYTES, 2 * 8 * len(keys)):
            self.bitmap, self.keys = np.zeros((n_bits + 7) // 8, dtype=np.uint8), None
            np.bitwise_or.at(self.bitmap, keys >> 3, np.left_shift(1, keys & 7).astype(np.uint8))
        else:
            self.bitmap, self.keys = None, np.unique(keys)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each (user, item) pair (broadcast) was seen."""
        keys = np.asarray(users, dtype=np.int64) * self.n_items + np.asarray(items, dtype=np.int64)
        if self.bitmap is not None:
            return (self.bitmap[keys >> 3] >> (keys & 7).astype(np.uint8)) & 1 == 1
        if not len(self.keys):
            return np.zeros(keys.shape, dtype=bool)
        at = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return self.keys[at] == keys


class SampleBuilder:
    """Builds samples for the users of one ``Interactions`` shard.

    ``device_ids`` are the users' global ids: negatives are a counter-based hash of
    (key, device id, position in its stream, slot), so a device's samples never depend
    on which host holds it or which other devices share its batch.
    """

    def __init__(self, inter: Interactions, window: int, device_ids: np.ndarray | None = None,
                 item_weights: np.ndarray | None = None) -> None:
        """``item_weights`` (n_items,), non-negative: negatives are drawn with probability
        proportional to them (e.g. item popularity) instead of uniformly; an item of weight 0
        is never a negative. None: uniform over the catalogue."""
        self.inter = inter
        self.L = window
        # user of every row, int32 when it fits: a 500k-device shard's 15M rows take 59
        # instead of 117 MB (row selections widen to int64: ``Samples.owner``)
        self.user = inter.user_of()
        if inter.n_users <= np.iinfo(np.int32).max:
            self.user = self.user.astype(np.int32)
        ids = np.arange(inter.n_users) if device_ids is None else np.asarray(device_ids)
        self.device_ids = ids.astype(np.uint64)
        self.seen = SeenPairs(self.user, inter.items, inter.n_users, inter.n_items)
        self._cdf = None
        if item_weights is not None:
            w = np.asarray(item_weights, dtype=np.float64)
            if w.shape != (inter.n_items,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"item_weights must be {inter.n_items} finite non-negative numbers, not all 0")
            self._cdf = np.cumsum(w) / w.sum()

    def _draw(self, h: np.ndarray) -> np.ndarray:
        """Item ids from uint64 hashes: uniform (h mod n_items), or by ``item_weights``
        (the top 53 bits as a uniform number in [0, 1), inverted through the weights' CDF)."""
        if self._cdf is None:
            return (h % np.uint64(self.inter.n_items)).astype(np.int64)
        u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), self.inter.n_items - 1).astype(np.int64)

    def windows_for(self, rows: np.ndarray) -> np.ndarray:
        """Window of the L items before each interaction row (left-padded with PAD)."""
        return self.windows_before(self.user[rows], rows)

    def windows_before(self, users: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The L items of each user before row ``ends`` (exclusive; may be one past the
        user's last row), left-padded with PAD."""
        start = self.inter.indptr[np.asarray(users, dtype=np.int64)]
        idx = np.asarray(ends, dtype=np.int64)[:, None] - self.L + np.arange(self.L)[None, :]
        valid = idx >= start[:, None]
        return np.where(valid, self.inter.items[np.clip(idx, 0, None)], PAD).astype(np.int64)

    def negatives(self, rows: np.ndarray, k: int, key: np.uint64, dtype: type = np.int64) -> np.ndarray:
        """k items per row that the row's user never interacted with (uniform or by
        ``item_weights``; a draw of a seen item is redrawn), as ``dtype``."""
        users = self.user[rows]
        pos = (rows - self.inter.indptr[users]).astype(np.uint64)
        row_key = mix64(mix64(self.device_ids[users] ^ key) + pos)
        slots = np.arange(k, dtype=np.uint64)[None, :]
        out = np.empty((len(rows), k), dtype=dtype)
        # First draws in blocks of rows, hashed in place: the work arrays stay in cache
        # (1.7x faster on a window of a million-device fleet than whole-array passes).
        per = max(1, NEGATIVES_BLOCK // max(k, 1))
        h = np.empty((min(per, len(rows)), k), dtype=np.uint64)
        tmp = np.empty_like(h)
        with np.errstate(over="ignore"):
            slot_add = slots * _GOLD
        bad_rows, bad_cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for b in range(0, len(rows), per):
            n = min(per, len(rows) - b)
            with np.errstate(over="ignore"):
                np.add(row_key[b : b + n, None], slot_add, out=h[:n])
            out[b : b + n] = self._draw(mix64_inplace(h[:n], tmp[:n]))
            at = np.flatnonzero(self.seen.contains(users[b : b + n, None], out[b : b + n]))  # 1-D: ~3x np.nonzero's speed
            bad_rows.append(at // k + b)
            bad_cols.append(at % k)
        bad_r, bad_c = np.concatenate(bad_rows), np.concatenate(bad_cols)
        for attempt in range(1, 256):
            if not bad_r.size:
                break
            h = mix64(row_key[bad_r] + slots[0, bad_c] * _GOLD + np.uint64(attempt << 32))
            draw = self._draw(h)
            out[bad_r, bad_c] = draw
            still = self.seen.contains(users[bad_r], draw)
            bad_r, bad_c = bad_r[still], bad_c[still]
        if bad_r.size:  # never silently a seen item as a negative
            u = int(self.device_ids[users[bad_r[0]]])
            raise DataError(f"user {u}: no unseen item drawn as a negative in 256 attempts "
                             "(the user has seen (nearly) every item that can be drawn)")
        return out

    def build(self, rows: np.ndarray, negatives: int, key: np.uint64, dtype: type = np.int64) -> Samples:
        """Samples for the given interaction rows (global row indices of the shard), with
        item ids (windows, candidates) as ``dtype``."""
        rows = np.asarray(rows, dtype=np.int64)
        cands = np.empty((len(rows), 1 + negatives), dtype=dtype)
        cands[:, 0] = self.inter.items[rows]
        cands[:, 1:] = self.negatives(rows, negatives, key, dtype)
        return Samples(self.user[rows].astype(np.int64), self.windows_for(rows).astype(dtype, copy=False), cands)

    # Row selections --------------------------------------------------------------

    def rows_between(self, users: np.ndarray, t0: float, t1: float) -> np.ndarray:
        """Rows of ``users`` with t0 <= time < t1 (grouped by user, time-ordered)."""
        mask = (self.inter.times >= t0) & (self.inter.times < t1)
        mask &= np.isin(self.user, users)
        return np.flatnonzero(mask)

    def recent_rows(self, users: np.ndarray, t_end: float, recent: int) -> np.ndarray:
        """The last ``recent`` rows before t_end of each user, skipping each user's first
        interaction (it has no window to learn from)."""
        indptr, times = self.inter.indptr, self.inter.times
        out = []
        for u in np.asarray(users, dtype=np.int64):
            s, e = indptr[u], indptr[u + 1]
            hi = s + np.searchsorted(times[s:e], t_end, side="left")
            lo = max(s + 1, hi - recent)
            if hi > lo:
                out.append(np.arange(lo, hi))
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def pad_by_owner(samples: Samples, order: np.ndarray) -> tuple[np.ndarray, ...]:
    """Group samples per owner into padded arrays following ``order`` (owner ids).

    Returns windows (B, N, L), candidates (B, N, C), weight (B, N) with 0 on padding, and
    the per-owner sample counts; B = len(order), N = the largest count.
    """
    pos = {int(u): i for i, u in enumerate(order)}
    slot = np.fromiter((pos[int(u)] for u in samples.owner), dtype=np.int64, count=len(samples))
    counts = np.bincount(slot, minlength=len(order))
    n = max(int(counts.max()) if len(counts) else 0, 1)
    first = np.zeros(len(order), np.int64)
    srt = np.argsort(slot, kind="stable")
    first[1:] = np.cumsum(counts)[:-1]
    rank = np.arange(len(samples)) - first[slot[srt]]
    L, C = samples.windows.shape[1], samples.candidates.shape[1]
    win = np.full((len(order), n, L), PAD, np.int64)
    cand = np.zeros((len(order), n, C), np.int64)
    weight = np.zeros((len(order), n), np.float32)
    win[slot[srt], rank] = samples.windows[srt]
    cand[slot[srt], rank] = samples.candidates[srt]
    weight[slot[srt], rank] = 1.0
    return win, cand, weight, counts
