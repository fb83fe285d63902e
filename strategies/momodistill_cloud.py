"""MoMoDistill's cloud half: the distillation of the device models into the cloud model
and into Theta + the auxiliary encoder (MoMoDistill, Yao et al., KDD'21: "model over
models").

- **Distillation** (every ``distill_every`` rounds, on the data uploaded since the last
  one): the cloud model f minimises, over each reporting device u's samples,
  BCE(y, f(x)) + lambda * KD(f_u(x) || f(x)), where f_u = the cloud model the device held
  + the patch generated from its phi_u and Theta, and KD is the binary KL divergence of
  the two click probabilities (``kd_weight`` = lambda = 1). Adam, ``distill_epochs``.
- **Refit** of Theta and the auxiliary encoder (``strategies.momodistill_aux``),
  distilling the device models into the proxy (new cloud model + patch): the proxy is
  trained with the same BCE + lambda*KD twice per device, once with its reported phi_u (so
  the metapatches devices keep stay meaningful under the new Theta) and once with the phi
  predicted by the auxiliary encoder from the items the device had *before* those
  samples' targets **(our choice)**.

``MoMoDistillCloud`` is the strategy's cloud half (its preparation, versions and
distillation); ``strategies.momodistill`` is the strategy and its device functions.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord

from devices import models
from devices.samples import Samples, pad_by_owner
from strategies.cloud import DIVERGED_LOSS, check_losses, check_params
from devices.errors import NonFiniteError
from strategies.metapatch_theta import patch_from_phi
from strategies.momodistill_aux import MOMO_TAG, contexts, init_aux, predict_phi, pretrain_aux, sequence_samples


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


class MoMoDistillCloud:
    """MoMoDistill's cloud half (a mixin before ``MetaPatch``): the cloud model, Theta and
    encoder, their version and the bundle pushed to devices, and the distillation."""

    def prepare(self, cloud) -> None:
        super().prepare(cloud)
        self.spec, self.seed, self.batch_size, self.negatives = cloud.spec, cloud.seed, cloud.batch_size, cloud.negatives
        self.initial = {k: np.asarray(v, np.float32) for k, v in cloud.initial.items()}
        self.model = dict(self.initial)
        self.aux = init_aux(cloud.spec, self.patch_dim, cloud.seed)
        self.aux_losses: list[float] = []
        if self.aux_epochs:
            self.theta, self.aux, self.aux_losses = pretrain_aux(cloud, self.theta, self.aux, self.patch_layer,
                                                                 self.aux_history, epochs=self.aux_epochs, lr=self.aux_lr)
        self.version = 0  # 0: the installed cloud model with the (pretrained) Theta and encoder
        self.device_version: dict[int, int] = {}
        self.pending: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # since the last distillation
        self.reported: set[int] = set()
        self.distillations: list[dict[str, float]] = []
        self._make_bundle()

    def _make_bundle(self) -> None:
        rec = lambda arrays: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        self._theta_record = rec(self.theta)
        self._bundle = {"theta": self._theta_record}
        if self.version > 0 or self.aux_epochs:
            self._bundle["aux"] = rec(self.aux)
        if self.version > 0:
            self._bundle["model"] = rec(self.model)
        self._initial_record = rec(self.initial)

    def distill(self, server_round: int) -> dict[str, float]:
        """Distil the reported device models into the cloud model, refit Theta and the
        encoder, start a new version (pushed from the next round)."""
        t0 = time.perf_counter()
        devs = sorted(self.pending)
        phis = torch.from_numpy(np.stack([self.pending[d][0] for d in devs]))
        seqs = [self.pending[d][1] for d in devs]
        targets = [self.pending[d][2] for d in devs]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, MOMO_TAG, server_round]))
        samples = sequence_samples(seqs, targets, self.spec.window, self.spec.n_items,
                                   self.negatives, rng)
        cloud_t = {k: torch.from_numpy(v)[None] for k, v in self.model.items()}
        theta_t = {k: torch.from_numpy(v) for k, v in self.theta.items()}
        teacher = torch.sigmoid(patched_logits(cloud_t, theta_t, phis, samples, self.patch_layer))
        self.model, d_losses = distill_cloud(self.model, teacher, samples, epochs=self.distill_epochs, lr=self.distill_lr,
                                             batch_size=self.batch_size, kd_weight=self.kd_weight, seed=self.seed + server_round)
        limit = DIVERGED_LOSS * (1 + self.kd_weight)  # BCE + kd_weight * KD
        check_losses(d_losses, "distillation", "strategies.momodistill.distill_lr", limit=limit, round=server_round)
        check_params(self.model, "distillation", "strategies.momodistill.distill_lr", round=server_round)
        windows = contexts(seqs, targets, self.aux_history)
        self.theta, self.aux, r_losses, r_first = refit_patch(self.model, self.theta, self.aux, phis, windows, teacher, samples,
                                                     self.patch_layer, epochs=self.refit_epochs, lr=self.refit_lr,
                                                     kd_weight=self.kd_weight, seed=self.seed + server_round)
        if r_first is not None and not r_first <= 2 * limit:  # diverged before the refit moved: the devices' phis
            raise NonFiniteError("distillation", "device.lr (or strategies.momodistill.lr)",
                                 f"round {server_round}: the uploaded metapatches give a diverged loss ({r_first:.3g} > "
                                 f"{2 * limit:.3g}) before the Θ refit's first step", round=server_round)
        check_losses(r_losses, "Θ refit", "strategies.momodistill.refit_lr", limit=2 * limit, round=server_round)
        self.version += 1
        self._make_bundle()
        self.pending = {}
        info = {"distilled_devices": len(devs), "distill_samples": len(samples), "distill_loss": d_losses[-1],
                "refit_loss": r_losses[-1], "distill_seconds": time.perf_counter() - t0}
        self.distillations.append({"round": server_round, **info})
        return info
