"""Throughput of FleetGrid against Flower's own simulation engine, same strategy and devices.

FedAvg over a synthetic fleet (default 10,000 devices, all always online, no failures,
1,000 sampled per round, 5 rounds) runs twice:

(a) on ``FleetGrid`` over a Ray ``HostPool`` (embedded Ray, one host per CPU by default);
(b) on Flower's ``run_simulation`` (``simulator.flower_app.run_on_flower``): the same
    strategy class and parameters and the same device function, one ClientApp call per
    device.

A round's wall time is measured on the strategy itself, identically for both engines:
from the end of ``aggregate_train`` of the previous round (for round 1: the start of
``configure_train``) to the end of its own ``aggregate_train``. It therefore holds sampling,
message construction, the exchange, aggregation and everything the engine does between
rounds (FleetGrid also scores every active device of the next window there; Flower has no
such work). Round 1 pays actor warm-up (Flower builds the fleet in each actor) and is
excluded: throughput = device-rounds of the warm rounds / their total wall time.

Run: ``python benchmarks/fleet_throughput.py [--devices 10000] [--per-round 1000]
[--rounds 5] [--skip-flower] [--json PATH] [--profile ROUND]``. The last line of stdout is
the result as JSON. ``--profile R`` also prints a cProfile of the driver for round R of
the FleetGrid run (host-side work shows up as waiting in ``ray.get``).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Callable

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import numpy as np  # noqa: E402

import simulator.grid as grid_module  # noqa: E402
from devices.pool import HostPool  # noqa: E402
from simulator import config  # noqa: E402
from simulator.fleetrun import FleetRun  # noqa: E402
from simulator.grid import FleetGrid  # noqa: E402
from simulator.run import make_strategy  # noqa: E402


def quiet() -> None:
    """Flower logs every round at INFO; keep the benchmark's output to its table."""
    logging.getLogger("flwr").setLevel(logging.WARNING)


# Per-round timing on the strategy ---------------------------------------------------------


class RoundTimer:
    """Timestamps of a strategy's ``configure_train`` / ``aggregate_train`` per round.

    Wraps the two methods on the instance (``Strategy.start`` calls ``self.<method>``), so
    the strategy's class, parameters and device functions stay exactly those under test.
    ``on_round_end`` (if set) is called after ``aggregate_train`` of every round.
    """

    def __init__(self, strategy) -> None:
        self.marks: dict[int, dict[str, float]] = defaultdict(dict)
        self.sent: dict[int, int] = {}
        self.ok: dict[int, int] = {}
        self.on_round_end: Callable[[int], None] | None = None
        configure, aggregate = strategy.configure_train, strategy.aggregate_train

        def configure_train(server_round, arrays, cfg, grid):
            self.marks[server_round]["cfg_start"] = time.perf_counter()
            msgs = list(configure(server_round, arrays, cfg, grid))
            self.sent[server_round] = len(msgs)
            self.marks[server_round]["cfg_end"] = time.perf_counter()
            return msgs

        def aggregate_train(server_round, replies):
            self.marks[server_round]["agg_start"] = time.perf_counter()
            replies = list(replies)
            self.ok[server_round] = sum(not m.has_error() for m in replies)
            out = aggregate(server_round, replies)
            self.marks[server_round]["agg_end"] = time.perf_counter()
            if self.on_round_end:
                self.on_round_end(server_round)
            return out

        strategy.configure_train = configure_train
        strategy.aggregate_train = aggregate_train

    def rounds(self) -> list[dict[str, float]]:
        out = []
        prev_end = None
        for r in sorted(self.marks):
            m = self.marks[r]
            start = m["cfg_start"] if prev_end is None else prev_end
            out.append({
                "round": r,
                "sent": self.sent.get(r, 0),
                "ok": self.ok.get(r, 0),
                "round_s": m["agg_end"] - start,
                "configure_s": m["cfg_end"] - m["cfg_start"],
                "exchange_s": m["agg_start"] - m["cfg_end"],
                "aggregate_s": m["agg_end"] - m["agg_start"],
                "between_s": m["cfg_start"] - start,  # previous round's tail: evaluate / round_hook
            })
            prev_end = m["agg_end"]
        return out


def summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """Medians and device-rounds per second over the warm rounds (round 1 excluded)."""
    warm = rounds[1:] if len(rounds) > 1 else rounds
    wall = sum(r["round_s"] for r in warm)
    dev = sum(r["sent"] for r in warm)
    return {
        "rounds": rounds,
        "warm_rounds": [r["round"] for r in warm],
        "first_round_s": rounds[0]["round_s"] if rounds else float("nan"),
        "median_round_s": statistics.median(r["round_s"] for r in warm) if warm else float("nan"),
        "median_exchange_s": statistics.median(r["exchange_s"] for r in warm) if warm else float("nan"),
        "warm_device_rounds": dev,
        "warm_wall_s": wall,
        "device_rounds_per_s": dev / wall if wall > 0 else float("nan"),
    }


