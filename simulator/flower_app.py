"""Run a fleetsim strategy on Flower's own simulation engine (``run_simulation``).

The same strategy object and the same device functions run unchanged: a ``ClientApp``
wrapper maps each Flower node to a fleetsim device (``partition-id`` = device id) and
runs the strategy's device function for that one device on a process-local
``DeviceHost`` built from the experiment config. Flower's engine keeps no per-device
state between messages unless it lives in that process, so this path is the reference
for cross-checks and speed comparisons, not for stateful strategies at scale.

No failure passes silently here either. Flower's engine turns an exception in a
``ClientApp`` into an error reply, which fleetsim's strategies skip as they skip a device
that dropped out, so without a check a device function that always raises would end in a
``Result`` with an empty model. The strategy therefore talks to Flower's grid through
``CheckedGrid``, which applies FleetGrid's rules with its default ``on_device_error =
"stop"``:

- what the strategy sends is checked before any device runs (``grid.check_sent``: NaN/Inf,
  a model parameter of another shape);
- a device function that raised, or any other error reply, ends the run with
  ``DeviceCodeError`` naming the device and the error;
- a reply with NaN/Inf or a diverged loss is quarantined: the device's state is rolled
  back and the strategy sees an error reply, as on FleetGrid; a round in which every reply
  was quarantined ends the run with ``NonFiniteError``;
- a message without a reply (Flower's ``timeout``) ends the run too: in a simulation a
  missing reply is a lost process, not a slow phone.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from devices.host import DeviceHost
from devices.pool import shard_of
from devices.runtime import DeviceApp
from simulator.errors import DeviceCodeError
from simulator.grid import ERR_CODE, ERR_NONFINITE, CodeError, all_quarantined, check_sent, message_round
from simulator.records import array_record, to_payload, to_recorddict

_HOSTS: dict[int, DeviceHost] = {}  # one whole-fleet host per process, per experiment


def _host(cfg, initial: dict[str, np.ndarray], key: int) -> DeviceHost:
    if key not in _HOSTS:
        from simulator.fleet import build_fleet

        fleet = build_fleet(cfg)
        spec = cfg.model.spec(fleet.interactions.n_items)
        shard = shard_of(fleet.interactions, fleet.timeline, np.arange(fleet.n_devices))
        host = DeviceHost(shard, spec, cfg.device, cfg.experiment.seed)
        host.reset(initial)
        _HOSTS[key] = host
    return _HOSTS[key]


def make_client_app(cfg, device_app: DeviceApp, initial: dict[str, np.ndarray]) -> ClientApp:
    """A Flower ``ClientApp`` whose nodes run ``device_app`` for device ``partition-id``."""
    key = int.from_bytes(os.urandom(6), "little")
    app = ClientApp()

    def handle(msg: Message, context: Context) -> Message:
        device = int(context.node_config["partition-id"])
        host = _host(cfg, initial, key)
        payload = to_payload(msg.content)
        rnd = payload.config().get("server-round")
        try:
            if rnd is None:  # CheckedGrid refuses to send such a message (``grid.message_round``)
                raise ValueError("the message's config has no 'server-round'")
            fn = device_app.function_for(msg.metadata.message_type)
        except (LookupError, ValueError) as exc:
            return Message(Error(code=ERR_CODE, reason=f"device {device}: {type(exc).__name__}: {exc}"), reply_to=msg)
        (res,) = host.run(int(rnd), 1, [(fn, payload, np.array([device]))])
        # an error reply of fleetsim's codes (FleetGrid's), which CheckedGrid reads: a ClientApp that raised
        # would make Flower log an error and a traceback for every quarantined reply
        if res.replies is None:
            return Message(Error(code=ERR_CODE, reason=f"device {device}: {res.error_type}: {res.error}"), reply_to=msg)
        if res.nonfinite[0] or res.diverged[0]:  # rolled back by host.run, as on FleetGrid
            why = "non-finite update" if res.nonfinite[0] else "diverged update (train_loss above 100 x ln 2)"
            return Message(Error(code=ERR_NONFINITE, reason=f"device {device}: {why}"), reply_to=msg)
        return Message(to_recorddict(res.replies[0]), reply_to=msg)

    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    return app


class CheckedGrid(Grid):
    """Flower's grid, with FleetGrid's checks of what a strategy sends and gets back (the
    module's docstring). ``shapes``: the devices' model parameters (``ModelSpec.shapes``).
    Strategies exchange through ``send_and_receive``; ``push_messages`` and
    ``pull_messages`` pass through unchecked."""

    def __init__(self, grid: Grid, shapes: dict[str, tuple[int, ...]]) -> None:
        self.grid, self.shapes = grid, shapes
        self.round = 0  # the latest round a message was sent in

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        self.round = rnd = message_round(messages, self.round)
        decoded: dict[int, dict] = {}  # ArrayRecords shared across contents, decoded once
        contents = {id(m.content): m.content for m in messages}  # a content shared by many messages, checked once
        check_sent([to_payload(c, decoded) for c in contents.values()], self.shapes, rnd)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if len(replies) < len(messages):
            raise RuntimeError(f"round {rnd}: {len(messages) - len(replies)} of {len(messages)} messages got no "
                               f"reply from Flower's engine within timeout={timeout} (a lost process?)")
        quarantined = 0
        for r in replies:
            if not r.has_error():
                continue
            if r.error.code == ERR_NONFINITE:
                quarantined += 1
                continue
            raise DeviceCodeError(_code_error(rnd, r.metadata.message_type, r.error, r.metadata.src_node_id), devices=1)
        if quarantined and quarantined == len(replies):
            raise all_quarantined(rnd, quarantined)
        return replies


def _code_error(rnd: int, message_type: str, error: Error, node: int) -> CodeError:
    """A device function's error (``ERR_CODE``, "device 3: ValueError: boom", as
    ``make_client_app`` replies it), or another error reply of Flower's (a ClientApp that
    it could not load or run) with its code, its reason's last line and the node."""
    found = re.match(r"device (\d+): (\w+): (.*)", error.reason, re.S) if error.code == ERR_CODE else None
    if found is None:
        # Flower's reason is a colored traceback: its last line says what was raised
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", error.reason).splitlines() if ln.strip()]
        reason = (lines[-1] if lines else "")[:300]
        return CodeError(rnd, message_type, 1, "error reply", f"Flower's error code {error.code}: {reason} (node {node})", "")
    device, error_type, message = found.groups()
    return CodeError(rnd, message_type, 1, error_type, message, "", (int(device),))


