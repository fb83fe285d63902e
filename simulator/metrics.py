"""Fleet metrics: the one place where evaluation numbers are computed.

Evaluation setting (METHODS.md, "Evaluation protocol"): in each round every evaluated
device scores each of its positives (its real next interactions) against sampled
negatives. A batch arrives as ``scores`` of shape ``(n_pos_total, C)`` -- column 0 is the
positive's logit, columns ``1..C-1`` are that positive's negatives -- plus ``owner``, the
device index of each row (rows need not be grouped by device).

What lives here:

- ``device_metrics``: per-device AUC, HR@10, NDCG@10, logloss and counts for one batch,
  vectorised over devices (one integer sort, no loop over devices).
- ``ScoreHistogram``: a mergeable fixed-bin histogram of positive / negative logits, for
  the pooled (overall) AUC of a whole run without keeping the scores.
- ``activity_buckets``: head / torso / tail split of users by history length.
- ``user_auc``, ``summarize``, ``per_round``: run-level tables and the JSON summary built
  from the per-device-round records.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

TOP_K = 10
BUCKETS = ("head", "torso", "tail")
# Largest number of candidates whose factors (1 + e^-|x|) <= 2 are multiplied together
# before one log: 2**512 is far below the float64 maximum (~2**1024).
_PROD_CHUNK = 512


# ---------------------------------------------------------------------------------------
# Per-device metrics of one batch
# ---------------------------------------------------------------------------------------


def _order_codes(scores: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative int64 codes below ``2**bits`` that preserve the order and ties of ``scores``.

    Floats are mapped to their order-preserving unsigned bit pattern. Scores that are
    exact float32 values (what the device models emit) use the 32-bit pattern as is.
    Other float64 scores are truncated to their top ``bits`` bits, which is exact unless
    two distinct values share those bits; a sort checks that, and only then do we pay for
    exact dense ranks (an argsort, ~10x slower).
    """
    s = np.asarray(scores)
    if s.dtype != np.float32 and bits >= 32:
        s32 = s.astype(np.float32)
        if np.array_equal(s32, s):
            s = s32
    if s.dtype == np.float32 and bits >= 32:
        i32 = (s + np.float32(0.0)).view(np.int32)  # -0.0 -> +0.0: they must tie, as in sklearn
        # flipping the magnitude bits of negative floats makes int32 order equal float order
        i32 ^= (i32 >> 31) & np.int32(0x7FFFFFFF)
        codes = i32.astype(np.int64)
        codes += 1 << 31
        return codes
    u = (s.astype(np.float64) + 0.0).view(np.uint64)
    u = np.where(u >> np.uint64(63), ~u, u | np.uint64(1 << 63))
    shift = np.uint64(64 - bits)
    srt = np.sort(u, axis=None)
    hi = srt >> shift
    if np.any((hi[1:] == hi[:-1]) & (srt[1:] != srt[:-1])):
        if srt.size > 2**bits:
            raise ValueError(f"too many scores ({srt.size}) for {bits}-bit rank codes")
        _, inverse = np.unique(u.ravel(), return_inverse=True)
        return inverse.reshape(u.shape).astype(np.int64)
    return (u >> shift).astype(np.int64)