# FleetGrid's own breakdown -------------------------------------------------------------------


class Stopwatch:
    """Accumulated wall time of named calls, per round (``round_of`` says the current one)."""

    def __init__(self, round_of: Callable[[], int]) -> None:
        self.round_of = round_of
        self.t: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.n: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                r = self.round_of()
                self.t[r][name] += time.perf_counter() - t0
                self.n[r][name] += 1

        return timed


def instrument_fleetgrid(grid: FleetGrid, pool: HostPool, watch: Stopwatch) -> Callable[[], None]:
    """Time the pool's Ray calls and the record conversions of one FleetGrid run.

    The conversions are module-level functions of ``simulator.grid``; they are wrapped for
    this process only and restored by the returned function.
    """
    pool.run = watch.wrap("pool.run", pool.run)
    pool.score = watch.wrap("pool.score", pool.score)
    grid.send_and_receive = watch.wrap("send_and_receive", grid.send_and_receive)
    # only the converters simulator.grid actually uses (it may change): missing ones are skipped
    saved = {name: getattr(grid_module, name) for name in ("to_payload", "to_recorddict") if hasattr(grid_module, name)}
    for name, fn in saved.items():
        setattr(grid_module, name, watch.wrap(name, fn))

    def restore() -> None:
        for name, fn in saved.items():
            setattr(grid_module, name, fn)

    return restore


# The two engines -----------------------------------------------------------------------------


