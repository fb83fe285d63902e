"""MoMoDistill (KDD 2021, cloud side of Device-Cloud Collaborative Learning) + MetaPatch.

The full loop of METHODS.md: cloud model -> devices learn metapatches -> the cloud distils
the device models ("model over models") -> the new cloud model, the refitted shared patch
parameters Theta and an auxiliary encoder are pushed to devices -> ...

Paper -> code:

- **Devices** train their metapatch phi_u exactly as in ``strategies.metapatch`` (only
  phi_u changes; the cloud model and Theta are frozen on the device). With phi_u they
  upload their recent data: the last ``recent + max(L, aux_history)`` item ids (``device.recent`` targets
  and the window before the first one; int32, bytes counted) **(our choice: the paper's
  cloud owns the interaction logs; here the cloud sees only what devices upload)**.
- **Distillation** (every ``distill_every`` rounds, on the data uploaded since the last
  one): the cloud model f minimises, over each reporting device u's samples,
  BCE(y, f(x)) + lambda * KD(f_u(x) || f(x)), where f_u = the cloud model the device held
  + the patch generated from its phi_u and Theta, and KD is the binary KL divergence of
  the two click probabilities (``kd_weight`` = lambda = 1). Adam, ``distill_epochs``.
- **Refit** of Theta and the auxiliary encoder, distilling the device models into the
  proxy (new cloud model + patch): the proxy is trained with the same BCE + lambda*KD
  twice per device, once with its reported phi_u (so the metapatches devices keep stay
  meaningful under the new Theta) and once with the phi predicted by the auxiliary
  encoder from the items the device had *before* those samples' targets **(our choice)**.
  The auxiliary encoder is phi = ReLU(mean item embedding of the user's last
  ``aux_history`` items . W1 + b1) . W2 + b2 on the cloud model's embeddings **(our
  choice; 50 items, longer than the model's window L, so the patch can add what the
  window does not show)**. Before round 1 the encoder and Theta are pretrained on the
  history the cloud holds (``pretrain_aux``, ``aux_epochs``; 0 = W2 starts at 0, phi = 0,
  the plain cloud model): the rounds alone are far too little data to train it.
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

import time
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from devices import models
from devices.runtime import DeviceApp, DeviceContext, Payload
from simulator.cloud import DIVERGED_LOSS, check_losses, check_params
from simulator.errors import NonFiniteError
from strategies.common import check_fraction, check_non_negative, check_positive, mean_metrics, sample_fraction
from strategies.metapatch import MetaPatch, patch_from_phi, train_local_phi
from strategies.momodistill_cloud import (  # noqa: F401 (the cloud half; names re-exported)
    MOMO_TAG, aux_flops, contexts, distill_cloud, init_aux, kd_loss, last_windows, patched_logits, predict_phi,
    pretrain_aux, refit_patch, sequence_samples)

PUSH_MODES = ("selected", "online")


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def train(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Device: adopt a pushed bundle (cloud model, Theta, encoder), start phi from the
    stored one or the encoder's prediction, train it if asked, upload phi + recent data."""
    cfg = payload.config()
    layer, dim, history = str(cfg["patch-layer"]), int(cfg["patch-dim"]), int(cfg["aux-history"])
    shared = ctx.shared("momodistill")
    if "model" in payload.arrays:
        ctx.hold(payload.arrays["model"])  # the new cloud model (drops the old patch override)
    if "theta" in payload.arrays:
        shared["theta"] = _tensors(payload.arrays["theta"])
    if "aux" in payload.arrays:
        shared["aux"] = _tensors(payload.arrays["aux"])
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
    from simulator.metrics import device_metrics

    cfg = payload.config()
    layer, history = str(cfg["patch-layer"]), int(cfg["aux-history"])
    win, cand, weight, counts = ctx.window_samples()
    b, n = weight.shape
    initial, distilled = _tensors(payload.arrays["initial"]), _tensors(payload.arrays["model"])
    context = last_windows(ctx.items_before_round(history), history)
    phi = predict_phi(_tensors(payload.arrays["aux"]), distilled["item_emb"][None], torch.from_numpy(context))
    patched = {**{k: v[None] for k, v in distilled.items()},
               **patch_from_phi(_tensors(payload.arrays["theta"]), phi, layer)}
    mask = weight.numpy() > 0
    owner = np.broadcast_to(np.arange(b)[:, None], (b, n))[mask]
    out = {}
    for name, params in (("initial", {k: v[None] for k, v in initial.items()}),
                         ("distilled", {k: v[None] for k, v in distilled.items()}), ("aux", patched)):
        if all(v.shape[0] == 1 for v in params.values()):  # one shared model: score all rows in one pass
            logits = models.forward(params, win.reshape(1, b * n, -1), cand.reshape(1, b * n, -1))[0]
            logits = logits.reshape(b, n, -1)
        else:
            logits = models.forward(params, win, cand)
        out[name] = device_metrics(logits.numpy()[mask], owner, b)["auc"]
    ctx.flops += 3 * counts * models.flops_per_sample(ctx.spec, cand.shape[-1], backward=False)
    replies = []
    for j in range(b):
        ok = all(np.isfinite(out[k][j]) for k in out)  # the device has both labels
        replies.append(Payload(metrics={"metrics": {"num-examples": int(ok), "phi-norm": float(phi[j].norm()),
                                                    **{f"auc_{k}": float(out[k][j]) if ok else 0.0 for k in out}}}))
    return replies


class MoMoDistill(MetaPatch, short_name="momodistill", colour="#9467bd"):
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
        if push not in PUSH_MODES:
            raise ValueError(f"push = {push!r}: one of {', '.join(PUSH_MODES)}")
        self.push = push
        self.fraction_evaluate = check_fraction("fraction_evaluate", fraction_evaluate, allow_zero=True)

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
        out = mean_metrics(replies)
        if out is None:
            return None
        out = dict(out)
        out["users"] = out.pop("num-examples")
        out["gain_distilled"] = out["auc_distilled"] - out["auc_initial"]
        out["gain_aux"] = out["auc_aux"] - out["auc_distilled"]
        return MetricRecord(out)
