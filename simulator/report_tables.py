"""What the report shows: one entry per strategy of a run (its colour, marker, records and
per-user AUCs), the baseline, and the summary, comparison and bucket tables.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from simulator import metrics, provenance
from simulator.errors import FleetsimError
from simulator.report_stats import MIN_SIGNIFICANT_N, N_BOOT, bootstrap_mean_ci, paired_comparison
from simulator.results import Run
from strategies.registry import STRATEGY_COLOURS


DEFAULT_BASELINE = "cloud_only"
# The built-in strategies always get the same colour; others take the rest in order.
KNOWN_COLOURS = STRATEGY_COLOURS  # registered with each built-in strategy (strategies.base)
EXTRA_COLOURS = ["#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
                 "#7b4173", "#3182bd", "#e6550d", "#31a354"]
MARKERS = ["o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "h", "p"]

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

    def same_fleet(self, other: Entry) -> bool:
        """Whether the two entries' users can be paired: the same seed (the same evaluation
        samples) and the same interaction data -- by the data digest both runs recorded
        (``simulator.provenance``), else by equal data settings."""
        mine, theirs = self.run.config, other.run.config
        if mine.get("experiment", {}).get("seed") != theirs.get("experiment", {}).get("seed"):
            return False
        a, b = provenance.fleet_id(self.run.summary), provenance.fleet_id(other.run.summary)
        if a is not None and b is not None:
            return a == b
        return json.dumps(mine.get("data"), sort_keys=True) == json.dumps(theirs.get("data"), sort_keys=True)


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


def paired_users(e: Entry, baseline: Entry) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-user AUCs of ``e`` and the baseline over the rounds *both* completed, so that a
    strategy that stopped early is compared with the baseline on the same rounds."""
    rounds_e, rounds_b = set(e.records["round"]), set(baseline.records["round"])
    if rounds_e == rounds_b:
        return e.users, baseline.users
    common = rounds_e & rounds_b
    fd = e.run.fleet_devices[["device_id", "bucket", "history_interactions"]]
    users = lambda x: metrics.user_auc(x.records[x.records["round"].isin(common)]).merge(fd, on="device_id", how="left")
    return users(e), users(baseline)


def pick_baseline(entries: Sequence[Entry], name: str | None, every: Sequence[Entry] = ()) -> tuple[Entry, str]:
    """The baseline entry and a note on how it was chosen.

    ``name`` matches a label first, then a strategy name, which must then be in one run
    only. Without a name: ``cloud_only`` if present, else the first strategy. ``entries``
    are the strategies with records; ``every`` all of them, to say why one without
    records cannot be the baseline.
    """
    without = [e for e in every if e not in entries]
    if name is not None:
        by_label = [e for e in entries if e.label == name]
        by_name = [e for e in entries if e.strategy == name]
        if by_label or len(by_name) == 1:
            match = by_label or by_name
            return match[0], f"baseline {match[0].label} (--baseline {name})"
        if by_name:
            raise FleetsimError(f"--baseline {name}: in more than one run; name one of "
                                f"{', '.join(e.label for e in by_name)}")
        empty = [e for e in without if name in (e.label, e.strategy)]
        if empty:
            raise FleetsimError(f"--baseline {name}: it completed no round ({empty[0].run.status.get(empty[0].strategy)}), "
                                f"so nothing can be compared with it")
        known = ", ".join(e.label for e in entries)
        raise FleetsimError(f"--baseline {name}: no such strategy in the runs (strategies: {known})")
    for e in entries:
        if e.strategy == DEFAULT_BASELINE:
            return e, f"baseline {e.label} (the default)"
    why = (f"{DEFAULT_BASELINE} completed no round" if any(e.strategy == DEFAULT_BASELINE for e in without)
           else f"{DEFAULT_BASELINE} is not in the runs")
    return entries[0], f"baseline {entries[0].label} ({why}; first strategy used)"


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [  # csv name, HTML header, format
    ("strategy", "strategy", "{}"),
    ("run", "run", "{}"),
    ("overall_auc", "overall AUC", "{:.4f}"),
    ("uauc", "UAUC", "{:.4f}"),
    ("user_auc_p10", "p10 per-user AUC", "{:.4f}"),
    *((m, metrics.METRICS[m][0], "{:.4f}") for m in metrics.POOLED_METRICS),
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
            "user_auc_p10": s.get("user_auc_p10"), **{m: s.get(m) for m in metrics.POOLED_METRICS},
            "tail_uauc": tail, "mb_up_per_device_round": s.get("mb_up_per_device_round"),
            "mb_down_per_device_round": s.get("mb_down_per_device_round"),
            "gflops_per_device_round": s.get("gflops_per_device_round"),
            "simulated_hours": (s["simulated_seconds"] / 3600) if s.get("simulated_seconds") is not None else None,
            "wall_seconds": s.get("wall_seconds"), "n_users_auc": s.get("n_users_auc"),
            "status": _status(e),
            "rounds_completed": s.get("rounds_completed", int(e.records["round"].nunique()) if len(e.records) else 0),
            "errors": s.get("errors", 0), "quarantined": s.get("quarantined", 0),
        })
    return pd.DataFrame(rows, columns=[c for c, _, _ in SUMMARY_COLUMNS])


