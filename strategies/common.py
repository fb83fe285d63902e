"""Pieces the baseline strategies share: reproducible node sampling and reply metrics."""
from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes


def check_fraction(key: str, value: object, allow_zero: bool = False) -> float:
    """A fraction in (0, 1] (or [0, 1]); raises ValueError naming the parameter."""
    low_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok(value) and value <= 1):
        raise ValueError(f"{key} = {value!r}: must be a number in {'[' if allow_zero else '('}0, 1]")
    return float(value)


def check_positive(key: str, value: object, integer: bool = False) -> float | int:
    """A positive (integer) number; raises ValueError naming the parameter."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < float("inf"):
        raise ValueError(f"{key} = {value!r}: must be a positive {'integer' if integer else 'number'}")
    return value


def check_non_negative(key: str, value: object, integer: bool = False, meaning: str = "") -> float | int:
    """A number (integer) >= 0; raises ValueError naming the parameter (``meaning`` is
    appended to the message in parentheses)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 <= value < float("inf"):
        why = f" ({meaning})" if meaning else ""
        raise ValueError(f"{key} = {value!r}: must be {'an integer' if integer else 'a number'} >= 0{why}")
    return value


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
