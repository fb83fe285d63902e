"""What a device function sees: payloads, the device-batch context, and the device app.

Device functions are plain functions ``fn(ctx: DeviceContext, payload: Payload) ->
list[Payload]`` that do the work of *many* devices at once (``ctx.device_ids``), one
reply per device in that order. They never see Ray or Flower: the host runs them, and the
grid converts payloads to and from Flower records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from devices import models



@dataclass
class Payload:
    """Plain-data mirror of a Flower ``RecordDict``: named array, metric and config records."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes on the wire: raw tensor bytes plus 8 bytes per scalar (a close lower bound)."""
        n = sum(models.num_bytes(a) for a in self.arrays.values())
        for rec in (*self.metrics.values(), *self.configs.values()):
            for v in rec.values():
                n += len(v.encode()) if isinstance(v, str) else 8 * (len(v) if isinstance(v, (list, tuple)) else 1)
        return int(n)

    def config(self) -> dict[str, Any]:
        """All config records merged (most payloads carry one)."""
        out: dict[str, Any] = {}
        for rec in self.configs.values():
            out.update(rec)
        return out


DeviceFn = Callable[["DeviceContext", Payload], list[Payload]]


@dataclass(frozen=True)
class DeviceApp:
    """A strategy's device half: one batch function per message type, plus ``predict``.

    ``predict`` is optional: by default a device scores with the model it holds (the
    shared parameters it last received, overridden by its personal ones).
    """

    functions: dict[str, DeviceFn]

    def function_for(self, message_type: str) -> DeviceFn:
        # "train.phase2" falls back to "train", as Flower's ClientApp routes by prefix.
        if message_type in self.functions:
            return self.functions[message_type]
        base = message_type.split(".")[0]
        if base in self.functions:
            return self.functions[base]
        raise LookupError(f"no device function for message type {message_type!r}")


@dataclass(frozen=True)
class DeviceSettings:
    """On-device training defaults shared by strategies (``[device]`` in the experiment)."""

    local_steps: int = 5
    lr: float = 0.5
    recent: int = 30  # interactions of recent history a device trains on
    negatives: int = 4
    eval_negatives: int = 99

    def __post_init__(self) -> None:
        from devices.errors import ConfigError

        for key in ("local_steps", "recent", "negatives", "eval_negatives"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"device.{key}", v, "a positive integer")
        if not 0 < self.lr < float("inf"):
            raise ConfigError("device.lr", self.lr, "a positive number")