def _status(e: Entry) -> str:
    status = e.run.status.get(e.strategy, "complete") if e.run.status else "complete"
    return (status == "complete" and metrics.nonfinite_status(e.summary)) or status


def comparison_table(entries: Sequence[Entry], baseline: Entry, *, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Each other strategy against the baseline, paired over users both evaluated.

    ``significant`` is ``yes`` when the 95 % CI excludes 0, ``no`` when it contains 0,
    and says why when the pair cannot be compared (another fleet, no common user, fewer
    than ``MIN_SIGNIFICANT_N`` paired users).
    """
    rows = []
    for i, e in enumerate(entries):
        if e is baseline:
            continue
        row: dict[str, Any] = {"strategy": e.label, "baseline": baseline.label}
        if not e.same_fleet(baseline):
            rows.append({**row, "paired_users": 0, "significant": "n/a: other fleet (data or seed differ)"})
            continue
        pc = paired_comparison(*paired_users(e, baseline), n_boot=n_boot, seed=i)
        if pc.n_users == 0:
            rows.append({**row, "paired_users": 0, "significant": "n/a: no user evaluated by both"})
            continue
        # devices that scored NaN/Inf are left out of the pairs: the rest are survivors, not a sample
        nan = [f"{x.label} {metrics.nonfinite_status(x.summary)}" for x in (e, baseline) if metrics.nonfinite_status(x.summary)]
        significant = ("n/a: " + "; ".join(nan) + ", left out") if nan else "yes" if pc.diff.significant else "no"
        if not nan and pc.n_users < MIN_SIGNIFICANT_N:
            significant = f"n/a: {pc.n_users} paired user{'s' if pc.n_users > 1 else ''} (fewer than {MIN_SIGNIFICANT_N})"
        rows.append({**row, "paired_users": pc.n_users, "mean_uauc_diff": pc.diff.mean, "ci_low": pc.diff.lo,
                     "ci_high": pc.diff.hi, "significant": significant,
                     "frac_users_gain": pc.frac_gain, "frac_users_lose": pc.frac_loss})
    return pd.DataFrame(rows, columns=[c for c, _, _ in COMPARISON_COLUMNS])


def bucket_table(entries: Sequence[Entry], baseline: Entry, *, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Per strategy and bucket: UAUC with its bootstrap CI over users, and the paired gain
    over the baseline with its CI (NaN for the baseline and for other fleets)."""
    rows = []
    for i, e in enumerate(entries):
        comparable = e is not baseline and e.same_fleet(baseline)
        pe, pb = paired_users(e, baseline) if comparable else (e.users, baseline.users)
        for j, b in enumerate(metrics.BUCKETS):
            u = e.users[e.users["bucket"] == b]
            ci = bootstrap_mean_ci(u["auc"].to_numpy(), n_boot=n_boot, seed=1000 + 10 * i + j)
            row = {"strategy": e.label, "bucket": b, "users": ci.n, "uauc": ci.mean, "uauc_lo": ci.lo,
                   "uauc_hi": ci.hi, "gain": math.nan, "gain_lo": math.nan, "gain_hi": math.nan, "gain_users": 0}
            if comparable:
                pc = paired_comparison(pe[pe["bucket"] == b], pb[pb["bucket"] == b], n_boot=n_boot,
                                       seed=2000 + 10 * i + j)
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
