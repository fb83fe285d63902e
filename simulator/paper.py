"""The DUET paper's protocol on MovieLens (``data.protocol = "leave_last"``): base vs
finetune vs DUET, as in Table 1 of the DUET paper (Lv et al., WWW 2023; docs/methods.md).

Per user, time-ordered: the LAST interaction is the test target, ranked against
``device.eval_negatives`` (99) sampled items the user never interacted with (the test item
included, none of them); every earlier interaction with at least one previous item is a
training sample with ``cloud.negatives`` / ``device.negatives`` (4) sampled negatives.
Windows are the last ``model.window`` (10) items before the target, so no training sample
sees a test item, as target or in its window. Users with a single interaction have no
window to score and are not evaluated.

The split is expressed as a time cut so the fleet's training code runs unchanged: in the
*training view* each user's last interaction is moved to t = +inf and the history cut is
+inf, so ``strategies.cloud.history_rows`` selects exactly the training samples, while the
sample builder still knows every interaction (negatives exclude the test items too).

- **base**: ``train_cloud_model`` (Adam, ``[cloud]`` epochs / lr / batch_size) on the
  training samples.
- **finetune**: each user's copy of the base model, ALL of it (or its head only, with
  ``strategies.local_finetune.layers = "head"``), trained on that user's own training
  samples with ``local_steps`` full-batch SGD steps at ``lr`` (``[strategies.local_finetune]``,
  else ``[device]``)
  (``models.sgd_train`` on local vocabularies, users batched; ``device.recent`` is not
  used: a user trains on all its samples, as in the paper).
- **duet**: ``train_duet`` from the base model, or from a fresh initialisation with
  ``from_scratch = true`` (``[strategies.duet]`` m, tau, stabilizer, frozen_bases,
  from_scratch, epochs, lr; DUET's defaults otherwise), then each user's head is generated
  from the window before its test item and scores the test candidates with the body.

Metrics: AUC pooled over all test samples (sklearn, exact), UAUC (mean per-user AUC),
NDCG@10 and HR@10 (``metrics.device_metrics``, one positive per user).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from devices import models
from devices.scoring import DEVICE_METRICS, POOLED_METRICS
from devices.data import Interactions
from devices.movielens import LEAVE_LAST_KEYS, PAPER_STRATEGIES, MovieLensConfig, filter_min_ratings, load_ratings_with_epoch
from devices.runtime import ITEM_TABLES, local_vocabulary
from devices.samples import SampleBuilder, Samples, pad_by_owner, stream_key
from simulator import metrics
from strategies.cloud import history_rows, train_cloud_model
from simulator.config import ExperimentConfig
from simulator.errors import FleetsimError
from simulator.fleetrun import FleetRun
from simulator.grid import RoundResult
from simulator.metrics import activity_buckets, device_metrics
from simulator.writer import write_json
from strategies.duet_generator import GeneratorConfig, duet_logits, train_duet
from strategies.registry import make_strategy

METHODS = ("base", "finetune", "duet")
TEST_TAG, FINETUNE_TAG = 11, 12  # sample streams (cloud.py uses 3, DUET 4)
FINETUNE_ROWS = 8192  # padded training samples per batch of users (bounds DIN's activations)
SCORE_AT_ONCE = 1 << 20  # held-out candidates scored in one forward pass if no more (DIN: ~5 GB) ...
SCORE_CANDIDATES = 1 << 16  # ... else per forward pass (bounds memory)
FINETUNE_CATALOGUE_USERS = 32  # users per fine-tuning batch when each scores the whole catalogue


@dataclass
class LeaveLastSplit:
    """The leave-last-out split of one ratings file (row indices into ``view``)."""

    view: Interactions  # the ratings with each user's held-out interaction (and any after it) at t = +inf
    train_rows: np.ndarray  # every interaction with >= 1 earlier item, before each user's held-out one
    test_rows: np.ndarray  # the held-out interaction of each evaluated user, in user order
    users: np.ndarray  # the evaluated users (>= 1 interaction before the held-out one), in the order of test_rows
    held_back: int = 1  # interactions per user not trained on: 1 (test) or 2 (validation: the last is dropped)


def leave_last_split(inter: Interactions, holdout: str = "test") -> LeaveLastSplit:
    """Split each user's stream into training samples and one held-out interaction: its
    last (``holdout = "test"``) or the one before it (``"validation"``; the last is then
    not used at all, so no setting chosen on validation has seen a test item)."""
    back = {"test": 1, "validation": 2}[holdout]
    counts = inter.counts
    times = inter.times.copy()
    for k in range(1, back + 1):
        times[(inter.indptr[1:] - k)[counts >= k]] = math.inf
    view = dataclasses.replace(inter, times=times)
    users = np.flatnonzero(counts >= back + 1)
    return LeaveLastSplit(view, history_rows(view, math.inf), inter.indptr[1:][users] - back, users, back)


def item_popularity(split: LeaveLastSplit) -> np.ndarray:
    """Interactions per item among the ones the methods train on (held-out ones excluded)."""
    view = split.view
    return np.bincount(view.items[np.isfinite(view.times)], minlength=view.n_items).astype(np.float64)


def build_test_samples(builder: SampleBuilder, split: LeaveLastSplit, negatives: int, seed: int) -> Samples:
    """Each evaluated user's held-out item against ``negatives`` never-seen items, drawn by
    ``builder`` (uniformly, or by popularity if it has ``item_weights``)."""
    return builder.build(split.test_rows, negatives, stream_key(seed, TEST_TAG))


def catalogue_samples(builder: SampleBuilder, split: LeaveLastSplit) -> tuple[Samples, np.ndarray]:
    """Each evaluated user's held-out item against every item it never interacted with
    (``eval_candidates = "all"``): each row is the whole catalogue, the held-out item
    first, the others in id order; the mask (n, n_items) is False where the user
    interacted with the item, so those candidates do not count."""
    n_items, rows = builder.inter.n_items, split.test_rows
    pos = builder.inter.items[rows]
    others = np.arange(n_items - 1)[None, :]
    others = others + (others >= pos[:, None])  # every item but the positive, in id order
    cands = np.concatenate([pos[:, None], others], 1)
    users = builder.user[rows].astype(np.int64)
    valid = ~builder.seen.contains(np.repeat(users[:, None], n_items - 1, 1), others)
    valid = np.concatenate([np.ones((len(rows), 1), bool), valid], 1)
    return Samples(users, builder.windows_for(rows), cands), valid


def user_metrics(scores: np.ndarray, valid: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Per-user metrics (``device_metrics``) and the pooled AUC (sklearn, exact) of scores
    (n_users, C), column 0 the positive, counting only the ``valid`` candidates."""
    n, c = scores.shape
    labels = np.zeros((n, c), np.int8)
    labels[:, 0] = 1
    if valid is None:
        return device_metrics(scores, np.arange(n), n), float(roc_auc_score(labels.ravel(), scores.ravel()))
    per = [device_metrics(scores[u, valid[u]][None], np.zeros(1, np.int64), 1) for u in range(n)]
    m = {k: np.concatenate([p[k] for p in per]) for k in per[0]} if per else device_metrics(scores[:0], np.zeros(0, np.int64), 0)
    return m, float(roc_auc_score(labels[valid], scores[valid]))