class DeviceContext:
    """A batch of devices on one host in one exchange of one round."""

    def __init__(self, host: Any, local: np.ndarray, round: int, exchange: int) -> None:
        # ``host`` is the devices.host.DeviceHost running the batch (not imported: host.py
        # imports this module, and importing it back would make a circle)
        self.host = host
        self.local = np.asarray(local, dtype=np.int64)
        self.device_ids = host.device_ids[self.local]
        self.round = round
        self.exchange = exchange
        self.spec = host.spec
        self.settings = host.settings
        self.seed = host.seed
        self.flops = np.zeros(len(self.local), dtype=np.float64)
        self.diverged = np.zeros(len(self.local), dtype=bool)

    def mark_diverged(self, mask: np.ndarray) -> None:
        """Flag devices whose local training diverged: the host quarantines their replies
        (and rolls back their state) even if every number in the reply is finite."""
        self.diverged |= np.asarray(mask, dtype=bool)

    def __len__(self) -> int:
        return len(self.local)

    # Data ------------------------------------------------------------------------

    def train_samples(self, negatives: int | None = None) -> tuple[torch.Tensor, ...]:
        """Each device's recent interactions up to the end of this round's window.

        Returns padded tensors windows (B, N, L), candidates (B, N, 1+neg), weight (B, N)
        and the per-device sample counts (numpy), in ``device_ids`` order.
        """
        return self.host.train_samples(self.local, self.round, negatives or self.settings.negatives)

    def last_windows(self) -> np.ndarray:
        """Each device's last L item ids up to the end of this round's window (B, L)."""
        return self.host.last_windows(self.local, self.round)

    def window_samples(self) -> tuple[torch.Tensor, ...]:
        """This round's interactions, each against ``eval_negatives`` negatives: the very
        samples the prequential scoring of this round used. Padded like ``train_samples``."""
        return self.host.window_samples(self.local, self.round)

    def windows_before_round(self) -> np.ndarray:
        """Each device's last L item ids before this round's window opened (B, L)."""
        return self.host.last_windows(self.local, self.round - 1)

    def items_before_round(self, n: int) -> list[np.ndarray]:
        """Each device's last ``n`` item ids before this round's window opened, oldest first."""
        return self.host.recent_items(self.local, self.round - 1, n)

    def recent_items(self, n: int) -> list[np.ndarray]:
        """Each device's last ``n`` item ids up to the end of this round's window, oldest
        first (what it uploads when a strategy asks for its recent data)."""
        return self.host.recent_items(self.local, self.round, n)

    # State -----------------------------------------------------------------------

    def held_params(self) -> dict[str, torch.Tensor]:
        """The models the devices hold, batched (a key shared by all devices has M = 1)."""
        return self.host.held_params(self.local)

    def hold(self, arrays: dict[str, np.ndarray]) -> None:
        """The devices adopt these shared parameters (e.g. a received global model)."""
        self.host.hold(self.local, arrays)

    def set_personal(self, params: dict[str, torch.Tensor]) -> None:
        """Per-device parameters (leading dim B) that override the held shared ones."""
        self.host.set_personal(self.local, params)

    def shared(self, key: str) -> dict[str, Any]:
        """Host-wide state every device of this host sees (e.g. shared parameters a
        strategy ships once and all its devices keep)."""
        return self.host.kv.setdefault(f"shared:{key}", {})

    def state(self, key: str) -> dict[int, Any]:
        """Strategy-specific per-device state, keyed by local index (persists across rounds)."""
        return self.host.kv.setdefault(key, {})

    # Cost accounting -------------------------------------------------------------

    def count_train(self, counts: np.ndarray, steps: int, candidates: int,
                    trainable: tuple[str, ...] | None = None) -> None:
        """Add the FLOPs of ``steps`` forward+backward passes over each device's samples
        (gradients of the ``trainable`` params only, if given)."""
        per = models.flops_per_sample(self.spec, candidates, backward=True, trainable=trainable)
        self.flops += np.asarray(counts, dtype=np.float64) * steps * per


ITEM_TABLES = ("item_emb", "item_bias")  # parameters with one row per catalogue item


def local_vocabulary(win: np.ndarray, cand: np.ndarray, n_items: int) -> tuple[np.ndarray, ...]:
    """Per device, the catalogue items its samples touch, and the samples re-indexed to them.

    Returns (items (B, U) with -1 padding, windows and candidates in local ids). Training
    on these small tables instead of the whole catalogue gives the same SGD result (rows a
    device never touches get no gradient) at a fraction of the cost.
    """
    b = win.shape[0]
    owner = np.arange(b, dtype=np.int64)
    keys_w = owner[:, None, None] * n_items + win
    keys_c = owner[:, None, None] * n_items + cand
    keys = np.unique(np.concatenate([keys_w[win >= 0], keys_c.ravel()]))
    dev = keys // n_items
    counts = np.bincount(dev, minlength=b)
    first = np.zeros(b, dtype=np.int64)
    first[1:] = np.cumsum(counts)[:-1]
    u = max(int(counts.max()), 1)
    items = np.full((b, u), -1, dtype=np.int64)
    items[dev, np.arange(len(keys)) - first[dev]] = keys % n_items
    local = lambda k: np.searchsorted(keys, k) - first[:, None, None]
    lw = np.where(win >= 0, local(keys_w), -1)
    return items, lw, local(keys_c)


