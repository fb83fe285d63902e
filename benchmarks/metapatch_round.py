"""Benchmark: one MetaPatch round of device training — 10,000 devices x 5 local steps.

    python benchmarks/metapatch_round.py [--devices 10000] [--steps 5] [--repeats 5] [--loop-sample 300]

Times the vectorised device work (every device's phi trained at once, per host) through
``DeviceHost.run`` on one in-process host holding all devices (target: <= 10 s, median of
``--repeats``), then the same work one device at a time on ``--loop-sample`` devices,
scaled to the fleet, for the ratio.
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
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-sample", type=int, default=300)
    args = ap.parse_args()

    import numpy as np
    import torch

    from devices.host import DeviceHost
    from devices.models import ModelSpec, init_params
    from devices.pool import shard_of
    from devices.runtime import DeviceSettings, Payload
    from devices.synthetic import SyntheticConfig, generate
    from strategies.metapatch import init_theta, train

    torch.set_num_threads(1)
    fleet = generate(SyntheticConfig(n_devices=args.devices, n_rounds=2), 0)
    spec = ModelSpec(n_items=1000)
    host = DeviceHost(shard_of(fleet.interactions, fleet.timeline, np.arange(args.devices)), spec,
                      DeviceSettings(local_steps=args.steps), 0)
    host.reset(init_params(spec, 0))
    theta = init_theta(spec, "encoder", 8, 0)
    cfg = {"config": {"server-round": 1, "patch-layer": "encoder", "patch-dim": 8, "local-steps": args.steps}}
    ids = host.device_ids
    times = []
    for _ in range(args.repeats):
        host.reset(init_params(spec, 0))
        t = time.perf_counter()
        (res,) = host.run(1, 1, [(train, Payload(arrays={"theta": theta}, configs=cfg), ids)])
        times.append(time.perf_counter() - t)
        assert res.replies is not None, res.error
    vec = statistics.median(times)
    sample = ids[: args.loop_sample]
    host.reset(init_params(spec, 0))
    t = time.perf_counter()
    for d in sample:
        host.run(1, 1, [(train, Payload(arrays={"theta": theta}, configs=cfg), np.array([d]))])
    loop = (time.perf_counter() - t) / len(sample) * len(ids)
    out = {"devices": len(ids), "steps": args.steps, "vectorised_s_median": vec, "vectorised_s_all": times,
           "one_at_a_time_s_estimated": loop, "loop_sample": len(sample), "ratio": loop / vec}
    print(f"vectorised  {len(ids):,} devices x {args.steps} steps: median {vec:.2f} s  (target <= 10 s: "
          f"{'ok' if vec <= 10 else 'MISSED'})")
    print(f"one device at a time: {loop:.1f} s (measured on {len(sample)} devices, scaled)  ratio {loop / vec:.1f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
