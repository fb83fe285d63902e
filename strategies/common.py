"""Pieces the baseline strategies share: reproducible node sampling, reply metrics and a
fast reader of Flower ``Array`` bytes for weighted averages."""
from __future__ import annotations

import io
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
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


# .npy header bytes -> (dtype, shape, offset of the data), or None where np.load must read it
_NPY_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...], int] | None] = {}
_NPY_LAYOUTS_MAX = 4096


def array_view(a: Array) -> np.ndarray:
    """The value of ``a.numpy()`` as a read-only view of ``a.data``.

    Flower's ``Array.numpy()`` is ``np.load`` of the .npy bytes, which parses the header
    text (``ast.literal_eval``) on every call: ~60 us, 0.6 s a round for the 10,000 arrays
    of 1,000 FedAvg replies. Replies share a few headers, so each distinct header is
    parsed once (by numpy's own reader) and the data is viewed in place. Anything but a
    plain C-order numeric .npy array of the right length goes to ``a.numpy()``.
    """
    data = a.data
    if a.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY" or len(data) < 12:
        return a.numpy()
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    head = bytes(data[:end])
    if head not in _NPY_LAYOUTS:
        f = io.BytesIO(head)
        major, _ = np.lib.format.read_magic(f)
        try:
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError:
            layout = None  # np.load raises its own error
        else:
            layout = None if fortran or dtype.hasobject else (dtype, tuple(shape), end)
        if len(_NPY_LAYOUTS) >= _NPY_LAYOUTS_MAX:
            _NPY_LAYOUTS.clear()
        _NPY_LAYOUTS[head] = layout
    layout = _NPY_LAYOUTS[head]
    if layout is None:
        return a.numpy()
    dtype, shape, offset = layout
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        return a.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _check_same_arrays(contents: list[RecordDict]) -> None:
    """Raise ``ValueError`` unless every reply holds the same array names with the same
    shapes: a mean over replies that lack a key, or whose shapes broadcast, would be a
    wrong number, not an error."""
    def layout(c: RecordDict) -> dict[str, tuple[int, ...]]:
        return {f"{name}/{k}": tuple(v.shape) for name, rec in c.array_records.items() for k, v in rec.items()}

    first = layout(contents[0]) if contents else {}
    for i, c in enumerate(contents[1:], start=1):
        other = layout(c)
        if other != first:
            diff = sorted(set(first) ^ set(other)) or sorted(k for k in first if first[k] != other[k])
            k = diff[0]
            raise ValueError(f"replies 0 and {i} hold different arrays ({k}: {first.get(k, 'missing')} vs "
                             f"{other.get(k, 'missing')}); a weighted mean needs the same names and shapes")


def weighted_mean_arrays(contents: list[RecordDict], weight_key: str) -> ArrayRecord:
    """Flower's ``aggregate_arrayrecords`` (FedAvg's weighted mean), value for value: the
    same weights, the same float32 products summed in the same order; only the arrays
    are read with ``array_view`` instead of ``np.load``, and each product reuses one buffer."""
    weights = [float(next(iter(c.metric_records.values()))[weight_key]) for c in contents]
    total = sum(weights)
    if not total > 0:  # Flower's mean would divide by zero
        raise ValueError(f"weighted_mean_arrays: the replies' {weight_key!r} sum to {total:g} (no device trained on "
                         f"an example); a round like this keeps the model (aggregate_train returns None, None, as "
                         f"strategies.fedavg does)")
    _check_same_arrays(contents)
    out: dict[str, np.ndarray] = {}
    scratch: dict[str, np.ndarray] = {}
    for content, w in zip(contents, (w / total for w in weights), strict=True):
        for record in content.array_records.values():
            for key, value in record.items():
                x = array_view(value)
                if key not in out:
                    out[key] = x * w
                    scratch[key] = np.empty_like(out[key])
                else:
                    out[key] += np.multiply(x, w, out=scratch[key])
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})