def make_server_app(strategy, initial: dict[str, np.ndarray], num_rounds: int, sink: dict[str, Any],
                    shapes: dict[str, tuple[int, ...]] | None = None) -> ServerApp:
    """A Flower ``ServerApp`` that runs ``strategy.start`` on a ``CheckedGrid``; the
    ``Result`` lands in ``sink``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink["result"] = strategy.start(grid=CheckedGrid(grid, shapes or {}), initial_arrays=array_record(initial),
                                        num_rounds=num_rounds)

    return app


def run_on_flower(cfg, strategy, initial: dict[str, np.ndarray] | ArrayRecord, num_rounds: int,
                  num_cpus_per_client: float = 1.0):
    """Run ``strategy`` on Flower's ``run_simulation`` over every device of ``cfg``'s fleet
    (``simulator.config.load``), from the model ``initial`` (numpy arrays by parameter
    name, as ``FleetRun.initial``, or an ``ArrayRecord`` of them)."""
    from flwr.simulation import run_simulation

    from simulator.fleet import build_fleet

    if isinstance(initial, ArrayRecord):
        initial = {k: v.numpy() for k, v in initial.items()}

    fleet = build_fleet(cfg)
    shapes = {k: tuple(v) for k, v in cfg.model.spec(fleet.interactions.n_items).shapes().items()}
    sink: dict[str, Any] = {}
    run_simulation(
        server_app=make_server_app(strategy, initial, num_rounds, sink, shapes),
        client_app=make_client_app(cfg, strategy.device_app, initial),
        num_supernodes=fleet.n_devices,
        backend_config={"client_resources": {"num_cpus": num_cpus_per_client}},
    )
    if "result" not in sink:  # the ServerApp ended without returning (Flower logged why)
        raise RuntimeError("Flower's engine ended without the strategy's result; its log above says why")
    return sink["result"]


def final_arrays(result) -> dict[str, np.ndarray]:
    """numpy arrays of a Flower ``Result``'s final model."""
    arrays: ArrayRecord = result.arrays
    return {k: v.numpy() for k, v in arrays.items()}
