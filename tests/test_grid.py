"""FleetGrid semantics: online nodes, error replies, shipping once per host, rounds."""
from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from conftest import SmallWorld, small_config
from devices import profiles as prof
from devices.runtime import DeviceApp, Payload
from simulator.grid import ERR_DROPPED, ERR_LATE, ERR_OFFLINE, FleetGrid, flower_patched
from simulator.records import array_record


def echo(ctx, payload: Payload) -> list[Payload]:
    """A device function that reports which device ran it and which round it was."""
    return [Payload(metrics={"m": {"device": int(d), "round": ctx.round, "num-examples": 1}}) for d in ctx.device_ids]


APP = DeviceApp({MessageType.TRAIN: echo})


def make_grid(w: SmallWorld, **kw) -> FleetGrid:
    return FleetGrid(w.fleet, w.pool, kw.pop("app", APP), seed=w.cfg.experiment.seed,
                     deadline_s=kw.pop("deadline_s", 1e9), **kw)


def send(grid: FleetGrid, nodes, content=None, round_=1):
    content = content or RecordDict({"config": ConfigRecord({"server-round": round_})})
    return list(grid.send_and_receive([Message(content, dst_node_id=int(n), message_type=MessageType.TRAIN) for n in nodes]))


def test_node_ids_are_exactly_the_online_devices():
    w = SmallWorld(small_config(profiles={"online_peak": 0.5, "online_trough": 0.5, "failure_rate": 0.0}))
    grid = make_grid(w)
    with flower_patched(grid, 0):
        grid.begin_round(2)
        ids = list(grid.get_node_ids())
    expect = prof.draw_online(w.fleet.profiles, w.fleet.timeline.window(2)[1], w.cfg.experiment.seed, 2,
                              start_clock=w.fleet.timeline.start_clock)
    assert ids == np.flatnonzero(expect).tolist()
    assert 0 < len(ids) < w.fleet.n_devices  # a real mix, so the filter is exercised


def test_ok_replies_come_from_the_right_devices(always_online_world):
    w = always_online_world
    grid = make_grid(w)
    with flower_patched(grid, 0):
        nodes = list(grid.get_node_ids())[:7]
        replies = send(grid, nodes)
    assert [r.metadata.src_node_id for r in replies] == nodes
    assert all(not r.has_error() for r in replies)
    assert [int(r.content["m"]["device"]) for r in replies] == nodes
    assert all(int(r.content["m"]["round"]) == 1 for r in replies)


def test_late_devices_get_error_replies_and_status(always_online_world):
    w = always_online_world
    grid = make_grid(w, deadline_s=1e-3)  # any network round trip exceeds a millisecond
    with flower_patched(grid, 0):
        nodes = list(grid.get_node_ids())[:5]
        content = RecordDict({"arrays": array_record(w.initial), "config": ConfigRecord({"server-round": 1})})
        replies = send(grid, nodes, content)
        grid.finish_round()
    assert all(r.has_error() and r.error.code == ERR_LATE for r in replies)
    rows = grid.results[-1].devices
    sel = np.isin(rows["device_id"], nodes)
    assert set(rows["status"][sel]) == {"late"}
    assert (rows["bytes_down"][sel] > 0).all()  # a late device still downloaded the model


def test_dropped_and_offline_devices_get_error_replies():
    w = SmallWorld(small_config(profiles={"online_peak": 0.5, "online_trough": 0.5, "failure_rate": 1.0}))
    grid = make_grid(w)
    with flower_patched(grid, 0):
        online = set(grid.get_node_ids())
        offline = [d for d in range(w.fleet.n_devices) if d not in online][:3]
        replies = send(grid, sorted(online)[:3] + offline)
        grid.finish_round()
    codes = [r.error.code for r in replies]
    assert codes == [ERR_DROPPED] * 3 + [ERR_OFFLINE] * 3
    rows = grid.results[-1].devices
    assert set(rows["status"][rows["selected"]]) == {"dropped"}
    assert (rows["bytes_up"][rows["selected"]] == 0).all()


