"""Report statistics (pure functions): bootstrap confidence intervals over users, the pairing
of two strategies' users, a running median and per-round pair AUCs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from simulator import metrics

N_BOOT = 1000
LEVEL = 0.95
# Below this many values a percentile bootstrap interval says nothing: with 1 value it is
# that value, with 2 of the same sign it never holds 0. No difference over fewer users is
# called significant (the report says why).
MIN_SIGNIFICANT_N = 10

# ---------------------------------------------------------------------------------------
# Statistics (pure functions)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanCI:
    """A mean with a percentile bootstrap confidence interval over ``n`` values."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (a difference that is not noise at this level),
        over at least ``MIN_SIGNIFICANT_N`` values."""
        return self.n >= MIN_SIGNIFICANT_N and (self.lo > 0 or self.hi < 0)


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL,
                      seed: int = 0) -> MeanCI:
    """Mean of ``values`` and its percentile bootstrap CI (resampling values with replacement):
    ``scipy.stats.bootstrap`` with ``method="percentile"``.

    NaNs are dropped first. The generator is ``numpy.random.default_rng(seed)``, so the
    interval is reproducible. With no value everything is NaN; with one value the
    interval is that value.

    Cost is ``n_boot * n`` draws, done in batches of about 2**23 so memory stays small
    (100,000 values x 1,000 resamples take ~0.5 s).
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, mean, mean, 1)
    ci = bootstrap((x,), np.mean, n_resamples=n_boot, batch=max(1, 2**23 // n), vectorized=True,
                   confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    return MeanCI(mean, float(ci.confidence_interval.low), float(ci.confidence_interval.high), n)


def paired_user_diff(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Pair two strategies' per-user AUCs over the same users.

    Args:
        a, b: ``metrics.user_auc`` tables (``device_id, auc``) of the strategy and the
            baseline.

    Returns:
        ``device_id, auc_a, auc_b, diff`` (``auc_a - auc_b``), sorted by ``device_id``,
        for the users present in both tables with a defined AUC in both; users seen by
        only one strategy (another device subset) are left out.
    """
    m = a[["device_id", "auc"]].merge(b[["device_id", "auc"]], on="device_id", how="inner", suffixes=("_a", "_b"))
    m = m[np.isfinite(m["auc_a"].to_numpy(dtype=float)) & np.isfinite(m["auc_b"].to_numpy(dtype=float))]
    m = m.sort_values("device_id", kind="stable").reset_index(drop=True)
    m["diff"] = m["auc_a"] - m["auc_b"]
    return m


@dataclass(frozen=True)
class PairedComparison:
    """A strategy against the baseline over the users both evaluated."""

    diff: MeanCI  # mean per-user AUC difference (strategy - baseline) and its bootstrap CI
    frac_gain: float  # fraction of paired users whose AUC is higher under the strategy
    frac_loss: float  # ... lower under the strategy (the rest tie)

    @property
    def n_users(self) -> int:
        return self.diff.n


def paired_comparison(a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int = N_BOOT, level: float = LEVEL,
                      seed: int = 0) -> PairedComparison:
    """Paired comparison of per-user AUCs ``a`` (strategy) and ``b`` (baseline).

    The mean difference is over users present in both (``paired_user_diff``), its CI a
    percentile bootstrap over those users (``bootstrap_mean_ci``).
    """
    d = paired_user_diff(a, b)["diff"].to_numpy()
    ci = bootstrap_mean_ci(d, n_boot=n_boot, level=level, seed=seed)
    n = max(d.size, 1)
    return PairedComparison(ci, float((d > 0).sum() / n) if d.size else math.nan,
                            float((d < 0).sum() / n) if d.size else math.nan)


def running_median(x: np.ndarray, y: np.ndarray, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Running median of ``y`` along ``x``: points sorted by ``x``, a centred window of
    ``window`` points (default ``max(15, n // 25)``), then one value per distinct ``x``
    (the mean of the medians at that ``x``, so ties in ``x`` give one point).

    Returns the distinct ``x`` values and the median there (empty arrays for no data).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0:
        return x, y
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    w = window or max(15, x.size // 25)
    med = pd.Series(y).rolling(w, center=True, min_periods=max(1, w // 2)).median().to_numpy()
    g = pd.DataFrame({"x": x, "m": med}).dropna().groupby("x", sort=True)["m"].mean()
    return g.index.to_numpy(), g.to_numpy()


def round_pair_auc(records: pd.DataFrame) -> pd.DataFrame:
    """Per-round AUC over all of the round's within-device (positive, negative) pairs.

    The pooled AUC (positives of one device against negatives of another) is only saved
    for the whole run; per round, this is what the saved records give: the per-device
    AUCs weighted by ``n_pos * n_neg``. It is ``metrics.user_auc`` with the round as the
    grouping key. Returns ``round, auc``.
    """
    by_round = metrics.user_auc(records.assign(device_id=records["round"].to_numpy()))
    return pd.DataFrame({"round": by_round["device_id"].to_numpy(), "auc": by_round["auc"].to_numpy()})
