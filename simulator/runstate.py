"""What a run records about each strategy: its status on disk (``RunState``), its
summary (``summarise``), a server-side failure (``server_failure``) and what ``FleetRun.play``
returns (``Played``)."""
from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd

from simulator import metrics
from simulator.errors import StrategyFailure
from simulator.fleet import Fleet
from simulator.grid import FleetGrid, RoundResult
from simulator.writer import RunWriter


@contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower logs every round at INFO; a fleet run shows its own progress instead."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def summarise(results: list[RoundResult], fleet: Fleet, wall_s: float, sim_end: float,
              counted: list[RoundResult] | None = None) -> dict[str, Any]:
    """Fleet metrics and costs of one strategy's run, from its per-round records;
    ``counted``: the rounds whose errors and quarantined replies count (default
    ``results``; a failed strategy's include the round it failed in)."""
    counted = results if counted is None else counted
    df = pd.DataFrame({k: np.concatenate([r.devices[k] for r in results]) for k in results[0].devices}) if results else pd.DataFrame()
    hist = metrics.ScoreHistogram()
    for r in results:
        hist = hist.merge(r.histogram)
    out = metrics.run_summary(df, overall_auc=hist.auc() if results else float("nan"), thresholds=fleet.bucket_thresholds)
    out.update(
        errors=int(sum(r.info["errors"] for r in counted)),
        quarantined=int(sum(r.info["quarantined"] for r in counted)),
        round_latency_s=float(sum(r.info["latency_s"] for r in results)),
        simulated_seconds=float(sim_end - fleet.timeline.history_end) if results else 0.0,
        wall_seconds=float(wall_s),
    )
    return out


SERVER_METHODS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate", "prepare", "summary")


def server_failure(exc: BaseException, round: int) -> StrategyFailure:
    """A ``StrategyFailure`` for an exception raised by a strategy's server half, naming
    the method it came from (the outermost strategy method in the traceback)."""
    stage = "start"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_name in SERVER_METHODS:
            stage = frame.f_code.co_name
            break
    first = (str(exc).splitlines() or [""])[0]
    return StrategyFailure(f"round {round}: {stage} raised {type(exc).__name__}: {first}", round=round, stage=stage,
                           error_type=type(exc).__name__, detail=first,
                           traceback="".join(traceback.format_exception(exc)))


class RunState:
    """The run's progress on disk: ``summary.json`` is rewritten when a strategy starts,
    after each of its rounds and when it ends, with its ``status`` (``running``,
    ``complete``, ``failed``, ``interrupted``) and ``rounds_completed``."""

    def __init__(self, writer: RunWriter, log) -> None:
        self.writer, self.log = writer, log

    def pending(self, names: list[str]) -> None:
        """Every strategy of the run, before any starts (so a stopped run shows what never ran)."""
        for name in names:
            self.writer.summary["strategies"][name] = {"status": "pending", "rounds_completed": 0}
        self.writer.write_summary(names[0], self.writer.summary["strategies"][names[0]])

    def start(self, name: str) -> None:
        self.writer.write_summary(name, {"status": "running", "rounds_completed": 0})

    def round_done(self, name: str, result: RoundResult) -> None:
        self.writer.write_round(name, result)
        entry = self.writer.summary["strategies"][name]
        entry["rounds_completed"] = result.round
        self.writer.write_summary(name, entry)

    def end(self, name: str, summary: dict[str, Any], status: str, failure: StrategyFailure | None = None,
            rounds: int = 0, quiet: bool = False) -> None:
        summary = {"status": status, "rounds_completed": rounds, **summary}
        if failure is not None:
            summary["error"] = {"strategy": name, **failure.info}
            path = self.writer.append_error_log(name, f"strategy failed: {failure}", failure.traceback)
            summary["error"]["log"] = str(path)
            if not quiet:
                self.log(f"fleetsim: error: {name} failed: {failure}; traceback in {path}" if failure.traceback
                         else f"fleetsim: error: {name} failed: {failure}")
        self.writer.write_summary(name, summary)



@dataclass
class Played:
    """What ``FleetRun.play`` leaves of one strategy: its status (``complete`` or
    ``failed``), its grid (with every ``RoundResult``), Flower's ``Result``, its summary
    and, if it failed, the ``StrategyFailure``."""

    status: str
    grid: FleetGrid
    result: Any = None
    summary: dict[str, Any] = field(default_factory=dict)
    failure: StrategyFailure | None = None
