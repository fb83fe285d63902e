"""The cloud's training tools: the backbone trained on history data (the model every
strategy starts from), the ``fit`` loop strategies train their cloud-side parts with,
and the checks that stop non-finite training.

It sits in ``strategies/`` because strategies' cloud halves use it; the run
(``simulator.fleetrun``) calls ``train_cloud_model`` and hands a ``CloudContext`` to each
strategy's ``prepare``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from devices import models
from devices.data import Interactions
from devices.samples import SampleBuilder, Samples, stream_key
from devices.models import DIVERGED_LOSS
from devices.errors import NonFiniteError

CLOUD_TAG = 3
FIT_BLOCK_SAMPLES = 1 << 18  # training samples ``fit`` builds at once (``blocked_samples``)


def check_losses(losses: list[float], stage: str, setting: str, *, limit: float = DIVERGED_LOSS,
                 round: int | None = None) -> list[float]:
    """Raise ``NonFiniteError`` naming ``stage`` and the ``setting`` to look at when an
    epoch's loss is NaN/Inf or above ``limit`` (diverged); else return ``losses``."""
    for epoch, loss in enumerate(losses, 1):
        if not math.isfinite(loss) or loss > limit:
            what = "non-finite" if not math.isfinite(loss) else f"diverged ({loss:.3g} > {limit:.3g})"
            at = f"round {round}: " if round is not None else ""
            raise NonFiniteError(stage, setting, f"{at}training loss {what} in epoch {epoch}", round=round)
    return losses


def check_params(params: dict[str, np.ndarray], stage: str, setting: str, round: int | None = None) -> None:
    """Raise ``NonFiniteError`` when a trained parameter holds NaN/Inf."""
    bad = [k for k, v in params.items() if not np.isfinite(np.sum(v, dtype=np.float64))]
    if bad:
        at = f"round {round}: " if round is not None else ""
        raise NonFiniteError(stage, setting, f"{at}parameters {', '.join(bad)} hold NaN/Inf", round=round)


def history_rows(inter: Interactions, history_end: float) -> np.ndarray:
    """Rows before ``history_end`` that have at least one earlier item (a window)."""
    first = np.zeros(len(inter.items), dtype=bool)
    first[inter.indptr[:-1][inter.counts > 0]] = True
    return np.flatnonzero((inter.times < history_end) & ~first)


