"""Can a per-user offset on a frozen cloud model take the synthetic fleet's personal
headroom? A probe of what limits MetaPatch, offline, outside the fleet loop.

    python experiments/dccl_user_offset.py [--setting tail_departs] [--seeds 100,101]
        [--l2 0,0.01,0.1] [--steps 300] [--recent 0] [--cloud-negatives uniform]
        [--set cloud.epochs=10 ...]

For the fleet and cloud model of ``experiments/dccl.toml`` at a taste-departure setting
(``dccl_departure.SETTINGS``), every user gets a free offset ``δ_u`` added to the cloud
model's user vector (the output of the user tower: a candidate's logit is
``(user + δ_u) . (W_t e_item) + b_item``, the cloud model frozen). It is fitted, all users
at once, by Adam on BCE over the user's history samples (each interaction with at least
one item before it, 4 never-seen negatives, as the cloud trained) plus ``l2 |δ_u|²``, to
convergence (``--steps``). ``--recent N`` fits each user on its last N history samples
only (a device's ``device.recent``). Every interaction of rounds 1..n_rounds is then
scored against 99 never-seen items, with and without the offset, and UAUC per bucket is
computed as a run computes it (``study.bucket_uauc``).

A MetaPatch patch after the encoder acts through the user tower's ReLU, so its effect on
the user vector can depend on the window, which a constant ``δ_u`` cannot. What binds
every patch on the user side alike is that a candidate's logit is linear in the item
vector ``W_t e_item``: a user can only be moved along directions those vectors span. The
probe therefore also prints how much of the fleet's true item factors ``v`` (the space
the tastes live in) the item vectors hold, the R² of a least-squares fit of ``v`` from
``[W_t e_item, 1]``, and the share of the item vectors' variance on their first principal
direction. ``--cloud-negatives popularity`` trains the cloud model with
popularity-weighted negatives (history counts) instead of uniform ones.

It measures capacity, not the fleet loop: the offset is fitted on the whole history,
once, with no drift since. Use tuning seeds (e.g. 100, 101): docs/dccl.md.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from dccl_departure import EXPERIMENT, SETTINGS
from study import bucket_rows, bucket_uauc, seed_list

from devices import models
from devices.backbones.layers import head
from devices.samples import SampleBuilder, stream_key
from devices.synthetic import generate
from simulator import config
from simulator.errors import ConfigError
from simulator.fleetrun import FleetRun
from simulator.metrics import BUCKETS
from strategies.cloud import history_rows, train_cloud_model


def probe(setting: str, seed: int, l2s: list[float], steps: int, recent: int, sets: list[str] = (),
          cloud_negatives: str = "uniform") -> dict[str, dict[str, float]]:
    head_d, tail_d = SETTINGS[setting]
    cfg = config.load(EXPERIMENT, [f"data.taste_departure_head={head_d}", f"data.taste_departure_tail={tail_d}",
                                   'experiment.strategies=["cloud_only"]', *sets], seed)
    torch.manual_seed(seed)
    run = FleetRun(cfg, use_ray=False)
    fleet = run.build_fleet()
    inter, tl, L = fleet.interactions, fleet.timeline, cfg.model.window
    builder = SampleBuilder(inter, L)
    if cloud_negatives == "uniform":
        run.train_cloud()
        initial = run.initial
    else:  # popularity-weighted training negatives (the evaluation's stay uniform)
        counts = np.bincount(inter.items[inter.times < tl.history_end], minlength=inter.n_items)
        c = cfg.cloud
        initial, _ = train_cloud_model(
            inter, tl.history_end, run.spec, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, negatives=c.negatives,
            seed=seed, builder=SampleBuilder(inter, L, item_weights=counts.astype(np.float64)))
    user, rounds = inter.user_of(), tl.round_of(inter.times)
    if recent:
        train = builder.recent_rows(np.arange(inter.n_users), tl.history_end, recent)
    else:
        train = history_rows(inter, tl.history_end)
    test = np.flatnonzero((rounds >= 1) & (rounds <= tl.n_rounds))
    params = models.to_torch(initial)
    with torch.no_grad():
        t_items = torch.matmul(params["item_emb"], params["target.w"])[0]  # (V, d)
        bias = params["item_bias"][0]

        def user_vectors(rows: np.ndarray) -> torch.Tensor:
            w = torch.from_numpy(builder.windows_for(rows)).unsqueeze(0)
            return head(params, models.body_output(params, w))[0]  # (N, d)

        u_train, u_test = user_vectors(train), user_vectors(test)
    c_train = torch.from_numpy(np.concatenate(
        [inter.items[train, None], builder.negatives(train, 4, stream_key(seed, 17, 0))], 1))
    c_test = torch.from_numpy(np.concatenate(
        [inter.items[test, None], builder.negatives(test, 99, stream_key(seed, 17, 1))], 1))
    y = torch.zeros(c_train.shape, dtype=torch.float32)
    y[:, 0] = 1.0
    owner_train = torch.from_numpy(user[train])

    def logits(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nd,ncd->nc", u, t_items[c]) + bias[c]

    def uauc(scores: torch.Tensor) -> dict[str, float]:
        return bucket_uauc(scores.detach().numpy(), user[test], rounds[test], inter.n_users, fleet.buckets)

    out = {"cloud model": uauc(logits(u_test, c_test))}
    v = generate(cfg.data, seed).item_factors.astype(np.float64)
    t = t_items.numpy().astype(np.float64)
    x = np.concatenate([t, np.ones((v.shape[0], 1))], 1)
    resid = v - x @ np.linalg.lstsq(x, v, rcond=None)[0]
    sv = np.linalg.svd(t - t.mean(0), compute_uv=False)
    for name, value in (("R² of v from item vectors", 1 - (resid ** 2).sum() / ((v - v.mean(0)) ** 2).sum()),
                        ("item vectors' variance on 1st direction", sv[0] ** 2 / (sv ** 2).sum())):
        out[name] = dict.fromkeys(("all", *BUCKETS), float(value))
    for l2 in l2s:
        delta = torch.zeros(inter.n_users, t_items.shape[1], requires_grad=True)
        opt = torch.optim.Adam([delta], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits(u_train + delta[owner_train], c_train), y, reduction="sum") / len(train)
            (loss + l2 * (delta ** 2).sum() / inter.n_users).backward()
            opt.step()
        with torch.no_grad():
            out[f"+ offset, l2 {l2:g}"] = uauc(logits(u_test + delta[torch.from_numpy(user[test])], c_test))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="tail_departs")
    ap.add_argument("--seeds", type=seed_list, default="100,101")
    ap.add_argument("--l2", default="0,0.01,0.1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recent", type=int, default=0, help="fit on each user's last N history samples (0: all)")
    ap.add_argument("--cloud-negatives", choices=("uniform", "popularity"), default="uniform")
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
    try:
        per_seed = [probe(args.setting, s, l2s, args.steps, args.recent, args.set, args.cloud_negatives)
                    for s in args.seeds]
    except ConfigError as e:  # a bad --set
        print(f"dccl_user_offset: {e}", file=sys.stderr)
        return 2
    sets = "".join(f", {x}" for x in args.set) + (", popularity negatives" if args.cloud_negatives != "uniform" else "")
    lines = [f"| {args.setting}, seeds {','.join(map(str, args.seeds))}, recent {args.recent or 'all'}{sets} | all | head | torso "
             "| tail |",
             "|---|---|---|---|---|"]
    print("\n".join(lines + bucket_rows(per_seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
