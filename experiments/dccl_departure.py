"""DCCL where its premise holds: MetaPatch (and MoMoDistill) per activity bucket across the
synthetic fleet's taste-departure setting.

    python experiments/dccl_departure.py [--settings own,tail_departs,...] [--variants encoder8,...]
        [--strategies cloud_only,metapatch] [--seeds 0,1,2] [--out-root runs/dccl_departure]

Each run is ``experiments/dccl.toml`` (2,000 synthetic phones, GRU4Rec, 10 rounds) with
``data.taste_departure_head`` / ``_tail`` from ``SETTINGS`` and MetaPatch's patch from
``VARIANTS``, through ``fleetsim run`` (its report gives ``buckets.csv``: per bucket, the
paired UAUC gain over CloudOnly with its 95 % bootstrap CI over users). Runs land in
``<out-root>/<setting>-<variant>-seed<S>`` (default ``runs/dccl_departure``) and are
skipped when done. The table printed (and written to ``<out-root>/table.md``) has, per setting, variant
and strategy, the mean over seeds of CloudOnly's head and tail UAUC and of the gain over
CloudOnly in the head and the tail bucket, each with a 95 % t-interval over seeds
(``t_interval``) and the number of seeds on which the gain is positive, and whether the
means, and then the intervals, show tail gain > head gain > 0 (``table``). Each report's
own bootstrap CI over users is in its ``buckets.csv``.

Choose variants on seeds other than the ones reported (e.g. ``--seeds 100,101,102``);
docs/dccl.md has the study.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from study import ROOT, finish, fleetsim_run, seed_list

EXPERIMENT = ROOT / "experiments" / "dccl.toml"

# name -> (δ of the most active user, δ of the least active user); docs: devices/synthetic.py
SETTINGS = {
    "own": (1.0, 1.0),  # every taste its own (the default fleet)
    "half": (0.5, 0.5),  # everyone halfway from the crowd, whatever their activity
    "tail_departs": (0.3, 1.0),  # the head near the crowd, the tail its own
    "crowd_head": (0.0, 1.0),  # the most active hold the crowd's taste exactly
    "head_half": (0.5, 1.0),  # the head halfway to the crowd, the tail its own
    "head_mild": (0.7, 1.0),  # the head a little toward the crowd, the tail its own
}
# name -> --set overrides of the personalising strategies' patch
VARIANTS = {
    "encoder8": [],  # dccl.toml: patch after the encoder, patch_dim 8
    "encoder4": ["strategies.metapatch.patch_dim=4", "strategies.momodistill.patch_dim=4"],
    "encoder16": ["strategies.metapatch.patch_dim=16", "strategies.momodistill.patch_dim=16"],
    "head8": ['strategies.metapatch.patch_layer="head.1"', 'strategies.momodistill.patch_layer="head.1"'],
    # every online device trains its patch each round (dccl.toml trains 30 %)
    "encoder8_all": ["strategies.metapatch.fraction_train=1.0", "strategies.momodistill.fraction_train=1.0"],
    # the cloud model trained 10 epochs on the history instead of dccl.toml's 3
    "cloud10": ["cloud.epochs=10"],
    "cloud10_all": ["cloud.epochs=10", "strategies.metapatch.fraction_train=1.0",
                    "strategies.momodistill.fraction_train=1.0"],
    # DIN instead of GRU4Rec: its classifier sees the candidate, so a patch there (head.1)
    # can act on user-item interactions, which a patch on GRU4Rec's user tower cannot
    "din": ['model.backbone="din"'],
    "din_head8": ['model.backbone="din"', 'strategies.metapatch.patch_layer="head.1"',
                  'strategies.momodistill.patch_layer="head.1"'],
    # Mechanism checks, not candidates: a shorter window shows the cloud model less of each
    # user's taste (it weakens CloudOnly too), to test why the patch adds so little at L = 10.
    "window3": ["model.window=3"],
    "window1": ["model.window=1"],
}


def run_one(setting: str, variant: str, seed: int, strategies: list[str], out_root: Path) -> Path:
    out = out_root / f"{setting}-{variant}-seed{seed}"
    if not (out / "buckets.csv").exists():
        head, tail = SETTINGS[setting]
        sets = [f"data.taste_departure_head={head}", f"data.taste_departure_tail={tail}",
                f"experiment.strategies={json.dumps(strategies)}", *VARIANTS[variant]]
        fleetsim_run(EXPERIMENT, out, seed, sets, "--no-progress")
    have = {strategy for strategy, _ in read_buckets(out)}
    if missing := [s for s in strategies if s not in have]:
        raise SystemExit(f"{out}: a run without {', '.join(missing)}; remove the folder to run it again "
                         "with these strategies")
    return out


def read_buckets(run: Path) -> dict[tuple[str, str], dict[str, float]]:
    with open(run / "buckets.csv") as f:
        return {(r["strategy"], r["bucket"]): {k: float(v) if v else float("nan") for k, v in r.items()
                                           if k not in ("strategy", "bucket")}
                for r in csv.DictReader(f)}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean of per-seed values and its 95 % t-interval over seeds (Student's t with n - 1
    degrees of freedom): seed-to-seed variation (another fleet, another training run) is
    what the interval measures. With 2 or 3 seeds it is wide; read it as descriptive."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def gains(per_seed: dict[int, dict], strategy: str, bucket: str) -> list[float]:
    """``strategy``'s paired UAUC gain over CloudOnly in ``bucket``, one value per seed."""
    return [r[(strategy, bucket)]["gain"] for r in per_seed.values()]


