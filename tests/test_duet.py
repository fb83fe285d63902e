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
    for rnd in (1, 2):  # the per-device generation time is the round's generation time over its devices
        m = result.train_metrics_clientapp[rnd]
        assert m["devices"] == m["installed"] == w.fleet.n_devices
        assert m["body_sent"] == (w.fleet.n_devices if rnd == 1 else 0)
        assert 0 < m["generation_s"] < float("inf")
        assert m["generation_ms_per_device"] == pytest.approx(1e3 * m["generation_s"] / m["devices"], rel=1e-12)


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


def numpy_heads(strategy, windows: np.ndarray) -> dict[str, np.ndarray]:
    """The DUET paper's generator (docs/methods.md) written out in numpy from the strategy's parameters: e_n = A_n z;
    W^(i) = D_i e_n + d_i; with the stabiliser p = softmax(rowsum(W W^T) / tau), W = sum_i p_i W^(i)."""
    import torch

    from strategies.duet_generator import encode_windows

    gen, gcfg = strategy.gen, strategy.gcfg
    with torch.no_grad():
        z = encode_windows({k: torch.from_numpy(v) for k, v in gen.items()}, models.to_torch(strategy.body),
                           torch.from_numpy(windows.astype(np.int64))).double().numpy()
    out = {}
    shapes = strategy.spec.shapes()
    for wk, bk in zip(strategy.spec.head_keys()[::2], strategy.spec.head_keys()[1::2]):
        A = gen[f"gen.{wk}.A"].astype(np.float64)
        for key, basis, off in ((wk, "D", "d0"), (bk, "C", "c0")):
            layer = wk if key == wk else bk
            D, d = gen[f"gen.{layer}.{basis}"].astype(np.float64), gen[f"gen.{layer}.{off}"].astype(np.float64)
            heads = []
            for n in range(len(z)):
                e = A @ z[n]
                W = np.stack([D[i] @ e + d[i] for i in range(len(D))])  # (m, P) candidates
                if len(D) == 1:
                    heads.append(W[0])
                else:
                    logit = W @ W.T
                    logit = logit.sum(1) / gcfg.tau
                    p = np.exp(logit - logit.max())
                    heads.append((p / p.sum()) @ W)
            out[key] = np.stack(heads).reshape(len(z), *shapes[key])
    return out


@pytest.mark.parametrize("params", [{"stabilizer": False}, {"frozen_bases": True}, {"m": 2, "tau": 2.0},
                                    {"from_scratch": True}])
def test_ablations_run(always_online_world, params):
    from strategies.duet_generator import BASES, GeneratorConfig, init_generator, is_basis

    w = always_online_world
    strategy, grid, _ = served(w, rounds=1, **params)
    assert grid.results[0].info["ok"] > 0
    assert grid.results[0].info["ok"] == w.fleet.n_devices and grid.results[0].info["errors"] == 0
    host = w.pool.hosts[0]
    local = np.array(sorted(host.personal)[:3])
    installed = {int(i): dict(host.personal[int(i)]) for i in local}
    bytes_down = grid.results[0].devices["bytes_down"].copy()
    heads_keys = w.spec.head_keys()
    # decoders per layer: 1 without the stabiliser (m ignored), else m
    decoders = 1 if params.get("stabilizer") is False else params.get("m", 5)
    assert all(v.shape[0] == decoders for k, v in strategy.gen.items() if is_basis(k))
    assert sum(is_basis(k) for k in strategy.gen) == len(BASES) * len(heads_keys) // 2
    # the installed head is the generator's formula (one decoder, or the stabilised mixture) for the window
    expect = numpy_heads(strategy, host.last_windows(local, 1))
    for j, i in enumerate(local):
        for k in heads_keys:
            np.testing.assert_allclose(installed[int(i)][k], expect[k][j], rtol=1e-4, atol=1e-5, err_msg=k)
    # the universal head the body carries is never trained (DUET generates it instead)
    assert all(np.array_equal(strategy.body[k], w.initial[k]) for k in heads_keys)
    if params.get("frozen_bases"):  # bases bit-identical to their init, everything else trained
        gen0 = init_generator(w.spec, strategy.gcfg, w.cfg.experiment.seed, head_init={k: w.initial[k] for k in heads_keys})
        assert all(np.array_equal(strategy.gen[k], gen0[k]) == is_basis(k) for k in gen0)
    if params.get("from_scratch"):
        # with a vanishing lr the joint training stays at its start: the fresh init for the
        # body (not the universal model), the universal model by default
        fresh = models.init_params(w.spec, w.cfg.experiment.seed)
        still = prepared(w, from_scratch=True, lr=1e-9)
        plain = prepared(w, lr=1e-9)
        for k in w.initial:
            if k in heads_keys:
                assert np.array_equal(still.body[k], w.initial[k]) and np.array_equal(plain.body[k], w.initial[k])
            else:
                np.testing.assert_allclose(still.body[k], fresh[k], rtol=0, atol=1e-5, err_msg=k)
                np.testing.assert_allclose(plain.body[k], w.initial[k], rtol=0, atol=1e-5, err_msg=k)
                assert not np.allclose(fresh[k], w.initial[k], rtol=0, atol=1e-3), k  # the two starts differ
        gen0 = init_generator(w.spec, GeneratorConfig(from_scratch=True), w.cfg.experiment.seed,
                              head_init={k: fresh[k] for k in heads_keys})  # offsets: the fresh head + noise
        np.testing.assert_allclose(still.gen["gen.head.w1.d0"], gen0["gen.head.w1.d0"], rtol=0, atol=1e-5)
    # against the default DUET on the same world: same bytes (same head and body shapes), other heads
    w.pool.reset(w.initial)
    default, default_grid, _ = served(w, rounds=1)
    np.testing.assert_array_equal(bytes_down, default_grid.results[0].devices["bytes_down"])
    assert all(not np.allclose(installed[int(i)]["head.w1"], host.personal[int(i)]["head.w1"]) for i in local)
    assert all(v.shape[0] == 5 for k, v in default.gen.items() if is_basis(k))
    if params.get("frozen_bases"):  # the default does train its bases
        gen0 = init_generator(w.spec, default.gcfg, w.cfg.experiment.seed, head_init={k: w.initial[k] for k in heads_keys})
        assert all(not np.array_equal(default.gen[k], gen0[k]) for k in gen0 if is_basis(k))


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
