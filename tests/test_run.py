"""End to end: baselines on a small fleet (Ray and in-process), determinism, Flower parity."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import SmallWorld, small_config
from devices.models import HEAD_KEYS
from simulator.grid import FleetGrid, flower_patched
from simulator.records import array_record
from simulator.results import read_devices, read_rounds
from simulator.run import make_strategy, run_experiment
from strategies.fedavg import FedAvg

COLUMNS = {"round", "device_id", "selected", "status", "auc", "ndcg10", "hr10", "logloss", "n_pos",
           "bytes_down", "bytes_up", "device_flops", "device_seconds", "bucket"}


def quiet(*_a, **_k):
    pass


@pytest.mark.slow
def test_all_baselines_through_ray_write_results_and_learn(tmp_path):
    # Devices start from an untrained model (cloud.epochs = 0), so any gain is the
    # strategies' own learning, measured prequentially on windows they had not seen.
    cfg = small_config(experiment={"strategies": ["cloud_only", "local_finetune", "fedavg"], "hosts": 2},
                       data={"n_devices": 120, "n_rounds": 6},
                       cloud={"epochs": 0}, device={"local_steps": 20},
                       strategies={"fedavg": {"fraction_train": 1.0}})
    summary = run_experiment(cfg, str(tmp_path / "run"), use_ray=True, progress=False, log=quiet)
    out = tmp_path / "run"
    assert (out / "config.toml").read_text().startswith("[experiment]")
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    fleet = json.loads((out / "fleet.json").read_text())
    assert fleet["n_devices"] == 120 and fleet["drift_events"]
    for name in cfg.experiment.strategies:
        df = read_devices(out, name)
        assert COLUMNS <= set(df.columns)
        assert sorted(df["round"].unique()) == [1, 2, 3, 4, 5, 6]
        assert set(df["status"]) <= {"ok", "idle", "dropped", "late", "failed"}
        assert set(df["bucket"]) == {"head", "torso", "tail"}
        assert len(read_rounds(out, name)) == 6
    s = summary["strategies"]
    assert s["cloud_only"]["bytes_up"] == 0 and s["fedavg"]["bytes_up"] > 0
    assert s["local_finetune"]["device_flops"] > 0
    last = {name: np.mean([r["uauc"] for r in s[name]["per_round"][-2:]]) for name in s}
    assert last["fedavg"] > last["cloud_only"] + 0.05, last
    assert last["local_finetune"] > last["cloud_only"] + 0.05, last


def _run(tmp_path, name, seed):
    cfg = small_config(experiment={"strategies": ["local_finetune", "fedavg"], "seed": seed},
                       strategies={"fedavg": {"fraction_train": 0.5}})
    run_experiment(cfg, str(tmp_path / name), use_ray=False, progress=False, log=quiet)
    return {s: read_devices(tmp_path / name, s) for s in ("local_finetune", "fedavg")}


def test_same_seed_same_records_other_seed_different(tmp_path):
    a, b, c = _run(tmp_path, "a", 5), _run(tmp_path, "b", 5), _run(tmp_path, "c", 6)
    for s in a:
        pd.testing.assert_frame_equal(a[s], b[s])
        assert not a[s].equals(c[s])


def _numbers(x, path=""):
    """Every number of a summary, by its path."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _numbers(val, f"{path}/{key}").items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in _numbers(val, f"{path}[{i}]").items()}
    return {path: x} if isinstance(x, (int, float)) and not isinstance(x, bool) else {}


def test_another_host_count_moves_only_the_last_bits_of_log_losses(tmp_path):
    """What README "Same seed, same numbers" promises across host counts: every draw, count,
    cost and per-device AUC is identical; a device's scores come out of matrix products
    batched per host, whose float32 rounding depends on the batch, so log-losses (and any
    number pooled over devices' scores) agree to 1e-6, not bit for bit."""
    runs = {}
    for hosts in (1, 3):
        cfg = small_config(experiment={"strategies": ["fedavg", "metapatch"], "hosts": hosts},
                           data={"n_devices": 60, "n_rounds": 3})
        runs[hosts] = run_experiment(cfg, str(tmp_path / f"h{hosts}"), use_ray=False, progress=False, log=quiet)
    for name in ("fedavg", "metapatch"):
        a, b = (read_devices(tmp_path / f"h{h}", name).sort_values(["round", "device_id"], ignore_index=True)
                for h in (1, 3))
        assert len(a) > 50 and a["auc"].notna().sum() > 30
        pd.testing.assert_frame_equal(a.drop(columns="logloss"), b.drop(columns="logloss"), check_exact=True)
        np.testing.assert_allclose(a["logloss"], b["logloss"], rtol=0, atol=1e-6)
    from test_resume import comparable_summary  # without wall-clock times

    x, y = (_numbers(comparable_summary(tmp_path / f"h{h}")) for h in (1, 3))
    assert x.keys() == y.keys() and len(x) > 50
    different = {k: (x[k], y[k]) for k in x if x[k] != y[k]}
    assert all(abs(u - v) <= 1e-6 for u, v in different.values()), different


