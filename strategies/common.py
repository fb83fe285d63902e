"""Pieces the baseline strategies share: reproducible node sampling and reply metrics."""
from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from devices.settings import (  # noqa: F401 (re-exported: the rules strategies check their parameters with)
    check_choice, check_fraction, check_non_negative, check_positive)


def sample_fraction(grid: Grid, fraction: float, minimum: int) -> list[int]:
    """``fraction`` of the online nodes (at least ``minimum``), sampled like Flower's FedAvg."""
    if fraction <= 0:
        return []
    online = list(grid.get_node_ids())
    size = max(int(len(online) * fraction), minimum)
    nodes, _ = sample_nodes(grid, size, size)
    return sorted(nodes)


def mean_metrics(replies: Iterable[Message], weight_key: str = "num-examples") -> MetricRecord | None:
    """Example-weighted mean of every metric in the valid replies (errors skipped)."""
    sums: dict[str, float] = {}
    total = 0.0
    for msg in replies:
        if msg.has_error():
            continue
        for rec in msg.content.metric_records.values():
            w = float(rec.get(weight_key, 1))
            total += w
            for k, v in rec.items():
                if k != weight_key and isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + w * float(v)
    if total <= 0:
        return None
    return MetricRecord({**{k: v / total for k, v in sums.items()}, weight_key: int(total)})
