"""LocalFinetune ("finetune"): each device trains its own copy of the whole model.

Server half: each round, asks a fraction of the online devices to fine-tune (a config
only, no weights: the cloud model never changes). Device half: ``train`` continues from
the model the device holds (its personal copy, or the cloud model the first time) with
``local-steps`` full-batch SGD steps on its recent interactions, and keeps the result.
``layers = "head"`` trains only the head (``ModelSpec.head_keys``), the rest stays as held.
This is the on-device training cost DUET avoids.
"""
from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from devices.runtime import DeviceApp, DeviceContext, Payload, train_held_models
from strategies.base import FleetStrategy
from devices.errors import ConfigError
from strategies.common import check_fraction, check_positive, mean_metrics, sample_fraction


def train(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Fine-tune every device's held model on its recent data and keep it."""
    cfg = payload.config()
    trainable = ctx.spec.head_keys() if cfg.get("layers", "all") == "head" else None
    new, losses, counts = train_held_models(ctx, int(cfg.get("local-steps", ctx.settings.local_steps)),
                                            float(cfg.get("lr", ctx.settings.lr)), trainable)
    ctx.set_personal({k: new[k] for k in trainable} if trainable else new)  # head only: the body stays as held
    return [Payload(metrics={"metrics": {"num-examples": int(n), "train_loss": float(l)}}) for n, l in zip(counts, losses)]


class LocalFinetune(FleetStrategy, short_name="local_finetune", colour="#1f77b4"):
    """Personal fine-tuning on every participating device; nothing is aggregated."""

    device_app = DeviceApp({MessageType.TRAIN: train})

    LAYERS = ("all", "head")  # what a device fine-tunes: the whole model, or only the head (ModelSpec.head_keys)

    def __init__(self, fraction_train: float = 1.0, local_steps: int | None = None, lr: float | None = None,
                 layers: str = "all") -> None:
        self.fraction_train = check_fraction("fraction_train", fraction_train)
        if layers not in self.LAYERS:
            raise ConfigError("layers", layers, " or ".join(f'"{x}"' for x in self.LAYERS))
        self.layers = layers
        self.local_steps = None if local_steps is None else check_positive("local_steps", local_steps, integer=True)
        self.lr = None if lr is None else check_positive("lr", lr)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = sample_fraction(grid, self.fraction_train, 1)
        extra = {"layers": self.layers} if self.layers != "all" else {}  # the default message as it was
        content = RecordDict({"config": self.device_config(server_round, **extra)})  # one record shared by every message
        return [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return None, mean_metrics(replies)
