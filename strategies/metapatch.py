"""MetaPatch (KDD 2021, device side of Device-Cloud Collaborative Learning).

Paper -> code (MetaPatch, Yao et al., KDD'21): the frozen cloud model gets a residual
*patch* after layer ``patch_layer`` (``devices.models.apply_patch``: h <- h + h W + b). Its
weights are not stored per device: they are generated from the shared parameters
Theta = (Theta_W, Theta_b), learned on the cloud and frozen on the device, and the tiny
per-device metapatch phi_u (``patch_dim`` floats): W = reshape(phi_u Theta_W),
b = phi_u Theta_b **(our choice: a linear map, no offset, so phi_u = 0 is the unpatched
cloud model)**. Theta is learned on the cloud before round 1 (``learn_theta``, in
``strategies.metapatch_theta``): jointly with one phi per user on the history data every
device uploaded in the past, the cloud model frozen **(our choice of how; the paper only
has Theta "learned on the cloud")**; ``theta_epochs = 0`` keeps the random init.

On the device only phi_u is trained (BCE, ``local_steps`` full-batch SGD steps), starting
from its previous value or zeros; it persists between rounds and is uploaded (a few floats).
Device training is vectorised: the phi of every device a host serves in a round form one
(B, k) tensor trained at once on the shared, frozen model (no loop over devices).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from devices import models
from devices.runtime import DeviceApp, DeviceContext, Payload, diverged_losses
from strategies.base import FleetStrategy
from strategies.common import (check_choice, check_fraction, check_non_negative, check_positive, mean_metrics,
                               sample_fraction)
from strategies.metapatch_theta import init_theta, learn_theta, patch_from_phi, tensors

PHI_CHUNK = 1024  # devices whose phi train in one batched pass


def train_phi(held: dict[str, torch.Tensor], theta: dict[str, torch.Tensor], phi: torch.Tensor, win, cand, weight,
              layer: str, steps: int, lr: float, final: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` SGD steps on phi (B, k) only; the model and Theta are constants. With
    ``final`` (a list), the loss after the last step is appended to it."""
    phi = phi.detach().clone().requires_grad_(True)
    frozen = {k: v.detach() for k, v in held.items()}
    theta = {k: v.detach() for k, v in theta.items()}
    with torch.no_grad():  # the patch sits after the body: its output is the same every step
        h = models.body_output(frozen, win)
    losses = torch.zeros(len(phi))
    for _ in range(steps):
        p = {**frozen, **patch_from_phi(theta, phi, layer)}
        out = models.forward(p, win, cand) if h is None else models.forward_from_body(p, h, cand)
        losses = models.bce_loss(out, weight)
        (grad,) = torch.autograd.grad(losses.sum(), [phi])
        with torch.no_grad():
            phi -= lr * grad
    if final is not None:
        with torch.no_grad():
            p = {**frozen, **patch_from_phi(theta, phi, layer)}
            out = (models.forward(p, win[:, :1], cand[:, :1]) if h is None  # first sample: see train_held_models
                   else models.forward_from_body(p, h[:, :1], cand[:, :1]))
            final.append(models.bce_loss(out, weight[:, :1]))
    return phi.detach(), losses.detach()


