"""Strategy comparison report: six figures, two tables and one self-contained HTML file.

``build_report(run_dirs, out)`` reads saved runs only (``simulator.results.load_run``) and
writes ``report.html`` (figures embedded as base64 data URIs, no external reference),
the figure PNGs, ``summary.csv`` (one row per strategy) and ``comparison.csv`` (each
strategy against the baseline, paired over users).

Where the numbers come from: run-level quality and cost figures are read from
``summary.json`` (computed by ``simulator.metrics.summarize`` during the run); per-user
AUCs are ``simulator.metrics.user_auc`` of the saved per-device records. This module adds
only statistics *about* those numbers: bootstrap confidence intervals over users
(``bootstrap_mean_ci``), the pairing of two strategies' users (``paired_user_diff``,
``paired_comparison``) and a running median (``running_median``) -- pure functions.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas (no pyplot,
so importing this module never changes a notebook's backend); each has a fixed size
(``FIGURES``) and each strategy keeps one colour in every figure (``strategy_colours``).
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from simulator import metrics
from simulator.errors import FleetsimError
from simulator.results import Run, load_run

DEFAULT_BASELINE = "cloud_only"
N_BOOT = 1000
LEVEL = 0.95
DPI = 100

# file name -> (title, width in inches, height in inches); PNGs are DPI pixels per inch
FIGURES: dict[str, tuple[str, float, float]] = {
    "fig1_rounds.png": ("Fleet quality per round", 13.0, 5.0),
    "fig2_user_auc_ecdf.png": ("Distribution of per-user AUC", 9.0, 5.5),
    "fig3_buckets.png": ("Long tail: quality per activity bucket", 13.0, 5.5),
    "fig4_user_gain.png": ("Per-user gain over the baseline", 13.0, 6.0),
    "fig5_cost_quality.png": ("Cost versus quality", 13.0, 5.0),
    "fig6_fleet.png": ("Fleet behaviour per round", 13.0, 7.0),
}

# The built-in strategies always get the same colour; others take the rest in order.
KNOWN_COLOURS = {"cloud_only": "#7f7f7f", "local_finetune": "#1f77b4", "fedavg": "#ff7f0e",
                 "duet": "#2ca02c", "metapatch": "#d62728", "momodistill": "#9467bd"}
EXTRA_COLOURS = ["#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
                 "#7b4173", "#3182bd", "#e6550d", "#31a354"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "h", "p"]


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
        """True when the interval excludes 0 (a difference that is not noise at this level)."""
        return self.n > 0 and (self.lo > 0 or self.hi < 0)


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL,
                      seed: int = 0) -> MeanCI:
    """Mean of ``values`` and its percentile bootstrap CI (resampling values with replacement).

    NaNs are dropped first. The generator is ``numpy.random.default_rng(seed)``, so the
    interval is reproducible. With no value everything is NaN; with one value the
    interval is that value.

    Cost is ``n_boot * n`` draws, done in blocks of about 2**23 so memory stays small
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
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    block = max(1, 2**23 // n)
    dtype = np.int32 if n < 2**31 else np.int64
    for k in range(0, n_boot, block):
        b = min(block, n_boot - k)
        means[k : k + b] = x[rng.integers(0, n, size=(b, n), dtype=dtype)].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return MeanCI(mean, float(lo), float(hi), n)


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


# ---------------------------------------------------------------------------------------
# What the report shows: one entry per strategy of a run
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Entry:
    """One strategy of one run as shown in the report."""

    label: str  # the strategy name, or "<run>/<strategy>" when runs share a name
    strategy: str
    run: Run
    colour: str = ""
    marker: str = "o"
    # earlier strategies are drawn wider, so a later one with the same curve leaves them visible
    linewidth: float = 1.8
    markersize: float = 5.0
    users: pd.DataFrame = field(default_factory=pd.DataFrame)  # device_id, auc, n_pos, bucket, history_interactions
    records: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def summary(self) -> dict[str, Any]:
        return self.run.summary["strategies"][self.strategy]

    @property
    def fleet_key(self) -> str:
        """Runs with the same data settings and seed have the same users (pairable)."""
        cfg = self.run.config
        return json.dumps([cfg.get("data"), cfg.get("experiment", {}).get("seed")], sort_keys=True)


def strategy_colours(strategies: Sequence[str]) -> list[str]:
    """A colour per entry (by strategy name, in report order): built-in strategies their
    fixed colour (first occurrence), everything else the unused palette colours in order."""
    used: set[str] = set()
    out: list[str | None] = []
    for s in strategies:
        c = KNOWN_COLOURS.get(s)
        out.append(c if c and c not in used else None)
        if c:
            used.add(c)
    spare = iter([c for c in EXTRA_COLOURS + list(KNOWN_COLOURS.values()) if c not in used])
    return [c if c else next(spare, "#000000") for c in out]


def _run_names(runs: Sequence[Run]) -> list[str]:
    names = [r.name for r in runs]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}#{seen[n]}")
    return out


