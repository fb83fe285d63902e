"""Prequential scoring on a host: one window scored with the model each device holds, and
the same work started ahead of time while the host would otherwise wait.

Why ahead of time: in a Ray pool a host is idle while the driver aggregates the replies
of an exchange and builds the next round's messages. Scoring window ``r + 1`` needs only
the device state as round ``r``'s exchanges leave it, so a host may start it when an
exchange ends (``Prefetch.start``), in a background thread at the lowest CPU priority: it
takes cores nobody else wants and yields them to the driver and the other hosts.

Why that cannot change a result: the prefetched score is the very function ``score``
would call, on the same state. It is used only if nothing touched the device state in
between -- every state-changing host call first settles the prefetch (``Prefetch.settle``
cancels it and, if it has started reading device state, waits for it to stop). A
cancelled, stale or failed prefetch is dropped and the score is computed again in the
call itself, so an error surfaces where it would have without prefetching.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable

import numpy as np
import torch

from devices import models, scoring
from devices.samples import pad_by_owner

EVAL_CHUNK_ROWS = 2048  # rows scored per forward pass of a shared model: its work arrays stay in
# cache (4.5 us a row with GRU4Rec, d = 32, against 5.9 at 8192 rows; 9.4 at 16384)
PERSONAL_CHUNK = 64  # personalised models stacked per forward pass


def late_keys(spec: models.ModelSpec) -> frozenset[str]:
    """Parameters applied after the body, for backbones whose body does not look at the
    candidates (``models.body_output``): the head and every MetaPatch patch. Empty for the
    others (DIN)."""
    if models.get_backbone(spec.backbone).body is None:
        return frozenset()
    return frozenset(spec.head_keys()).union(*(models.patch_keys(layer) for layer in models.PATCH_LAYERS))


def _version_chunks(host: Any, s: Any, by_pads: np.ndarray, devices: np.ndarray, check: Callable[..., None]):
    """For each shared version ``devices`` hold: its params with the every-item tables
    (``models.shared_tables``), then its devices' rows in ``by_pads`` order, in chunks of
    ``EVAL_CHUNK_ROWS``, as (params, rows, windows, candidates) with int64 item ids."""
    vids = host.held[devices]
    for vid in np.unique(vids):
        rows = by_pads[np.isin(s.owner[by_pads], devices[vids == vid])]
        params = models.shared_tables({k: torch.from_numpy(v)[None] for k, v in host.versions[int(vid)].items()})
        for c in range(0, len(rows), EVAL_CHUNK_ROWS):
            check()
            r = rows[c : c + EVAL_CHUNK_ROWS]
            win, cand = (torch.from_numpy(a[r].astype(np.int64)) for a in (s.windows, s.candidates))
            yield params, r, win, cand


class Cancelled(Exception):
    """Raised inside a prefetch that was settled: its result would be stale."""


def score_window(host: Any, round: int, check: Callable[..., None] | None = None) -> dict[str, Any]:
    """Per-device metrics of window ``round`` (the devices ``Shard.evaluated`` names, or
    all), each device scored with the model it holds, and a pooled score histogram.

    ``check`` (prefetch only) is called once with ``reading=True`` before the device state
    is first read and then between batches; it raises ``Cancelled`` to stop."""
    s = host.eval_samples(round, scored=True)  # does not depend on the device state
    check = check or (lambda reading=False: None)
    check(reading=True)
    scores = np.zeros(s.candidates.shape, dtype=np.float32)
    owners = np.unique(s.owner)
    has_own = np.array([int(i) in host.personal for i in owners], dtype=bool)
    shared = owners[~has_own]
    # rows with whole windows first: most batches then have no PAD step to mask
    by_pads = np.argsort((s.windows < 0).sum(axis=1), kind="stable")
    for params, r, win, cand in _version_chunks(host, s, by_pads, shared, check):
        scores[r] = models.forward(params, win[None], cand[None])[0].numpy()
    own = owners[has_own]
    late = late_keys(host.spec)
    if late and len(own):
        # personal models that differ from their held version only after the body (a DUET
        # or fine-tuned head, a MetaPatch patch): the body runs on the shared version in
        # large batches, each row's own head and patch after it
        quick = np.array([set(host.personal[int(i)]) <= late for i in own], dtype=bool)
        for params, r, win, cand in _version_chunks(host, s, by_pads, own[quick], check):
            group, at = np.unique(s.owner[r], return_inverse=True)
            at = torch.from_numpy(at.reshape(-1))
            mine = {k: v[at] for k, v in host.held_params(group).items() if k in late and v.shape[0] == len(group)}
            h = models.body_output(params, win[None])  # (1, n, d)
            out = models.forward_from_body({**params, **mine}, h.transpose(0, 1), cand[:, None])  # one model a row
            scores[r] = out[:, 0].numpy()
        own = own[~quick]
    for c in range(0, len(own), PERSONAL_CHUNK):
        check()
        group = own[c : c + PERSONAL_CHUNK]
        rows = np.flatnonzero(np.isin(s.owner, group))
        sub = s.take(rows)
        win, cand, weight, _ = pad_by_owner(sub, group)
        out = models.forward(host.held_params(group), torch.from_numpy(win), torch.from_numpy(cand)).numpy()
        # pad_by_owner orders rows by owner then time, as the stable sort of sub.owner
        order = np.argsort(np.searchsorted(group, sub.owner), kind="stable")
        scores[rows[order]] = out[weight > 0]
    check()
    # A model that emits NaN/Inf is recorded, never scored as if it were a number: its
    # device's metrics are NaN and flagged ``nonfinite``, its rows stay out of the pooled
    # histogram. (A float64 row sum is non-finite iff a float32 entry is.)
    bad_row = ~np.isfinite(scores.sum(axis=1, dtype=np.float64))
    if bad_row.any():
        scores[bad_row] = 0.0
    n = len(host.device_ids)
    per = scoring.device_metrics(scores, s.owner, n)
    nonfinite = np.zeros(n, dtype=bool)
    nonfinite[s.owner[bad_row]] = True
    for k in scoring.DEVICE_METRICS:
        per[k][nonfinite] = np.nan
    per["nonfinite"] = nonfinite
    active = np.flatnonzero(per["n_pos"] > 0)
    hist = scoring.ScoreHistogram()
    hist.add(scores[~bad_row] if bad_row.any() else scores)
    return {"device_id": host.device_ids[active], **{k: np.asarray(v)[active] for k, v in per.items()}, "histogram": hist}


class _Job:
    def __init__(self, round: int) -> None:
        self.round = round
        self.lock = threading.Lock()
        self.cancelled = False
        self.reading = False  # has started reading the device state
        self.result: dict[str, Any] | None = None
        self.thread: threading.Thread | None = None

    def check(self, reading: bool = False) -> None:
        with self.lock:
            if self.cancelled:
                raise Cancelled
            self.reading = self.reading or reading


def _lowest_priority() -> None:
    """Nice 19 for the calling thread only (Linux: a thread id is a valid PRIO_PROCESS
    target); elsewhere, or if refused, the thread keeps the process's priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class Prefetch:
    """At most one prefetched ``score_window`` of a host in flight."""

    def __init__(self, host: Any, on_done: Callable[[], None] | None = None) -> None:
        """``on_done``: called in the background thread when a prefetch ends (any way)."""
        self.host = host
        self.on_done = on_done
        self._job: _Job | None = None

    def start(self, round: int) -> None:
        """Begin scoring window ``round`` in the background (settling any earlier one)."""
        self.settle()
        job = _Job(round)
        job.thread = threading.Thread(target=self._work, args=(job,), name=f"prefetch-score-{round}", daemon=True)
        self._job = job
        job.thread.start()

    def _work(self, job: _Job) -> None:
        _lowest_priority()
        try:
            with torch.no_grad():
                job.result = score_window(self.host, job.round, job.check)
        except Cancelled:
            pass
        except BaseException:  # dropped: the score is computed again in the call, which raises it
            job.result = None
        finally:
            if self.on_done is not None:
                self.on_done()

    def settle(self) -> None:
        """Cancel the prefetch in flight; wait for it if it reads the device state."""
        job, self._job = self._job, None
        if job is None:
            return
        with job.lock:
            job.cancelled = True
            wait = job.reading
        if wait:
            job.thread.join()

    def take(self, round: int) -> dict[str, Any] | None:
        """The prefetched score of window ``round`` if there is a valid one (waiting for it
        to finish), else None; either way nothing is left in flight."""
        job = self._job
        if job is None or job.round != round:
            self.settle()
            return None
        self._job = None
        job.thread.join()
        return job.result