def train_local_phi(ctx: DeviceContext, theta: dict[str, torch.Tensor], phi0: torch.Tensor,
                    cfg: dict) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The devices of ``ctx`` train their phi (B, k) from ``phi0`` on their recent data
    with the model they hold frozen; returns phi, last losses, sample counts (FLOPs counted)."""
    win, cand, weight, counts = ctx.train_samples()
    held = {k: v for k, v in ctx.held_params().items() if not k.startswith("patch.")}
    steps = int(cfg.get("local-steps", ctx.settings.local_steps))
    layer, lr, b = str(cfg["patch-layer"]), float(cfg.get("lr", ctx.settings.lr)), len(phi0)
    # Devices sorted by sample count and trained in chunks, each padded only to its own
    # longest device: padding rows cost as much as real ones (10k devices x 5 steps: 13.5 s -> 4.2 s).
    order = np.argsort(counts, kind="stable")
    phi, losses, final = torch.empty_like(phi0), torch.empty(b), torch.empty(b)
    for c in range(0, b, PHI_CHUNK):
        sel = order[c : c + PHI_CHUNK]
        idx, n = torch.from_numpy(sel), max(int(counts[sel].max()), 1)
        part = {k: v[idx] if v.shape[0] == b and b > 1 else v for k, v in held.items()}
        last: list = []
        phi[idx], losses[idx] = train_phi(part, theta, phi0[idx], win[idx, :n], cand[idx, :n], weight[idx, :n],
                                          layer, steps, lr, final=last)
        final[idx] = last[0]
    ctx.count_train(counts, steps, cand.shape[-1])
    ctx.mark_diverged(diverged_losses(final.numpy()))
    return phi, losses, counts


def train(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Device: train phi_u on recent data (from its previous value), keep and upload it."""
    cfg = payload.config()
    layer, dim = str(cfg["patch-layer"]), int(cfg["patch-dim"])
    shared = ctx.shared("metapatch")
    if "theta" in payload.arrays:  # first contact, or Theta was refitted
        shared["current"] = tensors(payload.arrays["theta"])
    theta = shared["current"]
    store = ctx.state("metapatch.phi")
    phi0 = torch.from_numpy(np.stack([store.get(int(i), np.zeros(dim, np.float32)) for i in ctx.local]))
    phi, losses, counts = train_local_phi(ctx, theta, phi0, cfg)
    for j, i in enumerate(ctx.local):
        store[int(i)] = phi[j].numpy().copy()
    ctx.set_personal(patch_from_phi(theta, phi, layer))
    return [Payload(arrays={"phi": {"phi": phi[j].numpy()}},
                    metrics={"metrics": {"num-examples": int(counts[j]), "train_loss": float(losses[j])}})
            for j in range(len(ctx))]


class MetaPatch(FleetStrategy, short_name="metapatch", colour="#d62728"):
    """Server half: ship Theta once, ask a fraction of online devices to train phi_u."""

    device_app = DeviceApp({MessageType.TRAIN: train})

    def __init__(self, fraction_train: float = 1.0, patch_dim: int = 8, patch_layer: str = "encoder",
                 local_steps: int | None = None, lr: float | None = None, theta_epochs: int = 3) -> None:
        self.fraction_train = check_fraction("fraction_train", fraction_train)
        self.patch_dim = int(check_positive("patch_dim", patch_dim, integer=True))
        self.patch_layer = check_choice("patch_layer", patch_layer, models.PATCH_LAYERS)
        self.local_steps = None if local_steps is None else check_positive("local_steps", local_steps, integer=True)
        self.lr = None if lr is None else check_positive("lr", lr)
        self.theta_epochs = int(check_non_negative("theta_epochs", theta_epochs, integer=True))
        self.theta: dict[str, np.ndarray] | None = None
        self.phis: dict[int, np.ndarray] = {}  # uploaded metapatches, by device (MoMoDistill reads them)

    def prepare(self, cloud) -> None:
        self.theta = (learn_theta(cloud, self.patch_layer, self.patch_dim, epochs=self.theta_epochs)
                      if self.theta_epochs else init_theta(cloud.spec, self.patch_layer, self.patch_dim, cloud.seed))
        self._theta_record = ArrayRecord({k: Array(v) for k, v in self.theta.items()})
        self._has_theta: set[int] = set()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = sample_fraction(grid, self.fraction_train, 1)
        cfg = lambda: self.device_config(server_round, **{"patch-layer": self.patch_layer, "patch-dim": self.patch_dim})
        plain = RecordDict({"config": cfg()})
        with_theta = RecordDict({"config": cfg(), "theta": self._theta_record})
        return [Message(plain if n in self._has_theta else with_theta, dst_node_id=n, message_type=MessageType.TRAIN)
                for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for r in replies:
            if not r.has_error():
                self._has_theta.add(r.metadata.src_node_id)
                self.phis[r.metadata.src_node_id] = r.content["phi"]["phi"].numpy()
        return None, mean_metrics(replies)
