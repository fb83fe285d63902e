"""MoMoDistill (KDD 2021, cloud side of Device-Cloud Collaborative Learning) + MetaPatch.

The full loop of the paper (Yao et al., KDD'21): cloud model -> devices learn metapatches
-> the cloud distils the device models ("model over models") -> the new cloud model, the
refitted shared patch parameters Theta and an auxiliary encoder are pushed to devices -> ...

Paper -> code:

- **Devices** train their metapatch phi_u exactly as in ``strategies.metapatch`` (only
  phi_u changes; the cloud model and Theta are frozen on the device). With phi_u they
  upload their recent data: the last ``recent + max(L, aux_history)`` item ids (``device.recent`` targets
  and the window before the first one; int32, bytes counted) **(our choice: the paper's
  cloud owns the interaction logs; here the cloud sees only what devices upload)**.
- **Distillation** every ``distill_every`` rounds on the data uploaded since the last one,
  then the **refit** of Theta and the auxiliary encoder: ``strategies.momodistill_cloud``.
  The encoder (phi from the user's last ``aux_history`` items, pretrained with Theta on the
  cloud's history before round 1): ``strategies.momodistill_aux``.
- **Push**: the new cloud model, Theta and the encoder go to every selected device and,
  with ``push = "online"``, to every online device still holding an older version (a
  deployed app update; bytes counted). The encoder ships with Theta from the first
  contact. A device with no metapatch yet (new or cold) starts from the phi the
  auxiliary encoder predicts from its last ``aux_history`` items.
- **Measurement** (``fraction_evaluate`` > 0, Flower's federated evaluation): after each
  distillation, online devices that never reported score this round's interactions with
  the initial cloud model, the distilled one, and the distilled one + their predicted
  patch. Their data never reached the cloud, so this answers "does distillation improve
  the cloud model itself" and "does the cold-start patch help" on held-out users.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from devices import models
from devices.runtime import DeviceApp, DeviceContext, Payload
from devices.scoring import device_metrics
from strategies.common import (check_choice, check_fraction, check_non_negative, check_positive, mean_metrics,
                               sample_fraction)
from strategies.metapatch import MetaPatch, patch_from_phi, tensors, train_local_phi
from strategies.momodistill_aux import (  # noqa: F401 (the encoder and the uploads' samples; names re-exported)
    MOMO_TAG, aux_flops, contexts, init_aux, last_windows, predict_phi, pretrain_aux, sequence_samples)
from strategies.momodistill_cloud import (  # noqa: F401 (the cloud half; names re-exported)
    MoMoDistillCloud, distill_cloud, kd_loss, patched_logits, refit_patch)

PUSH_MODES = ("selected", "online")


def train(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Device: adopt a pushed bundle (cloud model, Theta, encoder), start phi from the
    stored one or the encoder's prediction, train it if asked, upload phi + recent data."""
    cfg = payload.config()
    layer, dim, history = str(cfg["patch-layer"]), int(cfg["patch-dim"]), int(cfg["aux-history"])
    shared = ctx.shared("momodistill")
    if "model" in payload.arrays:
        ctx.hold(payload.arrays["model"])  # the new cloud model (drops the old patch override)
    shared.update({k: tensors(payload.arrays[k]) for k in ("theta", "aux") if k in payload.arrays})
    theta, aux = shared["theta"], shared.get("aux")
    store = ctx.state("momodistill.phi")
    phi0 = torch.from_numpy(np.stack([store.get(int(i), np.zeros(dim, np.float32)) for i in ctx.local]))
    cold = np.array([int(i) not in store for i in ctx.local], dtype=bool) & (aux is not None)
    if cold.any():  # new or cold device: a metapatch from its last ``aux-history`` items
        context = last_windows(ctx.recent_items(history), history)[cold]
        with torch.no_grad():
            phi0[torch.from_numpy(cold)] = predict_phi(aux, ctx.held_params()["item_emb"], torch.from_numpy(context))
        ctx.flops[cold] += aux_flops(ctx.spec, dim, history)
    if cfg.get("train", True):
        phi, losses, counts = train_local_phi(ctx, theta, phi0, cfg)
        recent = ctx.recent_items(ctx.settings.recent + max(ctx.spec.window, history))
    else:
        phi = phi0
    for j, i in enumerate(ctx.local):
        store[int(i)] = phi[j].numpy().copy()
    ctx.set_personal(patch_from_phi(theta, phi, layer))
    if not cfg.get("train", True):
        return [Payload(metrics={"metrics": {"num-examples": 0, "cold-start": int(cold[j])}}) for j in range(len(ctx))]
    return [Payload(arrays={"phi": {"phi": phi[j].numpy()}, "data": {"items": recent[j]}},
                    metrics={"metrics": {"num-examples": int(counts[j]), "train_loss": float(losses[j]),
                                         "targets": int(min(ctx.settings.recent, max(len(recent[j]) - 1, 0))),
                                         "cold-start": int(cold[j])}})
            for j in range(len(ctx))]