def count_buckets(counts: np.ndarray, max_size: int, growth: float = 1.5) -> list[np.ndarray]:
    """Positions of devices grouped for training: sorted by sample count, a group ends when
    it holds ``max_size`` devices or the next count exceeds ``growth`` x its first count
    (plus one). A group padded to its largest count then pads by less than ``growth``, not
    every device to the batch's longest (recent = 30 padded ~2x the real work)."""
    order = np.argsort(counts, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or i - start >= max_size or counts[order[i]] > growth * counts[order[start]] + 1:
            groups.append(order[start:i])
            start = i
    return groups


def train_held_models(ctx: DeviceContext, steps: int, lr: float,
                      trainable: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """Every device trains (a copy of) the model it holds on its recent data.

    Devices are trained together in groups of similar sample count (``count_buckets``:
    each group is padded only to its own longest device), each on its local vocabulary
    (the items its samples touch), and the trained rows are written back into a full copy
    of the held model. Returns the trained params stacked over devices (B, ...), the last
    loss and the number of training samples per device, and counts the FLOPs.
    """
    win, cand, weight, counts = ctx.train_samples()
    held = ctx.held_params()
    b = len(ctx)
    chunk = max(1, int(256e6 // (4 * ctx.spec.n_params())))
    # every group writes its devices' rows of one (B, ...) result: no per-group parts to
    # concatenate and reorder (that held three copies of all B models at once)
    out = {k: torch.empty((b, *v.shape[1:]), dtype=v.dtype) for k, v in held.items()}
    losses, final = torch.zeros(b), torch.zeros(b)
    for sel in count_buckets(counts, chunk):
        idx, n, rows_n = torch.from_numpy(sel), len(sel), max(int(counts[sel].max()), 1)
        sw, sc, sweight = win[idx, :rows_n], cand[idx, :rows_n], weight[idx, :rows_n]
        items, lw, lc = local_vocabulary(sw.numpy(), sc.numpy(), ctx.spec.n_items)
        rows = torch.from_numpy(np.clip(items, 0, None))
        dev = torch.arange(n).unsqueeze(1).expand_as(rows)
        mine = {k: (v[idx] if v.shape[0] == b and b > 1 else v.expand(n, *v.shape[1:])) for k, v in held.items()}
        p = {k: (v[dev, rows] if k in ITEM_TABLES else v) for k, v in mine.items()}
        new, loss = models.sgd_train(p, torch.from_numpy(lw), torch.from_numpy(lc), sweight, steps, lr, trainable)
        with torch.no_grad():  # where the last step left each model (the reported loss is from before it),
            # on each device's first sample: a diverged model is off on every sample, and one
            # row per device keeps this check at a few % of the training's cost
            final[idx] = models.bce_loss(models.forward(new, torch.from_numpy(lw[:, :1]), torch.from_numpy(lc[:, :1])),
                                         sweight[:, :1])
            valid = torch.from_numpy(items >= 0)
            for k, v in new.items():
                if k in ITEM_TABLES:  # the held table, with the rows this group trained
                    out[k][idx] = mine[k]
                    out[k][idx[dev[valid]], rows[valid]] = v[valid]
                else:
                    out[k][idx] = v
        losses[idx] = loss
    ctx.count_train(counts, steps, cand.shape[-1], trainable)
    if hasattr(ctx, "mark_diverged"):
        ctx.mark_diverged(diverged_losses(final.numpy()))
    return out, losses.numpy(), counts


def diverged_losses(losses: np.ndarray) -> np.ndarray:
    """Which losses are NaN/Inf or above ``models.DIVERGED_LOSS`` (training diverged)."""
    losses = np.asarray(losses, dtype=np.float64)
    return ~np.isfinite(losses) | (losses > models.DIVERGED_LOSS)


@torch.no_grad()
def evaluate_received(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Flower's federated evaluation: score the received model on each device's recent
    data (its positives against ``eval_negatives`` sampled negatives) without adopting it."""
    from devices.scoring import DEVICE_METRICS, device_metrics

    arrays = next(iter(payload.arrays.values()))
    win, cand, weight, counts = ctx.train_samples(ctx.settings.eval_negatives)
    params = {k: torch.from_numpy(np.asarray(v))[None] for k, v in arrays.items()}
    b, n = weight.shape
    logits = models.forward(params, win.reshape(1, b * n, -1), cand.reshape(1, b * n, -1))[0]
    mask = weight.reshape(-1).numpy() > 0
    owner = np.repeat(np.arange(b), n)[mask]
    m = device_metrics(logits.numpy()[mask], owner, b)
    ctx.flops += counts * models.flops_per_sample(ctx.spec, cand.shape[-1], backward=False)
    return [Payload(metrics={"metrics": {"num-examples": int(counts[j]),
                                         # weight 0 when there is no data: report 0, not NaN,
                                         # so Flower's weighted mean is not poisoned
                                         **{k: float(m[k][j]) if counts[j] > 0 else 0.0
                                            for k in DEVICE_METRICS}}})
            for j in range(b)]
