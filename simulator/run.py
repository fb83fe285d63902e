"""The run loop: one fleet, one cloud model, every strategy on identical draws.

For each strategy the hosts are reset to the installed cloud model and a fresh
``FleetGrid`` (same seed, so the same availability, failures and evaluation samples) is
handed to the strategy's own ``start()``. Rounds are written as they complete.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import pandas as pd
from flwr.serverapp.strategy import Strategy

from devices.models import ModelSpec
from devices.pool import HostPool
from devices.runtime import DeviceApp
from simulator import metrics
from simulator.cloud import CloudContext, train_cloud_model
from simulator.config import SHORT_NAMES, ExperimentConfig
from simulator.errors import ConfigError, FleetsimError
from simulator.fleet import Fleet, build_fleet
from simulator.grid import FleetGrid, RoundResult, flower_patched
from simulator.records import array_record
from simulator.results import RunWriter


def resolve_strategy(name: str) -> type:
    """A strategy class from a short name or an import path ``package.module:Class``."""
    path = SHORT_NAMES.get(name, name)
    if os.getcwd() not in sys.path:  # user strategies next to the experiment, as `python -m` would
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError("experiment.strategies", name, "a short name or 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("experiment.strategies", name, f"cannot import module {module_name!r} ({exc})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError("experiment.strategies", name, f"module {module_name!r} has no {attr!r}")
    return cls


def make_strategy(name: str, params: dict[str, Any]) -> Strategy:
    """Instantiate and check a strategy: a Flower ``Strategy`` with a ``device_app``."""
    cls = resolve_strategy(name)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError("experiment.strategies", name, "a subclass of flwr.serverapp.strategy.Strategy")
    sig = inspect.signature(cls)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for key in params:
        if key not in sig.parameters and not has_var_kw:
            allowed = ", ".join(k for k in sig.parameters if k not in ("self", "kwargs")) or "none"
            raise ConfigError(f"strategies.{name}.{key}", params[key], f"unknown parameter; known: {allowed}")
    try:
        strategy = cls(**params)
    except (TypeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        key, sep, rest = msg.partition(" = ")
        if sep and key in params:  # our strategies say "param = value: what is allowed"
            raise ConfigError(f"strategies.{name}.{key}", params[key], rest.partition(": ")[2] or rest) from None
        raise ConfigError(f"strategies.{name}", params, msg) from None
    if not isinstance(getattr(strategy, "device_app", None), DeviceApp):
        raise ConfigError("experiment.strategies", name, "a strategy with a device_app (devices.runtime.DeviceApp)")
    return strategy


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
    out = metrics.summarize(df, overall_auc=hist.auc(), thresholds=fleet.bucket_thresholds)
    sel = df[df["selected"]] if len(df) else df
    n_sel = max(int(len(sel)), 1)
    out.update(
        bytes_down=int(df["bytes_down"].sum()), bytes_up=int(df["bytes_up"].sum()),
        mb_down_per_device_round=float(df["bytes_down"].sum()) / n_sel / 1e6,
        mb_up_per_device_round=float(df["bytes_up"].sum()) / n_sel / 1e6,
        device_flops=float(df["device_flops"].sum()),
        gflops_per_device_round=float(df["device_flops"].sum()) / n_sel / 1e9,
        device_seconds=float(df["device_seconds"].sum()),
        selected_device_rounds=int(len(sel)),
        status_counts={k: int(v) for k, v in sel["status"].value_counts().items()} if len(sel) else {},
        round_latency_s=float(sum(r.info["latency_s"] for r in results)),
        simulated_seconds=float(sim_end - fleet.timeline.history_end),
        wall_seconds=float(wall_s),
        per_round=metrics.per_round(df).to_dict(orient="records") if len(df) else [],
    )
    return out


def run_experiment(cfg: ExperimentConfig, out: str, *, ray_address: str | None = None, use_ray: bool = True,
                   progress: bool = True, log=print) -> dict[str, Any]:
    """Run every strategy of ``cfg`` on one fleet; write results to ``out``; return the summary."""
    if getattr(cfg.data, "protocol", "fleet") == "leave_last":  # the DUET paper's protocol, not a fleet
        from simulator.paper import run_leave_last

        return run_leave_last(cfg, out, log=log)
    writer = RunWriter(out)  # fail on a bad --out before any expensive work
    try:
        strategies = [(name, make_strategy(name, cfg.strategies.get(name, {}))) for name in cfg.experiment.strategies]
        t0 = time.perf_counter()
        fleet = build_fleet(cfg)
    except FleetsimError:
        writer.discard_if_empty()  # leave no empty run folder behind for bad input
        raise
    seed = cfg.experiment.seed
    writer.write_config(cfg.to_toml())
    writer.write_fleet(fleet)
    spec = ModelSpec(n_items=fleet.interactions.n_items, backbone=cfg.model.backbone, dim=cfg.model.dim, window=cfg.model.window)
    c = cfg.cloud
    initial, losses = train_cloud_model(fleet.interactions, fleet.timeline.history_end, spec, epochs=c.epochs, lr=c.lr,
                                        batch_size=c.batch_size, negatives=c.negatives, seed=seed)
    trained = f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})" if losses else "(untrained: cloud.epochs = 0)"
    log(f"fleet: {fleet.n_devices} devices ({fleet.source}), {fleet.timeline.n_rounds} rounds; cloud model "
        f"ready in {time.perf_counter() - t0:.1f} s {trained}")
    pool = HostPool(fleet.interactions, fleet.timeline, spec, cfg.device, seed, n_hosts=cfg.experiment.hosts,
                    use_ray=use_ray, ray_address=ray_address)
    n_rounds = fleet.timeline.n_rounds
    cloud = CloudContext(fleet.interactions, fleet.timeline.history_end, spec, initial, seed,
                         epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, negatives=c.negatives)
    try:
        from tqdm import tqdm

        bar = tqdm(total=n_rounds * len(strategies), disable=not progress, unit="round", dynamic_ncols=True)
        for name, strategy in strategies:
            bar.set_description(name)
            pool.reset(initial)
            t_start = time.perf_counter()
            if hasattr(strategy, "prepare"):  # cloud-side training before round 1 (DUET, MoMoDistill)
                strategy.prepare(cloud)
            t_prepared = time.perf_counter()

            def on_round(result: RoundResult, name: str = name) -> None:
                writer.write_round(name, result)
                bar.update(1)

            grid = FleetGrid(fleet, pool, strategy.device_app, seed=seed, deadline_s=cfg.experiment.deadline_s,
                             wait_s=cfg.experiment.wait_s, on_round=on_round)
            with flower_patched(grid, seed), quiet_flower():
                result = strategy.start(grid=grid, initial_arrays=array_record(initial), num_rounds=n_rounds,
                                        evaluate_fn=grid.round_hook)
                grid.finish_round()
            summary = summarise(grid.results, fleet, time.perf_counter() - t_start, grid.clock.t)
            summary["prepare_seconds"] = t_prepared - t_start
            summary["strategy_metrics"] = {str(r): dict(m) for r, m in getattr(result, "train_metrics_clientapp", {}).items()}
            summary["strategy_eval_metrics"] = {str(r): dict(m) for r, m in
                                                getattr(result, "evaluate_metrics_clientapp", {}).items()}
            writer.write_summary(name, summary)
        bar.close()
    finally:
        pool.shutdown()
    return writer.summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary table printed at the end of ``fleetsim run``."""
    cols = [("strategy", "{}"), ("AUC", "{:.4f}"), ("UAUC", "{:.4f}"), ("p10 uAUC", "{:.4f}"), ("tail UAUC", "{:.4f}"),
            ("MB up", "{:.2f}"), ("MB down", "{:.2f}"), ("sim h", "{:.1f}"), ("wall s", "{:.1f}")]
    rows = []
    for name, s in summary["strategies"].items():
        tail = (s.get("by_bucket") or {}).get("tail") or {}
        vals = [name, s.get("overall_auc"), s.get("uauc"), s.get("user_auc_p10"), tail.get("uauc"),
                s["bytes_up"] / 1e6, s["bytes_down"] / 1e6, s["simulated_seconds"] / 3600, s["wall_seconds"]]
        rows.append(["-" if v is None else fmt.format(v) for v, (_, fmt) in zip(vals, cols)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (h, _) in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line([h for h, _ in cols]), line(["-" * w for w in widths]), *map(line, rows)])
