"""A lost device host does not end the run (issue 14): host state round trip, a host
process killed mid-run (one node and a two-node Ray cluster), and a host that keeps dying.

The Ray tests play small strategies through ``FleetRun`` twice, uninterrupted and with a
host process SIGKILLed, and compare every per-device record, every round's facts and the
summary exactly (wall-clock fields and ``host_restarts`` excepted).
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType

from conftest import SmallWorld, small_config
from devices.errors import HostLost
from devices.host import DeviceHost
from devices.pool import shard_of
from devices.runtime import DeviceApp, Payload
from simulator.fleetrun import FleetRun
from simulator.run import make_strategy
from strategies import fedavg, local_finetune
from strategies.fedavg import FedAvg

ALWAYS_ON = {"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}
WALL = ("wall_seconds", "prepare_seconds")
ROOT = Path(__file__).resolve().parent.parent


def cfg_small(n_rounds: int = 3):
    return small_config(experiment={"strategies": ["local_finetune", "fedavg"], "hosts": 2},
                        data={"n_devices": 40, "n_rounds": n_rounds}, profiles=ALWAYS_ON)


# State round trip (in-process) --------------------------------------------------------


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__"):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b or (a != a and b != b)


def test_host_state_round_trip_gives_identical_outputs(tmp_path):
    """get_state -> a fresh host -> set_state: the same bytes back, and the same replies,
    costs, scores and histograms from both hosts on the next round's work."""
    w = SmallWorld(small_config(profiles=ALWAYS_ON), n_hosts=1)
    host = w.pool.hosts[0]
    ids = host.device_ids
    shifted = {k: (v + np.float32(0.01)).astype(np.float32) for k, v in w.initial.items()}

    def jobs():  # fedavg adopts a new shared version, local_finetune keeps personal models
        return [(fedavg.train, Payload(arrays={"arrays": shifted}), ids[:12]),
                (local_finetune.train, Payload(configs={"c": {"local-steps": 2}}), ids[12:30])]

    host.score(1)
    host.run(1, 0, jobs())
    host.kv.setdefault("seen", {})[3] = np.arange(4)
    host.score(2)
    data = host.get_state()
    assert host.personal and len(host.versions) == 2 and host._next_vid == 2
    fresh = DeviceHost(shard_of(w.fleet.interactions, w.fleet.timeline, ids), w.spec, w.cfg.device, w.run.seed)
    fresh.set_state(data)
    assert fresh.get_state() == data
    a, b = host.run(2, 0, jobs()), fresh.run(2, 0, jobs())
    assert len(a) == 2 and all(r.replies for r in a)
    assert _same([vars(r) for r in a], [vars(r) for r in b])
    sa, sb = host.score(3), fresh.score(3)
    assert len(sa["device_id"]) > 0 and _same(sa, sb)
    # the same state (the bytes may differ where pickle shares objects differently)
    assert _same(pickle.loads(fresh.get_state()), pickle.loads(host.get_state()))
    # the pool: states() to files, a reset, load_states() brings them back
    w.pool.set_restore_point(w.pool.states())
    saved = w.pool.states()
    for h, data in enumerate(saved):
        (tmp_path / f"host-{h:03d}.pkl").write_bytes(data)
    w.pool.reset(w.initial)
    assert w.pool.states() != saved
    w.pool.load_states(tmp_path)
    assert w.pool.states() == saved and w.pool._restore == tmp_path and w.pool.restarts_in(3) == 0
    with pytest.raises(ValueError):
        w.pool.set_restore_point(saved * 2)
    with pytest.raises(ValueError):
        DeviceHost(shard_of(w.fleet.interactions, w.fleet.timeline, ids[:5]), w.spec, w.cfg.device,
                   w.run.seed).set_state(data)


# Ray helpers ----------------------------------------------------------------------------