def make_config(args) -> config.ExperimentConfig:
    fraction = args.per_round / args.devices
    return config.from_dict({
        "experiment": {"strategies": ["fedavg"], "seed": args.seed, "hosts": args.hosts,
                       "deadline_s": 1e9},  # nobody is late: both engines aggregate the same devices
        "data": {"n_devices": args.devices, "n_rounds": args.rounds},
        "profiles": {"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0},
        "cloud": {"epochs": 1},
        # min_train_nodes pins the sample size where int(n * fraction) rounds down
        "strategies": {"fedavg": {"fraction_train": fraction, "min_train_nodes": args.per_round,
                                  "min_available_nodes": args.per_round}},
    })


def new_strategy(cfg):
    return make_strategy("fedavg", cfg.strategies["fedavg"])


def run_fleetgrid(run: FleetRun, args) -> dict[str, Any]:
    import ray

    t0 = time.perf_counter()
    pool = run.start_pool()
    pool.reset(run.initial)
    pool_s = time.perf_counter() - t0
    strategy = new_strategy(run.cfg)
    timer = RoundTimer(strategy)
    grid = run.new_grid(strategy)
    # rounds as the strategy counts them: a round "ends" after aggregate_train
    current = {"r": 1}
    watch = Stopwatch(lambda: current["r"])
    restore = instrument_fleetgrid(grid, pool, watch)
    hook = watch.wrap("round_hook", grid.round_hook)

    profiler = cProfile.Profile() if args.profile else None

    def on_round_end(r: int) -> None:
        current["r"] = r + 1  # the round_hook after round r scores round r+1's window
        if profiler is not None and r == args.profile - 1:
            profiler.enable()
        if profiler is not None and r == args.profile:
            profiler.disable()

    timer.on_round_end = on_round_end
    if profiler is not None and args.profile == 1:
        profiler.enable()
    try:
        played = run.play("fedavg", strategy, grid=grid, num_rounds=args.rounds, evaluate_fn=hook)
        if played.status != "complete":
            raise RuntimeError(f"fedavg {played.status}: {played.failure}")
    finally:
        restore()
        if profiler is not None:
            profiler.disable()
        n_hosts = pool.n_hosts
        run.close()
        ray.shutdown()
    out = summary(timer.rounds())
    out.update(hosts=n_hosts, pool_start_s=pool_s)
    for row in out["rounds"]:
        r = row["round"]
        row["breakdown"] = {k: round(v, 4) for k, v in watch.t[r].items()}
        row["calls"] = dict(watch.n[r])
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(35)
        out["profile_text"] = buf.getvalue()
    return out


def run_flower(cfg, initial, args) -> dict[str, Any]:
    from simulator.flower_app import run_on_flower

    strategy = new_strategy(cfg)
    timer = RoundTimer(strategy)
    t0 = time.perf_counter()
    result = run_on_flower(cfg, strategy, initial, args.rounds)
    total = time.perf_counter() - t0
    if result is None:
        raise RuntimeError("Flower's run_simulation returned no result (see its log above)")
    out = summary(timer.rounds())
    out["total_s"] = total
    return out


# Output ----------------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    engines = [e for e in ("fleetgrid", "flower") if e in res]
    lines = [f"{'round':>5}  " + "  ".join(f"{e + ' s':>12}  {e + ' dev/s':>15}" for e in engines)]
    n = max(len(res[e]["rounds"]) for e in engines)
    for i in range(n):
        cells = []
        for e in engines:
            rows = res[e]["rounds"]
            if i < len(rows):
                r = rows[i]
                cells.append(f"{r['round_s']:12.2f}  {r['sent'] / r['round_s']:15.0f}")
            else:
                cells.append(f"{'':12}  {'':15}")
        lines.append(f"{i + 1:>5}  " + "  ".join(cells) + ("   (warm-up, excluded)" if i == 0 else ""))
    lines.append("")
    for e in engines:
        s = res[e]
        lines.append(f"{e:>9}: warm median round {s['median_round_s']:.2f} s (exchange {s['median_exchange_s']:.2f} s), "
                     f"{s['device_rounds_per_s']:.0f} device-rounds/s over rounds {s['warm_rounds']}, "
                     f"first round {s['first_round_s']:.2f} s; 1-min load {s['load_1min'][0]:.1f} -> {s['load_1min'][1]:.1f}")
    if "ratio" in res:
        lines.append(f"    ratio: FleetGrid / Flower = {res['ratio']:.1f}x device-rounds/s "
                     f"(the goal of issue 15: >= 100)")
    return "\n".join(lines)


def breakdown_table(fg: dict[str, Any]) -> str:
    keys = ["round_s", "configure_s", "exchange_s", "aggregate_s", "between_s"]
    bkeys = ["pool.run", "to_payload", "to_recorddict", "round_hook", "pool.score"]
    head = f"{'round':>5}  " + "  ".join(f"{k:>11}" for k in keys + bkeys)
    lines = ["FleetGrid per-round breakdown (s; pool.score runs inside round_hook; to_* inside exchange):", head]
    for r in fg["rounds"]:
        vals = [r[k] for k in keys] + [r["breakdown"].get(k, 0.0) for k in bkeys]
        lines.append(f"{r['round']:>5}  " + "  ".join(f"{v:11.3f}" for v in vals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--per-round", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hosts", type=int, default=0, help="Ray host actors for FleetGrid (0 = one per CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--skip-fleetgrid", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the result JSON here")
    ap.add_argument("--profile", type=int, default=0, metavar="ROUND",
                    help="cProfile the FleetGrid driver during this round (0 = off)")
    args = ap.parse_args(argv)
    if not 0 < args.per_round <= args.devices:
        ap.error("--per-round must be in 1..--devices")
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is warm-up and excluded)")
    quiet()

    cfg = make_config(args)
    t0 = time.perf_counter()
    run = FleetRun(cfg)
    fleet = run.build_fleet()
    run.train_cloud()
    spec, initial = run.spec, run.initial
    setup_s = time.perf_counter() - t0
    print(f"fleet: {fleet.n_devices} devices, {args.per_round} per round, {args.rounds} rounds, "
          f"model {spec.n_params()} params; fleet + 1-epoch cloud model in {setup_s:.1f} s; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)

    res: dict[str, Any] = {
        "devices": args.devices, "per_round": args.per_round, "rounds": args.rounds, "seed": args.seed,
        "cpus": os.cpu_count(), "python": platform.python_version(), "setup_s": setup_s,
    }
    try:
        import flwr
        import ray

        res["versions"] = {"flwr": flwr.__version__, "ray": ray.__version__}
    except Exception:  # pragma: no cover - informational only
        pass

    if not args.skip_fleetgrid:
        print(f"running FleetGrid (load {os.getloadavg()[0]:.2f}) ...", flush=True)
        load0 = os.getloadavg()[0]
        res["fleetgrid"] = run_fleetgrid(run, args)
        res["fleetgrid"]["load_1min"] = [load0, os.getloadavg()[0]]  # another job on the machine skews timings
        quiet()
    if not args.skip_flower:
        print(f"running Flower run_simulation (load {os.getloadavg()[0]:.2f}) ...", flush=True)
        load0 = os.getloadavg()[0]
        res["flower"] = run_flower(cfg, initial, args)
        res["flower"]["load_1min"] = [load0, os.getloadavg()[0]]
        quiet()
    if "fleetgrid" in res and "flower" in res:
        res["ratio"] = res["fleetgrid"]["device_rounds_per_s"] / res["flower"]["device_rounds_per_s"]

    print()
    print(table(res))
    if "fleetgrid" in res:
        print()
        print(breakdown_table(res["fleetgrid"]))
        prof = res["fleetgrid"].pop("profile_text", None)
        if prof:
            print(f"\ncProfile of the FleetGrid driver, round {args.profile}:\n{prof}")
    line = json.dumps(res, default=float)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)
    return res


if __name__ == "__main__":
    main()
    sys.stdout.flush()