def _softplus_row_sums(x: np.ndarray) -> np.ndarray:
    """Row sums of ``log(1 + e^x)`` for a 2-D array, stable for any logit.

    ``softplus(x) = max(x, 0) + log(1 + e^-|x|)``; the log terms of a row are summed as the
    log of a product of factors in (1, 2], which trades one ``log`` per element (the
    dominant cost on 10^8 candidates) for one per row and column chunk, and loses nothing
    beyond ~1e-16 per factor. Blocks of ~2**20 elements keep the float64 temporaries small
    instead of allocating several copies of a 10^8-element batch.
    """
    n, c = x.shape
    out = np.zeros(n)
    step = max(1, 2**20 // max(c, 1))
    for r in range(0, n, step):
        for k in range(0, c, _PROD_CHUNK):
            xc = np.asarray(x[r : r + step, k : k + _PROD_CHUNK], dtype=np.float64)
            f = np.exp(-np.abs(xc))
            f += 1.0
            out[r : r + step] += np.maximum(xc, 0.0).sum(axis=1) + np.log(f.prod(axis=1))
    return out


def device_metrics(scores: np.ndarray, owner: np.ndarray, n_devices: int) -> dict[str, np.ndarray]:
    """Per-device metrics of one evaluation batch.

    Args:
        scores: float array ``(n_pos_total, C)``; column 0 is a positive's logit, columns
            ``1..C-1`` are its own negatives' logits. Must not contain NaN.
        owner: int array ``(n_pos_total,)``, the device (``0..n_devices-1``) of each row.
        n_devices: number of devices; output arrays have this length.

    Returns:
        Dict of arrays of length ``n_devices`` (float metrics are NaN for a device with no
        rows; ``auc`` is also NaN when a device has no negatives):

        - ``auc``: ROC AUC of the device's pooled samples (its positives vs all of its
          negatives, across rows), ties counted 0.5 -- equal to ``sklearn`` 's
          ``roc_auc_score`` on those samples.
        - ``hr10`` / ``ndcg10``: mean over the device's positives of HR@10 / NDCG@10, where
          a positive's rank is the number of its own negatives scoring ``>=`` it
          (pessimistic ties: a constant model ranks every positive last).
        - ``logloss``: mean binary cross-entropy of ``sigmoid(score)`` over all of the
          device's candidates, computed from logits (no probability clipping).
        - ``n_pos`` / ``n_neg``: int64 counts of positives / negatives.

    Cost is dominated by one int64 sort of all ``n_pos_total * C`` candidates: about 0.2 s
    for 10^5 rows x 100 and 2-3 s for 10^6 x 100 float32 logits on two cores. float64
    logits that are not float32 values may need an exact rank fallback (several x slower).
    """
    scores = np.asarray(scores)
    owner = np.asarray(owner)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be 2-D (n_pos_total, C) with C >= 1, got shape {scores.shape}")
    n_rows, n_cand = scores.shape
    if owner.shape != (n_rows,):
        raise ValueError(f"owner must have shape ({n_rows},), got {owner.shape}")
    if n_rows and not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"owner must be integer device indices, got dtype {owner.dtype}")
    owner = owner.astype(np.int64, copy=False)
    if n_rows and (owner.min() < 0 or owner.max() >= n_devices):
        raise ValueError(f"owner values must lie in [0, {n_devices}), got [{owner.min()}, {owner.max()}]")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")

    n_pos = np.bincount(owner, minlength=n_devices).astype(np.int64)
    n_neg = n_pos * (n_cand - 1)
    has = n_pos > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        pos, neg = scores[:, :1], scores[:, 1:]
        rank = (neg >= pos).sum(axis=1)  # ties count against the positive
        hit = rank < TOP_K
        gain = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
        hr10 = np.bincount(owner, weights=hit, minlength=n_devices) / n_pos
        ndcg10 = np.bincount(owner, weights=gain, minlength=n_devices) / n_pos

        row_loss = _softplus_row_sums(-pos) + _softplus_row_sums(neg)
        logloss = np.bincount(owner, weights=row_loss, minlength=n_devices) / (n_pos * n_cand)

        auc = _pooled_auc(scores, owner, n_devices, n_pos) / (n_pos * n_neg).astype(np.float64)
    auc[n_neg == 0] = np.nan
    for a in (hr10, ndcg10, logloss):
        a[~has] = np.nan
    return {"auc": auc, "hr10": hr10, "ndcg10": ndcg10, "logloss": logloss, "n_pos": n_pos, "n_neg": n_neg}


def _pooled_auc(scores: np.ndarray, owner: np.ndarray, n_devices: int, n_pos: np.ndarray) -> np.ndarray:
    """Per-device Mann-Whitney U (positive-vs-negative pairs won, ties 0.5), not normalised.

    Every candidate gets one int64 key ``owner | score code | label``; a single sort of the
    keys groups each device's samples in score order, with a score's negatives just before
    its positives. For each positive, the negatives of its device below its tie run count
    1 and those inside the run count 0.5; both come from positions in the sorted keys, so
    there is no loop over devices and no per-sample rank array.
    """
    n_rows, n_cand = scores.shape
    if n_rows == 0 or n_cand == 1:
        return np.zeros(n_devices)
    owner_bits = max(1, int(n_devices - 1).bit_length())
    bits = 62 - owner_bits  # owner + code + label bit fit in a non-negative int64
    keys = _order_codes(scores, bits)
    keys <<= 1
    keys[:, 0] |= 1
    keys |= owner[:, None] << (bits + 1)
    keys = keys.ravel()
    keys.sort()

    # sorted positions of the positives; the uint8 cast keeps the label bit at 1/8 the memory
    pos_at = np.flatnonzero(keys.astype(np.uint8) & 1)
    run_start = np.searchsorted(keys, keys[pos_at] - 1, side="left")
    # negatives before sorted position i = i - positives before i
    neg_before_pos = pos_at - np.arange(pos_at.size)
    neg_before_run = run_start - np.searchsorted(pos_at, run_start, side="left")
    pos_owner = keys[pos_at] >> (bits + 1)
    # lower-numbered devices' negatives all sort before this device's block
    neg_offset = (n_cand - 1) * (np.cumsum(n_pos) - n_pos)
    below = neg_before_run - neg_offset[pos_owner]
    tied = neg_before_pos - neg_before_run
    return np.bincount(pos_owner, weights=below + 0.5 * tied, minlength=n_devices)


