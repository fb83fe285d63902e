"""The run loop: one fleet, one cloud model, every strategy on identical draws.

For each strategy the hosts are reset to the installed cloud model and a fresh
``FleetGrid`` (same seed, so the same availability, failures and evaluation samples) is
handed to the strategy's own ``start()``. Rounds are written as they complete.
"""
from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pandas as pd
from flwr.serverapp.strategy import Strategy

from devices.models import ModelSpec
from devices.pool import HostPool, RayUnreachable, init_ray
from simulator import metrics
from simulator.cloud import CloudContext, train_cloud_model
from simulator.config import ExperimentConfig
from simulator.errors import FleetsimError, NonFiniteError, RayAddressError, StrategyFailure, Terminated
from simulator.fleet import Fleet, build_fleet
from simulator.grid import CodeError, FleetGrid, RoundResult, flower_patched
from simulator.records import array_record
from strategies.registry import make_strategy, resolve_strategy  # noqa: F401 (re-exported)
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


def summarise(results: list[RoundResult], fleet: Fleet, wall_s: float, sim_end: float) -> dict[str, Any]:
    """Fleet metrics and costs of one strategy's run, from its per-round records."""
    df = pd.DataFrame({k: np.concatenate([r.devices[k] for r in results]) for k in results[0].devices}) if results else pd.DataFrame()
    hist = metrics.ScoreHistogram()
    for r in results:
        hist = hist.merge(r.histogram)
    out = metrics.run_summary(df, overall_auc=hist.auc() if results else float("nan"), thresholds=fleet.bucket_thresholds)
    out.update(
        errors=int(sum(r.info["errors"] for r in results)),
        quarantined=int(sum(r.info["quarantined"] for r in results)),
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
        self.warned: set[str] = set()

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


def run_experiment(cfg: ExperimentConfig, out: str, *, ray_address: str | None = None, use_ray: bool = True,
                   progress: bool = True, log=print) -> dict[str, Any]:
    """Run every strategy of ``cfg`` on one fleet; write results to ``out``; return the summary.

    A strategy that fails (a device or server code error, non-finite training) is
    recorded as ``failed`` in ``summary.json`` with its error, its traceback goes to
    ``<out>/<strategy>/error.log``, one line goes to ``log``, and the next strategy runs.
    """
    if getattr(cfg.data, "protocol", "fleet") == "leave_last":  # the DUET paper's protocol, not a fleet
        from simulator.paper import run_leave_last

        return run_leave_last(cfg, out, log=log)
    writer = RunWriter(out)  # fail on a bad --out before any expensive work (nothing written yet)
    strategies = [(name, make_strategy(name, cfg.strategies.get(name, {}))) for name in cfg.experiment.strategies]
    if use_ray and ray_address:
        try:
            init_ray(ray_address)  # an unreachable cluster fails here, before --out is touched
        except RayUnreachable as exc:
            raise RayAddressError(str(exc)) from None
    t0 = time.perf_counter()
    fleet = build_fleet(cfg)
    writer.create()
    seed = cfg.experiment.seed
    writer.write_config(cfg.to_toml())
    writer.write_fleet(fleet)
    state = RunState(writer, log)
    state.pending([name for name, _ in strategies])
    spec = ModelSpec(n_items=fleet.interactions.n_items, backbone=cfg.model.backbone, dim=cfg.model.dim, window=cfg.model.window)
    c = cfg.cloud
    try:
        initial, losses = train_cloud_model(fleet.interactions, fleet.timeline.history_end, spec, epochs=c.epochs, lr=c.lr,
                                            batch_size=c.batch_size, negatives=c.negatives, seed=seed)
    except NonFiniteError as exc:  # every strategy starts from the cloud model: none can run
        log(f"fleetsim: error: {exc}; no strategy can run")
        for name, _ in strategies:
            state.end(name, {}, "failed", exc, quiet=True)
        writer.release()
        return writer.summary
    trained = f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})" if losses else "(untrained: cloud.epochs = 0)"
    log(f"fleet: {fleet.n_devices} devices ({fleet.source}), {fleet.timeline.n_rounds} rounds; cloud model "
        f"ready in {time.perf_counter() - t0:.1f} s {trained}")
    new_pool = lambda: HostPool(fleet.interactions, fleet.timeline, spec, cfg.device, seed, n_hosts=cfg.experiment.hosts,
                                use_ray=use_ray, ray_address=ray_address)
    n_rounds = fleet.timeline.n_rounds
    cloud = CloudContext(fleet.interactions, fleet.timeline.history_end, spec, initial, seed,
                         epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, negatives=c.negatives)
    pool = None
    try:
        pool = new_pool()
        restore = _terminate_on_sigterm()  # after ray.init: Ray's own handler would call sys.exit
        from tqdm import tqdm

        bar = tqdm(total=n_rounds * len(strategies), disable=not progress, unit="round", dynamic_ncols=True)
        for name, strategy in strategies:
            bar.set_description(name)
            _, hosts_lost = run_strategy(name, strategy, fleet, pool, cloud, initial, cfg, state, bar, log)
            if hosts_lost:  # a host process died: the next strategy gets a fresh pool
                pool.shutdown()
                pool = new_pool()
        bar.close()
        restore()
    finally:
        if pool is not None:
            pool.shutdown()
        writer.release()
    return writer.summary