def table(rows: dict[tuple[str, str], dict[int, dict]], strategies: list[str], seeds: list[int]) -> str:
    """One row per setting, variant and personalising strategy: each gain's mean over seeds
    with its 95 % t-interval over seeds (``t_interval``) and the seeds on which it is
    positive, and the per-seed difference tail gain - head gain (paired: both come from the
    same seed's runs) with its interval. The last two columns read the target "tail gain >
    head gain > 0" on the means, and then on the intervals: the head gain's above 0, and
    the difference's above 0."""
    lines = ["| setting (δ head, tail) | patch | strategy | CloudOnly UAUC head / tail | gain head, mean [95 % t-interval] "
             "(seeds > 0) | gain tail, mean [95 % t-interval] (seeds > 0) | tail − head, mean [95 % t-interval] | "
             "tail > head > 0, means | the same, intervals |",
             "|---|---|---|---|---|---|---|---|---|"]
    n = len(seeds)
    for (setting, variant), per_seed in rows.items():
        base = {b: sum(r[("cloud_only", b)]["uauc"] for r in per_seed.values()) / len(per_seed) for b in ("head", "tail")}
        for s in strategies:
            if s == "cloud_only":
                continue
            g = {b: gains(per_seed, s, b) for b in ("head", "tail")}
            ci = {b: t_interval(v) for b, v in g.items()}
            cell = {b: f"{m:+.5f} [{lo:+.5f}, {hi:+.5f}] ({sum(x > 0 for x in g[b])}/{n})"
                    for b, (m, lo, hi) in ci.items()}
            diff = t_interval([t - h for t, h in zip(g["tail"], g["head"])])
            means = "yes" if ci["tail"][0] > ci["head"][0] > 0 else "no"
            intervals = "yes" if ci["head"][1] > 0 and diff[1] > 0 else "no"
            lines.append(f"| {setting} {SETTINGS[setting]} | {variant} | {s} | {base['head']:.4f} / {base['tail']:.4f} | "
                         f"{cell['head']} | {cell['tail']} | {diff[0]:+.5f} [{diff[1]:+.5f}, {diff[2]:+.5f}] | "
                         f"{means} | {intervals} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--variants", default="encoder8")
    ap.add_argument("--strategies", default="cloud_only,metapatch")
    ap.add_argument("--seeds", type=seed_list, default="0,1,2")
    ap.add_argument("--out-root", type=Path, default=ROOT / "runs" / "dccl_departure",
                    help="folder of the runs and table.md (another one for another set of strategies)")
    args = ap.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    strategies = [s for s in args.strategies.split(",") if s]
    bad = [x for x in settings if x not in SETTINGS] + [x for x in variants if x not in VARIANTS]
    if bad or not settings or not variants or "cloud_only" not in strategies:
        print(f"dccl_departure: unknown {bad}, or cloud_only missing; settings: {', '.join(SETTINGS)}; "
              f"variants: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    seeds = args.seeds
    out_root = args.out_root.resolve()  # the runs start in ROOT; the table reads them from here
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    for setting in settings:
        for variant in variants:
            for seed in seeds:
                rows.setdefault((setting, variant), {})[seed] = read_buckets(
                    run_one(setting, variant, seed, strategies, out_root))
    return finish(out_root, table(rows, strategies, seeds))


if __name__ == "__main__":
    raise SystemExit(main())