# ---------------------------------------------------------------------------------------
# Pooled AUC over a whole run
# ---------------------------------------------------------------------------------------


class ScoreHistogram:
    """Mergeable fixed-bin histogram of positive and negative logits, for a pooled AUC.

    Logits are clipped to ``[lo, hi]`` (default ``[-30, 30]``, where ``sigmoid`` is within
    1e-13 of 0 or 1) and counted in ``n_bins`` equal bins (default ``2**16``, width
    ~9.2e-4). ``auc()`` is the exact Mann-Whitney AUC of the binned scores: pairs in
    different bins are ordered correctly, pairs sharing a bin count 0.5.

    Error bound: only positive-negative pairs sharing a bin can be mis-scored, each by at
    most 0.5, so ``|auc() - exact AUC| <= auc_error_bound() = 0.5 * sum_b pos_b * neg_b /
    (P * N)``. That is 0 when no bin holds both a positive and a negative (the result is
    then exact, ties included), and is about ``0.5 * width * integral(f_pos * f_neg)`` for
    continuous score densities -- below 1e-3 for densities under ~2 per logit unit.
    """

    def __init__(self, n_bins: int = 2**16, lo: float = -30.0, hi: float = 30.0) -> None:
        if n_bins < 1 or not hi > lo:
            raise ValueError(f"need n_bins >= 1 and hi > lo, got n_bins={n_bins}, lo={lo}, hi={hi}")
        self.n_bins, self.lo, self.hi = int(n_bins), float(lo), float(hi)
        self.pos = np.zeros(self.n_bins, dtype=np.int64)
        self.neg = np.zeros(self.n_bins, dtype=np.int64)

    def _count(self, x: np.ndarray) -> np.ndarray:
        """Bin counts of the scores in ``x``; blocks of 2**20 keep the temporaries small."""
        x = np.asarray(x).ravel()
        counts = np.zeros(self.n_bins, dtype=np.int64)
        scale = self.n_bins / (self.hi - self.lo)
        for k in range(0, x.size, 2**20):
            b = x[k : k + 2**20].astype(np.float64)
            if np.isnan(b).any():
                raise ValueError("scores contain NaN")
            b -= self.lo
            b *= scale
            # clipping the bin coordinate clips the logit to [lo, hi]; hi lands in the last bin
            np.clip(b, 0, self.n_bins - 1, out=b)
            counts += np.bincount(b.astype(np.intp), minlength=self.n_bins)
        return counts

    def add(self, scores: np.ndarray) -> None:
        """Add a ``(n, C)`` score matrix: column 0 positives, other columns negatives."""
        scores = np.asarray(scores)
        if scores.ndim != 2:
            raise ValueError(f"scores must be 2-D (n, C), got shape {scores.shape}")
        self.pos += self._count(scores[:, 0])
        self.neg += self._count(scores[:, 1:])

    def add_labeled(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add 1-D scores with 0/1 (or boolean) labels."""
        scores, labels = np.asarray(scores).ravel(), np.asarray(labels).ravel().astype(bool)
        if scores.shape != labels.shape:
            raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
        self.pos += self._count(scores[labels])
        self.neg += self._count(scores[~labels])

    def merge(self, other: ScoreHistogram) -> ScoreHistogram:
        """A new histogram holding both sets of counts; binning must match."""
        if (self.n_bins, self.lo, self.hi) != (other.n_bins, other.lo, other.hi):
            raise ValueError(
                f"cannot merge histograms with different bins: {(self.n_bins, self.lo, self.hi)} "
                f"vs {(other.n_bins, other.lo, other.hi)}"
            )
        out = ScoreHistogram(self.n_bins, self.lo, self.hi)
        out.pos, out.neg = self.pos + other.pos, self.neg + other.neg
        return out

    __add__ = merge

    @property
    def n_pos(self) -> int:
        """Number of positives counted."""
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        """Number of negatives counted."""
        return int(self.neg.sum())

    def auc(self) -> float:
        """Pooled AUC of the binned scores (ties within a bin 0.5); NaN if a class is empty."""
        p, n = float(self.n_pos), float(self.n_neg)
        if p == 0 or n == 0:
            return math.nan
        neg_below = np.cumsum(self.neg) - self.neg
        won = np.dot(self.pos.astype(np.float64), neg_below + 0.5 * self.neg)
        return float(won / (p * n))

    def auc_error_bound(self) -> float:
        """Upper bound on ``|auc() - exact AUC|`` from pairs sharing a bin; NaN if a class is empty."""
        p, n = float(self.n_pos), float(self.n_neg)
        if p == 0 or n == 0:
            return math.nan
        return float(0.5 * np.dot(self.pos.astype(np.float64), self.neg) / (p * n))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; only non-empty bins are stored (most of the 2**16 are empty)."""
        ip, ineg = np.flatnonzero(self.pos), np.flatnonzero(self.neg)
        return {
            "n_bins": self.n_bins,
            "lo": self.lo,
            "hi": self.hi,
            "pos_bins": ip.tolist(),
            "pos_counts": self.pos[ip].tolist(),
            "neg_bins": ineg.tolist(),
            "neg_counts": self.neg[ineg].tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreHistogram:
        """Inverse of ``to_dict``."""
        h = cls(d["n_bins"], d["lo"], d["hi"])
        h.pos[np.asarray(d["pos_bins"], dtype=np.int64)] = np.asarray(d["pos_counts"], dtype=np.int64)
        h.neg[np.asarray(d["neg_bins"], dtype=np.int64)] = np.asarray(d["neg_counts"], dtype=np.int64)
        return h

    def __repr__(self) -> str:
        return f"ScoreHistogram(n_bins={self.n_bins}, lo={self.lo}, hi={self.hi}, n_pos={self.n_pos}, n_neg={self.n_neg})"


# ---------------------------------------------------------------------------------------
# Activity buckets
# ---------------------------------------------------------------------------------------


def activity_buckets(history_counts: np.ndarray) -> tuple[np.ndarray, dict[str, int | None]]:
    """Split users into head / torso / tail by number of history interactions.

    Users are ranked by count, descending, ties broken by lower user index first; the top
    ``round(0.2 n)`` are head, the bottom ``round(0.5 n)`` tail and the rest torso (Python
    ``round``, so halves go to the even number: n = 5 gives 1 / 2 / 2).

    Returns:
        ``labels``: str array of length n (``'head'``, ``'torso'`` or ``'tail'``) indexed by
        user; ``thresholds``: ``head_min_interactions``, ``torso_min_interactions``,
        ``tail_max_interactions`` (None when that bucket is empty) and
        ``head_users``, ``torso_users``, ``tail_users``.
    """
    counts = np.asarray(history_counts)
    if counts.ndim != 1:
        raise ValueError(f"history_counts must be 1-D, got shape {counts.shape}")
    n = counts.size
    n_head, n_tail = round(n * 0.2), round(n * 0.5)
    n_torso = n - n_head - n_tail
    order = np.lexsort((np.arange(n), -counts.astype(np.int64)))
    labels = np.full(n, "torso", dtype="<U5")
    labels[order[:n_head]] = "head"
    labels[order[n - n_tail :]] = "tail"

    def edge(idx: np.ndarray, fn: Any) -> int | None:
        return int(fn(counts[idx])) if idx.size else None

    thresholds = {
        "head_min_interactions": edge(order[:n_head], np.min),
        "torso_min_interactions": edge(order[n_head : n - n_tail], np.min),
        "tail_max_interactions": edge(order[n - n_tail :], np.max),
        "head_users": int(n_head),
        "torso_users": int(n_torso),
        "tail_users": int(n_tail),
    }
    return labels, thresholds


# ---------------------------------------------------------------------------------------
# Run-level tables and summary
# ---------------------------------------------------------------------------------------


def user_auc(records: pd.DataFrame) -> pd.DataFrame:
    """Run-level AUC of each user from its per-round AUCs.

    A user's AUC is the mean of its per-round AUCs weighted by ``n_pos * n_neg``, i.e. the
    exact AUC over all within-round (positive, negative) pairs -- negatives of one round
    are never compared with positives of another, which would mix models. Rounds with an
    undefined AUC carry no pairs.

    Args:
        records: one row per device and round with ``device_id, auc, n_pos, n_neg``.

    Returns:
        DataFrame sorted by ``device_id`` with ``device_id, auc`` (NaN when the user has no
        pair in any round) and ``n_pos`` (total over rounds).
    """
    auc = records["auc"].to_numpy(dtype=np.float64)
    pairs = records["n_pos"].to_numpy(dtype=np.float64) * records["n_neg"].to_numpy(dtype=np.float64)
    ok = np.isfinite(auc) & (pairs > 0)
    w = np.where(ok, pairs, 0.0)
    t = pd.DataFrame(
        {
            "device_id": records["device_id"].to_numpy(),
            "won": np.where(ok, auc, 0.0) * w,
            "pairs": w,
            "n_pos": records["n_pos"].to_numpy(dtype=np.int64),
        }
    )
    g = t.groupby("device_id", sort=True).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.where(g["pairs"] > 0, g["won"] / g["pairs"], np.nan)
    return pd.DataFrame({"device_id": g.index.to_numpy(), "auc": u, "n_pos": g["n_pos"].to_numpy()})


def _json_num(x: Any) -> float | int | None:
    """Plain Python number for JSON; NaN/inf and None become None."""
    if x is None:
        return None
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def _weighted_mean(values: pd.Series, weights: pd.Series) -> float:
    """Mean of finite values weighted by positive weights; NaN if there are none."""
    v, w = values.to_numpy(dtype=np.float64), weights.to_numpy(dtype=np.float64)
    ok = np.isfinite(v) & (w > 0)
    return float(np.dot(v[ok], w[ok]) / w[ok].sum()) if ok.any() else math.nan


def _user_auc_stats(auc: np.ndarray) -> dict[str, float | int | None]:
    """UAUC and spread of per-user AUCs (users with an undefined AUC left out)."""
    a = np.sort(auc[np.isfinite(auc)])
    if a.size == 0:
        none = {k: None for k in ("uauc", "user_auc_p10", "user_auc_p50", "user_auc_p90", "user_auc_worst10")}
        return {**none, "n_users_auc": 0}
    p10, p50, p90 = np.percentile(a, [10, 50, 90])
    worst = a[: (a.size + 9) // 10]  # ceil(10 %) of users, at least one
    return {
        "uauc": _json_num(a.mean()),
        "user_auc_p10": _json_num(p10),
        "user_auc_p50": _json_num(p50),
        "user_auc_p90": _json_num(p90),
        "user_auc_worst10": _json_num(worst.mean()),
        "n_users_auc": int(a.size),
    }


def summarize(
    records: pd.DataFrame,
    overall_auc: float,
    buckets: pd.Series | dict | None = None,
    thresholds: dict | None = None,
) -> dict[str, Any]:
    """JSON-ready fleet summary of a run from its per-device-round records.

    Args:
        records: one row per device and round with ``device_id, round, auc, ndcg10, hr10,
            logloss, n_pos, n_neg`` and (unless ``buckets`` is given) ``bucket``.
        overall_auc: pooled AUC of all samples (e.g. ``ScoreHistogram.auc()``).
        buckets: device_id -> bucket label; overrides the ``bucket`` column.
        thresholds: the ``activity_buckets`` thresholds, copied as ``bucket_thresholds``.

    Returns:
        Plain floats / ints (NaN -> None): ``overall_auc``; per-user AUC stats from
        ``user_auc`` -- ``uauc`` (unweighted mean over users with a defined AUC),
        ``user_auc_p10/p50/p90`` (linear-interpolated percentiles), ``user_auc_worst10``
        (mean of the worst ceil(10 %) of users), ``n_users_auc``; ``ndcg10``, ``hr10``
        (means over all positives), ``logloss`` (mean over all candidates);
        ``n_users_evaluated`` (users with at least one positive), ``n_positives``;
        ``by_bucket`` with, per bucket, the same user-AUC stats plus ``ndcg10``, ``hr10``,
        ``n_users`` (users with a positive) and ``n_positives``; ``bucket_thresholds``.
    """
    ua = user_auc(records)
    out: dict[str, Any] = {"overall_auc": _json_num(overall_auc), **_user_auc_stats(ua["auc"].to_numpy())}
    out["ndcg10"] = _json_num(_weighted_mean(records["ndcg10"], records["n_pos"]))
    out["hr10"] = _json_num(_weighted_mean(records["hr10"], records["n_pos"]))
    out["logloss"] = _json_num(_weighted_mean(records["logloss"], records["n_pos"] + records["n_neg"]))
    out["n_users_evaluated"] = int((ua["n_pos"] > 0).sum())
    out["n_positives"] = int(records["n_pos"].sum())

    if buckets is not None:
        label = pd.Series(buckets)
    elif "bucket" in records.columns:
        per = records.groupby("device_id")["bucket"]
        if (per.nunique() > 1).any():
            raise ValueError("records give some device more than one bucket")
        label = per.first()
    else:
        label = None
    if label is not None:
        rec_bucket = records["device_id"].map(label)
        user_bucket = ua["device_id"].map(label)
        out["by_bucket"] = {}
        for b in [*BUCKETS, *sorted(set(label.dropna().astype(str)) - set(BUCKETS))]:
            r, u = records[rec_bucket == b], ua[user_bucket == b]
            out["by_bucket"][b] = {
                **_user_auc_stats(u["auc"].to_numpy()),
                "ndcg10": _json_num(_weighted_mean(r["ndcg10"], r["n_pos"])),
                "hr10": _json_num(_weighted_mean(r["hr10"], r["n_pos"])),
                "n_users": int((u["n_pos"] > 0).sum()),
                "n_positives": int(r["n_pos"].sum()),
            }
    if thresholds is not None:
        out["bucket_thresholds"] = {k: _json_num(v) for k, v in thresholds.items()}
    return out


def per_round(records: pd.DataFrame) -> pd.DataFrame:
    """Per-round fleet curve: ``round, uauc, ndcg10, hr10, logloss, n_devices, n_pos``.

    ``uauc`` is the mean of that round's per-device AUCs (defined ones only); ``ndcg10`` /
    ``hr10`` are means over the round's positives and ``logloss`` over its candidates;
    ``n_devices`` counts devices with at least one positive.
    """
    rows = []
    for rnd, r in records.groupby("round", sort=True):
        rows.append(
            {
                "round": rnd,
                "uauc": float(r["auc"].mean()) if r["auc"].notna().any() else math.nan,
                "ndcg10": _weighted_mean(r["ndcg10"], r["n_pos"]),
                "hr10": _weighted_mean(r["hr10"], r["n_pos"]),
                "logloss": _weighted_mean(r["logloss"], r["n_pos"] + r["n_neg"]),
                "n_devices": int((r["n_pos"] > 0).sum()),
                "n_pos": int(r["n_pos"].sum()),
            }
        )
    cols = ["round", "uauc", "ndcg10", "hr10", "logloss", "n_devices", "n_pos"]
    return pd.DataFrame(rows, columns=cols)


def run_summary(records: pd.DataFrame, overall_auc: float, thresholds: dict | None = None) -> dict[str, Any]:
    """``summarize`` plus the costs, error counts and per-round curve of one strategy's
    per-device-round records (what ``summary.json`` holds besides time and status)."""
    df = records
    out = summarize(df, overall_auc=overall_auc, thresholds=thresholds) if len(df) else {"overall_auc": None}
    sel = df[df["selected"]] if len(df) else df
    n_sel = max(int(len(sel)), 1)
    col = lambda k, dtype=float: df[k] if k in df else pd.Series([], dtype=dtype)
    out.update(
        bytes_down=int(col("bytes_down").sum()), bytes_up=int(col("bytes_up").sum()),
        mb_down_per_device_round=float(col("bytes_down").sum()) / n_sel / 1e6,
        mb_up_per_device_round=float(col("bytes_up").sum()) / n_sel / 1e6,
        device_flops=float(col("device_flops").sum()),
        gflops_per_device_round=float(col("device_flops").sum()) / n_sel / 1e9,
        device_seconds=float(col("device_seconds").sum()),
        selected_device_rounds=int(len(sel)),
        status_counts={k: int(v) for k, v in sel["status"].value_counts().items()} if len(sel) else {},
        nonfinite_score_device_rounds=int(col("nonfinite", bool).sum()),
        per_round=per_round(df).to_dict(orient="records") if len(df) else [],
    )
    return out
