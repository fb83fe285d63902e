"""Device-side scoring: per-device ranking metrics of one evaluation batch, and a
mergeable histogram of logits for a pooled AUC.

This is what a host computes when it scores its devices (prequential evaluation) or when
a device reports federated-evaluation metrics. Run-level summaries built from these
per-device numbers live in ``simulator.metrics``.

A batch arrives as ``scores`` of shape ``(n_pos_total, C)`` -- column 0 is the
positive's logit, columns ``1..C-1`` are that positive's negatives -- plus ``owner``, the
device index of each row (rows need not be grouped by device).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

TOP_K = 10
# The per-device metrics every scoring pass gives, in the order of devices.parquet's
# columns, with their display label and how a fleet pools them over devices:
#   "users"      -- unweighted mean over users with a defined value (UAUC from per-user AUC);
#   "positives"  -- mean over all positives (weights n_pos);
#   "candidates" -- mean over all scored candidates (weights n_pos + n_neg).
# Hosts, the grid, federated evaluation, run summaries, the report's tables and the paper
# protocol all read this one list; a new metric is added here and in ``device_metrics``.
METRICS = {  # key: (label, pooling)
    "auc": ("AUC", "users"),
    "ndcg10": (f"NDCG@{TOP_K}", "positives"),
    "hr10": (f"HR@{TOP_K}", "positives"),
    "logloss": ("log loss", "candidates"),
}
DEVICE_METRICS = tuple(METRICS)
# The metrics pooled by weighting (every metric but the per-user AUC), in column order.
POOLED_METRICS = tuple(k for k, (_, pooling) in METRICS.items() if pooling != "users")


def pooling_weights(records, metric: str):
    """The weights that pool ``metric`` over rows of ``records`` (``n_pos`` / ``n_neg`` columns)."""
    pooling = METRICS[metric][1]
    if pooling == "positives":
        return records["n_pos"]
    if pooling == "candidates":
        return records["n_pos"] + records["n_neg"]
    raise ValueError(f"{metric} is pooled per user, not by weights")
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
        above = (neg > pos).sum(axis=1)  # rank - above: the ties (with rank, a one-row device's U)
        hit = rank < TOP_K
        gain = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
        hr10 = np.bincount(owner, weights=hit, minlength=n_devices) / n_pos
        ndcg10 = np.bincount(owner, weights=gain, minlength=n_devices) / n_pos

        row_loss = _softplus_row_sums(-pos) + _softplus_row_sums(neg)
        logloss = np.bincount(owner, weights=row_loss, minlength=n_devices) / (n_pos * n_cand)

        auc = _pooled_auc(scores, owner, n_devices, n_pos, (rank, above)) / (n_pos * n_neg).astype(np.float64)
    auc[n_neg == 0] = np.nan
    for a in (hr10, ndcg10, logloss):
        a[~has] = np.nan
    return {"auc": auc, "hr10": hr10, "ndcg10": ndcg10, "logloss": logloss, "n_pos": n_pos, "n_neg": n_neg}


# Devices with at most this many rows get their U by comparing every positive with every
# negative of theirs (k^2 (C-1) comparisons, no sort); the others by one sort.
_PAIRWISE_MAX_ROWS = 16
_PAIRWISE_CELLS = 1 << 22  # comparisons per block


def _pooled_auc(scores: np.ndarray, owner: np.ndarray, n_devices: int, n_pos: np.ndarray,
                counts: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Per-device Mann-Whitney U (positive-vs-negative pairs won, ties 0.5), not normalised.

    Devices with few rows (most of a large fleet's, in one window) are counted directly:
    their rows, grouped by device and by row count k, compare each positive with the
    device's k (C - 1) negatives. The rest go through ``_pooled_auc_sorted``. Both count
    exactly the same pairs, so the result does not depend on the split.

    ``counts``: each row's negatives ``>=`` and ``>`` its positive, if the caller has them;
    a device with one row then takes its U from them without comparing again.
    """
    n_rows, n_cand = scores.shape
    if n_rows == 0 or n_cand == 1:
        return np.zeros(n_devices)
    k_row = n_pos[owner]
    small = k_row <= _PAIRWISE_MAX_ROWS
    u = np.zeros(n_devices)
    if counts is not None:
        one = k_row == 1
        ge, gt = counts[0][one], counts[1][one]
        u[owner[one]] = (n_cand - 1 - ge) + 0.5 * (ge - gt)
        small &= ~one
    if small.any():
        rows = np.flatnonzero(small)
        rows = rows[np.argsort(owner[rows], kind="stable")]  # each device's rows together
        k_of = k_row[rows]
        for k in np.unique(k_of):
            r = rows[k_of == k]  # B devices x k rows, device by device
            k = int(k)
            per = max(1, _PAIRWISE_CELLS // (k * k * (n_cand - 1)))  # devices per block
            for b in range(0, len(r), per * k):
                block = scores[r[b : b + per * k]]
                pos = block[:, :1].reshape(-1, k, 1)
                neg = block[:, 1:].reshape(-1, 1, k * (n_cand - 1))
                won = (neg < pos).sum(axis=(1, 2)) + 0.5 * (neg == pos).sum(axis=(1, 2))
                u[owner[r[b : b + per * k : k]]] = won
    big = k_row > _PAIRWISE_MAX_ROWS
    if big.any():
        u += _pooled_auc_sorted(scores[big], owner[big], n_devices, np.where(n_pos > _PAIRWISE_MAX_ROWS, n_pos, 0))
    return u


def _pooled_auc_sorted(scores: np.ndarray, owner: np.ndarray, n_devices: int, n_pos: np.ndarray) -> np.ndarray:
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
        pos = self._count(scores[:, 0])
        self.pos += pos
        # every score, minus the positives: a contiguous matrix is counted without copying
        # its negatives out first (16M scores a host per round at 1M devices)
        self.neg += self._count(scores) - pos if scores.flags.c_contiguous else self._count(scores[:, 1:])

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