def test_eval_users_scores_a_fixed_seeded_sample_with_the_full_runs_numbers(tmp_path):
    # experiment.eval_users = 12: only a seeded sample of 12 of the 40 devices is scored,
    # the same 12 for every strategy and round, and each is scored exactly as in a run that
    # scores everyone (a device's samples and its model do not depend on who else is scored).
    names = ["cloud_only", "fedavg"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_experiment(small_config(experiment={"strategies": names}), str(full), use_ray=False, progress=False, log=quiet)
    summary = run_experiment(small_config(experiment={"strategies": names, "eval_users": 12}), str(part),
                             use_ray=False, progress=False, log=quiet)
    assert summary["eval_users"] == 12 and summary["evaluated_devices"] == 12
    assert json.loads((full / "summary.json").read_text())["eval_users"] == "all"
    fleet = pd.read_parquet(part / "fleet_devices.parquet")
    sample = set(fleet.loc[fleet["evaluated"], "device_id"])
    assert len(sample) == 12
    assert pd.read_parquet(full / "fleet_devices.parquet")["evaluated"].all()
    for name in names:
        a, b = read_devices(full, name), read_devices(part, name)
        scored_a, scored_b = a[a["n_pos"] > 0], b[b["n_pos"] > 0]
        assert set(scored_b["device_id"]) <= sample and len(scored_b) > 0
        assert set(scored_a["device_id"]) > set(scored_b["device_id"])
        want = scored_a[scored_a["device_id"].isin(sample)].reset_index(drop=True)
        pd.testing.assert_frame_equal(want[["round", "device_id", "auc", "n_pos"]],
                                      scored_b.reset_index(drop=True)[["round", "device_id", "auc", "n_pos"]])
    again = tmp_path / "again"
    run_experiment(small_config(experiment={"strategies": names, "eval_users": 12}), str(again),
                   use_ray=False, progress=False, log=quiet)
    pd.testing.assert_frame_equal(pd.read_parquet(again / "fleet_devices.parquet"), fleet)


def test_user_strategy_by_import_path_trains_only_the_head(tmp_path):
    name = "examples.head_finetune:HeadFinetune"
    cfg = small_config(experiment={"strategies": [name]}, strategies={name: {"fraction_train": 1.0}})
    summary = run_experiment(cfg, str(tmp_path / "r"), use_ray=False, progress=False, log=quiet)
    df = read_devices(tmp_path / "r", name)
    assert (df["status"] == "ok").any()
    assert summary["strategies"][name]["device_flops"] > 0
    # the device half on its own: only head parameters become personal
    w = SmallWorld(cfg)
    strategy = make_strategy(name, {"fraction_train": 1.0})
    grid = FleetGrid(w.fleet, w.pool, strategy.device_app, seed=3, deadline_s=1e9)
    with flower_patched(grid, 3):
        strategy.start(grid=grid, initial_arrays=array_record(w.initial), num_rounds=1, evaluate_fn=grid.round_hook)
    host = w.pool.hosts[0]
    assert host.personal and all(set(p) == set(HEAD_KEYS) for p in host.personal.values())
    dev = next(iter(host.personal))
    assert any(not np.array_equal(host.personal[dev][k], w.initial[k]) for k in HEAD_KEYS)


@pytest.mark.slow
def test_fleetgrid_and_flower_engine_aggregate_the_same_weights(always_online_world):
    from simulator.flower_app import final_arrays, run_on_flower

    w = always_online_world
    cfg = small_config(data={"n_devices": 20, "n_rounds": 2},
                       profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0})
    w = SmallWorld(cfg)
    params = {"fraction_train": 1.0, "min_train_nodes": 20, "min_available_nodes": 20}
    strategy = make_strategy("fedavg", params)
    grid = FleetGrid(w.fleet, w.pool, strategy.device_app, seed=3, deadline_s=1e9)
    with flower_patched(grid, 3):
        ours = final_arrays(strategy.start(grid=grid, initial_arrays=array_record(w.initial), num_rounds=2,
                                           evaluate_fn=grid.round_hook))
    theirs = final_arrays(run_on_flower(cfg, make_strategy("fedavg", params), w.initial, 2))
    moved = max(float(np.abs(ours[k] - w.initial[k]).max()) for k in ours)
    assert moved > 1e-3  # training really changed the model
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


