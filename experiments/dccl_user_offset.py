"""Can a per-user offset on a frozen cloud model take the synthetic fleet's personal
headroom? A probe of what limits MetaPatch, offline, outside the fleet loop.

    python experiments/dccl_user_offset.py [--setting tail_departs] [--seeds 100,101]
        [--l2 0,0.01,0.1] [--steps 300] [--recent 0] [--set cloud.epochs=10 ...]

For the fleet and cloud model of ``experiments/dccl.toml`` at a taste-departure setting
(``dccl_departure.SETTINGS``), every user gets a free offset ``δ_u`` added to the cloud
model's user vector (the output of the user tower: a candidate's logit is
``(user + δ_u) . (W_t e_item) + b_item``, the cloud model frozen). ``δ_u`` is the most a
patch on the user side can do: any MetaPatch patch after the encoder or in the tower
moves the user vector, and no more freely than this. It is fitted, all users at once, by
Adam on BCE over the user's history samples (each interaction with at least one item
before it, 4 never-seen negatives, as the cloud trained) plus ``l2 |δ_u|²``, to
convergence (``--steps``). ``--recent N`` fits each user on its last N history samples
only (a device's ``device.recent``). Every interaction of rounds 1..n_rounds is then
scored against 99 never-seen items (uniform with replacement) with and without the offset;
the table gives UAUC per activity bucket for the cloud model and with the offset, and how
much of the true item factors (the space tastes live in) the cloud model's item vectors
hold: the R² of a least-squares fit of the factors from them.

It measures capacity (what the frozen model's item representations let a user vector
express), not the fleet loop: the offset is fitted on the whole history, once, with no
drift since. Use tuning seeds (e.g. 100, 101): docs/dccl.md.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from dccl_departure import EXPERIMENT, SETTINGS
from study import seed_list

from devices import models
from devices.backbones.layers import head
from devices.scoring import device_metrics
from devices.synthetic import generate
from simulator import config
from simulator.fleetrun import FleetRun
from simulator.metrics import activity_buckets

BUCKETS = ("head", "torso", "tail")


def windows_of(items: np.ndarray, indptr: np.ndarray, rows: np.ndarray, user: np.ndarray, L: int) -> np.ndarray:
    """The L items before each row in its user's stream, PAD (-1) on the left."""
    out = np.full((rows.size, L), -1, dtype=np.int64)
    for k in range(1, L + 1):
        src = rows - k
        ok = src >= indptr[user[rows]]
        out[ok, L - k] = items[src[ok]]
    return out


def negatives(rng: np.random.Generator, seen: np.ndarray, users: np.ndarray, k: int) -> np.ndarray:
    """k items per row its user never interacted with, uniform with replacement."""
    out = rng.integers(0, seen.shape[1], (users.size, k))
    bad = seen[users[:, None], out]
    while bad.any():
        out[bad] = rng.integers(0, seen.shape[1], int(bad.sum()))
        bad = seen[users[:, None], out]
    return out


