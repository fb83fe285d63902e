"""The only place that converts between Flower records and fleetsim's plain payloads."""
from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from devices.runtime import Payload


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def to_array(a: np.ndarray) -> Array:
    """numpy -> Flower ``Array``, byte-identical to ``Array(a)`` but without ``np.save``
    per call: the .npy header is built once per dtype and shape (replies are thousands of
    same-shaped arrays per round)."""
    a = np.ascontiguousarray(a)
    key = (a.dtype.str, a.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False, "shape": a.shape})
        header = _NPY_HEADERS[key] = buf.getvalue()
    return Array(dtype=str(a.dtype), shape=tuple(int(d) for d in a.shape), stype="numpy.ndarray",
                 data=header + a.tobytes())


def to_payload(content: RecordDict, cache: dict[int, dict[str, np.ndarray]] | None = None) -> Payload:
    """Flower ``RecordDict`` -> ``Payload`` (arrays decoded to numpy once).

    With ``cache``, an ``ArrayRecord`` object shared by many messages (a model body sent
    beside per-device heads) is decoded once and its numpy dict reused, so pickling a
    host's jobs ships it once per host.
    """
    p = Payload()
    for name, rec in content.array_records.items():
        if cache is None:
            p.arrays[name] = {k: v.numpy() for k, v in rec.items()}
        else:
            if id(rec) not in cache:
                cache[id(rec)] = {k: v.numpy() for k, v in rec.items()}
            p.arrays[name] = cache[id(rec)]
    for name, rec in content.metric_records.items():
        p.metrics[name] = dict(rec)
    for name, rec in content.config_records.items():
        p.configs[name] = dict(rec)
    return p


def to_recorddict(payload: Payload) -> RecordDict:
    """``Payload`` -> Flower ``RecordDict``."""
    rd = RecordDict()
    for name, arrays in payload.arrays.items():
        rd[name] = ArrayRecord({k: to_array(v) for k, v in arrays.items()})
    for name, rec in payload.metrics.items():
        rd[name] = MetricRecord(dict(rec))
    for name, rec in payload.configs.items():
        rd[name] = ConfigRecord(dict(rec))
    return rd


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: to_array(v) for k, v in arrays.items()})
