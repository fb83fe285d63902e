"""DUET served through FleetGrid: two exchanges, heads installed, bytes, no device training."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SmallWorld, numbers_equal, small_config
from test_cli import TINY, assert_one_line_error, fleetsim, write_experiment  # noqa: F401 (fleetsim: fixture)
from devices import models
from strategies.cloud import CloudContext
from simulator.grid import FleetGrid, flower_patched
from simulator.records import array_record
from simulator.run import make_strategy
from strategies.duet_generator import head_nbytes


def prepared(w: SmallWorld, **params):
    strategy = make_strategy("duet", {"epochs": 1, "fraction_train": 1.0, **params})
    strategy.prepare(CloudContext(w.fleet.interactions, w.fleet.timeline.history_end, w.spec, w.initial,
                                  w.cfg.experiment.seed, batch_size=256))
    return strategy


def served(world: SmallWorld, rounds: int = 2, strategy=None, **params):
    w = world
    strategy = strategy or prepared(w, **params)
    grid = FleetGrid(w.fleet, w.pool, strategy.device_app, seed=3, deadline_s=1e9)
    with flower_patched(grid, 3):
        result = strategy.start(grid=grid, initial_arrays=array_record(w.initial), num_rounds=rounds,
                                evaluate_fn=grid.round_hook)
    return strategy, grid, result


def test_each_round_uploads_windows_and_installs_generated_heads(always_online_world):
    w = always_online_world
    strategy, grid, result = served(w)
    r1, r2 = (r.devices for r in grid.results)
    assert all(r.info["exchanges"] == 2 for r in grid.results)
    sel = r1["selected"]
    assert sel.all() and set(r1["status"]) == {"ok"}
    # the device does no training: no FLOPs, nothing but a window and a metric going up
    assert (r1["device_flops"] == 0).all()
    assert (r1["bytes_up"] < 200).all() and (r1["bytes_up"] >= 40).all()
    body = sum(v.nbytes for v in strategy.body.values())
    head = head_nbytes(w.spec)
    assert (r1["bytes_down"] >= body + head).all()  # first contact: body + head
    assert (r2["bytes_down"] < body).all() and (r2["bytes_down"] >= head).all()  # then heads only
    # devices hold the DUET body and their own generated head
    host = w.pool.hosts[0]
    dev = next(iter(host.personal))
    assert set(host.personal[dev]) == set(w.spec.head_keys())
    held = host.versions[int(host.held[dev])]
    assert all(np.array_equal(held[k], strategy.body[k]) for k in held)
    heads = [host.personal[d]["head.w1"] for d in list(host.personal)[:5]]
    assert any(not np.allclose(heads[0], h) for h in heads[1:])  # personalised, not one head
    assert result.train_metrics_clientapp[1]["generation_ms_per_device"] > 0


def test_generated_head_is_what_the_generator_gives_for_the_uploaded_window(always_online_world):
    w = always_online_world
    strategy, grid, _ = served(w, rounds=1)
    host = w.pool.hosts[0]
    local = np.array(sorted(host.personal)[:3])
    windows = host.last_windows(local, 1)
    expect = strategy.generate(windows)
    for j, i in enumerate(local):
        for k in w.spec.head_keys():
            np.testing.assert_allclose(host.personal[int(i)][k], expect[k][j], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("params", [{"stabilizer": False}, {"frozen_bases": True}, {"m": 2, "tau": 2.0},
                                    {"from_scratch": True}])
def test_ablations_run(always_online_world, params):
    _, grid, _ = served(always_online_world, rounds=1, **params)
    assert grid.results[0].info["ok"] > 0


def test_short_windows_are_padded():
    # a device whose whole stream is shorter than L uploads a left-padded window
    w = SmallWorld(small_config(data={"mean_daily_interactions": 0.3},
                                profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}))
    host = w.pool.hosts[0]
    windows = host.last_windows(np.arange(len(host.device_ids)), 1)
    counts = np.diff(host.inter.indptr)
    short = np.flatnonzero((counts > 0) & (counts < w.spec.window))
    assert len(short) > 0
    i = short[0]
    n = min(int(counts[i]), w.spec.window)
    t_end = w.fleet.timeline.window(1)[1]
    items = host.inter.items[host.inter.indptr[i]:host.inter.indptr[i + 1]][host.inter.times[host.inter.indptr[i]:host.inter.indptr[i + 1]] < t_end]
    assert (windows[i, : w.spec.window - len(items)] == models.PAD).all()
    assert np.array_equal(windows[i, w.spec.window - len(items):], items)
    assert n >= len(items)
    _, grid, _ = served(w, rounds=1)
    assert grid.results[0].info["ok"] > 0 and grid.results[0].info["errors"] == 0


# Retraining (retrain_every) ---------------------------------------------------------------


@pytest.fixture
def four_round_world() -> SmallWorld:
    return SmallWorld(small_config(data={"n_rounds": 4},
                                   profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}))


def test_retrain_runs_exactly_every_k_rounds_and_changes_the_generator(four_round_world):
    w = four_round_world
    strategy = prepared(w, retrain_every=2)
    gen0, body0 = dict(strategy.gen), dict(strategy.body)
    _, grid, result = served(w, rounds=4, strategy=strategy)
    m = result.train_metrics_clientapp
    assert [r for r in m if "retrain_s" in m[r]] == [2, 4]
    assert [m[r]["body_version"] for r in (2, 4)] == [1, 2] and strategy.body_version == 2
    # 40 devices x 2 distinct windows x 9 samples at most, plus as many history samples
    assert all(0 < m[r]["retrain_samples"] <= 2 * 40 * 2 * 9 for r in (2, 4))
    assert all(not np.array_equal(strategy.gen[k], gen0[k]) for k in gen0)
    assert not np.array_equal(strategy.body["item_emb"], body0["item_emb"])
    # round 4's heads come from the retrained generator
    host = w.pool.hosts[0]
    local = np.array(sorted(host.personal)[:3])
    expect = strategy.generate(host.last_windows(local, 4))
    for j, i in enumerate(local):
        np.testing.assert_allclose(host.personal[int(i)]["head.w1"], expect["head.w1"][j], rtol=1e-6, atol=1e-7)


def test_retrained_body_is_shipped_again_to_devices_holding_the_old_one(always_online_world):
    w = always_online_world
    strategy, grid, result = served(w, rounds=3, retrain_every=2)
    body = sum(v.nbytes for v in strategy.body.values())
    head = head_nbytes(w.spec)
    r1, r2, r3 = (r.devices for r in grid.results)
    assert (r1["bytes_down"] >= body + head).all()
    # round 2 retrains: every device already had the (old) body and gets the new one
    assert (r2["bytes_down"] >= body + head).all() and np.array_equal(r2["bytes_down"], r1["bytes_down"])
    assert (r3["bytes_down"] < body).all() and (r3["bytes_down"] >= head).all()
    m = result.train_metrics_clientapp
    assert [m[r]["body_sent"] for r in (1, 2, 3)] == [40, 40, 0]
    for host in w.pool.hosts:  # every device holds the retrained body
        for dev in host.personal:
            held = host.versions[int(host.held[dev])]
            assert all(np.array_equal(held[k], strategy.body[k]) for k in held)


def test_retraining_is_deterministic_under_a_seed(always_online_world):
    w = always_online_world
    runs = []
    for _ in range(2):
        w.pool.reset(w.initial)
        strategy, grid, _ = served(w, rounds=2, retrain_every=1)
        heads = {(h, d): dict(p) for h, host in enumerate(w.pool.hosts) for d, p in host.personal.items()}
        runs.append((strategy, heads, np.concatenate([r.devices["auc"] for r in grid.results])))
    (s1, h1, a1), (s2, h2, a2) = runs
    assert s1.body_version == s2.body_version == 2
    assert numbers_equal(s1.gen, s2.gen) and numbers_equal(s1.body, s2.body)
    assert h1.keys() == h2.keys() and all(numbers_equal(h1[k], h2[k]) for k in h1)
    np.testing.assert_array_equal(a1, a2)


@pytest.mark.parametrize("setting, needles", [
    ("strategies.duet.retrain_every=-1", ["strategies.duet.retrain_every = -1", "integer >= 0"]),
    ("strategies.duet.retrain_every=1.5", ["strategies.duet.retrain_every = 1.5", "invalid: an integer"]),
    ("strategies.duet.retrain_every=true", ["strategies.duet.retrain_every = True"]),
    ("strategies.duet.retrain_epochs=0", ["strategies.duet.retrain_epochs = 0", "positive integer"]),
    ("strategies.duet.retrain_history=-0.5", ["strategies.duet.retrain_history = -0.5", "number >= 0"]),
    ("strategies.duet.from_scratch=1", ["strategies.duet.from_scratch = 1", "true or false"]),
])
def test_bad_retrain_settings_are_one_line_errors(fleetsim, tmp_path, setting, needles):
    code, _, err = fleetsim("run", write_experiment(tmp_path, TINY), "--set", 'experiment.strategies=["duet"]',
                            "--set", setting, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()
