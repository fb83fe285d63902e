"""A host: thousands of devices held as data, their state, and batched device work.

``DeviceHost`` is a plain class (tests and Flower's ClientApp wrapper use it directly);
``devices.pool`` runs a few of them as Ray actors. A host never knows about Flower: it
receives plain payloads and device functions and returns plain replies and costs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import pickle
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from devices import models
from devices.data import Interactions, Timeline
from devices.replies import check_replies, diverged_replies, nonfinite_replies
from devices.runtime import ITEM_TABLES, DeviceContext, DeviceFn, DeviceSettings, Payload
from devices.samples import SampleBuilder, Samples, pad_by_owner, stream_key
from devices import prequential

EVAL_TAG, TRAIN_TAG = 1, 2
# Evaluation samples are cached so every strategy is scored on the same samples without
# building them again; the oldest are dropped beyond this (rebuilt identically if asked
# again). A window of a million-device fleet takes ~75 MB per host, so there the cache
# holds one window: a run's strategies replay all its windows, so anything between one
# and all of them would be evicted before it is asked for again.
EVAL_CACHE_BYTES = 1 << 27


def _libc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


_MALLOC_TRIM = _libc_trim()


def free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``).

    A host's calls allocate hundreds of MB of short-lived arrays (a training batch, a
    window's scores). glibc keeps freed blocks below its adaptive mmap threshold in the
    heap, so without this a host's resident memory stays near its largest call's peak
    for the rest of the run: ~0.4 GB per host on a 1M-device fleet. Called when a host
    call (or its prefetch) ends; it takes ~1 ms and changes no value."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class Shard:
    """The devices one host holds: global ids (ascending) and their streams."""

    device_ids: np.ndarray
    interactions: Interactions  # local users 0..n-1 = device_ids in order
    timeline: Timeline
    evaluated: np.ndarray | None = None  # which local users prequential scoring evaluates (None: all)


@dataclass
class SparseRows:
    """Rows of an item table that differ from the shared version a device holds."""

    rows: np.ndarray
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.values.nbytes)


@dataclass
class JobResult:
    """Outcome of one device function call for a batch of devices.

    A device function that raised is a *code error* for every device of the call:
    ``replies`` is None and ``error`` / ``error_type`` / ``traceback`` say what was raised.
    A reply holding NaN or Inf in an array or a metric is *quarantined*: ``nonfinite``
    marks it, and that device's state is rolled back to what it was before the call.
    """

    device_ids: np.ndarray
    replies: list[Payload] | None  # None when the call raised
    flops: np.ndarray
    bytes_up: np.ndarray
    error: str = ""  # first line of the message of the exception the device function raised
    error_type: str = ""
    traceback: str = ""
    nonfinite: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    diverged: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


class DeviceHost:
    """Holds a shard of devices and runs device functions for many of them per call."""

    def __init__(self, shard: Shard | None, spec: models.ModelSpec | None = None,
                 settings: DeviceSettings | None = None, seed: int = 0, prefetch: bool = False) -> None:
        """``prefetch``: score the next window in the background after each exchange
        (``devices.prequential``); for hosts in their own process, as a Ray pool's are.
        ``shard=None`` makes a host process that is up before its devices exist; ``load``
        gives it them (``devices.pool.HostProcesses``)."""
        if shard is not None:
            self.load(shard, spec, settings, seed, prefetch)

    def load(self, shard: Shard, spec: models.ModelSpec, settings: DeviceSettings, seed: int,
             prefetch: bool = False) -> None:
        """Hold ``shard``'s devices (the constructor's arguments), every one without state."""
        torch.set_num_threads(1)  # hosts are one per core; intra-op threads would oversubscribe
        self.device_ids = np.asarray(shard.device_ids, dtype=np.int64)
        self.inter = shard.interactions
        self.timeline = shard.timeline
        self.evaluated = shard.evaluated
        self.spec, self.settings, self.seed = spec, settings, seed
        models.get_backbone(spec.backbone)  # a user backbone ('package.module:NAME') is imported in this process too
        self.builder = SampleBuilder(self.inter, spec.window, self.device_ids)
        self._eval_cache: dict[tuple[int, bool], Samples] = {}
        self._cache_lock = threading.Lock()  # a prefetch may build samples beside the main thread
        self._prefetch = prequential.Prefetch(self, on_done=free_heap) if prefetch else None
        self.reset(None)

    # State ---------------------------------------------------------------------

    def reset(self, initial: dict[str, np.ndarray] | None) -> None:
        """Forget all device state; every device holds ``initial`` (the installed app)."""
        self._settle()
        self.versions: dict[int, dict[str, np.ndarray]] = {}
        self._fingerprints: dict[bytes, int] = {}
        self._by_identity: dict[int, tuple[dict, int]] = {}
        self._next_vid = 0
        self.held = np.zeros(len(self.device_ids), dtype=np.int64)
        self.personal: dict[int, dict[str, np.ndarray]] = {}
        self.kv: dict[str, dict[int, Any]] = {}
        if initial is not None:
            self.held[:] = self._register(initial)

    STATE = ("versions", "_fingerprints", "_next_vid", "held", "personal", "kv")

    def get_state(self) -> bytes:
        """The device state (shared versions and their fingerprints, the next version id,
        what each device holds, personal parameters, key-value stores), pickled with
        protocol 5; caches are not part of it."""
        return pickle.dumps({k: getattr(self, k) for k in self.STATE}, protocol=5)

    def set_state(self, data: bytes) -> None:
        """Restore a state from ``get_state`` exactly; caches start empty."""
        self._settle()
        state = pickle.loads(data)
        if set(state) != set(self.STATE) or len(state["held"]) != len(self.device_ids):
            raise ValueError(f"not the state of this host ({len(self.device_ids)} devices)")
        for k in self.STATE:
            setattr(self, k, state[k])
        self._by_identity = {}
        self._eval_cache = {}

    def prune(self) -> None:
        """What ``score`` changes in the device state (replayed instead of a whole score)."""
        self._settle()
        self._drop_unused_versions()

    def replay(self, method: str, *args: Any) -> None:
        """Call ``method`` again for its effect on the device state only (a host restored
        after a crash catching up): the result is dropped; a score only prunes versions."""
        if method == "score":
            self.prune()
        else:
            getattr(self, method)(*args)

    def _settle(self) -> None:
        """Before the device state changes: no prefetch may read it (``devices.prequential``)."""
        if getattr(self, "_prefetch", None):
            self._prefetch.settle()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str | None:
        """The Ray node this host runs on (None outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def _register(self, arrays: dict[str, np.ndarray]) -> int:
        # The same payload object reaches many jobs of one call: hash it once.
        cached = self._by_identity.get(id(arrays))
        if cached is not None and cached[0] is arrays:
            return cached[1]
        h = hashlib.blake2b(digest_size=16)
        for k in sorted(arrays):
            h.update(k.encode())
            h.update(np.ascontiguousarray(arrays[k]).tobytes())
        fp = h.digest()
        if fp not in self._fingerprints:
            self._next_vid += 1
            vid = self._next_vid
            self._fingerprints[fp] = vid
            self.versions[vid] = {k: np.array(v, dtype=np.float32) for k, v in arrays.items()}
        self._by_identity[id(arrays)] = (arrays, self._fingerprints[fp])
        return self._fingerprints[fp]

    def hold(self, local: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        vid = self._register(arrays)
        self.held[local] = vid
        for i in local:
            self.personal.pop(int(i), None)

    def _drop_unused_versions(self) -> None:
        """Forget shared versions no device holds any more (once per round, not per job)."""
        used = set(np.unique(self.held).tolist())
        for vid in [v for v in self.versions if v not in used]:
            del self.versions[vid]
        self._by_identity.clear()
        self._fingerprints = {fp: vid for fp, vid in self._fingerprints.items() if vid in self.versions}

    def set_personal(self, local: np.ndarray, params: dict[str, torch.Tensor]) -> None:
        """Store per-device parameters. Item tables (one row per catalogue item) are kept
        as the rows that differ from the held shared version, so a personal model costs
        its dense layers plus the items its device touched, not the whole catalogue."""
        b = len(local)
        for j, i in enumerate(local):
            i = int(i)
            own = self.personal.setdefault(i, {})
            base = self.versions[int(self.held[i])]
            for k, v in params.items():
                arr = v[j] if v.shape[0] == b else v[0]
                arr = arr.detach().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
                if k in ITEM_TABLES:
                    changed = arr != base[k]
                    rows = np.flatnonzero(changed.reshape(len(arr), -1).any(axis=1))
                    own[k] = SparseRows(rows, arr[rows].copy())
                else:
                    own[k] = arr.copy()

    def held_params(self, local: np.ndarray) -> dict[str, torch.Tensor]:
        """Batched params of the models held by ``local`` devices (M = 1 where shared).

        Personal keys beyond the backbone's (a MetaPatch patch) are included; a device
        without one gets zeros, which for a residual patch is the identity."""
        local = np.asarray(local, dtype=np.int64)
        versions = np.unique(self.held[local])
        personal_keys: dict[str, tuple[int, ...]] = {}
        for i in local:
            for k, v in self.personal.get(int(i), {}).items():
                personal_keys.setdefault(k, getattr(v, "shape", None))
        out = {}
        for k in self.spec.shapes():
            if len(versions) == 1 and k not in personal_keys:
                out[k] = torch.from_numpy(self.versions[int(versions[0])][k])[None]
            else:
                out[k] = torch.from_numpy(np.stack([self._param(int(i), k) for i in local]))
        for k in sorted(set(personal_keys) - set(self.spec.shapes())):
            zero = np.zeros(personal_keys[k], dtype=np.float32)
            out[k] = torch.from_numpy(np.stack([self.personal.get(int(i), {}).get(k, zero) for i in local]))
        return out

    def _param(self, i: int, k: str) -> np.ndarray:
        base = self.versions[int(self.held[i])][k]
        own = self.personal.get(i, {}).get(k)
        if own is None:
            return base
        if isinstance(own, SparseRows):
            full = base.copy()
            full[own.rows] = own.values
            return full
        return own

    # Data ----------------------------------------------------------------------

    def train_samples(self, local: np.ndarray, round: int, negatives: int):
        _, t_end = self.timeline.window(round)
        rows = self.builder.recent_rows(local, t_end, self.settings.recent)
        samples = self.builder.build(rows, negatives, stream_key(self.seed, TRAIN_TAG, round))
        win, cand, weight, counts = pad_by_owner(samples, local)
        return torch.from_numpy(win), torch.from_numpy(cand), torch.from_numpy(weight), counts

    def _stream_ends(self, local: np.ndarray, round: int) -> np.ndarray:
        """Per device, the row one past its last interaction before the end of round
        ``round``'s window (what it has seen by then)."""
        _, t_end = self.timeline.window(round)
        indptr, times = self.inter.indptr, self.inter.times
        return np.array([indptr[u] + np.searchsorted(times[indptr[u]:indptr[u + 1]], t_end, side="left")
                         for u in local], dtype=np.int64)

    def last_windows(self, local: np.ndarray, round: int) -> np.ndarray:
        """Each device's last L items before the end of round ``round``'s window (what
        it can upload as its real-time samples), left-padded with PAD."""
        local = np.asarray(local, dtype=np.int64)
        ends = self._stream_ends(local, round)
        return self.builder.windows_before(local, ends) if len(ends) else np.zeros((0, self.spec.window), np.int64)

    def window_samples(self, local: np.ndarray, round: int):
        """``local`` devices' samples of round ``round``'s window, as scored, padded by device."""
        s = self.eval_samples(round)
        sub = s.take(np.flatnonzero(np.isin(s.owner, local)))
        win, cand, weight, counts = pad_by_owner(sub, np.asarray(local, dtype=np.int64))
        return torch.from_numpy(win), torch.from_numpy(cand), torch.from_numpy(weight), counts

    def recent_items(self, local: np.ndarray, round: int, n: int) -> list[np.ndarray]:
        """Each device's last ``n`` items before the end of round ``round``'s window."""
        local = np.asarray(local, dtype=np.int64)
        starts = self.inter.indptr[local]
        return [self.inter.items[max(s, e - n) : e].astype(np.int32)
                for s, e in zip(starts, self._stream_ends(local, round))]

    def eval_samples(self, round: int, scored: bool = False) -> Samples:
        """Positives of round ``round``'s window with 99 negatives each; ``scored``: only
        those of the devices prequential scoring evaluates (``Shard.evaluated``). A
        device's samples do not depend on which others are built with it. Cached (see
        ``EVAL_CACHE_BYTES``): every strategy is scored on exactly the same samples.
        Item ids are int32 here (``pad_by_owner`` and ``score_window`` widen them)."""
        scored = scored and self.evaluated is not None
        key = (round, scored)
        with self._cache_lock:
            cached = self._eval_cache.get(key)
        if cached is None:
            t0, t1 = self.timeline.window(round)
            in_window = (self.inter.times >= t0) & (self.inter.times < t1)
            if scored:
                in_window &= self.evaluated[self.builder.user]
            rows = np.flatnonzero(in_window)
            # int32 item ids: half the memory of a window of a large fleet (~70 instead
            # of ~140 MB per host at 1M devices); users widen a batch at a time
            s = self.builder.build(rows, self.settings.eval_negatives, stream_key(self.seed, EVAL_TAG, round),
                                   np.int32 if self.inter.n_items <= np.iinfo(np.int32).max else np.int64)
            size = lambda x: x.owner.nbytes + x.windows.nbytes + x.candidates.nbytes
            with self._cache_lock:
                while self._eval_cache and sum(map(size, self._eval_cache.values())) + size(s) > EVAL_CACHE_BYTES:
                    del self._eval_cache[next(iter(self._eval_cache))]
                cached = self._eval_cache.setdefault(key, s)
        return cached

    # Work ----------------------------------------------------------------------

    @torch.no_grad()
    def score(self, round: int) -> dict[str, Any]:
        """Prequential scoring of window ``round`` with the model each device holds now
        (the devices ``Shard.evaluated`` names, or all): ``prequential.score_window``,
        taken from a prefetch when a valid one exists."""
        out = self._prefetch.take(round) if self._prefetch else None
        self._drop_unused_versions()
        if out is None:
            out = prequential.score_window(self, round)
        free_heap()
        return out

    def _snapshot(self, local: np.ndarray) -> tuple:
        """What a device function may change for ``local`` devices (shallow: functions
        replace per-device entries, they do not edit arrays in place)."""
        keys = [int(i) for i in local]
        personal = {i: dict(self.personal[i]) for i in keys if i in self.personal}
        kv = {name: {i: d[i] for i in keys if i in d} for name, d in self.kv.items() if not name.startswith("shared:")}
        return self.held[local].copy(), personal, kv

    def _rollback(self, local: np.ndarray, snap: tuple) -> None:
        held, personal, kv = snap
        self.held[local] = held
        for i in (int(i) for i in local):
            if i in personal:
                self.personal[i] = personal[i]
            else:
                self.personal.pop(i, None)
            for name, d in self.kv.items():
                if name.startswith("shared:"):
                    continue
                saved = kv.get(name, {})
                if i in saved:
                    d[i] = saved[i]
                else:
                    d.pop(i, None)

    def run(self, round: int, exchange: int, jobs: list[tuple[DeviceFn, Payload, np.ndarray]]) -> list[JobResult]:
        """Run device functions: each job is (function, shared payload, global device ids).

        An exception fails that job's devices as a code error (their state is rolled
        back); a reply with non-finite values is quarantined (that device's state is
        rolled back, the reply is flagged). Neither stops the other jobs. With ``prefetch``
        the next window's scoring starts in the background as the call returns."""
        self._settle()
        out = []
        for fn, payload, ids in jobs:
            local = np.searchsorted(self.device_ids, ids)
            ctx = DeviceContext(self, local, round, exchange)
            snap = self._snapshot(local)
            try:
                replies = fn(ctx, payload)
                check_replies(fn, payload, replies, ids)
            except (Exception, SystemExit) as exc:  # a device-side bug (sys.exit too): a code error, never a dropout
                self._rollback(local, snap)
                msg = (str(exc).splitlines() or [""])[0]
                out.append(JobResult(np.asarray(ids), None, ctx.flops, np.zeros(len(local)), msg,
                                     type(exc).__name__, traceback.format_exc()))
                continue
            nonfinite = nonfinite_replies(replies)
            diverged = (diverged_replies(replies) | ctx.diverged) & ~nonfinite
            bad = nonfinite | diverged
            if bad.any():
                self._rollback(local[bad], (snap[0][bad], *snap[1:]))
            up = np.array([r.nbytes() for r in replies], dtype=np.float64)
            out.append(JobResult(np.asarray(ids), replies, ctx.flops, up, nonfinite=nonfinite, diverged=diverged))
        free_heap()
        if self._prefetch and 1 <= round < self.timeline.n_rounds:
            self._prefetch.start(round + 1)
        return out

    def memory_bytes(self) -> int:
        """Bytes held in device state (shared versions + personal parameters)."""
        n = sum(models.num_bytes(v) for v in self.versions.values())
        return n + sum(v.nbytes for own in self.personal.values() for v in own.values())
