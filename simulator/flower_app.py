"""Run a fleetsim strategy on Flower's own simulation engine (``run_simulation``).

The same strategy object and the same device functions run unchanged: a ``ClientApp``
wrapper maps each Flower node to a fleetsim device (``partition-id`` = device id) and
runs the strategy's device function for that one device on a process-local
``DeviceHost`` built from the experiment config. Flower's engine keeps no per-device
state between messages unless it lives in that process, so this path is the reference
for cross-checks and speed comparisons, not for stateful strategies at scale.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from devices.host import DeviceHost
from devices.pool import shard_of
from devices.runtime import DeviceApp
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
        rnd = int(payload.config().get("server-round", 1))
        fn = device_app.function_for(msg.metadata.message_type)
        (res,) = host.run(rnd, 1, [(fn, payload, np.array([device]))])
        if res.replies is None:
            raise RuntimeError(res.error)
        return Message(to_recorddict(res.replies[0]), reply_to=msg)

    app.train()(handle)
    app.evaluate()(handle)
    app.query()(handle)
    return app


def make_server_app(strategy, initial: dict[str, np.ndarray], num_rounds: int, sink: dict[str, Any]) -> ServerApp:
    """A Flower ``ServerApp`` that runs ``strategy.start``; the ``Result`` lands in ``sink``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink["result"] = strategy.start(grid=grid, initial_arrays=array_record(initial), num_rounds=num_rounds)

    return app


def run_on_flower(cfg, strategy, initial: dict[str, np.ndarray], num_rounds: int, num_cpus_per_client: float = 1.0):
    """Run ``strategy`` on Flower's ``run_simulation`` over every device of ``cfg``'s fleet."""
    from flwr.simulation import run_simulation

    from simulator.fleet import build_fleet

    n = build_fleet(cfg).n_devices
    sink: dict[str, Any] = {}
    run_simulation(
        server_app=make_server_app(strategy, initial, num_rounds, sink),
        client_app=make_client_app(cfg, strategy.device_app, initial),
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": num_cpus_per_client}},
    )
    return sink.get("result")


def final_arrays(result) -> dict[str, np.ndarray]:
    """numpy arrays of a Flower ``Result``'s final model."""
    arrays: ArrayRecord = result.arrays
    return {k: v.numpy() for k, v in arrays.items()}