def _terminate_on_sigterm():
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread, so a killed run
    ends like Ctrl-C: the strategy in flight is marked interrupted. Returns the restorer."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_strategy(name: str, strategy: Strategy, fleet: Fleet, pool: HostPool, cloud: CloudContext,
                 initial: dict[str, np.ndarray], cfg: ExperimentConfig, state: RunState, bar, log) -> tuple[str, bool]:
    """Run one strategy on a fresh grid; returns its status and whether a host process
    died. A ``StrategyFailure``, a ``FleetsimError`` raised while it runs (e.g. it waits for
    more devices than exist) or any exception of its code ends it as ``failed``; Ctrl-C
    as ``interrupted`` (then re-raised)."""
    seed = cfg.experiment.seed
    state.start(name)
    t_start = time.perf_counter()
    t_prepared = t_start
    warnings: list[tuple[CodeError, str]] = []

    def on_round(result: RoundResult) -> None:
        state.round_done(name, result)
        bar.update(1)

    def on_code_error(err: CodeError) -> None:
        if cfg.experiment.on_device_error != "record":
            return  # "stop": the failure itself is logged with this traceback
        key = f"{err.error_type}: {err.message}"
        path = state.writer.append_error_log(name, f"round {err.round}, message type {err.message_type!r}, "
                                                   f"{err.devices} device(s): {key}", err.traceback, once_key=key)
        if not warnings:
            warnings.append((err, str(path)))
            log(f"fleetsim: warning: {name}: round {err.round}: device function for {err.message_type!r} raised "
                f"{key}; recorded as errors, the run goes on (traceback in {path})")

    grid = FleetGrid(fleet, pool, strategy.device_app, seed=seed, deadline_s=cfg.experiment.deadline_s,
                     wait_s=cfg.experiment.wait_s, on_round=on_round, on_device_error=cfg.experiment.on_device_error,
                     on_code_error=on_code_error)
    result, failure, status, hosts_lost = None, None, "complete", False
    try:
        pool.reset(initial)
        t_start = t_prepared = time.perf_counter()  # a strategy's wall time starts with its hosts ready
        prepare = getattr(strategy, "prepare", None)
        if prepare is not None:  # cloud-side training before round 1 (DUET, MoMoDistill)
            prepare(cloud)
        t_prepared = time.perf_counter()
        with flower_patched(grid, seed), quiet_flower():
            result = strategy.start(grid=grid, initial_arrays=array_record(initial), num_rounds=fleet.timeline.n_rounds,
                                    evaluate_fn=grid.round_hook)
            grid.finish_round()
    except StrategyFailure as exc:
        failure, status = exc, "failed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except FleetsimError as exc:  # the strategy asked the fleet for the impossible
        failure, status = StrategyFailure(str(exc), round=grid.round or None, stage="strategy",
                                          error_type=type(exc).__name__), "failed"
    except Exception as exc:  # a bug in the strategy's server half, or a host process died
        hosts_lost = pool.lost_host(exc)
        if hosts_lost:
            first = (str(exc).splitlines() or [""])[0][:300]
            failure = StrategyFailure(f"round {grid.round}: a device host process died ({type(exc).__name__}: {first}); "
                                      f"the next strategy gets a new host pool", round=grid.round, stage="device host",
                                      error_type=type(exc).__name__, detail=first,
                                      traceback="".join(traceback.format_exception(exc)))
        else:
            failure = server_failure(exc, grid.round)
        status = "failed"
    except BaseException:  # SystemExit and the like: the strategy did not complete
        status = "interrupted"
        raise
    finally:
        if status == "failed":
            try:
                grid.finish_round()  # the round in flight, up to the failure, is kept
            except Exception:  # noqa: BLE001 -- the first failure is the one reported
                pass
        summary = summarise(grid.results, fleet, time.perf_counter() - t_start, grid.clock.t)
        summary["prepare_seconds"] = t_prepared - t_start
        summary["strategy_metrics"] = {str(r): dict(m) for r, m in getattr(result, "train_metrics_clientapp", {}).items()}
        summary["strategy_eval_metrics"] = {str(r): dict(m) for r, m in
                                            getattr(result, "evaluate_metrics_clientapp", {}).items()}
        failed_in = failure.info.get("round") if failure is not None else None
        done = sum(1 for r in grid.results if not failed_in or r.round < failed_in)  # the failed round is not complete
        state.end(name, summary, status, failure, rounds=done)
        if summary.get("quarantined") and not (failure is not None and failure.info.get("kind") == "non-finite"):
            log(f"fleetsim: warning: {name}: {summary['quarantined']} device replies were quarantined (non-finite or "
                f"diverged updates, never aggregated; quarantined in rounds.parquet); look at device.lr")
        if summary.get("nonfinite_score_device_rounds"):
            log(f"fleetsim: warning: {name}: {summary['nonfinite_score_device_rounds']} device-rounds were scored by a "
                f"model that emits NaN/Inf; their metrics are NaN and left out of every mean (nonfinite in devices.parquet)")
    return status, hosts_lost