class RaisingStrategy(FedAvg):
    def __init__(self) -> None:
        raise RuntimeError("no licence")


@pytest.mark.parametrize("name, params, needle", [
    ("fedavg", {"fraction_train": "x"}, "strategies.fedavg.fraction_train"),
    ("fedavg", {"fraction_train": -1}, "strategies.fedavg.fraction_train"),
    ("fedavg", {"min_train_nodes": 1.5}, "strategies.fedavg.min_train_nodes"),
    ("local_finetune", {"local_steps": "x"}, "strategies.local_finetune.local_steps"),
    ("local_finetune", {"lr": 0}, "strategies.local_finetune.lr"),
    ("duet", {"m": 0}, "strategies.duet.m"),
    ("duet", {"tau": -1.0}, "strategies.duet.tau"),
    ("fedavg", {"arrayrecord_key": 5}, "strategies.fedavg.arrayrecord_key"),
    ("fedavg", {"train_metrics_aggr_fn": "x"}, "strategies.fedavg.train_metrics_aggr_fn = 'x' is invalid: a function"),
    ("test_run:RaisingStrategy", {}, "its constructor raised RuntimeError: no licence"),
    ("builtins:int", {}, "subclass of flwr.serverapp.strategy.Strategy"),
    ("os:path", {}, "subclass of flwr.serverapp.strategy.Strategy"),
])
def test_bad_strategy_parameters_name_the_key(name, params, needle):
    """One ConfigError line naming the key (or what the plug-in's constructor raised)."""
    from simulator.errors import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        make_strategy(name, params)


@pytest.mark.slow
def test_joining_a_two_node_ray_cluster_gives_the_in_process_results(tmp_path):
    # --ray-address: hosts run on an existing (here: two-raylet) cluster; the records are
    # the same as with in-process hosts, because no draw depends on where a device runs.
    import ray
    from ray.cluster_utils import Cluster

    cfg = small_config(experiment={"strategies": ["local_finetune"], "hosts": 0})
    run_experiment(cfg, str(tmp_path / "local"), use_ray=False, progress=False, log=quiet)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        run_experiment(cfg, str(tmp_path / "cluster"), ray_address=cluster.address, progress=False, log=quiet)
        assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    pd.testing.assert_frame_equal(read_devices(tmp_path / "local", "local_finetune"),
                                  read_devices(tmp_path / "cluster", "local_finetune"))


def test_flower_federated_evaluation_round_is_served(always_online_world):
    w = always_online_world
    strategy = make_strategy("fedavg", {"fraction_train": 0.5, "fraction_evaluate": 0.5})
    grid = FleetGrid(w.fleet, w.pool, strategy.device_app, seed=3, deadline_s=1e9)
    with flower_patched(grid, 3):
        result = strategy.start(grid=grid, initial_arrays=array_record(w.initial), num_rounds=2,
                                evaluate_fn=grid.round_hook)
    ev = result.evaluate_metrics_clientapp
    assert set(ev) == {1, 2}
    assert 0.6 < ev[2]["auc"] <= 1.0  # the trained cloud model ranks well above chance
    assert all(r.info["errors"] == 0 for r in grid.results)