def evaluate(scores: np.ndarray, valid: np.ndarray | None = None) -> dict[str, Any]:
    """AUC (pooled, exact), UAUC and the mean of each pooled metric (NDCG@10, HR@10, log loss)
    over users, of scores (n_users, C), column 0 the positive (one positive per user),
    counting only the ``valid`` candidates (None: all)."""
    return _table_row(*user_metrics(scores, valid))


def _table_row(m: dict[str, np.ndarray], auc: float) -> dict[str, Any]:
    return {"auc": auc, "uauc": float(np.nanmean(m["auc"])),
            **{k: float(m[k].mean()) for k in POOLED_METRICS}, "n_users": int(len(m["auc"]))}


def _row_chunks(n: int, c: int) -> list[slice]:
    """Rows 0..n-1 in one slice if n * c <= ``SCORE_AT_ONCE`` candidates, else in slices
    of at most ``SCORE_CANDIDATES``."""
    if n * c <= SCORE_AT_ONCE:
        return [slice(0, n)]
    k = max(1, SCORE_CANDIDATES // max(c, 1))
    return [slice(i, i + k) for i in range(0, n, k)]


@torch.no_grad()
def score_shared(params: dict[str, np.ndarray], test: Samples) -> np.ndarray:
    """Scores (n, C) of the test samples under one shared model."""
    p = models.to_torch(params)
    return np.concatenate([
        models.forward(p, torch.from_numpy(test.windows[r])[None], torch.from_numpy(test.candidates[r])[None])[0].numpy()
        for r in _row_chunks(*test.candidates.shape)])


def _user_batches(counts: np.ndarray, budget: int) -> list[np.ndarray]:
    """Positions 0..n-1 in batches of similar sample counts, each <= ``budget`` padded rows."""
    order = np.argsort(-counts, kind="stable")
    out, i = [], 0
    while i < len(order):
        k = max(1, budget // max(int(counts[order[i]]), 1))
        out.append(np.sort(order[i : i + k]))
        i += k
    return out


def finetune_scores(base: dict[str, np.ndarray], builder: SampleBuilder, split: LeaveLastSplit, test: Samples, *,
                    steps: int, lr: float, negatives: int, seed: int,
                    trainable: tuple[str, ...] | None = None) -> np.ndarray:
    """Scores (n, C) of each user's test sample under its own fine-tuned copy of ``base``
    (``builder`` draws the training negatives; ``trainable``: the params trained, None: all).

    Users are trained together in batches, each on its local vocabulary: the items its
    training samples and its test sample touch. Plain SGD leaves the rows its training
    never touches (e.g. unseen test negatives) exactly at the base model's values, so this
    equals fine-tuning a full copy. (With the whole catalogue as candidates the local
    vocabulary is the catalogue: batches are then ``FINETUNE_CATALOGUE_USERS`` users.)
    """
    train = builder.build(split.train_rows, negatives, stream_key(seed, FINETUNE_TAG))
    pos = np.full(builder.inter.n_users, -1, np.int64)
    pos[split.users] = np.arange(len(split.users))
    owner = pos[train.owner]  # every training row's user is evaluated (it has >= 2 interactions)
    counts = np.bincount(owner, minlength=len(split.users))
    shared = models.to_torch(base)
    out = np.zeros(test.candidates.shape, np.float32)
    batches = _user_batches(counts, FINETUNE_ROWS)
    if test.candidates.shape[1] * len(test) > SCORE_AT_ONCE:
        batches = [b[i : i + FINETUNE_CATALOGUE_USERS] for b in batches for i in range(0, len(b), FINETUNE_CATALOGUE_USERS)]
    for batch in batches:
        sel = np.flatnonzero(np.isin(owner, batch))
        win, cand, weight, _ = pad_by_owner(Samples(owner[sel], train.windows[sel], train.candidates[sel]), batch)
        b, n, c = cand.shape
        # test candidates ride along as extra "candidates" so they get local ids too
        flat = np.concatenate([cand.reshape(b, n * c), test.candidates[batch]], 1)[:, :, None]
        items, lw, lc = local_vocabulary(np.concatenate([win, test.windows[batch][:, None]], 1), flat,
                                         builder.inter.n_items)
        rows = torch.from_numpy(np.clip(items, 0, None))
        p = {k: v[0][rows] if k in ITEM_TABLES else v.expand(b, *v.shape[1:]) for k, v in shared.items()}
        lc = torch.from_numpy(lc[:, :, 0])
        lw = torch.from_numpy(lw)
        new, _ = models.sgd_train(p, lw[:, :n], lc[:, : n * c].reshape(b, n, c), torch.from_numpy(weight), steps, lr,
                                  trainable)
        with torch.no_grad():
            for r in _row_chunks(b, lc.shape[1] - n * c):
                sub = {k: v[r] for k, v in new.items()}
                out[batch[r]] = models.forward(sub, lw[r, n:], lc[r, n * c :][:, None])[:, 0].numpy()
    return out


def finetune_config(cfg: ExperimentConfig, spec: models.ModelSpec) -> dict[str, Any]:
    """Steps, lr and trained params of finetune: ``[strategies.local_finetune]`` local_steps /
    lr / layers (validated as the fleet's), ``[device]`` local_steps / lr where unset."""
    ft = make_strategy("local_finetune", cfg.strategies.get("local_finetune", {}))
    return {"steps": ft.local_steps or cfg.device.local_steps, "lr": ft.lr or cfg.device.lr,
            "trainable": spec.head_keys() if ft.layers == "head" else None, "layers": ft.layers}


def duet_config(cfg: ExperimentConfig) -> tuple[GeneratorConfig, int, float]:
    """Generator config, epochs and lr from ``[strategies.duet]`` (validated as the fleet's DUET)."""

    duet = make_strategy("duet", cfg.strategies.get("duet", {}))
    return duet.gcfg, duet.epochs, duet.lr


def run_leave_last(cfg: ExperimentConfig, out: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run base, finetune and DUET under the leave-last protocol, on a ``FleetRun`` (its
    folder and status steps only: no host pool, no rounds); return the summary. Finetune
    and DUET run if ``experiment.strategies`` names ``local_finetune`` / ``duet``; base
    always does (both start from it).

    The run folder has a fleet run's layout, so ``load_run`` and ``fleetsim report`` read
    it: each method is a strategy with one round whose records are its evaluated users
    (their test sample); ``fleet_devices.parquet`` holds every user's training
    interactions and activity bucket. ``summary.json`` adds ``protocol``, ``methods``
    (the paper's table), timings, data, settings and training losses.
    """
    run = FleetRun(cfg, out, log=log)  # fail on a bad --out before any expensive work
    try:
        gcfg, duet_epochs, duet_lr = duet_config(cfg)
        ft = finetune_config(cfg, models.ModelSpec(n_items=1, backbone=cfg.model.backbone))
        t0 = time.perf_counter()
        inter, _ = load_ratings_with_epoch(cfg.data.path)
        if cfg.data.min_item_ratings or cfg.data.min_user_ratings:
            inter = filter_min_ratings(inter, cfg.data.min_item_ratings, cfg.data.min_user_ratings)
    except FleetsimError:
        run.writer.discard_if_empty()  # leave no empty run folder behind for bad input
        raise
    seed, c, dev = cfg.experiment.seed, cfg.cloud, cfg.device
    spec = cfg.model.spec(inter.n_items)
    d = cfg.data
    split = leave_last_split(inter, d.holdout)
    if not len(split.users) or not len(split.train_rows):  # nothing to evaluate, or nothing to train on
        run.writer.discard_if_empty()
        raise FleetsimError(f"{d.path}: too few ratings for leave_last (holdout {d.holdout!r}): of {inter.n_users} "
                            f"users {len(split.users)} have the {split.held_back + 1} a held-out one needs, and the "
                            f"rest gives {len(split.train_rows)} training samples (an item after an earlier one)")
    builder = SampleBuilder(split.view, spec.window)  # uniform negatives
    pop = SampleBuilder(split.view, spec.window, item_weights=item_popularity(split)) if "popularity" in (
        d.eval_candidates, d.train_negatives) else None
    train_builder = pop if d.train_negatives == "popularity" else builder
    if d.eval_candidates == "all":
        test, valid = catalogue_samples(builder, split)
    else:
        test, valid = build_test_samples(pop if d.eval_candidates == "popularity" else builder, split,
                                         dev.eval_negatives, seed), None
    protocol = {k: getattr(d, k) for k in LEAVE_LAST_KEYS}
    train_counts = np.maximum(inter.counts - split.held_back, 0)  # a user's held-out (and dropped) interactions
    buckets, thresholds = activity_buckets(train_counts)
    with run:
        # base always: finetune starts from it and DUET takes its head's initialisation
        methods = ["base"] + [m for m, sname in zip(METHODS[1:], PAPER_STRATEGIES[1:]) if sname in cfg.experiment.strategies]
        run.open(methods, fleet=False)
        run.writer.write_fleet_files(
            {"source": "movielens", "protocol": "leave_last", "n_devices": inter.n_users, "n_items": inter.n_items,
             "history_end_s": None, "round_seconds": None, "n_rounds": 1, "drift_events": [],
             "bucket_thresholds": thresholds},
            {"device_id": np.arange(inter.n_users, dtype=np.int64), "history_interactions": train_counts,
             "interactions": inter.counts, "bucket": np.asarray(buckets, dtype=str)})
        run.writer.summary.update(protocol="leave_last", protocol_settings=protocol, backbone=spec.backbone, seed=seed,
                                  methods={})
        timings = {"load_s": time.perf_counter() - t0}
        log(f"leave_last: {inter.n_users} users ({len(split.users)} evaluated), {inter.n_items} items, "
            f"{len(split.train_rows)} training samples; backbone {spec.backbone}, seed {seed}; "
            + ", ".join(f"{k} {v}" for k, v in protocol.items()))
        losses: dict[str, list[float]] = {}
        base: dict[str, np.ndarray] = {}

        def method_base() -> np.ndarray:
            params, losses["base"] = train_cloud_model(split.view, math.inf, spec, epochs=c.epochs, lr=c.lr,
                                                       batch_size=c.batch_size, negatives=c.negatives, seed=seed,
                                                       builder=train_builder)
            base.update(params)
            return score_shared(base, test)

        def method_finetune() -> np.ndarray:
            return finetune_scores(base, train_builder, split, test, steps=ft["steps"], lr=ft["lr"],
                                   negatives=dev.negatives, seed=seed, trainable=ft["trainable"])

        def method_duet() -> np.ndarray:
            body, gen, losses["duet"] = train_duet(split.view, math.inf, spec, gcfg, base, epochs=duet_epochs,
                                                   lr=duet_lr, batch_size=c.batch_size, negatives=c.negatives,
                                                   seed=seed, builder=train_builder)
            b, g = models.to_torch(body), {k: torch.from_numpy(v) for k, v in gen.items()}
            with torch.no_grad():
                return np.concatenate([
                    duet_logits(b, g, torch.from_numpy(test.windows[r]), torch.from_numpy(test.candidates[r]), spec,
                                gcfg).numpy() for r in _row_chunks(*test.candidates.shape)])

        for name, method in zip(METHODS, (method_base, method_finetune, method_duet)):
            if name not in methods:
                continue
            run.state.start(name)
            t = time.perf_counter()
            scores = method()
            timings[f"{name}_s"] = time.perf_counter() - t
            log(f"{name}: {timings[f'{name}_s']:.1f} s" + (f", loss {_losses(losses[name])}" if name in losses else ""))
            m, auc = user_metrics(scores, valid)  # once: the table row and the records
            run.writer.summary["methods"][name] = _table_row(m, auc)
            _record(run, name, m, auc, split, buckets, timings[f"{name}_s"], thresholds)
        timings["total_s"] = time.perf_counter() - t0
        run.writer.summary.update(
            timings=timings,
            data={"path": cfg.data.path, "n_users": inter.n_users, "n_items": inter.n_items,
                  "n_train_samples": len(split.train_rows), "n_test_users": len(split.users),
                  "n_candidates": int(valid.sum()) if valid is not None else int(test.candidates.size)},
            settings={"cloud": dataclasses.asdict(c),
                      "finetune": {"steps": ft["steps"], "lr": ft["lr"], "layers": ft["layers"],
                                   "negatives": dev.negatives},
                      "duet": {**dataclasses.asdict(gcfg), "epochs": duet_epochs, "lr": duet_lr},
                      "eval_negatives": dev.eval_negatives, "window": spec.window},
            train_losses=losses)
        write_json(run.writer.dir / "summary.json", run.writer.summary)
    return run.summary


def _record(run: FleetRun, name: str, m: dict[str, np.ndarray], overall: float, split: LeaveLastSplit,
            buckets: np.ndarray, seconds: float, thresholds: dict) -> None:
    """One method's per-user metrics (``user_metrics``) as a one-round strategy of the fleet layout."""
    n = len(m["auc"])
    users = split.users.astype(np.int64)
    devices = {
        "round": np.ones(n, np.int32), "device_id": users, "online": np.ones(n, bool), "selected": np.ones(n, bool),
        "status": np.full(n, "ok", dtype=object), **{k: m[k] for k in DEVICE_METRICS},
        "n_pos": m["n_pos"].astype(np.int64), "n_neg": m["n_neg"].astype(np.int64), "nonfinite": np.zeros(n, bool),
        "bytes_down": np.zeros(n, np.int64), "bytes_up": np.zeros(n, np.int64), "device_flops": np.zeros(n),
        "device_seconds": np.zeros(n), "bucket": np.asarray(buckets)[users],
    }
    info = {"round": 1, "t_start": 0.0, "latency_s": 0.0, "online": n, "active": n, "selected": n, "exchanges": 0,
            "ok": n, "dropped": 0, "late": 0, "quarantined": 0, "errors": 0, "nonfinite_scores": 0,
            "host_restarts": 0}
    run.state.round_done(name, RoundResult(1, devices, info, None))
    summary = metrics.run_summary(pd.DataFrame(devices), overall_auc=overall, thresholds=thresholds)
    summary.update(errors=0, quarantined=0, round_latency_s=0.0, simulated_seconds=0.0, wall_seconds=seconds)
    run.state.end(name, summary, "complete", rounds=1)


def _losses(values: list[float]) -> str:
    return f"{values[0]:.4f} -> {values[-1]:.4f}" if values else "(untrained)"


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MovieLensConfig)}


def format_table(summary: dict[str, Any]) -> str:
    """The table ``fleetsim run`` prints for a leave-last run."""
    head = f"{'method':<9} {'AUC':>7} {'UAUC':>7} {'NDCG@10':>8} {'HR@10':>7} {'users':>6} {'s':>7}"
    ps = summary.get("protocol_settings", {})
    lines = [f"leave_last, {summary['backbone']}, seed {summary['seed']}"
             + "".join(f", {k} {v}" for k, v in ps.items() if v != _DEFAULTS.get(k)), head, "-" * len(head)]
    for name, m in summary["methods"].items():
        secs = summary["timings"].get(f"{name}_s", math.nan)
        lines.append(f"{name:<9} {m['auc']:7.4f} {m['uauc']:7.4f} {m['ndcg10']:8.4f} {m['hr10']:7.4f} "
                     f"{m['n_users']:6d} {secs:7.1f}")
    return "\n".join(lines)