def test_shared_record_is_shipped_once_per_host(always_online_world):
    w = always_online_world
    calls = []
    real_run = w.pool.run

    def spy(round_, exchange, jobs_per_host):
        calls.append(jobs_per_host)
        return real_run(round_, exchange, jobs_per_host)

    w.pool.run = spy
    grid = make_grid(w)
    with flower_patched(grid, 0):
        nodes = list(grid.get_node_ids())
        send(grid, nodes)  # one RecordDict object for all messages
        per_device = [RecordDict({"config": ConfigRecord({"server-round": 1, "i": i})}) for i in range(6)]
        grid.send_and_receive([Message(c, dst_node_id=int(n), message_type=MessageType.TRAIN)
                               for c, n in zip(per_device, nodes[:6])])
    shared, distinct = calls
    assert len(calls) == 2  # one pool call (= one Ray call per host) per exchange
    assert all(len(jobs) == 1 for jobs in shared)  # one payload per host
    assert sum(len(job[2]) for jobs in shared for job in jobs) == len(nodes)
    assert sum(len(jobs) for jobs in distinct) == 6  # distinct records are shipped apiece


def test_round_hook_scores_every_active_device_with_its_held_model(always_online_world):
    w = always_online_world
    grid = make_grid(w)
    with flower_patched(grid, 0):
        grid.round_hook(0, None)
        send(grid, [0, 1])
        grid.round_hook(1, None)
        grid.round_hook(2, None)
        grid.round_hook(3, None)
    assert [r.round for r in grid.results] == [1, 2, 3]
    r1 = grid.results[0].devices
    active = np.unique(w.fleet.interactions.user_of()[w.fleet.timeline.round_of(w.fleet.interactions.times) == 1])
    assert set(active) <= set(r1["device_id"])
    assert set(r1["device_id"]) == set(active) | {0, 1}  # active or selected
    assert r1["selected"][np.isin(r1["device_id"], [0, 1])].all()
    assert np.isfinite(r1["auc"][np.isin(r1["device_id"], active)]).all()


def test_waiting_for_devices_advances_simulated_time_not_wall_time():
    w = SmallWorld(small_config(profiles={"online_peak": 0.3, "online_trough": 0.3, "failure_rate": 0.0}))
    grid = make_grid(w)
    import time

    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    with flower_patched(grid, 0):
        grid.begin_round(1)
        t_sim, t_wall = grid.clock.t, time.perf_counter()
        nodes, _ = sample_nodes(grid, 20, 20)  # more than are online at once: Flower waits
    assert len(nodes) == 20
    assert grid.clock.t > t_sim
    assert time.perf_counter() - t_wall < 1.0  # Flower's sleep(1) never ran


def test_fast_flower_arrays_are_byte_identical_to_flowers_own():
    from flwr.app import Array

    from simulator.records import to_array

    from flwr.app import ArrayRecord

    from simulator.records import array_record

    rng = np.random.default_rng(0)
    for a in (rng.random((3, 4), dtype=np.float32), rng.random(7), np.arange(5, dtype=np.int32),
              np.float32(2.5) * np.ones(()), rng.random((4, 3)).T, rng.random((5, 2))[::2], np.zeros((0, 3)),
              np.array([True, False])):
        # Flower's own writes a transposed (Fortran-ordered) array as such; ours is always C order
        ours, theirs = to_array(a), Array(np.asarray(a, order="C"))
        assert (ours.data, ours.dtype, ours.shape, ours.stype) == (theirs.data, theirs.dtype, theirs.shape, theirs.stype)
        assert ours.shape == a.shape  # a 0-d array stays 0-d
        np.testing.assert_array_equal(ours.numpy(), a)
    arrays = {"w": rng.random((2, 3), dtype=np.float32), "b": np.zeros(3, np.float32)}
    ours, theirs = array_record(arrays), ArrayRecord({k: Array(v) for k, v in arrays.items()})
    assert list(ours) == list(theirs) and ours.object_id == theirs.object_id  # the same record, key order too
