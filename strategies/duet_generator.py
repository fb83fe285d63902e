"""DUET's parameter generator, the training: joint training on history data and retraining
on uploaded windows (the model itself, ``GeneratorConfig`` and ``generate_heads``, is in
``strategies.duet_model``; its names are re-exported here).

Joint training (``train_duet``): body + encoder + generator are optimised together on
history data, from the universal model. ``from_scratch=True`` (the paper's fully joint
training, "body, encoder and generator are optimised together on history data") starts
body and decoder offsets from ``models.init_params(spec, seed)`` instead (numbers on
ml-latest-small: docs/duet_table1.md, "Further variants (session 3)").

Retraining (issue 3, part 4; ``retrain_duet``): the cloud only ever sees a device's
uploaded windows (its last L item ids), so each window of length L yields the samples
"prefix -> next item" inside it (``window_samples``: every item with at least one item
before it is a positive, its prefix left-padded to L is the sample's window), with
negatives drawn uniformly from items the cloud does not know the device to have touched
(its history rows and its uploaded windows), fresh every epoch. To limit forgetting, each
epoch mixes in ``history`` times as many samples drawn from the history data. Body +
encoder + generator continue from their current values with a fresh Adam, through the same
loop as the first training (``strategies.cloud.fit``).
"""
from __future__ import annotations

import numpy as np
import torch

from devices import models
from devices.data import Interactions
from devices.samples import SampleBuilder, Samples, stream_key
from strategies.cloud import fit, history_rows
from strategies.duet_model import (  # noqa: F401 (the model; names re-exported)
    BASES, GEN_TAG, NOISE, SPREAD, GeneratorConfig, duet_logits, dynamic_keys, encode_windows, generate_heads,
    head_layers, head_nbytes, init_generator, is_basis)

DUET_TAG = 4  # sample stream and shuffling of the joint training (cloud.py uses 3)
RETRAIN_TAG = 5  # sample streams and shuffling of the retrainings (with the round)


def train_duet(inter: Interactions, history_end: float, spec: models.ModelSpec, gcfg: GeneratorConfig,
               body_init: dict[str, np.ndarray], *, epochs: int, lr: float, batch_size: int, negatives: int,
               seed: int, builder: SampleBuilder | None = None,
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[float]]:
    """Joint Adam on body (non-head params, from ``body_init``) + generator over history samples.

    Mirrors ``strategies.cloud.train_cloud_model``. Returns (body params with the universal
    head unchanged, generator params, per-epoch mean loss). ``frozen_bases`` leaves the
    decoder bases out of the optimiser (and out of autograd). With ``gcfg.from_scratch`` the
    body and the decoder offsets start from ``models.init_params(spec, seed)`` (the fresh
    init the universal model itself starts from) instead of ``body_init``: the paper's fully
    joint training; the returned body still carries ``body_init``'s (unused) head.
    ``builder`` draws the training negatives (default: uniform, ``SampleBuilder(inter, ...)``).
    """
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # as train_cloud_model: small batches run faster on one thread
    heads = set(dynamic_keys(spec, gcfg))
    start = models.init_params(spec, seed) if gcfg.from_scratch else body_init
    body = {k: v.clone().requires_grad_(k not in heads)
            for k, v in models.to_torch({**start, **{k: body_init[k] for k in heads}}).items()}
    g0 = init_generator(spec, gcfg, seed, head_init={k: start[k] for k in heads})
    gen = {k: torch.from_numpy(v).requires_grad_(not (gcfg.frozen_bases and is_basis(k))) for k, v in g0.items()}
    trainable = [v for v in (*body.values(), *gen.values()) if v.requires_grad]
    losses = fit(trainable, lambda w, c: duet_logits(body, gen, w, c, spec, gcfg),
                 builder or SampleBuilder(inter, spec.window),
                 history_rows(inter, history_end), epochs=epochs, lr=lr, batch_size=batch_size, negatives=negatives,
                 seed=seed, tag=DUET_TAG, stage="DUET generator", setting="strategies.duet.lr")
    return ({k: v.detach()[0].numpy().copy() for k, v in body.items()},
            {k: v.detach().numpy().copy() for k, v in gen.items()}, losses)