def make_entries(runs: Sequence[Run]) -> list[Entry]:
    """Entries of every strategy of every run, in run order; a strategy name found in
    several runs is prefixed with its run's name."""
    run_names = _run_names(runs)
    pairs = [(rn, run, s) for rn, run in zip(run_names, runs) for s in run.strategies]
    counts = pd.Series([s for _, _, s in pairs]).value_counts()
    entries = [Entry(label=f"{rn}/{s}" if counts[s] > 1 else s, strategy=s, run=run) for rn, run, s in pairs]
    for e, c, m in zip(entries, strategy_colours([e.strategy for e in entries]),
                       MARKERS * (len(entries) // len(MARKERS) + 1)):
        e.colour, e.marker = c, m
    for i, e in enumerate(entries):
        e.linewidth, e.markersize = max(1.3, 3.2 - 0.6 * i), max(4.0, 8.0 - 1.3 * i)
    for run in runs:
        fd = run.fleet_devices[["device_id", "bucket", "history_interactions"]]
        for e in entries:
            if e.run is run:
                e.records = run.devices[run.devices["strategy"] == e.strategy] if len(run.devices) else run.devices
                if len(e.records):
                    e.users = metrics.user_auc(e.records).merge(fd, on="device_id", how="left")
                else:  # failed before its first round: in the summary table only
                    e.users = pd.DataFrame(columns=["device_id", "auc", "n_pos", "bucket", "history_interactions"])
    return entries


def pick_baseline(entries: Sequence[Entry], name: str | None) -> tuple[Entry, str]:
    """The baseline entry and a note on how it was chosen.

    ``name`` matches a label first, then a strategy name (first run holding it). Without
    a name: ``cloud_only`` if present, else the first strategy.
    """
    if name is not None:
        for match in ([e for e in entries if e.label == name], [e for e in entries if e.strategy == name]):
            if match:
                return match[0], f"baseline {match[0].label} (--baseline {name})"
        known = ", ".join(e.label for e in entries)
        raise FleetsimError(f"--baseline {name}: no such strategy in the runs (strategies: {known})")
    for e in entries:
        if e.strategy == DEFAULT_BASELINE:
            return e, f"baseline {e.label} (the default)"
    return entries[0], f"baseline {entries[0].label} ({DEFAULT_BASELINE} is not in the runs; first strategy used)"


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [  # csv name, HTML header, format
    ("strategy", "strategy", "{}"),
    ("run", "run", "{}"),
    ("overall_auc", "overall AUC", "{:.4f}"),
    ("uauc", "UAUC", "{:.4f}"),
    ("user_auc_p10", "p10 per-user AUC", "{:.4f}"),
    ("ndcg10", "NDCG@10", "{:.4f}"),
    ("hr10", "HR@10", "{:.4f}"),
    ("tail_uauc", "tail UAUC", "{:.4f}"),
    ("mb_up_per_device_round", "MB up / device-round", "{:.4g}"),
    ("mb_down_per_device_round", "MB down / device-round", "{:.4g}"),
    ("gflops_per_device_round", "device GFLOPs / device-round", "{:.4g}"),
    ("simulated_hours", "simulated h", "{:.1f}"),
    ("wall_seconds", "wall s", "{:.1f}"),
    ("n_users_auc", "users with AUC", "{}"),
    ("status", "status", "{}"),
    ("rounds_completed", "rounds", "{}"),
    ("errors", "code errors", "{}"),
    ("quarantined", "quarantined replies", "{}"),
]

COMPARISON_COLUMNS = [
    ("strategy", "strategy", "{}"),
    ("baseline", "baseline", "{}"),
    ("paired_users", "paired users", "{}"),
    ("mean_uauc_diff", "mean UAUC difference", "{:+.4f}"),
    ("ci_low", "95 % CI low", "{:+.4f}"),
    ("ci_high", "95 % CI high", "{:+.4f}"),
    ("significant", "significant", "{}"),
    ("frac_users_gain", "users who gain", "{:.1%}"),
    ("frac_users_lose", "users who lose", "{:.1%}"),
]


def summary_table(entries: Sequence[Entry]) -> pd.DataFrame:
    """One row per strategy: quality and cost from ``summary.json``."""
    rows = []
    for e in entries:
        s = e.summary
        tail = ((s.get("by_bucket") or {}).get("tail") or {}).get("uauc")
        rows.append({
            "strategy": e.label, "run": e.run.name, "overall_auc": s.get("overall_auc"), "uauc": s.get("uauc"),
            "user_auc_p10": s.get("user_auc_p10"), "ndcg10": s.get("ndcg10"), "hr10": s.get("hr10"),
            "tail_uauc": tail, "mb_up_per_device_round": s.get("mb_up_per_device_round"),
            "mb_down_per_device_round": s.get("mb_down_per_device_round"),
            "gflops_per_device_round": s.get("gflops_per_device_round"),
            "simulated_hours": (s["simulated_seconds"] / 3600) if s.get("simulated_seconds") is not None else None,
            "wall_seconds": s.get("wall_seconds"), "n_users_auc": s.get("n_users_auc"),
            "status": e.run.status.get(e.strategy, "complete") if e.run.status else "complete",
            "rounds_completed": s.get("rounds_completed", int(e.records["round"].nunique()) if len(e.records) else 0),
            "errors": s.get("errors", 0), "quarantined": s.get("quarantined", 0),
        })
    return pd.DataFrame(rows, columns=[c for c, _, _ in SUMMARY_COLUMNS])


def comparison_table(entries: Sequence[Entry], baseline: Entry, *, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Each other strategy against the baseline, paired over users both evaluated.

    ``significant`` is ``yes`` when the 95 % CI excludes 0, ``no`` when it contains 0,
    and says why when the pair cannot be compared (another fleet, no common user).
    """
    rows = []
    for i, e in enumerate(entries):
        if e is baseline:
            continue
        row: dict[str, Any] = {"strategy": e.label, "baseline": baseline.label}
        if e.fleet_key != baseline.fleet_key:
            rows.append({**row, "paired_users": 0, "significant": "n/a: other fleet (data settings or seed differ)"})
            continue
        pc = paired_comparison(e.users, baseline.users, n_boot=n_boot, seed=i)
        if pc.n_users == 0:
            rows.append({**row, "paired_users": 0, "significant": "n/a: no user evaluated by both"})
            continue
        rows.append({**row, "paired_users": pc.n_users, "mean_uauc_diff": pc.diff.mean, "ci_low": pc.diff.lo,
                     "ci_high": pc.diff.hi, "significant": "yes" if pc.diff.significant else "no",
                     "frac_users_gain": pc.frac_gain, "frac_users_lose": pc.frac_loss})
    return pd.DataFrame(rows, columns=[c for c, _, _ in COMPARISON_COLUMNS])


def bucket_table(entries: Sequence[Entry], baseline: Entry, *, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Per strategy and bucket: UAUC with its bootstrap CI over users, and the paired gain
    over the baseline with its CI (NaN for the baseline and for other fleets)."""
    rows = []
    for i, e in enumerate(entries):
        comparable = e is not baseline and e.fleet_key == baseline.fleet_key
        for j, b in enumerate(metrics.BUCKETS):
            u = e.users[e.users["bucket"] == b]
            ci = bootstrap_mean_ci(u["auc"].to_numpy(), n_boot=n_boot, seed=1000 + 10 * i + j)
            row = {"strategy": e.label, "bucket": b, "users": ci.n, "uauc": ci.mean, "uauc_lo": ci.lo,
                   "uauc_hi": ci.hi, "gain": math.nan, "gain_lo": math.nan, "gain_hi": math.nan, "gain_users": 0}
            if comparable:
                bu = baseline.users[baseline.users["bucket"] == b]
                pc = paired_comparison(u, bu, n_boot=n_boot, seed=2000 + 10 * i + j)
                row.update(gain=pc.diff.mean, gain_lo=pc.diff.lo, gain_hi=pc.diff.hi, gain_users=pc.n_users)
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if fmt == "{:+.4f}" and isinstance(value, float) and 0 < abs(value) < 5e-5:
        fmt = "{:+.1e}"  # a tiny nonzero difference would print as +0.0000 / -0.0000
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, float_format="%.6g")


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def _figure(name: str):
    from matplotlib.figure import Figure

    _, w, h = FIGURES[name]
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")


def _legend(fig, entries: Sequence[Entry], extra: Sequence[tuple[Any, str]] = ()) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=e.colour, marker=e.marker, linewidth=e.linewidth, markersize=6) for e in entries]
    labels = [e.label for e in entries]
    for h, lab in extra:
        handles.append(h)
        labels.append(lab)
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 6), frameon=False, fontsize=9)


