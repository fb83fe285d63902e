"""What checkpointing costs: wall time of a run with and without checkpoints, and the size
and seconds of each checkpoint.

The same experiment (default: the quickstart, ``fleetsim run``'s default run) runs
``--repeats`` times with ``experiment.checkpoint_every = 1`` and as often with ``0``,
alternating (this machine is shared and noisy), each into a fresh folder, through
``simulator.run.run_experiment``. Medians are reported. Per checkpoint: bytes on disk
(driver state + every host's shard) and seconds to write it, from ``FleetRun.checkpoint_log``.

Run: ``python benchmarks/checkpoint_cost.py [EXPERIMENT.toml] [--set k=v ...] [--repeats 3]
[--strategies fedavg,duet]``. The last line is ``checkpoint overhead: X %``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

from simulator import config  # noqa: E402
from simulator import fleetrun  # noqa: E402
from simulator.run import run_experiment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", nargs="?")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", help="comma-separated subset of the experiment's strategies")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.strategies:
        overrides.append(f"experiment.strategies={args.strategies.split(',')!r}".replace("'", '"'))

    logs: list[dict] = []
    original = fleetrun.FleetRun.close

    def close(self):  # collect each run's checkpoint log
        logs.extend(self.checkpoint_log)
        original(self)

    fleetrun.FleetRun.close = close
    walls: dict[int, list[float]] = {1: [], 0: []}
    quiet = lambda msg: None
    for rep in range(args.repeats):
        for every in (1, 0) if rep % 2 == 0 else (0, 1):
            cfg = config.load(args.experiment, [*overrides, f"experiment.checkpoint_every={every}"])
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                run_experiment(cfg, os.path.join(d, "run"), progress=False, log=quiet)
                walls[every].append(time.perf_counter() - t0)
            print(f"repeat {rep + 1}, checkpoint_every={every}: {walls[every][-1]:.1f} s", file=sys.stderr, flush=True)
    on, off = statistics.median(walls[1]), statistics.median(walls[0])
    per = [x["seconds"] for x in logs]
    size = [x["bytes"] for x in logs]
    print(f"runs (median of {args.repeats}): with checkpoints {on:.1f} s, without {off:.1f} s")
    if logs:
        print(f"checkpoints: {len(logs) // args.repeats} per run; size median {statistics.median(size) / 1e6:.2f} MB, "
              f"max {max(size) / 1e6:.2f} MB; seconds median {statistics.median(per):.3f}, max {max(per):.3f}; "
              f"total per run {sum(per) / args.repeats:.1f} s")
    print(f"checkpoint overhead: {100 * (on - off) / off:.1f} %")


if __name__ == "__main__":
    main()
