"""The report's six figures, drawn on ``matplotlib.figure.Figure`` with the Agg canvas (no
pyplot, so importing this never changes a notebook's backend). Each has a fixed size
(``FIGURES``) and each strategy keeps one colour in every figure.
"""
from __future__ import annotations

import math

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from simulator import metrics
from simulator.report_stats import paired_user_diff, round_pair_auc, running_median
from simulator.report_tables import Entry, _fmt, paired_users


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
    others = [e for e in entries if e is not baseline and e.same_fleet(baseline)]
    ncols = min(max(len(others), 1), 3)
    nrows = max(1, math.ceil(len(others) / ncols))
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(others):] if others else []:
        ax.set_visible(False)
    any_zero = False
    for ax, e in zip(axes, others):
        ue, ub = paired_users(e, baseline)
        d = paired_user_diff(ue, ub).merge(ub[["device_id", "history_interactions"]], on="device_id", how="left")
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
