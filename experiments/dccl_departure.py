"""DCCL where its premise holds: MetaPatch (and MoMoDistill) per activity bucket across the
synthetic fleet's taste-departure setting.

    python experiments/dccl_departure.py [--settings own,tail_departs,...] [--variants encoder8,...]
        [--strategies cloud_only,metapatch] [--seeds 0,1,2]

Each run is ``experiments/dccl.toml`` (2,000 synthetic phones, GRU4Rec, 10 rounds) with
``data.taste_departure_head`` / ``_tail`` from ``SETTINGS`` and MetaPatch's patch from
``VARIANTS``, through ``fleetsim run`` (its report gives ``buckets.csv``: per bucket, the
paired UAUC gain over CloudOnly with its 95 % bootstrap CI over users). Runs land in
``runs/dccl_departure/<setting>-<variant>-seed<S>`` and are skipped when done. The
table printed (and written to ``runs/dccl_departure/table.md``) has, per setting, variant
and strategy, the mean over seeds of CloudOnly's head and tail UAUC and of the gain over
CloudOnly in the head and the tail bucket, each with the seed-0 run's CI.

Choose variants on seeds other than the ones reported (e.g. ``--seeds 100,101,102``);
docs/dccl.md has the study.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from study import ROOT, finish, fleetsim_run, seed_list

EXPERIMENT = ROOT / "experiments" / "dccl.toml"

# name -> (δ of the most active user, δ of the least active user); docs: devices/synthetic.py
SETTINGS = {
    "own": (1.0, 1.0),  # every taste its own (the default fleet)
    "half": (0.5, 0.5),  # everyone halfway from the crowd, whatever their activity
    "tail_departs": (0.3, 1.0),  # the head near the crowd, the tail its own
    "crowd_head": (0.0, 1.0),  # the most active hold the crowd's taste exactly
}
# name -> --set overrides of the personalising strategies' patch
VARIANTS = {
    "encoder8": [],  # dccl.toml: patch after the encoder, patch_dim 8
    "encoder4": ["strategies.metapatch.patch_dim=4", "strategies.momodistill.patch_dim=4"],
    "encoder16": ["strategies.metapatch.patch_dim=16", "strategies.momodistill.patch_dim=16"],
    "head8": ['strategies.metapatch.patch_layer="head.1"', 'strategies.momodistill.patch_layer="head.1"'],
}


def run_one(setting: str, variant: str, seed: int, strategies: list[str], out_root: Path) -> Path:
    out = out_root / f"{setting}-{variant}-seed{seed}"
    if not (out / "buckets.csv").exists():
        head, tail = SETTINGS[setting]
        sets = [f"data.taste_departure_head={head}", f"data.taste_departure_tail={tail}",
                f"experiment.strategies={json.dumps(strategies)}", *VARIANTS[variant]]
        fleetsim_run(EXPERIMENT, out, seed, sets, "--no-progress")
    return out


def read_buckets(run: Path) -> dict[tuple[str, str], dict[str, float]]:
    with open(run / "buckets.csv") as f:
        return {(r["strategy"], r["bucket"]): {k: float(v) if v else float("nan") for k, v in r.items()
                                           if k not in ("strategy", "bucket")}
                for r in csv.DictReader(f)}


def table(rows: dict[tuple[str, str], dict[int, dict]], strategies: list[str], seeds: list[int]) -> str:
    lines = ["| setting (δ head, tail) | patch | strategy | CloudOnly UAUC head / tail | gain head [95 % CI, seed "
             f"{seeds[0]}] | gain tail [95 % CI, seed {seeds[0]}] | tail gain > head gain > 0 (mean) |",
             "|---|---|---|---|---|---|---|"]
    for (setting, variant), per_seed in rows.items():
        first = per_seed[seeds[0]]
        base = {b: sum(r[("cloud_only", b)]["uauc"] for r in per_seed.values()) / len(per_seed) for b in ("head", "tail")}
        for s in strategies:
            if s == "cloud_only":
                continue
            g = {b: sum(r[(s, b)]["gain"] for r in per_seed.values()) / len(per_seed) for b in ("head", "tail")}
            ci = {b: f"[{first[(s, b)]['gain_lo']:+.4f}, {first[(s, b)]['gain_hi']:+.4f}]" for b in ("head", "tail")}
            ok = "yes" if g["tail"] > g["head"] > 0 else "no"
            lines.append(f"| {setting} {SETTINGS[setting]} | {variant} | {s} | {base['head']:.4f} / {base['tail']:.4f} | "
                         f"{g['head']:+.4f} {ci['head']} | {g['tail']:+.4f} {ci['tail']} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--variants", default="encoder8")
    ap.add_argument("--strategies", default="cloud_only,metapatch")
    ap.add_argument("--seeds", type=seed_list, default="0,1,2")
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
    out_root = ROOT / "runs" / "dccl_departure"
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    for setting in settings:
        for variant in variants:
            for seed in seeds:
                rows.setdefault((setting, variant), {})[seed] = read_buckets(
                    run_one(setting, variant, seed, strategies, out_root))
    return finish(out_root, table(rows, strategies, seeds))


if __name__ == "__main__":
    raise SystemExit(main())