def train_or_die(marker: str, once: bool, ctx, payload):
    """FedAvg's device training, but the host process SIGKILLs itself while ``marker``
    exists (``once``: the first host to remove it dies, once)."""
    if os.path.exists(marker):
        if once:
            try:
                os.remove(marker)
            except FileNotFoundError:
                return fedavg.train(ctx, payload)
        os.kill(os.getpid(), signal.SIGKILL)
    return fedavg.train(ctx, payload)


class DyingFedAvg(FedAvg):
    def __init__(self, marker: Path, once: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.device_app = DeviceApp({MessageType.TRAIN: partial(train_or_die, str(marker), once),
                                     MessageType.EVALUATE: fedavg.evaluate_received})


FEDAVG = {"fraction_train": 0.5}


def ray_run(cfg, lines: list[str]) -> FleetRun:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # hosts cannot import this test file
    run = FleetRun(cfg, use_ray=True, n_hosts=2)
    run.build_fleet()
    run.train_cloud()
    run.start_pool()
    run.pool.log = lines.append
    return run


def records(played) -> str:
    """Every round's device records and facts and the summary, as exact text."""
    assert played.status == "complete", played.failure
    rounds = [{"info": {k: v for k, v in r.info.items() if k != "host_restarts"},
               "devices": {k: [repr(x) for x in np.asarray(v).tolist()] for k, v in r.devices.items()},
               "hist": [r.histogram.pos.tolist(), r.histogram.neg.tolist()]} for r in played.grid.results]
    summary = {k: v for k, v in played.summary.items() if k not in WALL}
    return json.dumps({"rounds": rounds, "summary": summary}, sort_keys=True, default=repr)


def kill_host(pool, h: int) -> int:
    import ray

    pid = ray.get(pool.hosts[h].pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_after_round(pool, h: int, after: int, killed: list[int]):
    def on_round(result) -> None:
        if result.round == after:
            killed.append(kill_host(pool, h))
    return on_round


@pytest.fixture(scope="module")
def local_ray():
    import ray
    from devices.pool import init_ray

    init_ray(None)
    yield
    ray.shutdown()


# One node -------------------------------------------------------------------------------


@pytest.mark.slow
def test_host_killed_mid_run_is_restarted_and_results_are_identical(local_ray, tmp_path):
    """local_finetune (personal state) with host 1 SIGKILLed after round 1 (restore point:
    host states in files), FedAvg with a host killing itself in the middle of round 2's
    training (restore point: the reset, 3 calls replayed): both complete, that round
    records the restart, and every number equals the uninterrupted run's."""
    lines: list[str] = []
    run = ray_run(cfg_small(), lines)
    try:
        plain_lf = records(run.play("local_finetune", make_strategy("local_finetune", {})))
        plain_fa = records(run.play("fedavg", make_strategy("fedavg", FEDAVG)))
        assert run.pool.restarts == 0 and lines == []

        killed: list[int] = []
        kill = kill_after_round(run.pool, 1, 1, killed)

        def checkpoint_then_kill(result) -> None:  # as a checkpoint would: states in files, the restore point
            if result.round == 1:
                for h, data in enumerate(run.pool.states()):
                    (tmp_path / f"host-{h:03d}.pkl").write_bytes(data)
                run.pool.set_restore_point(tmp_path)
            kill(result)
        played = run.play("local_finetune", make_strategy("local_finetune", {}), on_round=checkpoint_then_kill)
        assert len(killed) == 1 and played.status == "complete"
        assert [r.info["host_restarts"] for r in played.grid.results] == [0, 1, 0]  # found dead scoring round 2
        assert records(played) == plain_lf
        assert run.pool.restarts == 1 and len(lines) == 1
        assert lines[0] == ("fleetsim: warning: device host 1 died in round 2 (ActorDiedError); restarted it and "
                            "replayed 0 call(s) from the last restore point")
        assert kill_host(run.pool, 1) != killed[0]  # a new process ... which we kill again, between strategies

        marker = tmp_path / "die-once"
        strategy = DyingFedAvg(marker, once=True, **FEDAVG)

        def arm(result) -> None:
            if result.round == 1:
                marker.touch()
        played = run.play("fedavg", strategy, on_round=arm)
        assert not marker.exists() and played.status == "complete"
        # round 1 counts the restart the reset found (between strategies), round 2 its own:
        # every restart is in exactly one round's record
        assert [r.info["host_restarts"] for r in played.grid.results] == [1, 1, 0]
        assert records(played) == plain_fa
        # the host killed between strategies was found dead by the reset (no round), the other in round 2
        assert run.pool.restarts == 3 and len(lines) == 3 and run.pool._restore[0] == "reset"
        assert "died between rounds" in lines[1] and "replayed 0 call(s)" in lines[1]
        assert " died in round 2 (ActorDiedError); restarted it and replayed 3 call(s)" in lines[2]  # score 1, run 1, score 2
    finally:
        run.close()


@pytest.mark.slow
def test_host_dying_three_times_in_a_round_stops_only_that_strategy(local_ray, tmp_path):
    """A device function that kills its host every time: two restarts, the third death
    raises HostLost (one line naming host and round, stage "device host"); the pool heals
    and the next strategy completes."""
    lines: list[str] = []
    run = ray_run(cfg_small(n_rounds=2), lines)
    marker = tmp_path / "die-always"
    marker.touch()
    try:
        played = run.play("dying", DyingFedAvg(marker, once=False, **FEDAVG))
        assert played.status == "failed" and isinstance(played.failure, HostLost)
        msg = str(played.failure)
        assert msg == "round 1: device host 0 died 3 times in this round (ActorDiedError); the strategy stops"
        assert played.failure.info["stage"] == "device host" and played.failure.info["round"] == 1
        assert played.grid.results[0].info["host_restarts"] == 2
        assert len(lines) == 2 and all("device host 0 died in round 1" in x for x in lines)
        marker.unlink()
        played = run.play("fedavg", make_strategy("fedavg", FEDAVG))
        assert played.status == "complete" and len(played.grid.results) == 2
        # host 0 (given up on) and host 1 (dead since round 1, found by the reset) are replaced
        assert run.pool.restarts == 4 and len(lines) == 4
        assert [r.info["host_restarts"] for r in played.grid.results] == [2, 0]  # the reset's, in round 1
        assert all("\n" not in x for x in lines)
    finally:
        run.close()


# Hosts started ahead of the fleet --------------------------------------------------------

STARTED_AHEAD = """
import json, os, pickle
import ray
from devices.pool import HostPool
from simulator import config
from simulator.fleetrun import FleetRun

cfg = config.from_dict({"experiment": {"seed": 3, "strategies": ["fedavg"]},
                        "data": {"n_devices": 2, "n_items": 30, "n_rounds": 2, "mean_daily_interactions": 24.0,
                                 "history_days": 5.0}, "cloud": {"epochs": 1}})

def dead(actor):
    try:
        ray.get(actor.pid.remote(), timeout=60)
        return False
    except ray.exceptions.RayActorError:
        return True

out = {}
early = FleetRun(cfg, n_hosts=2)
early.connect()  # starts Ray (in a thread) and 2 hosts; the run ends before its pool
early.processes._done.wait()
started = list(early.processes.actors)
early.close()
out["ended_before_pool"] = [dead(a) for a in started]

run = FleetRun(cfg, n_hosts=3)  # 3 hosts asked for a fleet of 2 devices
run.connect()
run.build_fleet()
run.train_cloud()
run.processes._done.wait()
pool = run.start_pool()
pool.reset(run.initial)
out["pool_hosts"] = pool.n_hosts
out["started"] = len(run.processes.actors)  # never more hosts than devices
out["pids_differ"] = len({ray.get(h.pid.remote()) for h in pool.hosts}) == 2
fresh = HostPool(run.fleet.interactions, run.fleet.timeline, run.spec, cfg.device, run.seed, n_hosts=2)
fresh.reset(run.initial)
scores = [(pool.score(r), fresh.score(r)) for r in (1, 2)]
out["scores_equal"] = [pickle.dumps(a) == pickle.dumps(b) for a, b in scores]
out["scored"] = sorted(int(d) for a, _ in scores for host in a for d in host["device_id"])
fresh.shutdown()
run.close()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_hosts_started_before_the_fleet_serve_it_and_are_stopped_if_unused():
    """``FleetRun.connect`` starts Ray and the hosts in a thread while the fleet is built
    (a fresh process: Ray not yet started). The hosts a pool takes score exactly as hosts
    started after the fleet; no host beyond the fleet's size is started, and the hosts of a
    run that ends before its pool are stopped. Ray outlives the thread that started it."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", STARTED_AHEAD], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"ended_before_pool": [True, True], "pool_hosts": 2, "started": 2, "pids_differ": True,
                   "scores_equal": [True, True], "scored": [0, 0, 1, 1]}  # both devices, both windows
    assert "SIGTERM handler is not set" not in res.stderr