@torch.no_grad()
def evaluate(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Federated evaluation on this round's interactions (the prequential samples):
    the initial cloud model, the distilled one, and the distilled one + the patch the
    auxiliary encoder predicts from the last ``aux-history`` items before the round. Nothing is adopted."""
    cfg = payload.config()
    layer, history = str(cfg["patch-layer"]), int(cfg["aux-history"])
    win, cand, weight, counts = ctx.window_samples()
    b, n = weight.shape
    initial = {k: v[None] for k, v in tensors(payload.arrays["initial"]).items()}
    distilled = {k: v[None] for k, v in tensors(payload.arrays["model"]).items()}
    context = last_windows(ctx.items_before_round(history), history)
    phi = predict_phi(tensors(payload.arrays["aux"]), distilled["item_emb"], torch.from_numpy(context))
    patched = {**distilled, **patch_from_phi(tensors(payload.arrays["theta"]), phi, layer)}
    mask = weight.numpy() > 0
    owner = np.broadcast_to(np.arange(b)[:, None], (b, n))[mask]
    out = {}
    for name, params in (("initial", initial), ("distilled", distilled), ("aux", patched)):
        if all(v.shape[0] == 1 for v in params.values()):  # one shared model: score all rows in one pass
            logits = models.forward(params, win.reshape(1, b * n, -1), cand.reshape(1, b * n, -1))[0]
            logits = logits.reshape(b, n, -1)
        else:
            logits = models.forward(params, win, cand)
        out[name] = device_metrics(logits.numpy()[mask], owner, b)["auc"]
    ctx.flops += 3 * counts * models.flops_per_sample(ctx.spec, cand.shape[-1], backward=False)
    ok = [all(np.isfinite(out[k][j]) for k in out) for j in range(b)]  # the device has both labels
    return [Payload(metrics={"metrics": {"num-examples": int(ok[j]), "phi-norm": float(phi[j].norm()),
                                         **{f"auc_{k}": float(out[k][j]) if ok[j] else 0.0 for k in out}}})
            for j in range(b)]


class MoMoDistill(MoMoDistillCloud, MetaPatch, short_name="momodistill", colour="#9467bd"):
    """Server half of the full loop: MetaPatch rounds, distillation every K rounds, pushes."""

    device_app = DeviceApp({MessageType.TRAIN: train, MessageType.EVALUATE: evaluate})

    def __init__(self, fraction_train: float = 1.0, patch_dim: int = 8, patch_layer: str = "encoder",
                 local_steps: int | None = None, lr: float | None = None, distill_every: int = 2,
                 kd_weight: float = 1.0, distill_epochs: int = 1, distill_lr: float = 0.001,
                 refit_epochs: int = 5, refit_lr: float = 0.01, push: str = "online",
                 fraction_evaluate: float = 0.0, theta_epochs: int = 3, aux_history: int = 50,
                 aux_epochs: int = 3, aux_lr: float = 0.003) -> None:
        super().__init__(fraction_train, patch_dim, patch_layer, local_steps, lr, theta_epochs)
        self.distill_every = int(check_positive("distill_every", distill_every, integer=True))
        self.kd_weight = float(check_non_negative("kd_weight", kd_weight))
        self.distill_epochs = int(check_positive("distill_epochs", distill_epochs, integer=True))
        self.distill_lr = float(check_positive("distill_lr", distill_lr))
        self.refit_epochs = int(check_positive("refit_epochs", refit_epochs, integer=True))
        self.refit_lr = float(check_positive("refit_lr", refit_lr))
        self.aux_history = int(check_positive("aux_history", aux_history, integer=True))
        self.aux_epochs = int(check_non_negative("aux_epochs", aux_epochs, integer=True))
        self.aux_lr = float(check_positive("aux_lr", aux_lr))
        self.push = check_choice("push", push, PUSH_MODES)
        self.fraction_evaluate = check_fraction("fraction_evaluate", fraction_evaluate, allow_zero=True)

    def _config(self, server_round: int, train: bool) -> ConfigRecord:
        return self.device_config(server_round, **{"patch-layer": self.patch_layer, "patch-dim": self.patch_dim,
                                                   "aux-history": self.aux_history, "train": train})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = sample_fraction(grid, self.fraction_train, 1)
        stale = lambda n: self.device_version.get(n, -1) < self.version
        plain = RecordDict({"config": self._config(server_round, True)})
        bundled = RecordDict({"config": self._config(server_round, True), **self._bundle})
        msgs = [Message(bundled if stale(n) else plain, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        if self.push == "online" and self.version > 0:
            push = RecordDict({"config": self._config(server_round, False), **self._bundle})
            chosen = set(nodes)
            msgs += [Message(push, dst_node_id=n, message_type=MessageType.TRAIN)
                     for n in grid.get_node_ids() if n not in chosen and stale(n)]
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        cold = 0
        for r in replies:
            if r.has_error():
                continue
            dev = r.metadata.src_node_id
            self.device_version[dev] = self.version
            cold += int(r.content["metrics"].get("cold-start", 0))
            if "phi" in r.content:
                phi = r.content["phi"]["phi"].numpy()
                self.phis[dev] = phi
                self.reported.add(dev)
                self.pending[dev] = (phi, r.content["data"]["items"].numpy(), int(r.content["metrics"]["targets"]))
        metrics = dict(mean_metrics(replies) or {})
        metrics.update(version=self.version, cold_starts=cold, reported_total=len(self.reported))
        if server_round % self.distill_every == 0 and self.pending:
            metrics.update(self.distill(server_round))
            return ArrayRecord({k: Array(v) for k, v in self.model.items()}), MetricRecord(metrics)
        return None, MetricRecord(metrics)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        if not self.fraction_evaluate or self.version == 0 or server_round % self.distill_every:
            return []
        never = sorted(set(grid.get_node_ids()) - self.reported)
        if not never:
            return []
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, MOMO_TAG, 4, server_round]))
        k = max(1, int(len(never) * self.fraction_evaluate))
        chosen = np.sort(rng.choice(never, size=k, replace=False))
        content = RecordDict({"config": self._config(server_round, False), "initial": self._initial_record,
                              **self._bundle})
        return [Message(content, dst_node_id=int(n), message_type=MessageType.EVALUATE) for n in chosen]

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        out = dict(mean_metrics(replies) or {})
        if not out:
            return None
        out["users"] = out.pop("num-examples")
        return MetricRecord({**out, "gain_distilled": out["auc_distilled"] - out["auc_initial"],
                             "gain_aux": out["auc_aux"] - out["auc_distilled"]})
