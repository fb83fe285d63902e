"""Run-level fleet metrics, built from the per-device-round records.

Evaluation setting: in each round every evaluated device scores each of its positives
(its real next interactions) against sampled negatives; ``devices.scoring`` turns a
batch of such scores into per-device AUC, HR@10, NDCG@10 and logloss (re-exported here as
``device_metrics``, with the pooled ``ScoreHistogram``).

What lives here:

- ``activity_buckets``: head / torso / tail split of users by history length.
- ``user_auc``, ``summarize``, ``per_round``, ``run_summary``: run-level tables and the
  JSON summary built from the per-device-round records.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

# Device scoring lives below the coordinator, with the hosts that use it; re-exported here.
from devices.scoring import METRICS, POOLED_METRICS, TOP_K, ScoreHistogram, device_metrics, pooling_weights  # noqa: F401

BUCKETS = ("head", "torso", "tail")


# ---------------------------------------------------------------------------------------
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
        (mean of the worst ceil(10 %) of users), ``n_users_auc``; each of
        ``devices.scoring.POOLED_METRICS`` pooled as ``METRICS`` says (``ndcg10``, ``hr10``
        over all positives, ``logloss`` over all candidates);
        ``n_users_evaluated`` (users with at least one positive), ``n_positives``;
        ``by_bucket`` with, per bucket, the same user-AUC stats and pooled metrics,
        ``n_users`` (users with a positive) and ``n_positives``; ``bucket_thresholds``.
    """
    ua = user_auc(records)
    out: dict[str, Any] = {"overall_auc": _json_num(overall_auc), **_user_auc_stats(ua["auc"].to_numpy())}
    for m in POOLED_METRICS:
        out[m] = _json_num(_weighted_mean(records[m], pooling_weights(records, m)))
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
                **{m: _json_num(_weighted_mean(r[m], pooling_weights(r, m))) for m in POOLED_METRICS},
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
                **{m: _weighted_mean(r[m], pooling_weights(r, m)) for m in POOLED_METRICS},
                "n_devices": int((r["n_pos"] > 0).sum()),
                "n_pos": int(r["n_pos"].sum()),
            }
        )
    cols = ["round", "uauc", *POOLED_METRICS, "n_devices", "n_pos"]
    return pd.DataFrame(rows, columns=cols)


def nonfinite_status(summary: dict[str, Any]) -> str | None:
    """What the summary table and the report show as the status of a strategy some of
    whose devices scored with a model that emits NaN/Inf (None if none did). Their metrics
    are NaN and left out of every mean, so the strategy's means cover the rest only."""
    n = summary.get("nonfinite_score_device_rounds") or 0
    return f"NaN scores ({n} device-rounds)" if n else None


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
