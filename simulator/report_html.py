"""The single-file HTML report: tables inline, every figure as a base64 ``data:`` URI.
"""
from __future__ import annotations

import base64
import html
import math

from pathlib import Path
from typing import Sequence

import pandas as pd

from simulator import provenance
from simulator.report_figures import FIGURES
from simulator.report_stats import N_BOOT
from simulator.report_tables import COMPARISON_COLUMNS, SUMMARY_COLUMNS, Entry, _fmt
from simulator.results import Run


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
        rows.append([r.name, f.get("source", data.get("source", "")), f.get("n_devices"),
                     f.get("evaluated_devices", f.get("n_devices")), f.get("n_rounds"),
                     _fmt((f.get("round_seconds") or math.nan) / 3600, "{:.3g}"),
                     r.config.get("experiment", {}).get("seed"), drift, ", ".join(r.strategies),
                     provenance.describe(r.summary)])
    head = "".join(f"<th>{h}</th>" for h in ["run", "data", "devices", "evaluated users", "rounds",
                                              "round length (h)", "seed", "drift", "strategies", "code and versions"])
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
        *([f'<p class="warn">Not complete, or not all finite: {html.escape(", ".join(f"{r.strategy} ({r.status}, {r.rounds_completed} rounds)" for r in summary.itertuples() if r.status != "complete"))}. '
           "Their numbers cover only the rounds they completed (a failed strategy's error and traceback are in "
           "summary.json and &lt;run&gt;/&lt;strategy&gt;/error.log); a strategy with NaN scores leaves those "
           "device-rounds out of every mean (nonfinite in devices.parquet), so its means cover the rest only and "
           "its comparisons claim no significance.</p>"]
          if (summary["status"] != "complete").any() else []),
        f"<h2>Paired comparison against the baseline</h2><p class=\"note\">{html.escape(baseline_note)}. A strategy "
        "that did not complete is compared with the baseline over the rounds both completed. Pairs are "
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