# Two nodes ------------------------------------------------------------------------------


@pytest.mark.slow
def test_hosts_spread_over_two_nodes_and_a_killed_worker_node_host_is_recovered(tmp_path):
    """A two-node Ray cluster: one host per node; the host on the worker node is SIGKILLed
    after round 2 (restore point: host states kept in memory after round 1) and the
    results equal the uninterrupted run's."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a Ray started by another test (e.g. the module fixture) is left alone
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    run = None
    try:
        worker = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"FLWR_TELEMETRY_ENABLED": "0",
                                           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}})
        cluster.wait_for_nodes()
        lines: list[str] = []
        run = ray_run(cfg_small(), lines)
        nodes = ray.get([h.node_id.remote() for h in run.pool.hosts])
        assert sorted(nodes) == sorted({cluster.head_node.node_id, worker.node_id})
        on_worker = nodes.index(worker.node_id)
        plain = records(run.play("local_finetune", make_strategy("local_finetune", {})))
        killed: list[int] = []
        kill = kill_after_round(run.pool, on_worker, 2, killed)

        def keep_states_then_kill(result) -> None:  # an in-memory restore point after round 1
            if result.round == 1:
                run.pool.set_restore_point(run.pool.states())
            kill(result)
        played = run.play("local_finetune", make_strategy("local_finetune", {}), on_round=keep_states_then_kill)
        assert len(killed) == 1 and played.status == "complete"
        assert [r.info["host_restarts"] for r in played.grid.results] == [0, 0, 1]
        assert records(played) == plain
        assert len(lines) == 1 and f"device host {on_worker} died in round 3" in lines[0]
        assert "replayed 2 call(s)" in lines[0]  # score 2, run 2 since the restore point
        assert ray.get(run.pool.hosts[on_worker].node_id.remote()) in (cluster.head_node.node_id, worker.node_id)
    finally:
        if run is not None:
            run.close()
        ray.shutdown()
        cluster.shutdown()


def test_hosts_are_placed_by_each_nodes_cpus():
    from devices.recovery import pick_node

    def place(n_hosts, cpus):
        node_of: list = []
        for h in range(n_hosts):
            node_of.append(pick_node(h, node_of, cpus))
        return node_of

    # 6 hosts over nodes of 2 and 4 CPUs (and one without CPUs): 2 and 4 hosts
    six = place(6, {"a": 2.0, "b": 4.0, "gpu-only": 0.0})
    assert six.count("a") == 2 and six.count("b") == 4
    # equal nodes alternate
    assert place(4, {"a": 1.0, "b": 1.0}) == ["a", "b", "a", "b"]
    # a replacement for host 1 (node "b" gone) goes to the node left, then to the emptiest
    assert pick_node(1, ["a", "b", "a"], {"a": 2.0}) == "a"
    assert pick_node(1, ["a", "b", "a"], {"a": 2.0, "c": 2.0}) == "c"
    assert pick_node(0, [], {}) is None
