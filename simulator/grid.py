"""``FleetGrid``: Flower's ``Grid`` interface over the host pool and the simulated clock.

Node id = stable device id. ``get_node_ids()`` lists the devices online at the current
simulated time; ``send_and_receive`` groups messages by host (one Ray call per host per
exchange, a record shared by many messages shipped once per host) and answers with Flower
``Message`` replies, error replies for devices that dropped out, were offline, missed the
deadline, whose device function raised (a code error) or whose reply held NaN/Inf
(quarantined: never handed to the strategy).

Code errors are not dropouts. With ``on_device_error = "stop"`` (the default) the round
in which one happens is written and ``DeviceCodeError`` ends the strategy; with
``"record"`` they are counted (``errors`` in the round, status ``error``) and the run goes
on. A round in which every computed reply was quarantined raises ``NonFiniteError``.

Rounds follow the prequential protocol: when round r begins (the window of round r has
closed) every device with interactions in that window is scored with the model it holds,
then the strategy's exchanges of round r run. The round advances when the strategy's
``evaluate_fn`` hook is called (``FleetGrid.round_hook``) or when a message's config says
``server-round`` is larger than the current round.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator
from uuid import uuid4

import numpy as np
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from devices import profiles as prof
from devices.scoring import DEVICE_METRICS
from devices.pool import HostPool
from devices.runtime import DeviceApp, Payload
from simulator import metrics
from simulator.clock import SimClock
from simulator.errors import DeviceCodeError, FleetsimError, NonFiniteError
from simulator.fleet import Fleet
from simulator.records import to_payload, to_recorddict

STATUSES = ("idle", "ok", "dropped", "late", "quarantined", "error")  # a worse status has a higher code
IDLE, OK, DROPPED, LATE, QUARANTINED, ERROR = range(6)
# rounds.parquet column of each status count ("error" devices are counted as ``errors``)
STATUS_COUNTS = {OK: "ok", DROPPED: "dropped", LATE: "late", QUARANTINED: "quarantined", ERROR: "errors"}
ERR_DROPPED, ERR_LATE, ERR_CODE, ERR_OFFLINE, ERR_NONFINITE = 1001, 1002, 1003, 1004, 1005
ON_DEVICE_ERROR = ("stop", "record")
MAX_WAITS = 2000


@dataclass
class CodeError:
    """One device function call that raised (all devices of the call share it)."""

    round: int
    message_type: str
    devices: int
    error_type: str
    message: str
    traceback: str
    device_ids: tuple[int, ...] = ()  # the call's first few devices (the call raised for all of them)


@dataclass
class RoundResult:
    """Everything one round produced: per-device rows, fleet-level facts, pooled scores."""

    round: int
    devices: dict[str, np.ndarray]
    info: dict[str, float]
    histogram: metrics.ScoreHistogram = field(repr=False, default_factory=metrics.ScoreHistogram)


class FleetGrid(Grid):
    """A Flower ``Grid`` whose nodes are simulated devices held by Ray hosts."""

    def __init__(
        self,
        fleet: Fleet,
        pool: HostPool,
        device_app: DeviceApp,
        *,
        seed: int,
        deadline_s: float,
        wait_s: float = 300.0,
        run_id: int = 1,
        on_round: Callable[[RoundResult], None] | None = None,
        on_device_error: str = "stop",
        on_code_error: Callable[[CodeError], None] | None = None,
    ) -> None:
        if on_device_error not in ON_DEVICE_ERROR:
            raise ValueError(f"on_device_error must be one of {ON_DEVICE_ERROR}, got {on_device_error!r}")
        self.on_device_error, self.on_code_error = on_device_error, on_code_error
        self.fleet, self.pool, self.app = fleet, pool, device_app
        spec = getattr(pool, "spec", None)
        self._shapes = {} if spec is None else {k: tuple(v) for k, v in spec.shapes().items()}
        self.profiles = fleet.profiles
        self.seed, self.deadline_s, self.wait_s = seed, deadline_s, wait_s
        self.on_round = on_round
        self._run = Run.create_empty(run_id)
        self.clock = SimClock(0.0)
        self.round = self.wait_step = self._most_online = self.replies_idle = 0  # (also for a checkpoint without them)
        self._finished = 0
        self._pending: dict[str, Message] = {}
        self.results: list[RoundResult] = []
        self.online = np.zeros(fleet.n_devices, dtype=bool)

    # Flower Grid interface ------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        if self.round == 0:
            self.begin_round(1)
        return np.flatnonzero(self.online).tolist()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        msgs = [self._pending.pop(i) for i in message_ids if i in self._pending]
        return self._exchange(msgs) if msgs else []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # ``timeout`` is wall time in Flower; here time is simulated and the round
        # deadline plays that role, so it is ignored.
        return self.pull_messages(self.push_messages(messages))

    # Rounds ----------------------------------------------------------------------

    def round_hook(self, server_round: int, arrays) -> MetricRecord | None:
        """``evaluate_fn`` for ``Strategy.start``: closes round ``server_round`` and, if
        another round follows, opens it (its window is scored before its exchanges)."""
        self.finish_round()
        if server_round + 1 <= self.fleet.timeline.n_rounds:
            res = self.begin_round(server_round + 1)
            return MetricRecord({"window": server_round + 1, **res})
        return None

    def begin_round(self, r: int) -> dict[str, float]:
        """Open round ``r``: move the clock to the end of its window, draw who is online,
        score every device active in the window with the model it holds."""
        if r <= self.round:
            return {}
        if r > self.fleet.timeline.n_rounds:
            raise FleetsimError(f"the strategy asked for round {r} but the fleet has {self.fleet.timeline.n_rounds}")
        self.finish_round()
        self.round, self.exchange, self.wait_step, self._most_online = r, 0, 0, 0
        self.clock.set(self.fleet.timeline.window(r)[1])
        self.round_start = self.clock.t
        self._draw_online()
        n = self.fleet.n_devices
        self.selected = np.zeros(n, dtype=bool)
        self.status = np.zeros(n, dtype=np.int8)
        self.bytes_down = np.zeros(n)
        self.bytes_up = np.zeros(n)
        self.flops = np.zeros(n)
        self.seconds = np.zeros(n)
        self.online_at_start = self.online.copy()
        self.replies_finite = self.replies_quarantined = self.replies_idle = 0
        parts = self.pool.score(r)
        self.scored = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "histogram"}
        self.histogram = metrics.ScoreHistogram()
        for p in parts:
            self.histogram = self.histogram.merge(p["histogram"])
        auc = self.scored["auc"]
        return {"uauc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
                "auc": float(self.histogram.auc()), "active": int(len(auc))}

    def finish_round(self) -> None:
        """Close the current round: hand its records to ``on_round``."""
        if self.round == 0 or self._finished == self.round:
            return
        self._finished = self.round
        sc = self.scored
        # rows: every scored or selected device, by id; ``at``: its row in ``sc`` (-1: not
        # scored). Masks over the fleet, not sorts: O(fleet) passes of a few ms at 1M devices.
        at = np.full(self.fleet.n_devices, -1, dtype=np.int64)
        at[sc["device_id"]] = np.arange(len(sc["device_id"]))
        ids = np.flatnonzero((at >= 0) | self.selected)
        at = at[ids]
        found = at >= 0
        pos = at[found]
        cols: dict[str, np.ndarray] = {
            "round": np.full(len(ids), self.round, dtype=np.int32),
            "device_id": ids,
            "online": self.online_at_start[ids],
            "selected": self.selected[ids],
            "status": np.array(STATUSES, dtype=object)[self.status[ids]],
        }
        for k in DEVICE_METRICS:
            v = np.full(len(ids), np.nan)
            v[found] = sc[k][pos]
            cols[k] = v
        for k in ("n_pos", "n_neg"):
            v = np.zeros(len(ids), dtype=np.int64)
            v[found] = sc[k][pos]
            cols[k] = v
        nonfinite = np.zeros(len(ids), dtype=bool)
        nonfinite[found] = sc["nonfinite"][pos]
        cols["nonfinite"] = nonfinite
        cols.update(bytes_down=self.bytes_down[ids].astype(np.int64), bytes_up=self.bytes_up[ids].astype(np.int64),
                    device_flops=self.flops[ids], device_seconds=self.seconds[ids],
                    bucket=self.fleet.buckets[ids])
        st = self.status[self.selected]
        info = {
            "round": self.round, "t_start": self.round_start, "latency_s": self.clock.t - self.round_start,
            "online": int(self.online_at_start.sum()), "active": int(len(self.scored["device_id"])),
            "selected": int(self.selected.sum()), "exchanges": self.exchange,
            **{name: int((st == code).sum()) for code, name in STATUS_COUNTS.items()},
            "nonfinite_scores": int(sc["nonfinite"].sum()),
            "host_restarts": int(self.pool.take_restarts(self.round)),
        }
        result = RoundResult(self.round, cols, info, self.histogram)
        self.results.append(result)
        if self.on_round:
            self.on_round(result)
        if self.replies_quarantined and not self.replies_finite:
            raise all_quarantined(self.round, self.replies_quarantined, self.replies_idle)

    def _draw_online(self) -> None:
        tl = self.fleet.timeline
        self.online = prof.draw_online(self.profiles, self.clock.t, self.seed, self.round,
                                       step=self.wait_step, start_clock=tl.start_clock)

    def wait(self, _wall_seconds: float = 1.0) -> None:
        """What Flower's "waiting for nodes" means here: simulated time passes and
        availability is drawn again (never a wall-clock sleep)."""
        self.wait_step += 1
        self._most_online = max(self._most_online, int(self.online.sum()))
        if self.wait_step > MAX_WAITS:
            raise FleetsimError(
                f"round {self.round}: the strategy waits for more devices than are ever online (at most "
                f"{self._most_online} of {self.fleet.n_devices} in {MAX_WAITS} draws of who is online)")
        self.clock.advance(self.wait_s)
        self._draw_online()

    # One exchange ------------------------------------------------------------------

    def _exchange(self, msgs: list[Message]) -> list[Message]:
        cfg_round = message_round(msgs, self.round)
        if cfg_round > self.round:
            self.begin_round(cfg_round)
        if self.round == 0:
            self.begin_round(1)
        self.exchange += 1
        dst = np.array([m.metadata.dst_node_id for m in msgs], dtype=np.int64)
        if dst.size and (dst.min() < 0 or dst.max() >= self.fleet.n_devices):
            raise FleetsimError(f"message to unknown node {int(dst[(dst < 0) | (dst >= self.fleet.n_devices)][0])}")
        payloads: dict[int, Payload] = {}
        decoded: dict[int, dict] = {}  # ArrayRecords shared across contents, decoded once
        for m in msgs:
            if id(m.content) not in payloads:
                payloads[id(m.content)] = to_payload(m.content, decoded)
        check_sent(payloads.values(), self._shapes, self.round)
        failed_draw = prof.draw_failures(self.profiles, self.seed, self.round, self.exchange)
        offline = ~self.online[dst]
        dropped = failed_draw[dst] | offline
        self.selected[dst] = True

        down = np.zeros(len(msgs))
        jobs: dict[tuple[int, int, str], list[int]] = {}
        for i, m in enumerate(msgs):
            key = id(m.content)
            if not dropped[i]:
                down[i] = payloads[key].nbytes()
                jobs.setdefault((int(self.pool.host_of[dst[i]]), key, m.metadata.message_type), []).append(i)

        per_host: list[list] = [[] for _ in range(self.pool.n_hosts)]
        per_host_idx: list[list[list[int]]] = [[] for _ in range(self.pool.n_hosts)]
        unrouted: dict[int, str] = {}
        code_errors: list[CodeError] = []
        for (h, key, mtype), idx in jobs.items():
            try:
                fn = self.app.function_for(mtype)
            except LookupError as exc:
                why = str(exc)
                unrouted.update({i: why for i in idx})
                code_errors.append(CodeError(self.round, mtype, len(idx), "LookupError", why, "",
                                             tuple(int(d) for d in sorted(dst[idx])[:3])))
                continue
            idx = sorted(idx, key=lambda i: dst[i])
            per_host[h].append((fn, payloads[key], dst[idx]))
            per_host_idx[h].append(idx)
        ordered = [idx for host_jobs in per_host_idx for idx in host_jobs]  # pool.run's order
        types = [msgs[idx[0]].metadata.message_type for host_jobs in per_host_idx for idx in host_jobs]
        results = self.pool.run(self.round, self.exchange, per_host)

        reply_payload: list[Payload | None] = [None] * len(msgs)
        error: dict[int, tuple[int, str]] = {i: (ERR_CODE, f"code error: {r}") for i, r in unrouted.items()}
        quarantined = np.zeros(len(msgs), dtype=bool)
        diverged = np.zeros(len(msgs), dtype=bool)
        flops, up = np.zeros(len(msgs)), np.zeros(len(msgs))
        for idx, res, mtype in zip(ordered, results, types):
            idx = np.asarray(idx)
            flops[idx] = res.flops
            up[idx] = res.bytes_up
            if res.replies is None:
                code_errors.append(CodeError(self.round, mtype, len(idx), res.error_type, res.error, res.traceback,
                                             tuple(int(d) for d in dst[idx[:3]])))
                for i in idx:
                    error[int(i)] = (ERR_CODE, f"code error: {res.error_type}: {res.error}")
                continue
            if res.nonfinite.any() or res.diverged.any():
                quarantined[idx[res.nonfinite | res.diverged]] = True
                diverged[idx[res.diverged]] = True
            for j, i in enumerate(idx):
                reply_payload[int(i)] = res.replies[j]

        live = ~dropped
        timing = SimClock.exchange(self.profiles.subset(dst[live]), down[live], up[live], flops[live], self.deadline_s)
        seconds = np.zeros(len(msgs))
        seconds[live] = timing.seconds
        late = np.zeros(len(msgs), dtype=bool)
        late[live] = timing.late

        status = np.full(len(msgs), OK, dtype=np.int8)
        status[dropped] = DROPPED
        status[late] = LATE
        status[quarantined] = QUARANTINED
        for i in error:
            status[i] = ERROR
        # a usable reply: computed, not quarantined, and -- among the messages of one content whose
        # device function counts FLOPs (some reply of it did) -- from a device that did work: one with no
        # example to train on returns its model unchanged, which proves nothing. Per content, so a
        # message that asks for no work (MoMoDistill's pushes beside its trainers) is never "idle".
        ran = np.array([p is not None for p in reply_payload], dtype=bool)
        content = np.array([id(m.content) for m in msgs], dtype=np.int64)
        counted = np.isin(content, content[ran & (flops > 0)])
        usable = ran & ~quarantined & (~counted | (flops > 0))
        self.replies_quarantined += int(quarantined.sum())
        self.replies_finite += int(usable.sum())
        self.replies_idle += int((ran & ~quarantined & ~usable).sum())
        np.maximum.at(self.status, dst, status)
        np.add.at(self.bytes_down, dst, down)
        np.add.at(self.bytes_up, dst, np.where(live, up, 0))
        np.add.at(self.flops, dst, np.where(live, flops, 0))
        np.add.at(self.seconds, dst, seconds)
        self.clock.advance(timing.latency)

        replies = []
        for i, m in enumerate(msgs):
            if status[i] == OK:
                replies.append(Message(to_recorddict(reply_payload[i]), reply_to=m))
            elif status[i] == ERROR:
                code, reason = error[i]
                replies.append(Message(Error(code=code, reason=reason), reply_to=m))
            elif status[i] == QUARANTINED:
                reason = "diverged update (train_loss above 100 x ln 2)" if diverged[i] else "non-finite update"
                replies.append(Message(Error(code=ERR_NONFINITE, reason=reason), reply_to=m))
            elif status[i] == LATE:
                replies.append(Message(Error(code=ERR_LATE, reason=f"late: {seconds[i]:.0f} s > deadline {self.deadline_s:.0f} s"), reply_to=m))
            elif offline[i]:
                replies.append(Message(Error(code=ERR_OFFLINE, reason="offline"), reply_to=m))
            else:
                replies.append(Message(Error(code=ERR_DROPPED, reason="dropped out"), reply_to=m))
        nothing = not usable.any()  # and something failed: stop before the strategy aggregates nothing
        for ce in code_errors:  # "record" that stops here reports the error as its failure instead
            if self.on_code_error and not (self.on_device_error == "record" and nothing):
                self.on_code_error(ce)
        if code_errors and (self.on_device_error == "stop" or nothing):
            try:
                self.finish_round()  # the round's records so far, errors included, are kept
            except NonFiniteError:
                pass  # the code error is the one reported
            note = "" if self.on_device_error == "stop" else (
                "; no device of the exchange replied usably, so the strategy would aggregate nothing "
                "(on_device_error = \"record\" goes on only while some device succeeds)")
            raise DeviceCodeError(code_errors[0], devices=sum(c.devices for c in code_errors), note=note)
        n_quarantined = int(quarantined.sum())
        if n_quarantined and nothing:
            self.finish_round()  # raises it if no earlier exchange of the round had a usable reply
            raise all_quarantined(self.round, n_quarantined, idle=int((ran & ~quarantined).sum()))
        return replies


def check_sent(payloads: Iterable[Payload], shapes: dict[str, tuple[int, ...]], round: int) -> None:
    """Raise ``NonFiniteError`` if an array (or a float config value) the strategy sends holds NaN/Inf: a model
    that is not a number must stop the strategy where it was made (its aggregation or
    configure step), not reach devices that would score with it. An array named like a
    parameter of the devices' model (``shapes``, from ``ModelSpec.shapes``) with another shape is a
    ``ValueError`` of the strategy for the same reason. Each array shared by many
    messages is checked once. FleetGrid and ``simulator.flower_app`` (Flower's engine) both
    check what a strategy sends with it."""
    seen: set[int] = set()
    bad: list[str] = []
    for p in payloads:
        for rec, arrays in p.arrays.items():
            if id(arrays) in seen:
                continue
            seen.add(id(arrays))
            for k, a in arrays.items():  # a model parameter of another shape: the device would be blamed
                if k in shapes and a.shape != shapes[k]:
                    raise ValueError(f"round {round}: the strategy sends {rec}/{k} of shape {a.shape}, but "
                                     f"the devices' model has {k} of shape {shapes[k]} (made by its "
                                     f"configure or aggregate step, before any device ran)")
            bad += [f"{rec}/{k}" for k, a in arrays.items()
                    if a.dtype.kind in "fc" and not np.isfinite(a).all() and f"{rec}/{k}" not in bad]
        for rec, values in p.configs.items():  # an lr of NaN is a NaN model one step later
            bad += [f"{rec}/{k}" for k, v in values.items()
                    if isinstance(v, float) and not math.isfinite(v) and f"{rec}/{k}" not in bad]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError("the strategy's server side", "its aggregate_train / configure_train (or its server lr)",
                             f"round {round}: what it sends to devices holds NaN/Inf "
                             f"({', '.join(bad[:3])}{more})", round=round)


def all_quarantined(round: int, n: int, idle: int = 0) -> NonFiniteError:
    """The failure of a round in which every computed device reply was quarantined, or
    ``idle`` other replies came from devices that did no work (no example to train on)."""
    if idle:
        what = (f"every reply with work behind it was non-finite or diverged ({n} quarantined; the {idle} other "
                f"repl{'ies' if idle > 1 else 'y'} came from devices that did no work, such as having no example "
                f"to train on), none aggregated")
    else:
        what = f"every device reply was non-finite or diverged ({n} quarantined, none aggregated)"
    return NonFiniteError("device training", "device.lr (or the strategy's lr / local_steps)",
                          f"round {round}: {what}", round=round)


def message_round(msgs: list[Message], current: int) -> int:
    """The round ``msgs`` are sent in: the ``server-round`` of their configs, which every
    message carries (docs/extending.md); ``current`` if there are none. A message without
    one, messages of different rounds in one exchange, or of a round before ``current``, are
    a ``ValueError`` of the strategy: FleetGrid could guess the round, but a device on
    Flower's engine could not."""
    rounds: set[int] = set()
    for m in msgs:
        r = server_round(m)
        if r is None:
            raise ValueError(f"round {max(current, 1)}: the strategy sent a {m.metadata.message_type!r} message to "
                             f"device {m.metadata.dst_node_id} without 'server-round' in its config; every message "
                             f"carries the round it is sent in (Flower's strategies set config['server-round'] = "
                             f"server_round in configure_train)")
        rounds.add(r)
    if len(rounds) > 1:
        raise ValueError(f"round {max(current, 1)}: the strategy sent messages of rounds {sorted(rounds)} in one "
                         f"exchange (their config's 'server-round'); a message carries the round it is sent in")
    r = rounds.pop() if rounds else current
    if r < current:  # a device would take an earlier round's data
        raise ValueError(f"round {current}: the strategy sent messages of round {r} (their config's "
                         f"'server-round'); a message carries the round it is sent in")
    return r


def server_round(m: Message) -> int | None:
    for rec in m.content.config_records.values():
        if "server-round" in rec:
            return int(rec["server-round"])
    return None


@contextmanager
def flower_patched(grid: FleetGrid, seed: int) -> Iterator[None]:
    """Run Flower strategies on the simulated clock with reproducible node sampling.

    Flower's ``sample_nodes`` sleeps one wall second per retry and samples with the
    global ``random``; for the duration of a run it gets a seeded ``random.Random`` and a
    ``sleep`` that advances simulated time instead.
    """
    import flwr.serverapp.strategy.strategy_utils as su
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (su.random, su.sleep, TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    su.random = random.Random(seed)
    su.sleep = grid.wait
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = grid.run.run_id, SUPERLINK_NODE_ID, 1
    try:
        yield
    finally:
        su.random, su.sleep = saved[0], saved[1]
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved[2:]
