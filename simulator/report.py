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

The layers, one module each: ``report_stats`` (statistics), ``report_tables`` (entries and
tables), ``report_figures`` (the six figures, drawn with the Agg canvas, never pyplot) and
``report_html`` (the page); this module reads the runs, calls them in order and re-exports
their public names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from simulator.errors import FleetsimError
from simulator.report_figures import (  # noqa: F401 (re-exported: the report's public API)
    DPI, FIGURES, fig_buckets, fig_cost_quality, fig_ecdf, fig_fleet, fig_rounds, fig_user_gain)
from simulator.report_html import write_html
from simulator.report_stats import (  # noqa: F401
    LEVEL, N_BOOT, MeanCI, PairedComparison, bootstrap_mean_ci, paired_comparison, paired_user_diff, round_pair_auc,
    running_median)
from simulator.report_tables import (  # noqa: F401
    COMPARISON_COLUMNS, DEFAULT_BASELINE, EXTRA_COLOURS, KNOWN_COLOURS, MARKERS, SUMMARY_COLUMNS, Entry, _write_csv,
    bucket_table, comparison_table, make_entries, pick_baseline, strategy_colours, summary_table)
from simulator.results import load_run

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


def _check_out(out_dir: Path, given: str | Path | None, runs: dict[Path, str | Path]) -> None:
    """Refuse an ``--out`` that would damage a run: inside a run's record folders (a
    report there makes them unreadable), or another run's folder (its report would be
    replaced by one about other runs)."""
    if given is not None and not str(given).strip():
        raise FleetsimError("--out is empty; give the folder for the report")
    resolved = out_dir.resolve()
    for folder in (resolved, *resolved.parents):
        if folder.suffix == ".parquet":
            raise FleetsimError(f"--out {out_dir}: inside {folder}, a run's records; a report there would make "
                                f"them unreadable: choose a folder outside it")
    if resolved not in runs and (resolved / "summary.json").is_file():
        raise FleetsimError(f"--out {out_dir}: holds another run, whose own report would be replaced; choose an "
                            f"empty folder, or that run's folder as one of the runs")


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
    seen: dict[Path, str | Path] = {}
    for d in run_dirs:  # the same run twice would be compared with itself
        key = Path(d).resolve()
        if key in seen:
            also = "" if str(seen[key]) == str(d) else f" (as {seen[key]} too)"
            raise FleetsimError(f"report: {d} is given twice{also}; give each run once")
        seen[key] = d
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out) if out is not None else Path(run_dirs[0])
    _check_out(out_dir, out, seen)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FleetsimError(f"--out {out_dir}: cannot create ({exc.strerror or exc})") from None
    if not out_dir.is_dir():
        raise FleetsimError(f"--out {out_dir}: not a directory")
    every = make_entries(runs)
    summary = summary_table(every)  # every strategy, finished or not, with its status
    entries = [e for e in every if len(e.records)]  # figures and comparisons need records
    if not entries:  # every strategy failed before (or never reached) its first round: statuses only
        def statuses(folder: Path) -> None:
            _write_csv(summary, folder / "summary.csv")
            write_html(folder / "report.html", runs, every, "No strategy wrote a round: nothing to compare",
                       summary, pd.DataFrame(columns=[c for c, _, _ in COMPARISON_COLUMNS]),
                       pd.DataFrame(columns=["strategy", "bucket", "users", "uauc"]), [])

        _write_atomically(out_dir, statuses)
        return ReportFiles(out_dir / "report.html", [], out_dir / "summary.csv", out_dir / "comparison.csv",
                           out_dir / "buckets.csv")
    base, note = pick_baseline(entries, baseline, every)
    comparison = comparison_table(entries, base, n_boot=n_boot)
    buckets = bucket_table(entries, base, n_boot=n_boot)
    overall = {e.label: bootstrap_mean_ci(e.users["auc"].to_numpy(), n_boot=n_boot, seed=3000 + i)
               for i, e in enumerate(entries)}

    def everything(folder: Path) -> None:
        paths = {name: folder / name for name in FIGURES}
        fig_rounds(entries, paths["fig1_rounds.png"])
        fig_ecdf(entries, paths["fig2_user_auc_ecdf.png"])
        fig_buckets(entries, base, buckets, paths["fig3_buckets.png"])
        fig_user_gain(entries, base, paths["fig4_user_gain.png"])
        fig_cost_quality(entries, overall, paths["fig5_cost_quality.png"])
        fig_fleet(entries, paths["fig6_fleet.png"])
        _write_csv(summary, folder / "summary.csv")
        _write_csv(comparison, folder / "comparison.csv")
        _write_csv(buckets, folder / "buckets.csv")
        write_html(folder / "report.html", runs, entries, note, summary, comparison, buckets, list(paths.values()))

    _write_atomically(out_dir, everything)
    return ReportFiles(out_dir / "report.html", [out_dir / name for name in FIGURES], out_dir / "summary.csv",
                       out_dir / "comparison.csv", out_dir / "buckets.csv")


def _write_atomically(out_dir: Path, write) -> None:
    """``write(folder)`` into a hidden temporary folder in ``out_dir``, then each file
    renamed into place: a report that cannot be written whole leaves the one before it
    as it was (a drill: a failed write left three figures of a new report beside the
    tables of the old). An ``OSError`` is one line naming the file."""
    import errno
    import os
    import shutil
    import tempfile

    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".report-"))
    except OSError as exc:
        raise FleetsimError(f"--out {out_dir}: cannot write the report ({exc.strerror or exc})") from None
    try:
        write(tmp)
        files = sorted(tmp.iterdir())
        for f in files:  # what a rename would fail on, before any rename
            if (out_dir / f.name).is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out_dir / f.name))
        for f in files:
            os.replace(f, out_dir / f.name)
    except OSError as exc:
        name = Path(exc.filename2 or exc.filename).name if (exc.filename2 or exc.filename) else None
        what = f"{out_dir / name}" if name else "the report"
        raise FleetsimError(f"--out {out_dir}: cannot write {what} ({exc.strerror or exc}); the report there "
                            f"before, if any, is unchanged") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
