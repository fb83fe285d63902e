"""The strategy contract: what a fleetsim strategy is, written down once.

A strategy is a real Flower strategy (``flwr.serverapp.strategy.Strategy``, Message API)
plus a device half. ``FleetStrategy`` (or ``FleetMixin`` on top of one of Flower's own
strategies, as ``strategies.fedavg`` does) gives it the parts every strategy shares:

1. **Device half.** ``device_app``: a ``devices.runtime.DeviceApp`` mapping message types
   to device functions ``fn(ctx, payload) -> list[Payload]``, each doing the work of a
   *batch* of devices on one host (``ctx.device_ids``) and returning one reply per device.
   A message type ``"train.x"`` falls back to ``"train"``, as Flower's ClientApp routes.
2. **Cloud preparation.** ``prepare(cloud)`` runs before round 1 with a
   ``strategies.cloud.CloudContext`` (history data, the installed cloud model, the model
   spec, the seed). The default does nothing; DUET trains its generator there.
3. **Rounds.** ``start()`` is Flower's own (or the strategy's). The grid opens round *r*
   -- moves the clock to the end of its window and scores every active device with the
   model it holds (prequential evaluation) -- when the ``evaluate_fn`` hook of round
   *r - 1* is called, or when a message's config carries ``server-round`` = *r*. Put
   ``server-round`` into every message's config (``device_config`` does).
4. **Replies.** Dropped, offline and late devices, code errors and quarantined (NaN/Inf or
   diverged) updates come back as Flower error replies; aggregation skips replies with
   ``has_error()``. What a strategy's ``aggregate_train`` returns as metrics is saved per
   round in ``summary.json`` (``strategy_metrics``).
5. **Device settings.** ``lr`` and ``local_steps``, when a strategy sets them, are sent
   as ``lr`` / ``local-steps`` in the config (``device_config``); otherwise devices use
   the experiment's ``[device]`` section.
6. **Name and colour.** ``class X(FleetStrategy, short_name="x", colour="#rrggbb")``
   registers a built-in strategy under its short name, with the colour it keeps in every
   report figure (``strategies.registry``). A strategy of one's own needs neither: it is
   named by import path ``package.module:Class``.

7. **State, for checkpoints.** ``state()`` returns the server state a checkpoint saves and
   ``restore(state, cloud)`` puts it back, so a killed run continues exactly where its last
   checkpoint left it (``experiment.checkpoint_every``). By default the state is every
   attribute of the strategy (its arrays, generator, Theta, versions, ...), pickled, except
   the ``CloudContext`` (re-linked on restore) and the attributes named in
   ``transient_state``: caches derived from the cloud data that ``rebuild(cloud)`` makes
   again. A strategy that keeps something unpicklable overrides the three.
8. **Resumable rounds.** ``start(..., first_round=k, result=r)`` is Flower's round loop
   (the same calls in the same order) begun at round *k* with ``initial_arrays`` the
   arrays after round *k - 1* and ``r`` the ``Result`` so far. The run passes its own
   ``Result`` so that a checkpoint holds the metrics of the rounds before it. A strategy
   that overrides ``start`` (DUET) accepts both keywords; a plain Flower strategy without
   ``FleetMixin`` still runs, but a resumed run plays it again from round 1.
9. **Model check.** ``check_model(spec)`` is called when the config is validated, before
   anything is written; a strategy that needs something of the model (DUET generating
   DIN's attention) raises ``ConfigError`` there. The default accepts every model.

Evaluation halves are no-ops by default (every device is scored prequentially by the
grid); a strategy that wants Flower's federated evaluation overrides them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from devices.runtime import DeviceApp
from strategies.cloud import CloudContext

REGISTERED: dict[str, type] = {}  # short name -> class, in the order the classes were defined
COLOURS: dict[str, str] = {}


class FleetMixin:
    """The fleetsim parts of a strategy; combine with a Flower ``Strategy``."""

    device_app: ClassVar[DeviceApp] = DeviceApp({})
    short_name: ClassVar[str | None] = None
    lr: float | None = None
    local_steps: int | None = None

    def __init_subclass__(cls, short_name: str | None = None, colour: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if short_name is not None:
            if short_name in REGISTERED and REGISTERED[short_name].__qualname__ != cls.__qualname__:
                raise TypeError(f"strategy short name {short_name!r} is taken by {REGISTERED[short_name].__qualname__}")
            cls.short_name = short_name
            REGISTERED[short_name] = cls
            if colour is not None:
                COLOURS[short_name] = colour

    def prepare(self, cloud: Any) -> None:
        """Cloud-side work before round 1 (nothing by default)."""

    def check_model(self, spec: Any) -> None:
        """Raise ``ConfigError`` if the strategy cannot run on ``spec`` (a ``ModelSpec``)."""

    # -- checkpoints: the state contract ------------------------------------------------

    transient_state: ClassVar[tuple[str, ...]] = ()  # attributes ``rebuild(cloud)`` derives again

    def state(self) -> dict[str, Any]:
        """The server state a checkpoint saves (picklable): every attribute but the
        ``CloudContext`` and ``transient_state``."""
        attrs = vars(self)
        cloud = sorted(k for k, v in attrs.items() if isinstance(v, CloudContext))
        skip = set(cloud) | set(self.transient_state)
        return {"attrs": {k: v for k, v in attrs.items() if k not in skip}, "cloud_attrs": cloud}

    def restore(self, state: dict[str, Any], cloud: Any) -> None:
        """Put back what ``state()`` returned; re-link ``cloud``; ``rebuild(cloud)``."""
        vars(self).update(state["attrs"])
        for k in state["cloud_attrs"]:
            setattr(self, k, cloud)
        self.rebuild(cloud)

    def rebuild(self, cloud: Any) -> None:
        """Make the ``transient_state`` caches again after ``restore`` (nothing by default)."""

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *,
              first_round: int = 1, result: Result | None = None) -> Result:
        """Flower's ``Strategy.start`` round loop (same calls, same order, without its log
        lines), begun at ``first_round``; fills and returns ``result`` (a new one if None)."""
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result() if result is None else result
        if evaluate_fn:
            res = evaluate_fn(first_round - 1, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[first_round - 1] = res
        arrays = initial_arrays
        for rnd in range(first_round, num_rounds + 1):
            replies = grid.send_and_receive(messages=self.configure_train(rnd, arrays, train_config, grid),
                                            timeout=timeout)
            agg_arrays, agg_metrics = _aggregated(self.aggregate_train(rnd, replies))
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[rnd] = agg_metrics
            replies = grid.send_and_receive(messages=self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                                            timeout=timeout)
            agg_eval = self.aggregate_evaluate(rnd, replies)
            if agg_eval is not None and not isinstance(agg_eval, MetricRecord):
                raise TypeError(f"aggregate_evaluate returned {type(agg_eval).__name__}; it returns a MetricRecord or None")
            if agg_eval is not None:
                result.evaluate_metrics_clientapp[rnd] = agg_eval
            if evaluate_fn:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
        return result

    def device_config(self, server_round: int, **extra: Any) -> ConfigRecord:
        """A message config: ``server-round``, then ``extra``, then ``local-steps`` and
        ``lr`` when the strategy sets them (else devices use ``[device]``)."""
        cfg: dict[str, Any] = {"server-round": server_round, **extra}
        if self.local_steps is not None:
            cfg["local-steps"] = self.local_steps
        if self.lr is not None:
            cfg["lr"] = self.lr
        return ConfigRecord(cfg)


def _aggregated(out: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """What ``aggregate_train`` returned, checked as Flower's loop would use it: a wrong
    type is named here, not where it breaks later (a message of the next round)."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (ArrayRecord, type(None)))
            and isinstance(out[1], (MetricRecord, type(None)))):  # Flower's loop unpacks a list as well
        got = type(out).__name__ if not isinstance(out, (tuple, list)) else \
            f"({', '.join(type(x).__name__ for x in out)})"
        raise TypeError(f"aggregate_train returned {got}; it returns (ArrayRecord or None, MetricRecord or None)")
    return out


class FleetStrategy(FleetMixin, Strategy):
    """A Flower ``Strategy`` with fleetsim's contract; implement ``configure_train`` and
    ``aggregate_train`` (evaluation halves and ``summary`` are no-ops)."""

    def summary(self) -> None:
        pass

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
