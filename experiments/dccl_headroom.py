"""How much a per-user model could gain on the synthetic fleet: the ground truth's UAUC per
activity bucket, next to a popularity-only score, across the taste-departure setting.

    python experiments/dccl_headroom.py [--settings own,tail_departs,...] [--seeds 0,1,2]

The synthetic fleet draws each interaction from ``softmax(taste_strength * u_p . v +
popularity logit)`` (``devices/synthetic.py``), so the best any model can do is score a
candidate by that logit with the user's true taste of the period. For the fleet of
``experiments/dccl.toml`` at each setting of ``dccl_departure.SETTINGS``, every interaction
of rounds 1..n_rounds is a positive scored against 99 items its user never interacted with
(uniform with replacement, as the simulator's prequential evaluation draws them, but from
this script's own seeded stream), and per-user AUC (``devices.scoring.device_metrics``) is averaged over the
users of each bucket (``simulator.metrics.activity_buckets``) for three scores:

- ``popularity``: the popularity logit alone (a model that knows nothing of the user);
- ``history taste``: the user's true history taste (a perfect per-user model fitted before
  round 1, blind to the drift that follows);
- ``true taste``: the true taste of the round (the ceiling).

Compare with CloudOnly's bucket UAUC from ``dccl_departure.py`` (docs/dccl.md): what lies
between CloudOnly and the ceiling is what any personalisation could still add.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from dccl_departure import EXPERIMENT, SETTINGS
from study import seed_list

from devices.scoring import device_metrics
from devices.synthetic import generate
from simulator import config
from simulator.metrics import activity_buckets

N_NEG = 99
BUCKETS = ("head", "torso", "tail")


def headroom(setting: str, seed: int) -> dict[str, dict[str, float]]:
    """Per score, UAUC per bucket (and ``all``) on the fleet of ``setting`` and ``seed``."""
    head, tail = SETTINGS[setting]
    cfg = config.load(EXPERIMENT, [f"data.taste_departure_head={head}", f"data.taste_departure_tail={tail}"], seed).data
    fleet = generate(cfg, seed)
    inter, tl = fleet.interactions, fleet.timeline
    n, n_items = inter.n_users, inter.n_items
    user = np.repeat(np.arange(n), np.diff(inter.indptr))
    in_rounds = inter.times >= tl.history_end
    period = np.where(in_rounds, 1 + ((inter.times - tl.history_end) // tl.round_seconds).astype(np.int64), 0)
    period = np.minimum(period, tl.n_rounds)
    labels, _ = activity_buckets(np.bincount(user[~in_rounds], minlength=n))

    seen = np.zeros((n, n_items), dtype=bool)
    seen[user, inter.items] = True
    rows = np.flatnonzero(in_rounds)
    rng = np.random.default_rng([seed, 16])
    neg = np.empty((rows.size, N_NEG), dtype=np.int64)
    for j, r in enumerate(rows):  # uniform over the user's never-seen items, with replacement
        pool = np.flatnonzero(~seen[user[r]])
        neg[j] = pool[rng.integers(0, pool.size, N_NEG)]
    cand = np.concatenate([inter.items[rows, None], neg], axis=1)  # column 0: the positive

    pop = fleet.item_popularity_logit
    v = fleet.item_factors.astype(np.float64)
    s = cfg.taste_strength

    def taste_scores(taste: np.ndarray) -> np.ndarray:  # taste (rows, d)
        return s * np.einsum("rd,rcd->rc", taste, v[cand]) + pop[cand]

    scores = {
        "popularity": pop[cand],
        "history taste": taste_scores(fleet.tastes[0, user[rows]].astype(np.float64)),
        "true taste": taste_scores(fleet.tastes[period[rows], user[rows]].astype(np.float64)),
    }
    out = {}
    for name, sc in scores.items():
        auc = device_metrics(sc.astype(np.float32), user[rows], n)["auc"]
        out[name] = {b: float(np.nanmean(auc[labels == b])) for b in BUCKETS}
        out[name]["all"] = float(np.nanmean(auc))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seeds", type=seed_list, default="0,1,2")
    args = ap.parse_args(argv)
    settings = [x for x in args.settings.split(",") if x]
    if bad := [x for x in settings if x not in SETTINGS]:
        print(f"dccl_headroom: unknown settings {bad}; settings: {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    lines = ["| setting (δ head, tail) | score | all | head | torso | tail |", "|---|---|---|---|---|---|"]
    for setting in settings:
        per_seed = [headroom(setting, seed) for seed in args.seeds]
        for name in per_seed[0]:
            mean = {b: np.mean([r[name][b] for r in per_seed]) for b in ("all", *BUCKETS)}
            lines.append(f"| {setting} {SETTINGS[setting]} | {name} | " + " | ".join(
                f"{mean[b]:.4f}" for b in ("all", *BUCKETS)) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
