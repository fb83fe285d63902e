"""Per-round cost against fleet size: 10k, 100k and 1M devices, 1,000 per round.

    python benchmarks/fleet_scale.py [--sizes 10000,100000,1000000] [--warm 3] [--hosts 0]

Each fleet size runs in its own process (so its memory is its own): FedAvg with GRU4Rec on
a synthetic fleet (always online, no failures, the untrained cloud model: the cloud's
history training is not what is measured), 1,000 devices per round, one warm-up round and
``--warm`` warm rounds. Every round ends with the prequential scoring of *every* device
with interactions in the next window (``experiment.eval_users = "all"``).

Printed per size: start-up seconds, from ``FleetRun.connect`` (which starts Ray and the host
processes in the background) to a pool whose hosts hold their shards and the cloud model;
within it, the fleet build's seconds and the pool start's after the build (waiting for the
hosts, shards shipped, cloud model installed). Then the median warm round in seconds (and on
a second line the medians of its phases, as ``benchmarks/fleet_throughput.RoundTimer`` splits
it: configure, the exchange, aggregation, and what runs between two rounds -- the next
window's scores and the round's records), and the peak memory of all the run's processes together (the driver and every Ray process it
starts), sampled from ``/proc`` every 0.2 s, once up to the started pool and once over the
whole run. Memory is the sum of PSS (proportional set size: a shared page counts once, split among its
sharers); the sum of RSS, which counts shared pages in every process, is printed beside it.

Before it, one line gives the largest fleet's start-up (median) and whole-run peak (largest)
against issue 15's targets at 1M (<= 30 s, <= 4 GB). The last line is ``scale ratio
1M/10k per-round: X`` (the target of issue 15 is <= 1.5);
with ``--repeats N`` every size is measured N times, sizes interleaved, and X is the median
of the N ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
HERE = Path(__file__).resolve().parent


# Memory of a process tree, from /proc -------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over ``root`` and all its descendants."""
    kids, todo, pss, rss = _children(), [root], 0, 0
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:  # gone, or not ours
            continue
    return pss, rss


