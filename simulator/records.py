"""The only place that converts between Flower records and fleetsim's plain payloads."""
from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from devices.runtime import Payload


# (dtype, shape) -> (.npy header, dtype name, shape as ints)
_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], tuple[bytes, str, tuple[int, ...]]] = {}


def to_array(a: np.ndarray) -> Array:
    """numpy -> Flower ``Array``, byte-identical to ``Array(a)`` (for an array in C order;
    any other is written in C order: the same values) but without ``np.save`` per call:
    the .npy header (and the dtype's name) is made once per dtype and shape (replies are
    thousands of same-shaped arrays per round), and the data is copied once, straight
    from the array's buffer after the header."""
    a = np.asarray(a, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    key = (a.dtype.str, a.shape)
    known = _NPY_HEADERS.get(key)
    if known is None:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False, "shape": a.shape})
        known = _NPY_HEADERS[key] = (buf.getvalue(), str(a.dtype), tuple(int(d) for d in a.shape))
    header, dtype, shape = known
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=b"".join((header, a.data)))


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
        rd[name] = array_record(arrays)
    for name, rec in payload.metrics.items():
        rd[name] = MetricRecord(dict(rec))
    for name, rec in payload.configs.items():
        rd[name] = ConfigRecord(dict(rec))
    return rd


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """numpy dict -> ``ArrayRecord``, equal to ``ArrayRecord({k: to_array(v) ...})``.

    Filled item by item: ``ArrayRecord(dict_of_arrays)`` would build every ``Array`` a
    second time."""
    record = ArrayRecord()
    for k, v in arrays.items():
        record[k] = to_array(v)
    return record
