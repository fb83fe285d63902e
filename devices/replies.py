"""Checks of device replies: malformed ones (a code error), non-finite values (quarantined)
and diverged local training.

Vectorised over replies; ``DeviceHost.run`` calls them on every job's replies.
"""
from __future__ import annotations

import numpy as np

from devices import models
from devices.runtime import Payload


def check_replies(fn, sent: Payload, replies: list[Payload], ids: np.ndarray) -> None:
    """Raise ``ValueError`` naming the device if a reply is malformed, so the call is a code
    error of the device function (not a failure of whoever reads the reply later):

    - an array under a name it was sent (the same record and key) with another shape, or
      not float where a float was sent: an update that no longer fits the model it
      updates, which averaged in would broadcast or truncate silently (arrays under new
      names -- samples, patches -- are not constrained);
    - a record the server sent, returned without some of its arrays: averaged, the model
      would lose a parameter, or Flower refuses the round's replies naming no device (a
      partial update goes under a new record name);
    - a metric value Flower's ``MetricRecord`` refuses (a numpy scalar, a bool, a mixed list);
    - not a list of ``Payload``, one per device (``TypeError``; a wrong count: ``RuntimeError``).
    """
    name = getattr(fn, "__name__", fn)
    if not isinstance(replies, (list, tuple)):
        raise TypeError(f"{name} returned {type(replies).__name__}; a device function returns a list of "
                        f"devices.runtime.Payload, one per device of the call ({len(ids)} here)")
    if len(replies) != len(ids):
        raise RuntimeError(f"{name} returned {len(replies)} replies for {len(ids)} devices")
    for j, r in enumerate(replies):
        if not isinstance(r, Payload):
            raise TypeError(f"{name} returned a {type(r).__name__} for device {int(ids[j])}; each reply is a "
                            f"devices.runtime.Payload (arrays, metrics, configs)")
    for j, r in enumerate(replies):
        for rec, vals in r.metrics.items():
            for k, v in vals.items():
                if not _metric_value(v):
                    raise ValueError(f"{getattr(fn, '__name__', fn)} returned metric {rec}/{k} = {v!r} "
                                     f"({type(v).__name__}) for device {int(ids[j])}; a Flower metric is an int, a "
                                     f"float or a list of one of them (float(x) turns a numpy scalar into one)")
        for rec, arrays in r.arrays.items():
            given = sent.arrays.get(rec)
            if not given:
                continue
            missing = [k for k in given if k not in arrays]
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                sent_n = f"{len(given)} array{'s' if len(given) > 1 else ''}"
                raise ValueError(f"{getattr(fn, '__name__', fn)} returned {rec} without {shown} for device "
                                 f"{int(ids[j])}; it was sent {sent_n} there (a record the server sent comes back "
                                 f"whole, or under a new name)")
            for k, a in arrays.items():
                if k not in given:
                    continue
                if np.shape(a) != np.shape(given[k]):
                    raise ValueError(f"{getattr(fn, '__name__', fn)} returned {rec}/{k} of shape {tuple(np.shape(a))} "
                                     f"for device {int(ids[j])}; it was sent with shape {tuple(np.shape(given[k]))}")
                sent_kind, kind = np.asarray(given[k]).dtype.kind, np.asarray(a).dtype.kind
                if sent_kind in "fc" and kind not in "fc":
                    raise ValueError(f"{getattr(fn, '__name__', fn)} returned {rec}/{k} as {np.asarray(a).dtype} for "
                                     f"device {int(ids[j])}; it was sent as {np.asarray(given[k]).dtype} (an update "
                                     f"of a float parameter must be float)")


def _metric_value(v) -> bool:
    """What Flower's ``MetricRecord`` takes: int, float, list[int] or list[float] (no bool)."""
    if type(v) in (int, float):
        return True
    return type(v) is list and (not v or (type(v[0]) in (int, float) and all(type(x) is type(v[0]) for x in v)))


def diverged_replies(replies: list[Payload], limit: float = models.DIVERGED_LOSS) -> np.ndarray:
    """Which replies report a finite ``train_loss`` metric above ``limit``: local training
    diverged (a loss of 100 x ln 2 means logits in the hundreds with the wrong sign), so
    the update is garbage even though every number in it is finite."""
    out = np.zeros(len(replies), dtype=bool)
    for j, r in enumerate(replies):
        for vals in r.metrics.values():
            v = vals.get("train_loss")
            if isinstance(v, float) and np.isfinite(v) and v > limit:
                out[j] = True
    return out


def nonfinite_replies(replies: list[Payload]) -> np.ndarray:
    """Which replies hold a NaN or Inf in any array or float metric, vectorised per key.

    Arrays of one key are stacked over replies and summed in float64 per reply: a sum
    is non-finite iff an element is (float32 values cannot overflow a float64 sum), so
    one reduction per key replaces an ``isfinite`` per array; a float64 array whose sum
    overflowed is checked element-wise before it is called non-finite.
    """
    n = len(replies)
    bad = np.zeros(n, dtype=bool)
    if n == 0:
        return bad
    groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    floats: dict[tuple, list[tuple[int, float]]] = {}
    for j, r in enumerate(replies):
        for rec, arrays in r.arrays.items():
            for k, a in arrays.items():
                a = np.asarray(a)
                if a.dtype.kind in "fc":
                    groups.setdefault((rec, k, a.shape, a.dtype.str), []).append((j, a))
        for rec, vals in r.metrics.items():
            for k, v in vals.items():
                if isinstance(v, float):
                    floats.setdefault((rec, k), []).append((j, v))
                elif isinstance(v, (list, tuple)) and v and isinstance(v[0], float):
                    floats.setdefault((rec, k), []).append((j, float(np.sum(v, dtype=np.float64))))
    for members in groups.values():
        idx = np.fromiter((j for j, _ in members), dtype=np.int64, count=len(members))
        arrays = [a for _, a in members]
        # replies cut from one stacked result are reduced on it in place; others are stacked
        base, rows = rows_of_one_array(arrays) or (np.stack(arrays), np.arange(len(arrays)))
        stacked = base.reshape(len(base), -1)
        with np.errstate(over="ignore", invalid="ignore"):
            sums = stacked.sum(axis=1, dtype=np.float64)[rows]
        suspect = ~np.isfinite(sums)
        if suspect.any():
            suspect[suspect] = ~np.isfinite(stacked[rows[suspect]]).all(axis=1)
            bad[idx[suspect]] = True
    for members in floats.values():
        vals = np.fromiter((v for _, v in members), dtype=np.float64, count=len(members))
        idx = np.fromiter((j for j, _ in members), dtype=np.int64, count=len(members))
        bad[idx[~np.isfinite(vals)]] = True
    return bad


def rows_of_one_array(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """If every array is a whole row of one C-contiguous array (replies cut from one
    stacked result, ``v[j]``), that array and each one's row index; else None."""
    base = arrays[0].base
    if not isinstance(base, np.ndarray) or base.ndim == 0 or base.shape[1:] != arrays[0].shape \
            or base.dtype != arrays[0].dtype or not base.flags.c_contiguous:
        return None
    row_bytes = max(arrays[0].nbytes, 1)
    start = base.__array_interface__["data"][0]
    rows = np.empty(len(arrays), dtype=np.int64)
    for i, a in enumerate(arrays):
        if a.base is not base or a.shape != base.shape[1:] or not a.flags.c_contiguous:
            return None
        rows[i], rest = divmod(a.__array_interface__["data"][0] - start, row_bytes)
        if rest or not 0 <= rows[i] < len(base):
            return None
    return base, rows
