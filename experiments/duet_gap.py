"""DUET's gap to its published gain, hypothesis by hypothesis, on the VALIDATION split.

    python experiments/duet_gap.py --data ../shared/data/ml-latest-small/ratings.csv \\
        [--variants base_protocol,eval_popularity,...] [--seeds 0,1,2] [--jobs 2] [--holdout validation]

Each variant is ``experiments/duet_movielens.toml`` (DIN, the paper protocol) plus a few
``--set`` overrides, run through ``fleetsim run`` with ``data.holdout = "validation"``:
each user's one-before-last interaction is held out and its last is dropped, so nothing
chosen here has seen a test item. Runs land in ``runs/duet_gap/<variant>-seed<S>`` and are
skipped when their ``summary.json`` exists (the study resumes). The table printed (and
written to ``runs/duet_gap/table.md``) has one row per variant: its change, the mean
validation AUC of base, finetune and DUET over the seeds run, DUET - base and
DUET - finetune. docs/duet_table1.md has the study and its decisions.

``--holdout test`` runs the chosen variants on the test split (``runs/duet_gap_test``).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devices.movielens import PAPER_STRATEGIES  # the strategy each of METHODS runs as
from study import ROOT, finish, fleetsim_run, seed_list

EXPERIMENT = ROOT / "experiments" / "duet_movielens.toml"

# name -> (the change, --set overrides). The first is the reference: the shipped protocol.
# A variant that changes only finetune (ft_*) runs base and finetune, and takes DUET from the
# reference run of the same seed; one that changes only DUET (gen_*, duet_*) takes finetune
# from it (base is always run: both start from it; its numbers equal the reference's).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base_protocol": ("the shipped paper protocol (uniform candidates and negatives)", []),
    # the protocol (issue 16, point 1)
    "eval_popularity": ("candidates drawn by popularity", ["data.eval_candidates=popularity"]),
    "pop_both": ("candidates and training negatives by popularity",
                 ["data.eval_candidates=popularity", "data.train_negatives=popularity"]),
    "eval_all": ("every never-seen item a candidate", ["data.eval_candidates=all"]),
    "filter_30u30i": ("only items, then users, with >= 30 ratings (the authors' folder name)",
                      ["data.min_item_ratings=30", "data.min_user_ratings=30"]),
    # the finetune baseline's own tuning
    "ft_lr_0.02": ("finetune lr 0.02 (5 steps)", ["strategies.local_finetune.lr=0.02"]),
    "ft_lr_0.5": ("finetune lr 0.5 (5 steps)", ["strategies.local_finetune.lr=0.5"]),
    "ft_20_steps": ("finetune 20 steps at lr 0.1", ["strategies.local_finetune.local_steps=20"]),
    "ft_head": ("finetune the head only, lr 0.5", ["strategies.local_finetune.layers=head",
                                                   "strategies.local_finetune.lr=0.5"]),
    # window length, generator capacity, training schedule
    "window_20": ("window L = 20", ["model.window=20"]),
    "window_5": ("window L = 5", ["model.window=5"]),
    "gen_64": ("generator z_dim = e_dim = 64", ["strategies.duet.z_dim=64", "strategies.duet.e_dim=64"]),
    "gen_16": ("generator z_dim = e_dim = 16", ["strategies.duet.z_dim=16", "strategies.duet.e_dim=16"]),
    # which layers DUET generates (all three methods run: needs no reference run)
    "layers_head_attention": ("DUET generates DIN's attention unit too (generate = head+attention)",
                              ["strategies.duet.generate=head+attention"]),
    "duet_4_epochs": ("DUET 4 epochs", ["strategies.duet.epochs=4"]),
    "duet_6_epochs": ("DUET 6 epochs", ["strategies.duet.epochs=6"]),
    "duet_lr_0.002": ("DUET lr 0.002, 8 epochs", ["strategies.duet.lr=0.002", "strategies.duet.epochs=8"]),
    # what validation chose (docs/duet_table1.md), all three methods in one run: for --holdout test
    "chosen": ("validation's choice: generator z_dim = e_dim = 16", ["strategies.duet.z_dim=16",
                                                                     "strategies.duet.e_dim=16"]),
}
METHODS = ("base", "finetune", "duet")
REFERENCE = "base_protocol"


def strategies_of(name: str) -> list[str]:
    if name.startswith("ft_"):
        return ["cloud_only", "local_finetune"]
    if name.startswith(("gen_", "duet_")):
        return ["cloud_only", "duet"]
    return ["cloud_only", "local_finetune", "duet"]


def run_one(name: str, seed: int, data: str, holdout: str, out_root: Path) -> dict:
    out = out_root / f"{name}-seed{seed}"
    summary = out / "summary.json"
    if not summary.exists():
        sets = [f"data.path={json.dumps(data)}", f"data.holdout={holdout}", *VARIANTS[name][1],
                f"experiment.strategies={json.dumps(strategies_of(name))}"]
        fleetsim_run(EXPERIMENT, out, seed, sets)
    s = json.loads(summary.read_text())
    if s.get("protocol_settings", {}).get("holdout") != holdout:
        raise SystemExit(f"{summary}: not a {holdout} run")
    # summary.json is written as the run goes: an interrupted run has one too. Its missing
    # methods must not be borrowed from the reference as if this run had them.
    expected = [METHODS[PAPER_STRATEGIES.index(x)] for x in strategies_of(name)]
    unfinished = [m for m in expected if s.get("strategies", {}).get(m, {}).get("status") != "complete"]
    if unfinished:
        raise SystemExit(f"{out}: an unfinished run ({', '.join(unfinished)} not complete); "
                         "remove the folder to run it again")
    return {m: s["methods"][m]["auc"] for m in METHODS if m in s["methods"]}


def table(results: dict[str, dict[int, dict]]) -> str:
    lines = ["| variant | change | seeds | base | finetune | DUET | DUET − base | DUET − finetune |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        mean = {m: sum(r[m] for r in per_seed.values()) / len(per_seed) for m in METHODS}
        lines.append(f"| {name} | {VARIANTS[name][0]} | {','.join(map(str, sorted(per_seed)))} | "
                     f"{mean['base']:.4f} | {mean['finetune']:.4f} | {mean['duet']:.4f} | "
                     f"{mean['duet'] - mean['base']:+.4f} | {mean['duet'] - mean['finetune']:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a MovieLens ratings file")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", type=seed_list, default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each trains on one core)")
    ap.add_argument("--holdout", choices=("validation", "test"), default="validation")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        print(f"duet_gap: unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    seeds = args.seeds
    if not Path(args.data).is_file():
        print(f"duet_gap: --data {args.data}: no such file", file=sys.stderr)
        return 2
    out_root = ROOT / "runs" / ("duet_gap" if args.holdout == "validation" else "duet_gap_test")
    if any(strategies_of(n) != strategies_of(REFERENCE) for n in names) and REFERENCE not in names and \
            args.holdout == "validation":
        names = [REFERENCE, *names]  # the methods a variant does not change come from the reference
    jobs = [(n, s) for n in names for s in seeds]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        got = list(pool.map(lambda j: run_one(j[0], j[1], str(Path(args.data).resolve()), args.holdout, out_root), jobs))
    results: dict[str, dict[int, dict]] = {}
    for (n, s), r in zip(jobs, got):
        results.setdefault(n, {})[s] = r
    for n, per_seed in results.items():
        for s, r in per_seed.items():
            if n != REFERENCE and set(r) != set(METHODS):
                if REFERENCE not in results:
                    raise SystemExit(f"{n} seed {s}: runs only {sorted(r)}; run {REFERENCE} beside it")
                base = results[REFERENCE][s]
                if abs(r["base"] - base["base"]) > 1e-12 and set(r) != set(METHODS):
                    raise SystemExit(f"{n} seed {s}: base differs from the reference's, so it cannot borrow its methods")
                for m in METHODS:
                    r.setdefault(m, base[m])
    return finish(out_root, table(results))


if __name__ == "__main__":
    raise SystemExit(main())
