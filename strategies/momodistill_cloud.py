"""MoMoDistill's cloud half: the auxiliary encoder, the upload's training samples, and
the distillation of the device models into the cloud model and into Theta + encoder.

Pure functions of arrays and tensors (no Flower, no Ray); ``strategies.momodistill`` is
the strategy and its device functions. See that module's docstring for the method.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from devices import models
from devices.models import PAD
from devices.samples import SampleBuilder, Samples, pad_by_owner
from strategies.metapatch_theta import patch_from_phi

MOMO_TAG = 13


# Auxiliary encoder (cloud-trained, runs on the device for cold starts) ---------------

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
    from simulator.cloud import fit, history_rows

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


# Device side ---------------------------------------------------------------------------


# Cloud side ----------------------------------------------------------------------------

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


def contexts(seqs: list[np.ndarray], targets: list[int], history: int) -> np.ndarray:
    """The encoder's input for each uploaded sequence: its last ``history`` items *before*
    the targets ``sequence_samples`` trains on (B, history), PAD on the left. Feeding it
    the targets themselves would teach the encoder from what it is meant to predict."""
    return last_windows([np.asarray(s)[: max(1, len(s) - int(k))] for s, k in zip(seqs, targets)], history)


def last_windows(seqs: list[np.ndarray], window: int) -> np.ndarray:
    """The last ``window`` items of each sequence (B, L), PAD on the left; an empty
    upload (a device with no interactions yet) gives an all-PAD window."""
    out = np.full((len(seqs), window), PAD, np.int64)
    for j, s in enumerate(seqs):
        tail = np.asarray(s, np.int64)[-window:]
        if len(tail):
            out[j, window - len(tail):] = tail
    return out


def kd_loss(student_logits: torch.Tensor, teacher_prob: torch.Tensor) -> torch.Tensor:
    """Elementwise binary KL(teacher || student) of click probabilities: zero when equal."""
    t = teacher_prob.clamp(1e-7, 1 - 1e-7)
    entropy = -(t * t.log() + (1 - t) * (1 - t).log())
    return F.binary_cross_entropy_with_logits(student_logits, t, reduction="none") - entropy


def _labels(logits: torch.Tensor) -> torch.Tensor:
    y = torch.zeros_like(logits)
    y[..., 0] = 1.0
    return y


@torch.no_grad()
def patched_logits(cloud: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], phis: torch.Tensor,
                   samples: Samples, layer: str, chunk: int = 256) -> torch.Tensor:
    """Logits (n, C) of each sample under its owner's patched model (cloud + patch(phi))."""
    out = []
    for c in range(0, len(phis), chunk):
        group = np.arange(c, min(c + chunk, len(phis)))
        sub = samples.take(np.flatnonzero((samples.owner >= group[0]) & (samples.owner <= group[-1])))
        if not len(sub):
            continue
        win, cand, weight, _ = pad_by_owner(sub, group)
        params = {**cloud, **patch_from_phi(theta, phis[group], layer)}
        out.append(models.forward(params, torch.from_numpy(win), torch.from_numpy(cand))[torch.from_numpy(weight > 0)])
    return torch.cat(out) if out else torch.zeros(0, samples.candidates.shape[1])


def distill_cloud(cloud: dict[str, np.ndarray], teacher_prob: torch.Tensor, samples: Samples, *, epochs: int,
                  lr: float, batch_size: int, kd_weight: float, seed: int) -> tuple[dict[str, np.ndarray], list[float]]:
    """Cloud model <- Adam on sum BCE(y, f(x)) + kd_weight * KD(f_u(x) || f(x))."""
    p = {k: torch.from_numpy(np.array(v))[None].requires_grad_(True) for k, v in cloud.items()}
    opt = torch.optim.Adam(list(p.values()), lr=lr)
    rng = np.random.default_rng(np.random.SeedSequence([seed, MOMO_TAG, 2]))
    win, cand = torch.from_numpy(samples.windows), torch.from_numpy(samples.candidates)
    losses = []
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(samples)))
        total = 0.0
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            logits = models.forward(p, win[idx][None], cand[idx][None])[0]
            loss = (F.binary_cross_entropy_with_logits(logits, _labels(logits), reduction="none")
                    + kd_weight * kd_loss(logits, teacher_prob[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / max(len(samples), 1))
    return {k: v.detach()[0].numpy().copy() for k, v in p.items()}, losses


def refit_patch(cloud: dict[str, np.ndarray], theta: dict[str, np.ndarray], aux: dict[str, np.ndarray],
                phis: torch.Tensor, windows: np.ndarray, teacher_prob: torch.Tensor, samples: Samples, layer: str, *,
                epochs: int, lr: float, kd_weight: float, seed: int, batch_devices: int = 256,
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[float], float | None]:
    """Theta and the auxiliary encoder <- distil the device models into the proxy (frozen
    new cloud model + patch from the reported phi, and from the predicted phi). Returns
    Theta, the encoder, the per-epoch mean loss and the loss before the first step."""
    frozen = {k: torch.from_numpy(np.array(v))[None] for k, v in cloud.items()}
    th = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in theta.items()}
    ax = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in aux.items()}
    opt = torch.optim.Adam([*th.values(), *ax.values()], lr=lr)
    d = len(phis)
    win, cand, weight, _ = (torch.from_numpy(a) for a in pad_by_owner(samples, np.arange(d)))
    teacher = torch.zeros(cand.shape)
    teacher[weight > 0] = teacher_prob
    with torch.no_grad():
        h = models.body_output(frozen, win)
    last = torch.from_numpy(windows)
    rng = np.random.default_rng(np.random.SeedSequence([seed, MOMO_TAG, 3]))
    losses = []
    first = None  # the proxy's loss before any step: what the inputs (device models) give
    for _ in range(epochs):
        total = 0.0
        for b in np.array_split(rng.permutation(d), max(1, -(-d // batch_devices))):
            b = torch.from_numpy(np.sort(b))
            loss = torch.zeros(())
            for phi in (phis[b], predict_phi(ax, frozen["item_emb"], last[b])):
                params = {**frozen, **patch_from_phi(th, phi, layer)}
                logits = (models.forward(params, win[b], cand[b]) if h is None
                          else models.forward_from_body(params, h[b], cand[b]))
                per = (F.binary_cross_entropy_with_logits(logits, _labels(logits), reduction="none")
                       + kd_weight * kd_loss(logits, teacher[b])).mean(-1)
                loss = loss + (per * weight[b]).sum() / weight[b].sum().clamp(min=1.0)
            if first is None:
                first = float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        losses.append(total / max(d, 1))
    return ({k: v.detach().numpy().copy() for k, v in th.items()},
            {k: v.detach().numpy().copy() for k, v in ax.items()}, losses, first)
