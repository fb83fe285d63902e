"""Benchmark: build a ``fleetsim report`` for 100,000 devices x 20 rounds x 4 strategies.

Nothing is simulated: a run directory is synthesised with random but plausible per-device
records and written through ``simulator.writer.RunWriter`` (so the layout is exactly what
``fleetsim run`` writes); ``summary.json`` is computed from those records with
``simulator.metrics.summarize`` as a run would. Then ``fleetsim report RUN --out RUN/report``
runs in a fresh process (imports included, as a user sees it) and its wall time is printed.
Target: <= 60 s.

    python benchmarks/report_build.py                      # 100,000 devices, 20 rounds
    python benchmarks/report_build.py --devices 20000 --keep /tmp/bench-run
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from devices.data import DriftEvent, Timeline
from simulator import config, metrics
from simulator.writer import RunWriter

# name -> (fraction of online devices selected, MB down, MB up, GFLOPs per selected device, AUC shift)
STRATEGIES = {
    "cloud_only": (0.0, 0.0, 0.0, 0.0, 0.0),
    "local_finetune": (1.0, 0.0, 0.00002, 0.03, 0.012),
    "fedavg": (0.1, 0.16, 0.16, 0.03, 0.001),
    "duet": (0.5, 0.0084, 0.0001, 0.0, 0.02),
}
ROUND_S = 4 * 3600.0
HISTORY_END = 14 * 86400.0


def synthesise(out: Path, n_devices: int, n_rounds: int, seed: int = 0) -> int:
    """Write a plausible run directory; returns the number of device rows written."""
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(np.log(2.0), 1.2, n_devices)  # interactions per day
    history = rng.poisson(activity * 14)
    buckets, thresholds = metrics.activity_buckets(history)
    quality = rng.beta(8, 1.5, n_devices)  # a user's typical AUC under the cloud model
    tier = rng.choice(3, n_devices, p=[0.3, 0.5, 0.2])
    online_p = rng.uniform(0.15, 0.8, n_devices)

    cfg = config.from_dict({"experiment": {"name": "bench", "strategies": list(STRATEGIES)},
                            "data": {"n_devices": n_devices, "n_rounds": n_rounds, "drift": "sudden",
                                     "drift_rounds": [n_rounds // 2]}})
    writer = RunWriter(out)
    writer.create(mark_running=False)
    writer.write_config(cfg.to_toml())
    timeline = Timeline(HISTORY_END, ROUND_S, n_rounds, 0.0,
                        (DriftEvent(n_rounds // 2, "sudden", 0.5, "half of the users jump to a fresh taste"),))
    profiles = SimpleNamespace(tier=tier, flops=rng.lognormal(np.log(10e9), 0.35, n_devices),
                               down_bps=rng.lognormal(np.log(20e6), 0.6, n_devices),
                               up_bps=rng.lognormal(np.log(5e6), 0.6, n_devices),
                               rtt_s=rng.lognormal(np.log(0.08), 0.3, n_devices),
                               tz_offset_h=rng.choice([-8.0, 0.0, 1.0, 5.5, 8.0], n_devices),
                               failure_p=rng.beta(0.4, 19.6, n_devices))
    writer.write_fleet(SimpleNamespace(
        source="synthetic", n_devices=n_devices, timeline=timeline, history_counts=history, buckets=buckets,
        bucket_thresholds=thresholds, profiles=profiles,
        interactions=SimpleNamespace(n_items=1000, counts=history + rng.poisson(activity * n_rounds / 6))))

    # the same availability and evaluation samples for every strategy, as in a real run
    rounds = []
    for r in range(1, n_rounds + 1):
        online = rng.random(n_devices) < online_p
        n_pos = rng.poisson(activity * ROUND_S / 86400)
        fail = rng.random(n_devices)
        noise = rng.normal(0, 0.08, n_devices)
        rounds.append((online, n_pos, fail, noise))

    n_rows = 0
    for si, (name, (frac, mb_down, mb_up, gflops, shift)) in enumerate(STRATEGIES.items()):
        t0 = time.perf_counter()
        frames = []
        for r, (online, n_pos, fail, noise) in enumerate(rounds, start=1):
            sel_rng = np.random.default_rng([seed, si, r])
            selected = online & (sel_rng.random(n_devices) < frac)
            keep = (n_pos > 0) | selected
            ids = np.flatnonzero(keep)
            pos, sel = n_pos[ids], selected[ids]
            drift = -0.05 if r >= n_rounds // 2 and name == "cloud_only" else 0.0
            auc = np.clip(quality[ids] + shift + drift + noise[ids], 0, 1)
            auc = np.round(auc * 99) / 99
            scored = pos > 0
            status = np.where(~sel, "idle", np.where(fail[ids] < 0.03, "dropped", np.where(fail[ids] < 0.04, "late", "ok")))
            devices = {
                "round": np.full(ids.size, r, dtype=np.int32), "device_id": ids.astype(np.int64),
                "online": online[ids], "selected": sel, "status": status.astype(str),
                "auc": np.where(scored, auc, np.nan),
                "ndcg10": np.where(scored, np.clip(auc - 0.3 + sel_rng.normal(0, 0.1, ids.size), 0, 1), np.nan),
                "hr10": np.where(scored, np.clip(auc - 0.15, 0, 1), np.nan),
                "logloss": np.where(scored, 0.15 + sel_rng.normal(0, 0.02, ids.size), np.nan),
                "n_pos": pos.astype(np.int64), "n_neg": (pos * 99).astype(np.int64),
                "bytes_down": np.where(sel, int(mb_down * 1e6), 0).astype(np.int64),
                "bytes_up": np.where(sel & (status == "ok"), int(mb_up * 1e6), 0).astype(np.int64),
                "device_flops": np.where(sel, gflops * 1e9, 0.0),
                "device_seconds": np.where(sel, sel_rng.lognormal(0, 0.5, ids.size), 0.0),
                "bucket": buckets[ids],
            }
            counts = pd.Series(status[sel]).value_counts()
            info = {"round": r, "t_start": HISTORY_END + r * ROUND_S, "latency_s": float(sel_rng.uniform(5, 600)) if frac else 0.0,
                    "online": int(online.sum()), "active": int(scored.sum()), "selected": int(sel.sum()),
                    "exchanges": 1 if frac else 0, **{k: int(counts.get(k, 0)) for k in ("ok", "dropped", "late", "quarantined")},
                    "errors": int(counts.get("error", 0))}
            writer.write_round(name, SimpleNamespace(round=r, devices=devices, info=info))
            frames.append(pd.DataFrame(devices))
        df = pd.concat(frames, ignore_index=True)
        n_rows += len(df)
        summary = metrics.summarize(df, overall_auc=float(np.nanmean(df["auc"])) + 0.02, thresholds=thresholds)
        sel = df[df["selected"]]
        n_sel = max(len(sel), 1)
        summary.update(
            bytes_down=int(df["bytes_down"].sum()), bytes_up=int(df["bytes_up"].sum()),
            mb_down_per_device_round=df["bytes_down"].sum() / n_sel / 1e6,
            mb_up_per_device_round=df["bytes_up"].sum() / n_sel / 1e6,
            device_flops=float(df["device_flops"].sum()), gflops_per_device_round=df["device_flops"].sum() / n_sel / 1e9,
            device_seconds=float(df["device_seconds"].sum()), selected_device_rounds=len(sel),
            status_counts={k: int(v) for k, v in sel["status"].value_counts().items()},
            round_latency_s=0.0, simulated_seconds=n_rounds * ROUND_S, wall_seconds=time.perf_counter() - t0,
            per_round=metrics.per_round(df).to_dict(orient="records"))
        writer.write_summary(name, summary)
    return n_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--keep", help="write the synthetic run here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fleetsim-report-bench-"))
    run = base / "run" if not args.keep else base
    try:
        t = time.perf_counter()
        rows = synthesise(run, args.devices, args.rounds)
        print(f"synthesised {args.devices:,} devices x {args.rounds} rounds x {len(STRATEGIES)} strategies "
              f"({rows:,} device rows) in {time.perf_counter() - t:.1f} s: {run}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "simulator.cli", "report", str(run), "--out", str(run / "report")],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        elapsed = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return proc.returncode
        print(proc.stdout.strip())
        print(f"fleetsim report: {elapsed:.1f} s (target <= 60 s)")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
