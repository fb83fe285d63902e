"""CloudOnly ("base"): the cloud model is trained once on history; devices only infer.

Server half: never sends anything. Device half: none; a device scores with the model
installed at the start (the cloud model), which the host holds for every device.
"""
from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from strategies.base import FleetStrategy


class CloudOnly(FleetStrategy, short_name="cloud_only", colour="#7f7f7f"):
    """No device work, no traffic: the reference every personalisation must beat."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return None, None
