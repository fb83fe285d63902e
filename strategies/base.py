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

Evaluation halves are no-ops by default (every device is scored prequentially by the
grid); a strategy that wants Flower's federated evaluation overrides them.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from devices.runtime import DeviceApp

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

    def device_config(self, server_round: int, **extra: Any) -> ConfigRecord:
        """A message config: ``server-round``, then ``extra``, then ``local-steps`` and
        ``lr`` when the strategy sets them (else devices use ``[device]``)."""
        cfg: dict[str, Any] = {"server-round": server_round, **extra}
        if self.local_steps is not None:
            cfg["local-steps"] = self.local_steps
        if self.lr is not None:
            cfg["lr"] = self.lr
        return ConfigRecord(cfg)


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