def window_samples(windows: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples inside uploaded windows (n, L): every item with an item before it is a
    positive, the items before it (left-padded to L) its window.

    Returns (windows (k, L), positives (k,), owners (k,)); a full window gives L - 1 samples.
    """
    n, L = windows.shape
    wins, pos, own = [], [], []
    for t in range(1, L):
        ok = (windows[:, t] != models.PAD) & (windows[:, t - 1] != models.PAD)
        w = np.full((int(ok.sum()), L), models.PAD, np.int64)
        w[:, L - t :] = windows[ok, :t]
        wins.append(w)
        pos.append(windows[ok, t].astype(np.int64))
        own.append(np.asarray(owners)[ok].astype(np.int64))
    return np.concatenate(wins), np.concatenate(pos), np.concatenate(own)


class UploadedSamples:
    """Retraining samples of ``window_samples`` plus a draw of history samples, built per
    epoch with fresh negatives: a stand-in for the ``SampleBuilder`` that
    ``strategies.cloud.fit`` calls (``build(rows, negatives, key)``; ``rows`` index the
    window samples, so ``fit`` gets ``np.arange(len(uploaded))``).

    ``history`` is how many history samples per window sample (``Duet.retrain_history``);
    negatives of window samples avoid the items of the device's history rows and of all
    its uploaded windows (what the cloud knows it touched); history samples are built by
    ``builder`` exactly as in the first training.
    """

    def __init__(self, windows: np.ndarray, owners: np.ndarray, builder: SampleBuilder, hist_rows: np.ndarray,
                 history: float) -> None:
        self.windows, self.positives, self.owners = window_samples(windows, owners)
        self.builder, self.hist_rows = builder, hist_rows
        self.n_items = builder.inter.n_items
        self.n_history = min(int(round(history * len(self.positives))), len(hist_rows))
        hist_keys = builder.user[hist_rows].astype(np.int64) * self.n_items + builder.inter.items[hist_rows].astype(np.int64)
        up = np.asarray(windows, np.int64)
        up_keys = (np.repeat(np.asarray(owners, np.int64), up.shape[1]) * self.n_items + up.ravel())[up.ravel() >= 0]
        self.known = np.unique(np.concatenate([hist_keys, up_keys]))

    def __len__(self) -> int:
        return len(self.positives)

    def negatives(self, owners: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """k items per owner outside what the cloud knows the owner touched (resampled)."""
        out = rng.integers(0, self.n_items, (len(owners), k))
        for _ in range(256):
            keys = owners[:, None] * self.n_items + out
            at = np.searchsorted(self.known, keys).clip(max=max(len(self.known) - 1, 0))
            todo = self.known[at] == keys
            if not todo.any():
                break
            out[todo] = rng.integers(0, self.n_items, int(todo.sum()))
        return out

    def build(self, rows: np.ndarray, negatives: int, key: np.uint64) -> Samples:
        rng = np.random.default_rng(np.random.SeedSequence([int(key)]))
        rows = np.asarray(rows, np.int64)
        cands = np.concatenate([self.positives[rows, None], self.negatives(self.owners[rows], negatives, rng)], 1)
        up = Samples(self.owners[rows], self.windows[rows], cands)
        if not self.n_history:
            return up
        hist = self.builder.build(np.sort(rng.choice(self.hist_rows, self.n_history, replace=False)), negatives, key)
        return Samples(np.concatenate([up.owner, hist.owner]), np.concatenate([up.windows, hist.windows]),
                       np.concatenate([up.candidates, hist.candidates]))


def retrain_duet(body: dict[str, np.ndarray], gen: dict[str, np.ndarray], samples: UploadedSamples,
                 spec: models.ModelSpec, gcfg: GeneratorConfig, *, epochs: int, lr: float, batch_size: int,
                 negatives: int, seed: int, rnd: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[float]]:
    """Continue the joint training of body (non-head params) + generator on ``samples``.

    As ``train_duet`` but from the current ``body`` and ``gen`` (fresh Adam), with sample
    streams and shuffling keyed by (seed, ``RETRAIN_TAG``, round ``rnd``). Returns (body,
    generator, per-epoch mean loss); ``frozen_bases`` still leaves the bases untouched.
    """
    heads = set(dynamic_keys(spec, gcfg))
    b = {k: v.clone().requires_grad_(k not in heads) for k, v in models.to_torch(body).items()}
    g = {k: torch.from_numpy(np.array(v)).requires_grad_(not (gcfg.frozen_bases and is_basis(k))) for k, v in gen.items()}
    trainable = [v for v in (*b.values(), *g.values()) if v.requires_grad]
    losses = fit(trainable, lambda w, c: duet_logits(b, g, w, c, spec, gcfg), samples, np.arange(len(samples)),
                 epochs=epochs, lr=lr, batch_size=batch_size, negatives=negatives, seed=seed,
                 tag=int(stream_key(RETRAIN_TAG, rnd)), stage=f"DUET generator (retrain, round {rnd})",
                 setting="strategies.duet.lr")
    return ({k: v.detach()[0].numpy().copy() for k, v in b.items()},
            {k: v.detach().numpy().copy() for k, v in g.items()}, losses)
