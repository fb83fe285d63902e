"""MoMoDistill's auxiliary encoder (trained on the cloud, run on a device for cold starts)
and what the cloud builds from the devices' uploads.

The encoder predicts a metapatch from the items a user had: phi = ReLU(mean item
embedding of the user's last ``aux_history`` items . W1 + b1) . W2 + b2 on the cloud
model's embeddings **(our choice; 50 items, longer than the model's window L, so the patch
can add what the window does not show)**. Before round 1 the encoder and Theta are
pretrained on the history the cloud holds (``pretrain_aux``, ``aux_epochs``; 0 = W2 starts
at 0, phi = 0, the plain cloud model): the rounds alone are far too little data to train
it. Each distillation refits it (``strategies.momodistill_cloud.refit_patch``) on
``contexts``: the items a device had *before* the targets it uploaded, which
``sequence_samples`` turns into the distillation's samples.

Pure functions of arrays and tensors (no Flower, no Ray); ``strategies.momodistill`` is
the strategy and its device functions.
"""
from __future__ import annotations

import numpy as np
import torch

from devices import models
from devices.models import PAD
from devices.samples import SampleBuilder, Samples
from strategies.metapatch_theta import patch_from_phi

MOMO_TAG = 13


def init_aux(spec: models.ModelSpec, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Auxiliary encoder window -> phi; W2 = 0 so it first predicts phi = 0."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, MOMO_TAG, 1]))
    d = spec.dim
    return {"aux.w1": (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32),
            "aux.b1": np.zeros(d, np.float32), "aux.w2": np.zeros((d, dim), np.float32),
            "aux.b2": np.zeros(dim, np.float32)}


def predict_phi(aux: dict[str, torch.Tensor], item_emb: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """phi (B, k) from windows (B, L) and the cloud model's item table (1 or B, V, d)."""
    ids = windows.clamp(min=0)
    emb = item_emb[0][ids] if item_emb.shape[0] == 1 else item_emb[torch.arange(len(ids))[:, None], ids]
    mask = (windows >= 0).unsqueeze(-1).to(emb.dtype)
    mean = (emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.relu(mean @ aux["aux.w1"] + aux["aux.b1"]) @ aux["aux.w2"] + aux["aux.b2"]


def pretrain_aux(cloud, theta: dict[str, np.ndarray], aux: dict[str, np.ndarray], layer: str, history: int, *,
                 epochs: int, lr: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[float]]:
    """Theta and the auxiliary encoder <- Adam on BCE over the history data the cloud holds
    before round 1 (the data the cloud model was trained on), the cloud model frozen: each
    sample is scored by the cloud model + the patch the encoder predicts from the
    ``history`` items before it (the last L of which are the model's window).

    Why: the rounds give the cloud too few samples to train an encoder (about 0.3
    interactions per user and round); trained on the rounds' uploads alone it overfitted and
    *lowered* held-out users' AUC (see docs/dccl.md, "Cold start").
    """
    from strategies.cloud import fit, history_rows

    frozen = {k: torch.from_numpy(np.asarray(v, np.float32))[None] for k, v in cloud.initial.items()}
    th = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in theta.items()}
    ax = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in aux.items()}
    L, span = cloud.spec.window, max(history, cloud.spec.window)

    def logits(context: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = models.body_output(frozen, context[None, :, span - L:])
        phi = predict_phi(ax, frozen["item_emb"], context[:, span - history:])
        params = {**frozen, **patch_from_phi(th, phi, layer)}  # one patched model per sample
        if h is None:
            return models.forward(params, context[:, None, span - L:], cand[:, None])[:, 0]
        return models.forward_from_body(params, h[0][:, None], cand[:, None])[:, 0]

    losses = fit([*th.values(), *ax.values()], logits, SampleBuilder(cloud.interactions, span),
                 history_rows(cloud.interactions, cloud.history_end), epochs=epochs, lr=lr,
                 batch_size=cloud.batch_size, negatives=cloud.negatives, seed=cloud.seed, tag=MOMO_TAG,
                 stage="auxiliary encoder", setting="strategies.momodistill.aux_lr")
    return ({k: v.detach().numpy().copy() for k, v in th.items()},
            {k: v.detach().numpy().copy() for k, v in ax.items()}, losses)


def aux_flops(spec: models.ModelSpec, dim: int, history: int) -> float:
    """Multiply-adds x 2 of one ``predict_phi`` over ``history`` items (a cold device runs it once)."""
    d = spec.dim
    return 2.0 * (history * d + d * d + d * dim)


def last_windows(seqs: list[np.ndarray], window: int) -> np.ndarray:
    """The last ``window`` items of each sequence (B, L), PAD on the left; an empty
    upload (a device with no interactions yet) gives an all-PAD window."""
    out = np.full((len(seqs), window), PAD, np.int64)
    for j, s in enumerate(seqs):
        tail = np.asarray(s, np.int64)[-window:]
        if len(tail):
            out[j, window - len(tail):] = tail
    return out


def contexts(seqs: list[np.ndarray], targets: list[int], history: int) -> np.ndarray:
    """The encoder's input for each uploaded sequence: its last ``history`` items *before*
    the targets ``sequence_samples`` trains on (B, history), PAD on the left. Feeding it
    the targets themselves would teach the encoder from what it is meant to predict."""
    return last_windows([np.asarray(s)[: max(1, len(s) - int(k))] for s, k in zip(seqs, targets)], history)


def sequence_samples(seqs: list[np.ndarray], targets: list[int], window: int, n_items: int, negatives: int,
                     rng: np.random.Generator) -> Samples:
    """Samples from uploaded item sequences: the last ``targets[j]`` items of sequence j
    are positives (with the L items before each as the window) against ``negatives``
    uniform items absent from that sequence. Owners are sequence indices, ascending."""
    owner, wins, pos = [], [], []
    for j, (s, k) in enumerate(zip(seqs, targets)):
        s = np.asarray(s, dtype=np.int64)
        at = np.arange(max(1, len(s) - int(k)), len(s))
        if not len(at):
            continue
        idx = at[:, None] - window + np.arange(window)[None, :]
        wins.append(np.where(idx >= 0, s[np.clip(idx, 0, None)], PAD))
        pos.append(s[at])
        owner.append(np.full(len(at), j, dtype=np.int64))
    if not owner:
        return Samples(np.zeros(0, np.int64), np.zeros((0, window), np.int64), np.zeros((0, 1 + negatives), np.int64))
    owner_a = np.concatenate(owner)
    longest = max(len(s) for s in seqs)
    seen = np.full((len(seqs), longest), PAD, dtype=np.int64)
    for j, s in enumerate(seqs):
        seen[j, : len(s)] = s
    neg = rng.integers(0, n_items, (len(owner_a), negatives))
    for _ in range(100):  # resample items the device interacted with
        bad = (neg[:, :, None] == seen[owner_a][:, None, :]).any(-1)
        if not bad.any():
            break
        neg[bad] = rng.integers(0, n_items, int(bad.sum()))
    return Samples(owner_a, np.concatenate(wins), np.concatenate([np.concatenate(pos)[:, None], neg], axis=1))