def blocked_samples(builder: SampleBuilder, rows: np.ndarray, batches: list[np.ndarray], negatives: int,
                    key: np.uint64, block_samples: int) -> Iterator[tuple[Samples, list[slice]]]:
    """The samples of ``rows[batch]`` for each batch in turn, built a block of consecutive
    whole batches of about ``block_samples`` at a time: yields (the block's samples, each
    batch's slice of them). An epoch over a million-device history is 27M samples
    (MoMoDistill's 50-item contexts alone would take 11 GB at once); a sample does not
    depend on the others built with it (``SampleBuilder``), so blocks change no number."""
    block: list[np.ndarray] = []
    size = 0
    for i, batch in enumerate(batches):
        block.append(batch)
        size += len(batch)
        if size >= block_samples or i == len(batches) - 1:
            s = builder.build(rows[np.concatenate(block)], negatives, key)
            edges = np.cumsum([0, *map(len, block)]).tolist()
            yield s, [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
            block, size = [], 0


def fit(trainable: list[torch.Tensor], logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        builder: SampleBuilder, rows: np.ndarray, *, epochs: int, lr: float, batch_size: int, negatives: int,
        seed: int, tag: int, stage: str = "cloud model", setting: str = "cloud.lr") -> list[float]:
    """Adam on BCE over samples of ``rows`` (fresh negatives every epoch); returns the
    per-epoch mean loss. ``logits(windows (N, L), candidates (N, C)) -> (N, C)``.
    ``builder`` is a ``SampleBuilder`` (samples built a block of batches at a time,
    ``blocked_samples``) or any object whose ``build(rows, negatives, key)`` returns the
    epoch's samples at once, possibly more than ``rows`` (``UploadedSamples``).
    A non-finite or diverged epoch raises ``NonFiniteError`` naming ``stage`` and ``setting``."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # measured: small GRU batches run 4x slower on 2 threads here
    opt = torch.optim.Adam(trainable, lr=lr)
    rng = np.random.default_rng(np.random.SeedSequence([seed, tag]))
    losses = []

    def shuffled(n: int) -> list[np.ndarray]:  # batches of a fresh permutation of n samples
        order = rng.permutation(n)
        return [order[b : b + batch_size] for b in range(0, n, batch_size)]

    for epoch in range(epochs):
        key = stream_key(seed, tag, epoch)
        if isinstance(builder, SampleBuilder):  # a sample per row, each its own: built a block at a time
            blocks = blocked_samples(builder, rows, shuffled(len(rows)), negatives, key, FIT_BLOCK_SAMPLES)
        else:  # a stand-in whose samples are drawn together (DUET's uploads add history samples): at once
            s = builder.build(rows, negatives, key)
            blocks = [(s, shuffled(len(s)))]
        total, n = 0.0, 0
        for s, batches_of_s in blocks:
            for idx in batches_of_s:
                out = logits(torch.from_numpy(s.windows[idx]), torch.from_numpy(s.candidates[idx]))
                loss = models.bce_loss(out[None], torch.ones(1, out.shape[0])).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * out.shape[0]
                n += out.shape[0]
        losses.append(total / max(n, 1))
        check_losses(losses, stage, setting)
    if epochs and n:  # an epoch's loss is measured before its steps: check where the last step left the model
        with torch.no_grad():
            out = logits(torch.from_numpy(s.windows[idx]), torch.from_numpy(s.candidates[idx]))
            final = float(models.bce_loss(out[None], torch.ones(1, out.shape[0])).sum())
        try:
            check_losses([final], stage, setting)
        except NonFiniteError as exc:
            detail = str(exc.info["message"]).replace("in epoch 1", "after the last step")
            raise NonFiniteError(stage, setting, detail) from None
    return losses


def train_cloud_model(inter: Interactions, history_end: float, spec: models.ModelSpec, *, epochs: int,
                      lr: float, batch_size: int, negatives: int, seed: int, builder: SampleBuilder | None = None,
                      ) -> tuple[dict[str, np.ndarray], list[float]]:
    """Adam on BCE over all devices' history samples; returns params and per-epoch loss.
    ``builder`` draws the training negatives (default: uniform, ``SampleBuilder(inter, ...)``)."""
    rows = history_rows(inter, history_end)
    p = {k: v.clone().requires_grad_(True) for k, v in models.to_torch(models.init_params(spec, seed)).items()}
    losses = fit(list(p.values()), lambda w, c: models.forward(p, w[None], c[None])[0],
                 builder or SampleBuilder(inter, spec.window), rows, epochs=epochs, lr=lr,
                 batch_size=batch_size, negatives=negatives, seed=seed, tag=CLOUD_TAG)
    out = {k: v.detach()[0].numpy().copy() for k, v in p.items()}
    check_params(out, "cloud model", "cloud.lr")
    return out, losses


@dataclass(frozen=True)
class CloudContext:
    """What the cloud side of a strategy may use before round 1: the history data every
    device uploaded in the past, the universal model trained on it, and the model shape.

    Strategies that train cloud-side models (DUET's generator, MoMoDistill) receive it in
    ``prepare(ctx)``; the others never look at it.
    """

    interactions: Interactions
    history_end: float
    spec: models.ModelSpec
    initial: dict[str, np.ndarray]
    seed: int
    epochs: int = 3
    lr: float = 0.005
    batch_size: int = 512
    negatives: int = 4
    # Cloud-side results strategies of one run may share (e.g. MetaPatch's learned Theta,
    # which MoMoDistill needs too), keyed by everything they depend on.
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