def test_a_strategys_rounds_run_on_a_frozen_heap_that_thaws_after(world):
    """``frozen_heap``: while the rounds run, the objects alive at their start are out of
    the cycle collector's reach (``gc.freeze``); after the strategy, complete or failed,
    nothing is frozen and a cycle made inside is collected."""
    import gc
    import weakref

    from simulator.fleetrun import frozen_heap
    from strategies.fedavg import FedAvg

    seen = []

    class Watched(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            seen.append(gc.get_freeze_count())
            if server_round == 2 and self.fail:
                raise RuntimeError("boom")
            return super().configure_train(server_round, arrays, config, grid)

    for fail in (False, True):
        s = Watched(fraction_train=0.2)
        s.fail = fail
        played = world.run.play("watched", s, num_rounds=2)
        assert played.status == ("failed" if fail else "complete")
        assert gc.get_freeze_count() == 0
    assert len(seen) == 4 and min(seen) > 1000  # the whole heap, not a handful

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    with frozen_heap():
        del a, b  # a cycle that was alive when the heap froze: garbage now, but frozen
        gc.collect()
        assert gone() is not None
    gc.collect()
    assert gone() is None and gc.get_freeze_count() == 0


def test_host_processes_start_before_a_generated_fleet_and_after_one_read_from_files(monkeypatch, tmp_path):
    """A synthetic fleet's input is its validated config: Ray and the hosts start at
    ``connect``, beside the build. A fleet read from files starts them once it is read, so
    a bad file fails at once, having started nothing; without Ray nothing starts."""
    from devices.errors import DataError
    from simulator import fleetrun

    events: list[str] = []

    class Started:
        def __init__(self, n_hosts, address, max_hosts=None):
            events.append(f"hosts({n_hosts}, at most {max_hosts})")  # no more hosts than devices

        def close(self):
            events.append("closed")

    real_build = fleetrun.build_fleet
    monkeypatch.setattr(fleetrun, "HostProcesses", Started)
    monkeypatch.setattr(fleetrun, "build_fleet", lambda cfg: events.append("build") or real_build(cfg))

    def steps(cfg, use_ray=True):
        events.clear()
        run = fleetrun.FleetRun(cfg, use_ray=use_ray, n_hosts=3)
        try:
            run.connect()
            run.build_fleet()
        finally:
            run.close()
        return list(events)

    assert steps(small_config()) == ["hosts(3, at most 40)", "build", "closed"]
    rows = ["userId,movieId,rating,timestamp"] + [f"{u},{i + u},4.0,{1000 + 10 * u + i}" for u in range(1, 5)
                                                  for i in range(1, 9)]
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    from simulator import config

    movielens = lambda name: config.from_dict({"experiment": {"strategies": ["fedavg"]}, "data": {
        "source": "movielens", "path": str(tmp_path / name), "n_rounds": 2}})
    assert steps(movielens("ratings.csv")) == ["build", "hosts(3, at most 4)", "closed"]
    (tmp_path / "bad.csv").write_text("userId,movieId,rating,timestamp\n1,2,x,3\n")
    with pytest.raises(DataError, match="bad.csv:2"):
        steps(movielens("bad.csv"))
    assert events == ["build"]
    assert steps(small_config(), use_ray=False) == ["build"]


def test_host_processes_start_no_more_hosts_than_devices(monkeypatch):
    """experiment.hosts far above the fleet's devices starts one host per device (it started
    every host asked for, for minutes at 100,000, only for the pool to stop the extra ones)."""
    from devices import pool

    created: list[int] = []

    class Actor:
        def options(self, **_):
            return self

        def remote(self, shard):
            created.append(len(created))
            return f"actor{len(created)}"

    monkeypatch.setattr(pool, "init_ray", lambda address: None)
    monkeypatch.setattr(pool, "host_actor", Actor)
    monkeypatch.setattr(pool, "placement", lambda h, node_of: None)
    actors, _ = pool.HostProcesses(1000, None, max_hosts=3).take()
    assert actors == ["actor1", "actor2", "actor3"] and len(created) == 3
    created.clear()
    assert len(pool.HostProcesses(2, None, max_hosts=40).take()[0]) == 2 == len(created)


def test_host_processes_that_failed_to_start_raise_in_the_callers_thread(monkeypatch):
    """What stops Ray's start in the background thread is raised where the pool takes the
    hosts, in the caller's thread, as it would have been had Ray started there; closing
    afterwards stops nothing and raises nothing."""
    from devices import pool

    def no_ray(address):
        raise pool.RayUnreachable(f"no Ray for {address}")

    monkeypatch.setattr(pool, "init_ray", no_ray)
    started = pool.HostProcesses(2, "10.0.0.1:6379")
    with pytest.raises(pool.RayUnreachable, match="no Ray for 10.0.0.1:6379"):
        started.take()
    started.close()
    assert started.actors == [] and started._thread.is_alive()  # parked, as after a start
