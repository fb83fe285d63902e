"""The ``fleetsim run`` loop: one fleet, one cloud model, every strategy on identical draws.

The run's life (folder, fleet, cloud model, host pool, one ``FleetGrid`` per strategy,
records) is ``simulator.fleetrun.FleetRun``; this module orders its steps for a whole
experiment, shows progress and formats the closing table.
"""
from __future__ import annotations

import time
from typing import Any

from devices import raywatch
from simulator.config import ExperimentConfig
from simulator.errors import NonFiniteError, Terminated
from simulator.metrics import nonfinite_status
from simulator.fleetrun import (  # noqa: F401 (re-exported)
    FleetRun, Played, RunState, quiet_flower, server_failure, summarise)
from strategies.registry import make_strategy, resolve_strategy  # noqa: F401 (re-exported)


def run_experiment(cfg: ExperimentConfig, out: str, *, ray_address: str | None = None, use_ray: bool = True,
                   progress: bool = True, log=print, resume: bool = False,
                   allow_code_change: bool = False) -> dict[str, Any]:
    """Run every strategy of ``cfg`` on one fleet; write results to ``out``; return the summary.

    A strategy that fails (a device or server code error, non-finite training) is
    recorded as ``failed`` in ``summary.json`` with its error, its traceback goes to
    ``<out>/<strategy>/error.log``, one line goes to ``log``, and the next strategy runs.

    ``resume``: continue the run in ``out`` (``simulator.checkpoint.check_resumable``
    first): finished strategies are kept, the one in flight continues from its last
    checkpoint, the others run. It is refused (``simulator.provenance``) if the fleet's data
    changed since the run started, or its code or environment did and not
    ``allow_code_change``.
    """
    # SIGTERM from the start: one while the fleet builds or the cloud model trains ends the
    # run as one during a strategy does (one line, exit 143, Ray and the hosts stopped)
    raywatch.reset()
    restore_early = _terminate_on_sigterm()
    try:
        return _run_experiment(cfg, out, ray_address=ray_address, use_ray=use_ray, progress=progress, log=log,
                               resume=resume, allow_code_change=allow_code_change)
    finally:
        restore_early()


def _run_experiment(cfg: ExperimentConfig, out: str, *, ray_address: str | None, use_ray: bool, progress: bool,
                    log, resume: bool, allow_code_change: bool) -> dict[str, Any]:
    run = FleetRun(cfg, out, use_ray=use_ray, ray_address=ray_address, log=log, resume=resume,
                   allow_code_change=allow_code_change)
    strategies = [(name, make_strategy(name, cfg.strategies.get(name, {}))) for name in cfg.experiment.strategies]
    if resume:
        done = [n for n, _ in strategies if run.summary["strategies"].get(n, {}).get("status") in ("complete", "failed")]
        strategies = [(n, s) for n, s in strategies if n not in done]
    names = [name for name, _ in strategies]
    run.connect()  # an unreachable cluster fails here, before --out is touched
    t0 = time.perf_counter()
    with run:
        fleet = run.build_fleet()
        run.open(names)  # resume: checks the data, code and environment, reopens the folder, keeps its statuses
        if resume:
            log(f"fleetsim: resuming {out}: kept {', '.join(done) or 'no finished strategy'}; to run: "
                f"{', '.join(names)}")
        try:
            run.train_cloud()
        except NonFiniteError as exc:  # every strategy starts from the cloud model: none can run
            log(f"fleetsim: error: {exc}; no strategy can run")
            run.fail_all(names, exc)
            return run.summary
        losses = run.cloud_losses
        trained = f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})" if losses else "(untrained: cloud.epochs = 0)"
        log(f"fleet: {fleet.n_devices} devices ({fleet.source}), {fleet.timeline.n_rounds} rounds; cloud model "
            f"ready in {time.perf_counter() - t0:.1f} s {trained}")
        run.start_pool()
        restore = _terminate_on_sigterm()  # again after ray.init: Ray's own handler would call sys.exit
        from tqdm import tqdm

        bar = tqdm(total=fleet.timeline.n_rounds * len(strategies), disable=not progress, unit="round",
                   dynamic_ncols=True)
        try:
            for name, strategy in strategies:
                bar.set_description(name)
                run.play(name, strategy, on_round=lambda _result: bar.update(1))
        finally:  # also when a checkpoint cannot be restored (a one-line ResumeError)
            bar.close()
            restore()
    return run.summary


def _terminate_on_sigterm():
    """SIGTERM, and SIGHUP (the terminal closed), raise ``Terminated`` (a KeyboardInterrupt)
    in the main thread, so a killed run ends like Ctrl-C: the strategy in flight is marked
    interrupted. All three, Ctrl-C too, first tell ``devices.raywatch`` to stand down.
    Returns the restorer."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum, frame):
        raywatch.stand_down()  # a signal sent to the whole group ends Ray's GCS too: not a loss to report
        if raywatch.lost() is None:  # else devices.raywatch sent it (a lost GCS or raylet), not the user
            Terminated.received = signum
        raise Terminated()

    terminate.interrupts_run = True  # devices.raywatch sends SIGTERM only to this handler

    def interrupt(signum, frame):  # Ctrl-C: Python's own KeyboardInterrupt, after the same stand-down
        raywatch.stand_down()
        signal.default_int_handler(signum, frame)

    previous = {sig: signal.signal(sig, handler)
                for sig, handler in ((signal.SIGTERM, terminate), (signal.SIGHUP, terminate), (signal.SIGINT, interrupt))}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


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
        elif status == "complete" and nonfinite_status(s):
            status = nonfinite_status(s)
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
    """Strategies that failed, or that some device scored with a model emitting NaN/Inf
    (their means leave those devices out, so they are not a sound comparison): a run with
    any of them exits with code 1."""
    return [n for n, s in summary.get("strategies", {}).items()
            if s.get("status") == "failed" or s.get("nonfinite_score_device_rounds")]