def probe(setting: str, seed: int, l2s: list[float], steps: int, recent: int,
          sets: list[str] = ()) -> dict[str, dict[str, float]]:
    head_d, tail_d = SETTINGS[setting]
    cfg = config.load(EXPERIMENT, [f"data.taste_departure_head={head_d}", f"data.taste_departure_tail={tail_d}",
                                   'experiment.strategies=["cloud_only"]', *sets], seed)
    torch.manual_seed(seed)
    run = FleetRun(cfg, use_ray=False)
    run.build_fleet()
    run.train_cloud()
    inter, tl = run.fleet.interactions, run.fleet.timeline
    n, L = inter.n_users, cfg.model.window
    user = np.repeat(np.arange(n), np.diff(inter.indptr))
    pos_in_stream = np.arange(user.size) - inter.indptr[user]
    in_rounds = inter.times >= tl.history_end
    labels, _ = activity_buckets(np.bincount(user[~in_rounds], minlength=n))
    seen = np.zeros((n, inter.n_items), dtype=bool)
    seen[user, inter.items] = True
    rng = np.random.default_rng([seed, 17])

    train = np.flatnonzero(~in_rounds & (pos_in_stream >= 1))
    if recent:
        n_hist = np.bincount(user[~in_rounds], minlength=n)
        train = train[pos_in_stream[train] >= n_hist[user[train]] - recent]
    test = np.flatnonzero(in_rounds)
    params = models.to_torch(run.initial)
    with torch.no_grad():
        t_items = torch.matmul(params["item_emb"], params["target.w"])[0]  # (V, d)
        bias = params["item_bias"][0]

        def user_vectors(rows: np.ndarray) -> torch.Tensor:
            w = torch.from_numpy(windows_of(inter.items, inter.indptr, rows, user, L)).unsqueeze(0)
            return head(params, models.body_output(params, w))[0]  # (N, d)

        u_train, u_test = user_vectors(train), user_vectors(test)
    c_train = torch.from_numpy(np.concatenate([inter.items[train, None], negatives(rng, seen, user[train], 4)], 1))
    c_test = torch.from_numpy(np.concatenate([inter.items[test, None], negatives(rng, seen, user[test], 99)], 1))
    y = torch.zeros(c_train.shape, dtype=torch.float32)
    y[:, 0] = 1.0
    owner_train, owner_test = torch.from_numpy(user[train]), user[test]

    def logits(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nd,ncd->nc", u, t_items[c]) + bias[c]

    def uauc(scores: torch.Tensor) -> dict[str, float]:
        auc = device_metrics(scores.detach().numpy().astype(np.float32), owner_test, n)["auc"]
        return {**{b: float(np.nanmean(auc[labels == b])) for b in BUCKETS}, "all": float(np.nanmean(auc))}

    out = {"cloud model": uauc(logits(u_test, c_test))}
    # How much of the true item factors v (the taste space) the model's item vectors hold:
    # R^2 of a least-squares fit of v from [W_t e_item, 1], over all coordinates of v.
    v = generate(cfg.data, seed).item_factors.astype(np.float64)
    x = np.concatenate([t_items.numpy().astype(np.float64), np.ones((v.shape[0], 1))], 1)
    resid = v - x @ np.linalg.lstsq(x, v, rcond=None)[0]
    out["R² of v from item vectors"] = dict.fromkeys(("all", *BUCKETS), 1 - (resid ** 2).sum() / ((v - v.mean(0)) ** 2).sum())
    for l2 in l2s:
        delta = torch.zeros(n, t_items.shape[1], requires_grad=True)
        opt = torch.optim.Adam([delta], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits(u_train + delta[owner_train], c_train), y, reduction="sum") / len(train)
            (loss + l2 * (delta ** 2).sum() / n).backward()
            opt.step()
        with torch.no_grad():
            out[f"+ offset, l2 {l2:g}"] = uauc(logits(u_test + delta[torch.from_numpy(owner_test)], c_test))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="tail_departs")
    ap.add_argument("--seeds", type=seed_list, default="100,101")
    ap.add_argument("--l2", default="0,0.01,0.1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recent", type=int, default=0, help="fit on each user's last N history samples (0: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further override of the experiment file (e.g. cloud.epochs=10)")
    args = ap.parse_args(argv)
    if args.setting not in SETTINGS:
        print(f"dccl_user_offset: unknown setting {args.setting!r}; settings: {', '.join(SETTINGS)}", file=sys.stderr)
        return 2
    try:
        l2s = [float(x) for x in args.l2.split(",") if x]
    except ValueError:
        print(f"dccl_user_offset: --l2 takes comma-separated numbers, not {args.l2!r}", file=sys.stderr)
        return 2
    per_seed = [probe(args.setting, s, l2s, args.steps, args.recent, args.set) for s in args.seeds]
    sets = "".join(f", {x}" for x in args.set)
    lines = [f"| {args.setting}, seeds {','.join(map(str, args.seeds))}, recent {args.recent or 'all'}{sets} | all | head | torso "
             "| tail |",
             "|---|---|---|---|---|"]
    for name in per_seed[0]:
        mean = {b: np.mean([r[name][b] for r in per_seed]) for b in ("all", *BUCKETS)}
        lines.append(f"| {name} | " + " | ".join(f"{mean[b]:.4f}" for b in ("all", *BUCKETS)) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
