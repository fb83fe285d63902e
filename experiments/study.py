"""What the study scripts (``duet_gap.py``, ``dccl_*.py``) share: one ``fleetsim run`` of
an experiment file with ``--set`` overrides, the table they end with, and (for the offline
probes) UAUC per activity bucket the way a run computes it."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def fleetsim_run(experiment: Path, out: Path, seed: int, sets: list[str], *extra: str) -> None:
    """``fleetsim run experiment --seed S --out out --set ...`` in a subprocess; a failure
    ends the study with one line naming the run and the end of its error output."""
    cmd = [sys.executable, "-m", "simulator.cli", "run", str(experiment), "--seed", str(seed), "--out", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{out.name} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")


def finish(out_root: Path, text: str) -> int:
    """Print the study's table and keep it as ``table.md`` beside its runs."""
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "table.md").write_text(text + "\n")
    print(text)
    return 0


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2`` (an argparse type: a bad value ends with one line and exit 2)."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, not {text!r}") from None


def bucket_uauc(scores: np.ndarray, owner: np.ndarray, rounds: np.ndarray, n_users: int,
                buckets: np.ndarray) -> dict[str, float]:
    """UAUC per activity bucket (and ``all``) as a run computes it: per-user AUC over the
    (positive, negative) pairs within each round (``devices.scoring.device_metrics`` per
    round, pooled by ``simulator.metrics.user_auc``), averaged over the users of a bucket.

    ``scores`` (rows, C): column 0 a positive, the rest its negatives; ``owner`` and
    ``rounds`` give each row's user and round; ``buckets`` the bucket of every user."""
    from devices.scoring import device_metrics
    from simulator.metrics import BUCKETS, user_auc

    records = []
    for r in np.unique(rounds):
        at = rounds == r
        m = device_metrics(scores[at].astype(np.float32), owner[at], n_users)
        has = np.flatnonzero(m["n_pos"] > 0)
        records.append(pd.DataFrame({"device_id": has, "auc": m["auc"][has], "n_pos": m["n_pos"][has],
                                     "n_neg": m["n_neg"][has]}))
    per_user = user_auc(pd.concat(records, ignore_index=True))
    auc = np.full(n_users, np.nan)
    auc[per_user["device_id"].to_numpy()] = per_user["auc"].to_numpy()
    out = {b: float(np.nanmean(auc[buckets == b])) for b in BUCKETS}
    out["all"] = float(np.nanmean(auc))
    return out


def bucket_rows(per_seed: list[dict[str, dict[str, float]]], prefix: str = "") -> list[str]:
    """Markdown rows ``| prefix name | all | head | torso | tail |``: per score name, the mean
    over seeds of ``bucket_uauc``-shaped results (one dict of scores per seed)."""
    from simulator.metrics import BUCKETS

    cols = ("all", *BUCKETS)
    return [f"| {prefix}{name} | " + " | ".join(f"{np.mean([r[name][b] for r in per_seed]):.4f}" for b in cols) + " |"
            for name in per_seed[0]]
