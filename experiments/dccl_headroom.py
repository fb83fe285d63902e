"""How much a per-user model could gain on the synthetic fleet: the generating model's UAUC
per activity bucket, next to a popularity-only score, across the taste-departure setting.

    python experiments/dccl_headroom.py [--settings own,tail_departs,...] [--seeds 0,1,2]

The synthetic fleet draws each interaction from ``softmax(taste_strength * u_p . v +
popularity logit)`` (``devices/synthetic.py``). For the fleet of ``experiments/dccl.toml``
at each setting of ``dccl_departure.SETTINGS``, every interaction of rounds 1..n_rounds is
a positive scored against 99 items its user never interacted with, drawn by the
simulator's own ``SampleBuilder.negatives``, and UAUC per bucket is computed as a run
computes it (``study.bucket_uauc``: within-round pairs) for four scores:

- ``popularity``: the popularity logit alone (a model that knows nothing of the user);
- ``history taste``: the generating logit with the user's history taste (a perfect
  per-user model fitted before round 1, blind to the drift that follows);
- ``true taste``: the generating logit with the true taste of the round;
- ``true taste, repeats first``: the same, with every positive the user had interacted
  with before ranked above all candidates. Negatives are never-seen items, so an item
  seen before is always the positive: memorising them beats the generating model, and
  this row, not ``true taste``, bounds what a model can reach under this evaluation.

Compare with CloudOnly's bucket UAUC from ``dccl_departure.py`` (docs/dccl.md).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from dccl_departure import EXPERIMENT, SETTINGS
from study import bucket_rows, bucket_uauc, seed_list

from devices.samples import SampleBuilder, stream_key
from devices.synthetic import generate
from simulator import config
from simulator.metrics import BUCKETS, activity_buckets

N_NEG = 99


def headroom(setting: str, seed: int) -> dict[str, dict[str, float]]:
    """Per score, UAUC per bucket (and ``all``) on the fleet of ``setting`` and ``seed``."""
    head, tail = SETTINGS[setting]
    cfg = config.load(EXPERIMENT, [f"data.taste_departure_head={head}", f"data.taste_departure_tail={tail}"], seed)
    truth = generate(cfg.data, seed)  # the fleet a run of cfg builds, with the tastes that generated it
    inter, tl = truth.interactions, truth.timeline
    user, rounds = inter.user_of(), tl.round_of(inter.times)
    buckets, _ = activity_buckets(np.bincount(user[rounds == 0], minlength=inter.n_users))
    rows = np.flatnonzero((rounds >= 1) & (rounds <= tl.n_rounds))
    cand = np.concatenate([inter.items[rows, None],
                           SampleBuilder(inter, cfg.model.window).negatives(rows, N_NEG, stream_key(seed, 16))], 1)
    # a row's item is a repeat when the user had it at an earlier position of its stream
    _, first, pair = np.unique(user * inter.n_items + inter.items, return_index=True, return_inverse=True)
    repeat = first[pair[rows]] < rows

    pop = truth.item_popularity_logit
    v = truth.item_factors.astype(np.float64)

    def taste_scores(taste: np.ndarray) -> np.ndarray:  # taste (rows, d)
        return cfg.data.taste_strength * np.einsum("rd,rcd->rc", taste, v[cand]) + pop[cand]

    true = taste_scores(truth.tastes[rounds[rows], user[rows]].astype(np.float64))
    repeats_first = true.copy()
    repeats_first[repeat, 0] = np.inf
    scores = {
        "popularity": pop[cand],
        "history taste": taste_scores(truth.tastes[0, user[rows]].astype(np.float64)),
        "true taste": true,
        "true taste, repeats first": repeats_first,
    }
    return {name: bucket_uauc(sc, user[rows], rounds[rows], inter.n_users, buckets)
            for name, sc in scores.items()}


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
        lines += bucket_rows([headroom(setting, seed) for seed in args.seeds], f"{setting} {SETTINGS[setting]} | ")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
