"""Benchmark: DUET serving — heads for 10,000 devices in one round.

    python benchmarks/duet_serving.py [--devices 10000] [--backbone gru4rec] [--repeats 5]

Reports, median of ``--repeats``:
- generation: the cloud's one batched pass over 10,000 uploaded windows (target: <= 2 s;
  per device beside the paper's 0.34 ms claim);
- a whole DUET round through FleetGrid: window upload, generation and head install for
  every device (all online), i.e. what the round costs the simulator.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--backbone", default="gru4rec", choices=["gru4rec", "din", "sasrec"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-round", action="store_true", help="only time the generation")
    args = ap.parse_args()

    import logging

    import numpy as np
    import torch

    from simulator import config
    from simulator.fleetrun import FleetRun
    from simulator.run import make_strategy

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = config.from_dict({
        "experiment": {"strategies": ["duet"], "seed": 0, "deadline_s": 1e9},
        "cloud": {"epochs": 1},
        "data": {"n_devices": args.devices, "n_rounds": 2},
        "model": {"backbone": args.backbone},
        "profiles": {"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0},
    })
    run = FleetRun(cfg)
    run.build_fleet()
    run.train_cloud()
    spec = run.spec
    duet = make_strategy("duet", {"epochs": 1, "fraction_train": 1.0})
    duet.prepare(run.cloud)

    rng = np.random.default_rng(0)
    windows = rng.integers(0, spec.n_items, size=(args.devices, spec.window))
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        duet.generate(windows)
        times.append(time.perf_counter() - t)
    gen = statistics.median(times)
    out = {"devices": args.devices, "backbone": args.backbone, "generation_s_median": gen,
           "generation_ms_per_device": 1e3 * gen / args.devices, "paper_ms_per_device": 0.34,
           "generation_s_all": times}
    print(f"generation  {args.devices:,} heads ({args.backbone})  median {gen:.3f} s  "
          f"= {1e3 * gen / args.devices:.4f} ms/device (paper: 0.34 ms)  target <= 2 s: {'ok' if gen <= 2 else 'MISSED'}")

    if not args.skip_round:
        from simulator.grid import flower_patched

        pool = run.start_pool()
        rounds = []
        for rep in range(args.repeats):
            pool.reset(run.initial)
            duet._has_body = set()
            grid = run.new_grid(duet)
            with flower_patched(grid, 0):
                grid.begin_round(1)
                t = time.perf_counter()
                metrics = duet.round(grid, 1)
                rounds.append(time.perf_counter() - t)
        run.close()
        r = statistics.median(rounds)
        out.update(round_s_median=r, round_s_all=rounds, installed=int(metrics["installed"]))
        print(f"DUET round  {args.devices:,} devices through FleetGrid (upload + generate + install)  "
              f"median {r:.3f} s  ({int(metrics['installed']):,} heads installed)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