def _round_axis(ax, entries: Sequence[Entry]) -> None:
    """Integer round ticks and, when all runs share a round length, simulated hours on top."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (each round is one window of simulated time)")
    secs = {e.run.fleet.get("round_seconds") for e in entries}
    if len(secs) == 1 and None not in secs:
        h = float(secs.pop()) / 3600.0
        top = ax.secondary_xaxis("top", functions=(lambda r: (r - 0.5) * h, lambda t: t / h + 0.5))
        top.set_xlabel("simulated time after the history cut (hours, round midpoints)", fontsize=9)
        top.tick_params(labelsize=8)


def _drift_marks(ax, entries: Sequence[Entry], text: bool = True) -> None:
    """History cut (before round 1) and drift events (before the first round they affect)."""
    from matplotlib.transforms import blended_transform_factory

    tr = blended_transform_factory(ax.transData, ax.transAxes)
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1.2)
    if text:
        ax.text(0.52, 0.02, "history cut", transform=tr, fontsize=8, rotation=90, va="bottom", ha="left")
    seen: set[tuple] = set()
    for e in entries:
        for ev in e.run.drift_events:
            key = (ev.get("round"), ev.get("kind"), ev.get("fraction"))
            if key in seen:
                continue
            seen.add(key)
            x = max(float(ev.get("round", 0)), 1.0) - 0.5
            x += 0.04 if x == 0.5 else 0.0  # keep a drift at round 1 visible next to the cut
            ax.axvline(x, color="#c00000", linestyle=":", linewidth=1.6)
            if text:
                frac = ev.get("fraction")
                what = f"{ev.get('kind')} drift" + (f" ({frac:.0%} of users)" if frac is not None and frac < 1 else "")
                if ev.get("round", 0) == 0:
                    what += " in history"
                ax.text(x + 0.02, 0.98, what, transform=tr, fontsize=8, rotation=90, va="top", ha="left",
                        color="#c00000")


def _drift_legend_handles() -> list[tuple[Any, str]]:
    from matplotlib.lines import Line2D

    return [(Line2D([], [], color="black", linestyle="--"), "history cut (cloud model trained before it)"),
            (Line2D([], [], color="#c00000", linestyle=":", linewidth=1.6), "drift event (first affected round)")]


def fig_rounds(entries: Sequence[Entry], path: Path) -> None:
    """Figure 1: UAUC and AUC per round per strategy, history cut and drift events marked."""
    fig = _figure(path.name)
    ax_u, ax_a = fig.subplots(1, 2, sharex=True)
    for e in entries:
        pr = pd.DataFrame(e.summary.get("per_round") or [], columns=["round", "uauc"])
        ax_u.plot(pr["round"], pr["uauc"].astype(float), color=e.colour, marker=e.marker, linewidth=e.linewidth,
                  markersize=e.markersize)
        ra = round_pair_auc(e.records) if len(e.records) else pd.DataFrame(columns=["round", "auc"])
        ax_a.plot(ra["round"], ra["auc"].astype(float), color=e.colour, marker=e.marker, linewidth=e.linewidth,
                  markersize=e.markersize)
    ax_u.set_ylabel("UAUC (mean per-device AUC in the round; 0.5 = chance)")
    ax_u.set_title("UAUC per round", fontsize=11)
    ax_a.set_ylabel("AUC over the round's within-device pairs (0.5 = chance)")
    ax_a.set_title("AUC per round (pairs weighted by n_pos x n_neg)", fontsize=11)
    for ax in (ax_u, ax_a):
        _drift_marks(ax, entries)
        _round_axis(ax, entries)
        ax.grid(alpha=0.3)
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, 0.3), hi)
    _legend(fig, entries, _drift_legend_handles())
    _save(fig, path)


def fig_ecdf(entries: Sequence[Entry], path: Path) -> None:
    """Figure 2: empirical CDF of per-user AUC per strategy, p10/p50/p90 marked."""
    from matplotlib.lines import Line2D

    fig = _figure(path.name)
    ax = fig.subplots()
    for q in (0.1, 0.5, 0.9):
        ax.axhline(q, color="#bbbbbb", linestyle=":", linewidth=1)
    labels = []
    for e in entries:
        a = np.sort(e.users["auc"].to_numpy(dtype=float))
        a = a[np.isfinite(a)]
        if a.size:
            ax.ecdf(a, color=e.colour, linewidth=e.linewidth)
        s = e.summary
        ps = [s.get("user_auc_p10"), s.get("user_auc_p50"), s.get("user_auc_p90")]
        for q, p in zip((0.1, 0.5, 0.9), ps):
            if p is not None:
                ax.plot([p], [q], marker=e.marker, color=e.colour, markersize=8, markeredgecolor="black",
                        markeredgewidth=0.6, linestyle="none", zorder=5)
        labels.append(f"{e.label}: p10 {_fmt(ps[0], '{:.3f}')}, p50 {_fmt(ps[1], '{:.3f}')}, "
                      f"p90 {_fmt(ps[2], '{:.3f}')}")
    ax.set_xlabel("per-user AUC over the run (dimensionless; 0.5 = chance, 1 = perfect)")
    ax.set_ylabel("fraction of users with AUC <= x")
    ax.set_ylim(0, 1.02)
    ax.set_yticks([0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=e.colour, marker=e.marker, markeredgecolor="black", markeredgewidth=0.6,
                      linewidth=e.linewidth) for e in entries]
    ax.legend(handles, labels, loc="upper left", fontsize=8, title="markers: p10 / p50 / p90", title_fontsize=8)
    _save(fig, path)


BUCKET_SHARES = {"head": "top 20 %", "torso": "middle 30 %", "tail": "bottom 50 %"}


def _bucket_ticks(entries: Sequence[Entry]) -> list[str]:
    """Tick labels: each bucket's share of users by rank and its range of history
    interactions (neighbouring ranges can share a value: equal counts are split by rank)."""
    fd = entries[0].run.fleet_devices
    ticks = []
    for b in metrics.BUCKETS:
        h = fd.loc[fd["bucket"] == b, "history_interactions"] if "bucket" in fd else pd.Series([], dtype=float)
        rng = f"{int(h.min())}–{int(h.max())} hist. inter." if len(h) else "no users"
        ticks.append(f"{b} ({BUCKET_SHARES[b]})\n{rng}")
    return ticks


def fig_buckets(entries: Sequence[Entry], baseline: Entry, buckets: pd.DataFrame, path: Path) -> None:
    """Figure 3: per-bucket UAUC with 95 % bootstrap CIs; paired gain over the baseline."""
    fig = _figure(path.name)
    ax_u, ax_g = fig.subplots(1, 2)
    x = np.arange(len(metrics.BUCKETS))
    ticks = _bucket_ticks(entries)

    width = 0.8 / max(len(entries), 1)
    for i, e in enumerate(entries):
        t = buckets[buckets["strategy"] == e.label].set_index("bucket").reindex(metrics.BUCKETS)
        h = t["uauc"].to_numpy(dtype=float) - 0.5
        err = np.vstack([t["uauc"] - t["uauc_lo"], t["uauc_hi"] - t["uauc"]]).astype(float)
        ax_u.bar(x + (i - (len(entries) - 1) / 2) * width, h, width * 0.95, bottom=0.5, color=e.colour,
                 yerr=err, capsize=3, error_kw={"elinewidth": 1, "ecolor": "black"})
    ax_u.set_xticks(x, ticks)
    ax_u.set_xlabel("activity bucket (by history interactions)")
    ax_u.set_ylabel("UAUC (mean per-user AUC; bars start at chance 0.5)")
    ax_u.set_title("UAUC per bucket, 95 % bootstrap CI over users", fontsize=11)
    top = np.nanmax(buckets["uauc_hi"].to_numpy(dtype=float)) if buckets["uauc_hi"].notna().any() else 1.0
    ax_u.set_ylim(0.5, min(1.0, top + 0.03) if top > 0.5 else 1.0)
    ax_u.grid(axis="y", alpha=0.3)

    others = [e for e in entries if e is not baseline]
    width = 0.8 / max(len(others), 1)
    for i, e in enumerate(others):
        t = buckets[buckets["strategy"] == e.label].set_index("bucket").reindex(metrics.BUCKETS)
        g = t["gain"].to_numpy(dtype=float)
        err = np.vstack([t["gain"] - t["gain_lo"], t["gain_hi"] - t["gain"]]).astype(float)
        ax_g.bar(x + (i - (len(others) - 1) / 2) * width, np.nan_to_num(g), width * 0.95, color=e.colour,
                 yerr=np.nan_to_num(err), capsize=3, error_kw={"elinewidth": 1, "ecolor": "black"})
    ax_g.axhline(0, color="black", linewidth=0.8)
    ax_g.set_xticks(x, ticks)
    ax_g.set_xlabel("activity bucket (by history interactions)")
    ax_g.set_ylabel(f"UAUC gain over {baseline.label} (AUC difference, paired)")
    ax_g.set_title(f"Gain over {baseline.label}: mean paired difference, 95 % CI", fontsize=11)
    ax_g.grid(axis="y", alpha=0.3)
    if not others:
        ax_g.text(0.5, 0.5, "no other strategy", transform=ax_g.transAxes, ha="center")
    _legend(fig, entries)
    _save(fig, path)


def fig_user_gain(entries: Sequence[Entry], baseline: Entry, path: Path) -> None:
    """Figure 4: per-user AUC gain over the baseline against user activity (log x), one
    panel per strategy, with a running median."""
    from matplotlib.lines import Line2D

    fig = _figure(path.name)
    others = [e for e in entries if e is not baseline and e.fleet_key == baseline.fleet_key]
    ncols = min(max(len(others), 1), 3)
    nrows = max(1, math.ceil(len(others) / ncols))
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(others):] if others else []:
        ax.set_visible(False)
    any_zero = False
    for ax, e in zip(axes, others):
        d = paired_user_diff(e.users, baseline.users).merge(
            baseline.users[["device_id", "history_interactions"]], on="device_id", how="left")
        act = d["history_interactions"].to_numpy(dtype=float)
        any_zero |= bool((act < 1).any())
        act = np.maximum(act, 1.0)
        big = len(d) > 3000
        ax.scatter(act, d["diff"], s=5 if big else 14, color=e.colour, alpha=0.25 if big else 0.6, linewidths=0,
                   rasterized=True)
        mx, my = running_median(act, d["diff"].to_numpy())
        ax.plot(mx, my, color="black", linewidth=2)
        ax.axhline(0, color="#888888", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{e.label} vs {baseline.label} ({len(d)} users)", fontsize=10 if nrows == 1 else 9)
        ax.grid(alpha=0.3, which="both")
    if not others:
        axes[0].text(0.5, 0.5, "no strategy to compare with the baseline", transform=axes[0].transAxes, ha="center")
    fig.supxlabel("user activity: history interactions (count, log scale)", fontsize=10)
    fig.supylabel(f"per-user AUC gain over {baseline.label} (AUC difference)", fontsize=10)
    extra = [(Line2D([], [], color="black", linewidth=2), "running median")]
    if any_zero:
        extra.append((Line2D([], [], linestyle="none"), "(users with 0 history interactions shown at 1)"))
    _legend(fig, others, extra)
    _save(fig, path)


def fig_cost_quality(entries: Sequence[Entry], overall: dict[str, Any], path: Path) -> None:
    """Figure 5: UAUC against MB per device-round and against device GFLOPs per device-round."""
    fig = _figure(path.name)
    ax_b, ax_f = fig.subplots(1, 2, sharey=True)
    points: dict[Any, list[tuple[float, float, Entry]]] = {}
    for e in entries:
        s, ci = e.summary, overall[e.label]
        mb = (s.get("mb_up_per_device_round") or 0.0) + (s.get("mb_down_per_device_round") or 0.0)
        gf = s.get("gflops_per_device_round") or 0.0
        yerr = np.array([[ci.mean - ci.lo], [ci.hi - ci.mean]]) if ci.n > 1 else None
        for ax, xv in ((ax_b, mb), (ax_f, gf)):
            ax.errorbar([xv], [ci.mean], yerr=yerr, color=e.colour, marker=e.marker, markersize=10,
                        markeredgecolor="black", markeredgewidth=0.6, capsize=4, linestyle="none")
            points.setdefault(ax, []).append((xv, ci.mean, e))
    ax_b.set_xlabel("MB transferred per selected device-round (up + down, MB)")
    ax_f.set_xlabel("device compute per selected device-round (GFLOPs)")
    ax_b.set_ylabel("UAUC (mean per-user AUC) with 95 % bootstrap CI")
    ax_b.set_title("Quality vs communication", fontsize=11)
    ax_f.set_title("Quality vs device compute", fontsize=11)
    for ax, unit in ((ax_b, "MB"), (ax_f, "GFLOPs")):
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.15)
        pts = points.get(ax, [])
        xs = [p[0] for p in pts]
        mid = (min(xs) + max(xs)) / 2 if xs else 0.0
        lo, hi = ax.get_ylim()
        gap = 0.075 * (hi - lo)  # about one label height at this figure size
        for right in (True, False):  # labels on the side facing the middle, stacked apart
            side = sorted((p for p in pts if (p[0] <= mid) == right), key=lambda p: p[1])
            placed: list[float] = []
            for xv, yv, e in side:
                ly = max(yv, placed[-1] + gap) if placed else yv
                placed.append(ly)
                ax.annotate(f"{e.label}: {xv:.3g} {unit}", (xv, yv), xytext=(12 if right else -12, ly),
                            textcoords=("offset points", "data"), ha="left" if right else "right", va="center",
                            fontsize=8, arrowprops=dict(arrowstyle="-", color="#999", lw=0.6) if ly != yv else None)
            if placed and placed[-1] + gap > hi:
                hi = placed[-1] + gap
                ax.set_ylim(lo, hi)
    _legend(fig, entries)
    _save(fig, path)


def fig_fleet(entries: Sequence[Entry], path: Path) -> None:
    """Figure 6: online, selected, ok, dropped and late devices per round, and round latency."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(path.name)
    outcomes = [("ok", "selected devices that replied in time (ok)"),
                ("dropped", "selected devices dropped (offline / failed)"),
                ("late", "selected devices late (missed the deadline)"),
                ("quarantined", "selected devices quarantined (NaN/Inf reply)"),
                ("errors", "selected devices with a code error")]
    rounds = [e.run.rounds[e.run.rounds["strategy"] == e.strategy] for e in entries if len(e.run.rounds)]
    happened = lambda col: any(col in r.columns and (r[col] > 0).any() for r in rounds)
    panels = [("online", "online devices at round start", "devices"),
              ("selected", "devices selected by the strategy", "devices"),
              *[(c, t, "devices") for c, t in outcomes if c == "ok" or happened(c)],  # no empty panels
              ("latency_s", "simulated round latency", "simulated seconds")]
    ncols = 3
    nrows = -(-len(panels) // ncols)
    axes = fig.subplots(nrows, ncols, sharex=True).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (col, title, unit) in zip(axes, panels):
        for e in entries:
            r = e.run.rounds[e.run.rounds["strategy"] == e.strategy]
            if col in r.columns:
                ax.plot(r["round"], r[col].astype(float), color=e.colour, marker=e.marker, linewidth=e.linewidth,
                        markersize=e.markersize - 1, clip_on=False)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        top = max(ax.get_ylim()[1], 1.0)
        ax.set_ylim(-0.03 * top, top)  # a strategy at 0 stays visible above the axis
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if unit == "devices":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(panels) - ncols:len(panels)]:
        ax.set_xlabel("round")
    _legend(fig, entries)
    _save(fig, path)


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------

