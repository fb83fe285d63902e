"""Benchmark: building fleets — profiles, synthetic streams, host pool — and one round's scoring.

    python benchmarks/fleet_build.py [--devices 100000] [--repeats 5]

Targets (issue 2): 100,000 profiles build in under a second. Prints medians over
``--repeats`` runs of the profiles and the synthetic streams, then one start of the host
pool (Ray included) and one prequential scoring of round 1. Memory of a whole run is
measured by ``benchmarks/fleet_scale.py``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()

    from devices.profiles import ProfileConfig, make_profiles
    from devices.synthetic import SyntheticConfig, generate

    n = args.devices
    t_prof, _ = median_time(lambda: make_profiles(n, ProfileConfig(), 0), args.repeats)
    print(f"profiles       {n:>9,} devices  {t_prof:7.3f} s  (target < 1 s: {'ok' if t_prof < 1 else 'MISSED'})")
    cfg = SyntheticConfig(n_devices=n)
    t_syn, fleet = median_time(lambda: generate(cfg, 0), max(1, args.repeats // 2))
    print(f"synthetic      {n:>9,} devices  {t_syn:7.3f} s  ({len(fleet.interactions.items):,} interactions)")
    if args.skip_ray:
        return
    import ray

    from devices.models import ModelSpec, init_params
    from devices.pool import HostPool
    from devices.runtime import DeviceSettings

    t = time.perf_counter()
    spec = ModelSpec(n_items=cfg.n_items)
    pool = HostPool(fleet.interactions, fleet.timeline, spec, DeviceSettings(), 0)
    pool.reset(init_params(spec, 0))  # hosts are built when this returns
    t_pool = time.perf_counter() - t
    print(f"host pool      {n:>9,} devices  {t_pool:7.3f} s  ({pool.n_hosts} hosts, incl. Ray start-up)")
    t = time.perf_counter()
    pool.score(1)
    print(f"score round 1  {n:>9,} devices  {time.perf_counter() - t:7.3f} s  (every active device, cloud model)")
    pool.shutdown()


if __name__ == "__main__":
    main()
