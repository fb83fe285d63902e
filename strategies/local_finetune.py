"""LocalFinetune ("finetune"): each device trains its own copy of the whole model.

Server half: each round, asks a fraction of the online devices to fine-tune (a config
only, no weights: the cloud model never changes). Device half: ``train`` continues from
the model the device holds (its personal copy, or the cloud model the first time) with
``local-steps`` full-batch SGD steps on its recent interactions, and keeps the result.
This is the on-device training cost DUET avoids.
"""
from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from devices.runtime import DeviceApp, DeviceContext, Payload, train_held_models
from strategies.base import FleetStrategy
from strategies.common import check_fraction, check_positive, mean_metrics, sample_fraction


def train(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Fine-tune every device's held model on its recent data and keep it."""
    cfg = payload.config()
    new, losses, counts = train_held_models(ctx, int(cfg.get("local-steps", ctx.settings.local_steps)),
                                            float(cfg.get("lr", ctx.settings.lr)))
    ctx.set_personal(new)
    return [Payload(metrics={"metrics": {"num-examples": int(n), "train_loss": float(l)}}) for n, l in zip(counts, losses)]


class LocalFinetune(FleetStrategy, short_name="local_finetune", colour="#1f77b4"):
    """Personal fine-tuning on every participating device; nothing is aggregated."""

    device_app = DeviceApp({MessageType.TRAIN: train})

    def __init__(self, fraction_train: float = 1.0, local_steps: int | None = None, lr: float | None = None) -> None:
        self.fraction_train = check_fraction("fraction_train", fraction_train)
        self.local_steps = None if local_steps is None else check_positive("local_steps", local_steps, integer=True)
        self.lr = None if lr is None else check_positive("lr", lr)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = sample_fraction(grid, self.fraction_train, 1)
        content = RecordDict({"config": self.device_config(server_round)})  # one record shared by every message
        return [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return None, mean_metrics(replies)