def format_table(summary: dict[str, Any]) -> str:
    """The summary table printed at the end of ``fleetsim run``: quality and cost per
    strategy, then its status, code errors and quarantined replies."""
    cols = [("strategy", "{}"), ("AUC", "{:.4f}"), ("UAUC", "{:.4f}"), ("p10 uAUC", "{:.4f}"), ("tail UAUC", "{:.4f}"),
            ("MB up", "{:.2f}"), ("MB down", "{:.2f}"), ("sim h", "{:.1f}"), ("wall s", "{:.1f}"), ("status", "{}"),
            ("errors", "{}"), ("quar.", "{}")]
    rows = []
    for name, s in summary["strategies"].items():
        tail = (s.get("by_bucket") or {}).get("tail") or {}
        status = s.get("status", "complete")
        failed_in = (s.get("error") or {}).get("round")
        if status == "failed" and failed_in:
            status = f"failed in round {failed_in}"
        elif status == "pending":
            status = "not run"
        elif status != "complete":
            status = f"{status} ({s.get('rounds_completed', 0)} rounds)"
        num = lambda k, scale=1.0: None if s.get(k) is None else s[k] / scale
        vals = [name, s.get("overall_auc"), s.get("uauc"), s.get("user_auc_p10"), tail.get("uauc"),
                num("bytes_up", 1e6), num("bytes_down", 1e6), num("simulated_seconds", 3600), s.get("wall_seconds"),
                status, s.get("errors", 0), s.get("quarantined", 0)]
        rows.append(["-" if v is None else fmt.format(v) for v, (_, fmt) in zip(vals, cols)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (h, _) in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line([h for h, _ in cols]), line(["-" * w for w in widths]), *map(line, rows)])


def failed_strategies(summary: dict[str, Any]) -> list[str]:
    return [n for n, s in summary.get("strategies", {}).items() if s.get("status") == "failed"]