CAPTIONS = {
    "fig1_rounds.png": (
        "Left: UAUC per round (mean of the round's per-device AUCs, from summary.json). Right: AUC per "
        "round. The pooled overall AUC (positives of one device against negatives of another) is only "
        "saved for the whole run, so per round this is the AUC over all of the round's within-device "
        "(positive, negative) pairs: per-device AUCs weighted by n_pos x n_neg, computed from "
        "devices.parquet. The dashed line is the history cut; dotted red lines mark drift events."),
    "fig2_user_auc_ecdf.png": (
        "Empirical CDF of each user's run-level AUC (metrics.user_auc); markers at the p10, p50 and p90 "
        "users (summary.json). A curve further right is better; the left end is the worst-served users."),
    "fig3_buckets.png": (
        "Users split by rank of history activity (head: top 20 %, torso: middle 30 %, tail: bottom 50 %; users "
        "with equal counts at a boundary are split by rank, so neighbouring ranges can share a value). Left: UAUC per bucket with 95 % "
        "percentile-bootstrap CIs over users. Right: mean paired per-user AUC difference against the "
        "baseline over users evaluated by both, with its 95 % bootstrap CI."),
    "fig4_user_gain.png": (
        "Each point is one user evaluated by both the strategy and the baseline: x its history "
        "interactions, y its AUC gain over the baseline. The black line is the running median."),
    "fig5_cost_quality.png": (
        "One point per strategy: UAUC (with 95 % bootstrap CI over users) against bytes moved and device "
        "training FLOPs per selected device-round (summary.json)."),
    "fig6_fleet.png": (
        "Per round (rounds.parquet): devices online at round start, selected, and the selected devices' "
        "outcomes; and the round's simulated latency (slowest device in time, or the deadline, plus waits)."),
}

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1350px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.ns{color:#888;font-style:italic}.sig{font-weight:bold}.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.35em;vertical-align:-.1em;border:1px solid #555}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.88em;color:#444;max-width:1100px}
.note{font-size:.88em;color:#555}.incomplete td{background:#fff4e5;font-style:italic}.warn{color:#a33;font-weight:bold}
"""


def _table_html(df: pd.DataFrame, columns: Sequence[tuple[str, str, str]], colours: dict[str, str],
                row_class=None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for i, (c, _, f) in enumerate(columns):
            text = html.escape(_fmt(row.get(c), f))
            if i == 0 and row.get(c) in colours:
                text = f'<span class="swatch" style="background:{colours[row[c]]}"></span>{text}'
            cells.append(f"<td>{text}</td>")
        cls = f' class="{row_class(row)}"' if row_class else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _runs_html(runs: Sequence[Run]) -> str:
    rows = []
    for r in runs:
        data = r.config.get("data", {})
        f = r.fleet
        drift = ", ".join(f"{e.get('kind')} @ round {e.get('round')}" for e in r.drift_events) or "none"
        rows.append([r.name, f.get("source", data.get("source", "")), f.get("n_devices"), f.get("n_rounds"),
                     _fmt((f.get("round_seconds") or math.nan) / 3600, "{:.3g}"),
                     r.config.get("experiment", {}).get("seed"), drift, ", ".join(r.strategies)])
    head = "".join(f"<th>{h}</th>" for h in ["run", "data", "devices", "rounds", "round length (h)", "seed",
                                              "drift", "strategies"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, runs: Sequence[Run], entries: Sequence[Entry], baseline_note: str,
               summary: pd.DataFrame, comparison: pd.DataFrame, buckets: pd.DataFrame, figures: Sequence[Path]) -> None:
    """The single-file report: tables inline, every figure as a base64 ``data:`` URI."""
    colours = {e.label: e.colour for e in entries}
    bucket_cols = [("strategy", "strategy", "{}"), ("bucket", "bucket", "{}"), ("users", "users", "{}"),
                   ("uauc", "UAUC", "{:.4f}"), ("uauc_lo", "95 % CI low", "{:.4f}"), ("uauc_hi", "95 % CI high", "{:.4f}"),
                   ("gain", "paired gain", "{:+.4f}"), ("gain_lo", "gain CI low", "{:+.4f}"),
                   ("gain_hi", "gain CI high", "{:+.4f}")]
    sig_class = lambda row: "sig" if row.get("significant") == "yes" else "ns"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>fleetsim report</title>", f"<style>{CSS}</style></head><body>",
        "<h1>fleetsim strategy comparison</h1>",
        "<h2>Runs</h2>", _runs_html(runs),
        "<h2>Summary per strategy</h2>",
        _table_html(summary, SUMMARY_COLUMNS, colours, lambda row: "" if row.get("status") == "complete" else "incomplete"),
        '<p class="note">Overall AUC is pooled over all scored samples; UAUC is the mean per-user AUC; tail UAUC '
        "is over the 50 % least active users. MB and GFLOPs are per selected device-round. Also in summary.csv.</p>",
        *([f'<p class="warn">Not complete: {html.escape(", ".join(f"{r.strategy} ({r.status}, {r.rounds_completed} rounds)" for r in summary.itertuples() if r.status != "complete"))}. '
           "Their numbers cover only the rounds they completed (a failed strategy's error and traceback are in "
           "summary.json and &lt;run&gt;/&lt;strategy&gt;/error.log).</p>"]
          if (summary["status"] != "complete").any() else []),
        f"<h2>Paired comparison against the baseline</h2><p class=\"note\">{html.escape(baseline_note)}. Pairs are "
        "the users evaluated by both strategies; the CI is a 95 % percentile bootstrap over those users "
        f"({N_BOOT} resamples). A CI containing 0 is <span class=\"ns\">not significant</span>. Also in "
        "comparison.csv.</p>",
        _table_html(comparison, COMPARISON_COLUMNS, colours, sig_class) if len(comparison)
        else '<p class="note">Only one strategy: nothing to compare.</p>',
        "<h2>Per activity bucket</h2>", _table_html(buckets, bucket_cols, colours),
        "<h2>Figures</h2>",
    ]
    for fp in figures:
        data = base64.b64encode(fp.read_bytes()).decode("ascii")
        title = FIGURES[fp.name][0]
        parts.append(f'<figure id="{fp.stem}"><h3>{html.escape(title)}</h3>'
                     f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(CAPTIONS[fp.name])}</figcaption></figure>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by ``build_report``."""

    html: Path
    figures: list[Path]
    summary_csv: Path
    comparison_csv: Path
    buckets_csv: Path


def build_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, *, baseline: str | None = None,
                 n_boot: int = N_BOOT) -> ReportFiles:
    """Read ``run_dirs`` and write the report to ``out`` (default: the first run directory).

    Strategies of several runs are combined; names found in more than one run get the
    run's name as a prefix. ``baseline`` names the strategy the others are compared with
    (default ``cloud_only``, else the first). Raises ``FleetsimError`` for a folder that is
    not a run, an unsupported result layout, an unknown baseline or an unwritable ``out``.
    """
    if not run_dirs:
        raise FleetsimError("report: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out) if out is not None else Path(run_dirs[0])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FleetsimError(f"--out {out_dir}: cannot create ({exc.strerror or exc})") from None
    if not out_dir.is_dir():
        raise FleetsimError(f"--out {out_dir}: not a directory")
    every = make_entries(runs)
    summary = summary_table(every)  # every strategy, finished or not, with its status
    entries = [e for e in every if len(e.records)]  # figures and comparisons need records
    if not entries:
        raise FleetsimError(f"{run_dirs[0]}: no strategy wrote a round; nothing to compare")
    base, note = pick_baseline(entries, baseline)
    comparison = comparison_table(entries, base, n_boot=n_boot)
    buckets = bucket_table(entries, base, n_boot=n_boot)
    overall = {e.label: bootstrap_mean_ci(e.users["auc"].to_numpy(), n_boot=n_boot, seed=3000 + i)
               for i, e in enumerate(entries)}
    paths = {name: out_dir / name for name in FIGURES}
    try:
        fig_rounds(entries, paths["fig1_rounds.png"])
        fig_ecdf(entries, paths["fig2_user_auc_ecdf.png"])
        fig_buckets(entries, base, buckets, paths["fig3_buckets.png"])
        fig_user_gain(entries, base, paths["fig4_user_gain.png"])
        fig_cost_quality(entries, overall, paths["fig5_cost_quality.png"])
        fig_fleet(entries, paths["fig6_fleet.png"])
        summary_csv, comparison_csv = out_dir / "summary.csv", out_dir / "comparison.csv"
        _write_csv(summary, summary_csv)
        _write_csv(comparison, comparison_csv)
        _write_csv(buckets, out_dir / "buckets.csv")
        html_path = out_dir / "report.html"
        write_html(html_path, runs, entries, note, summary, comparison, buckets, list(paths.values()))
    except OSError as exc:
        raise FleetsimError(f"--out {out_dir}: cannot write the report ({exc.strerror or exc})") from None
    return ReportFiles(html_path, list(paths.values()), summary_csv, comparison_csv, out_dir / "buckets.csv")