class PeakMemory(threading.Thread):
    """Samples ``tree_memory(pid)`` until stopped; ``mark()`` freezes a first peak."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak = [0, 0]
        self.at_mark: list[int] | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pss, rss = tree_memory(self.pid)
            self.peak = [max(self.peak[0], pss), max(self.peak[1], rss)]
            self._halt.wait(self.every_s)

    def mark(self) -> None:
        self.at_mark = list(self.peak)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# One fleet size, in a child process ----------------------------------------------------------


def one_size(n_devices: int, per_round: int, warm: int, hosts: int, seed: int) -> dict:
    import logging

    from benchmarks.fleet_throughput import RoundTimer, summary
    from simulator import config
    from simulator.fleetrun import FleetRun
    from simulator.run import make_strategy

    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = config.from_dict({
        "experiment": {"strategies": ["fedavg"], "seed": seed, "hosts": hosts, "deadline_s": 1e9},
        "data": {"n_devices": n_devices, "n_rounds": warm + 1},
        "profiles": {"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0},
        "cloud": {"epochs": 0},
        "strategies": {"fedavg": {"fraction_train": per_round / n_devices, "min_train_nodes": per_round,
                                  "min_available_nodes": per_round}},
    })
    run = FleetRun(cfg)
    t_start = time.perf_counter()
    run.connect()  # Ray and the hosts start in the background, beside the build
    t0 = time.perf_counter()
    run.build_fleet()
    build_s = time.perf_counter() - t0
    run.train_cloud()
    t0 = time.perf_counter()
    pool = run.start_pool()
    pool.reset(run.initial)
    pool_s = time.perf_counter() - t0
    startup_s = time.perf_counter() - t_start
    print("POOL-STARTED", flush=True)
    strategy = make_strategy("fedavg", cfg.strategies["fedavg"])
    timer = RoundTimer(strategy)
    try:
        played = run.play("fedavg", strategy, grid=run.new_grid(strategy), num_rounds=warm + 1)
        if played.status != "complete":
            raise RuntimeError(f"fedavg {played.status}: {played.failure}")
        hosts_used = pool.n_hosts
    finally:
        run.close()
    s = summary(timer.rounds())
    return {"devices": n_devices, "hosts": hosts_used, "build_s": build_s, "pool_start_s": pool_s, "startup_s": startup_s,
            "first_round_s": s["first_round_s"], "median_round_s": s["median_round_s"],
            "rounds_s": [r["round_s"] for r in s["rounds"]],
            "phases_s": {k: statistics.median(r[k] for r in s["rounds"][1:])
                         for k in ("configure_s", "exchange_s", "aggregate_s", "between_s")}}


def measure(n_devices: int, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.fleet_scale", "--one", str(n_devices), "--per-round", str(args.per_round),
           "--warm", str(args.warm), "--hosts", str(args.hosts), "--seed", str(args.seed)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE.parent, env=env)
    mem = PeakMemory(child.pid)
    mem.start()
    result = None
    for line in child.stdout:
        if line.startswith("POOL-STARTED"):
            mem.mark()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            sys.stdout.write(line)
    rc = child.wait()
    mem.stop()
    if rc != 0 or result is None:
        raise SystemExit(f"fleet_scale: the {n_devices:,}-device run failed (exit {rc})")
    start = mem.at_mark or mem.peak
    result.update(peak_start_pss=start[0], peak_start_rss=start[1], peak_pss=mem.peak[0], peak_rss=mem.peak[1])
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="fleet sizes, comma-separated")
    ap.add_argument("--per-round", type=int, default=1000)
    ap.add_argument("--warm", type=int, default=3, help="warm rounds measured (after one warm-up round)")
    ap.add_argument("--hosts", type=int, default=0, help="Ray device hosts (0 = as many as the CPUs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure every size this many times, sizes interleaved; the ratio is then the "
                         "median of the repeats' ratios (on a shared machine one run's ratio says little)")
    ap.add_argument("--json", metavar="PATH", help="also write all results here")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_size(args.one, args.per_round, args.warm, args.hosts, args.seed)), flush=True)
        return
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: expected comma-separated integers")
    if args.per_round < 1 or any(s < args.per_round for s in sizes) or args.warm < 1 or args.repeats < 1:
        ap.error("--per-round must be >= 1, every size >= --per-round, and --warm and --repeats >= 1")
    gb = 1 << 30
    results = []
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {args.per_round} devices per round, "
          f"{args.warm} warm rounds", flush=True)
    for n in [n for _ in range(args.repeats) for n in sizes]:
        r = measure(n, args)
        results.append(r)
        print(f"{n:>9,} devices ({r['hosts']} hosts): start-up {r['startup_s']:5.1f} s (build {r['build_s']:5.1f} s, "
              f"then pool start {r['pool_start_s']:4.1f} s), "
              f"warm round median {r['median_round_s']:6.2f} s (rounds {', '.join(f'{x:.2f}' for x in r['rounds_s'])}); "
              f"peak memory up to the started pool {r['peak_start_pss'] / gb:.2f} GB PSS "
              f"({r['peak_start_rss'] / gb:.2f} GB RSS), whole run {r['peak_pss'] / gb:.2f} GB PSS "
              f"({r['peak_rss'] / gb:.2f} GB RSS)", flush=True)
        ph = r["phases_s"]
        print(f"    warm round phases (medians): configure {ph['configure_s']:.2f} s, exchange "
              f"{ph['exchange_s']:.2f} s, aggregate {ph['aggregate_s']:.2f} s, between rounds "
              f"{ph['between_s']:.2f} s (the round hook: the next window's scores, the round's records)",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results) + "\n")
    lo, hi = (10_000, 1_000_000) if {10_000, 1_000_000} <= set(sizes) else (sizes[0], sizes[-1])
    ratios = []
    for i in range(0, len(results), len(sizes)):  # one repeat: every size once
        round_s = {r["devices"]: r["median_round_s"] for r in results[i : i + len(sizes)]}
        ratios.append(round_s[hi] / round_s[lo])
    if len(ratios) > 1:
        print(f"ratios of the {len(ratios)} repeats: {', '.join(f'{x:.2f}' for x in ratios)}")
    big = [r for r in results if r["devices"] == max(sizes)]
    startup = statistics.median(r["startup_s"] for r in big)
    peak = max(r["peak_pss"] for r in big) / gb
    verdict = lambda ok: (": ok" if ok else ": MISSED") if max(sizes) == 1_000_000 else ""  # issue 15's targets are at 1M
    print(f"{max(sizes):,} devices: start-up {startup:.1f} s (median; target <= 30 s at 1M{verdict(startup <= 30)}), "
          f"whole-run peak {peak:.2f} GB PSS (largest; target <= 4 GB at 1M{verdict(peak <= 4)})")
    name = "1M/10k" if (lo, hi) == (10_000, 1_000_000) else f"{hi}/{lo}"
    print(f"scale ratio {name} per-round: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
