"""Prequential scoring on one host, in this process: what a host does per round for the
devices it holds, without Ray, training or the driver around it.

    python benchmarks/host_scoring.py [--devices 1000000] [--hosts 2] [--rounds 1,2,3] [--repeats 2]
                                      [--personal none|head|patch]

A synthetic fleet of ``--devices`` (the defaults of ``fleetsim run``, an untrained cloud
model) is dealt to ``--hosts`` hosts as a run deals it (``devices.pool.assign_hosts``), and
host 0's shard is loaded into an in-process ``DeviceHost`` holding the cloud model (as every
device of a FedAvg run does at first). ``--personal head`` gives every device of the host
its own head as well (as DUET or a head-only LocalFinetune leave them), ``--personal patch``
its own MetaPatch patch after the encoder (about 8 KB and 4 KB a device: use a smaller
fleet, e.g. ``--devices 100000``). For each window of ``--rounds``, ``--repeats``
times, it times:

- ``samples``: building the window's evaluation samples (positives, 99 negatives each,
  windows), from an empty cache;
- ``score``: ``devices.prequential.score_window`` on them (the model, per-device metrics,
  the pooled histogram), one thread, as a host's prefetch runs it.

Printed: the rows scored, the median seconds of each part and microseconds per row. This is
the part of a round that grows with the fleet (``benchmarks/fleet_scale.py``); run it
before and after a change to scoring, alternating, on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--hosts", type=int, default=2, help="the fleet is dealt to this many hosts; host 0 is measured")
    ap.add_argument("--rounds", default="1,2,3", help="windows scored, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--personal", choices=("none", "head", "patch"), default="none",
                    help="every device of the host also holds its own head or MetaPatch patch")
    args = ap.parse_args(argv)
    try:
        rounds = [int(r) for r in args.rounds.split(",")]
    except ValueError:
        ap.error(f"--rounds {args.rounds!r}: expected comma-separated integers")
    if args.devices < args.hosts or args.hosts < 1 or args.repeats < 1 or min(rounds) < 1:
        ap.error("--hosts and --repeats must be >= 1, --devices >= --hosts, and rounds >= 1")

    import numpy as np
    import torch

    from devices import prequential
    from devices.host import DeviceHost
    from devices.pool import assign_hosts, shard_of
    from simulator import config
    from simulator.fleetrun import FleetRun

    cfg = config.from_dict({"experiment": {"strategies": ["fedavg"], "seed": args.seed},
                            "data": {"n_devices": args.devices, "n_rounds": max(rounds) + 1},
                            "cloud": {"epochs": 0}})
    run = FleetRun(cfg, use_ray=False, log=lambda _: None)
    t0 = time.perf_counter()
    fleet = run.build_fleet()
    run.train_cloud()
    inter = fleet.interactions
    ids = np.flatnonzero(assign_hosts(inter.counts, args.hosts) == 0)
    host = DeviceHost(shard_of(inter, fleet.timeline, ids), run.spec, cfg.device, args.seed)
    host.reset(run.initial)
    everyone, d = np.arange(len(ids)), run.spec.dim
    gen = torch.Generator().manual_seed(args.seed)
    for c in range(0, len(everyone), 4096):  # perturbed copies: the values do not change the work
        group = everyone[c : c + 4096]
        if args.personal == "head":
            host.set_personal(group, {k: torch.from_numpy(run.initial[k])[None] + 0.01 * torch.randn(
                len(group), *run.initial[k].shape, generator=gen) for k in run.spec.head_keys()})
        elif args.personal == "patch":
            host.set_personal(group, {"patch.encoder.w": 0.01 * torch.randn(len(group), d, d, generator=gen),
                                      "patch.encoder.b": torch.zeros(len(group), d)})
    print(f"{args.devices:,} devices, host 0 of {args.hosts}: {len(ids):,} devices (own parameters: {args.personal}), "
          f"{len(host.inter.items):,} interactions, {inter.n_items:,} items (ready in {time.perf_counter() - t0:.1f} s)",
          flush=True)
    torch.set_num_threads(1)
    samples_s, score_s, rows = [], [], []
    for _ in range(args.repeats):
        for r in rounds:
            host._eval_cache.clear()
            t0 = time.perf_counter()
            s = host.eval_samples(r, scored=True)
            t1 = time.perf_counter()
            with torch.no_grad():
                prequential.score_window(host, r)
            t2 = time.perf_counter()
            samples_s.append(t1 - t0)
            score_s.append(t2 - t1)
            rows.append(len(s))
            print(f"  window {r}: {len(s):,} rows, samples {t1 - t0:.3f} s, score {t2 - t1:.3f} s", flush=True)
    med_rows = statistics.median(rows)
    a, b = statistics.median(samples_s), statistics.median(score_s)
    print(f"median: {med_rows:,.0f} rows; samples {a:.3f} s ({a / med_rows * 1e6:.2f} us/row), "
          f"score {b:.3f} s ({b / med_rows * 1e6:.2f} us/row), total {a + b:.3f} s")


if __name__ == "__main__":
    main()
