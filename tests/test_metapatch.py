"""MetaPatch: patch shapes, only phi trains, vectorised = per-device loop, state, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SmallWorld, small_config
from devices import models
from strategies.cloud import CloudContext
from simulator.grid import FleetGrid, flower_patched
from simulator.records import array_record
from simulator.run import make_strategy
from strategies.metapatch import init_theta, patch_from_phi, train_phi


@pytest.mark.parametrize("backbone, layer, width", [("gru4rec", "encoder", 32), ("gru4rec", "head.1", 32),
                                                    ("din", "encoder", 32), ("din", "head.1", 128),
                                                    ("sasrec", "encoder", 32)])
def test_patch_shapes_and_zero_patch_is_identity(backbone, layer, width):
    spec = models.ModelSpec(n_items=50, backbone=backbone)
    theta = {k: torch.from_numpy(v) for k, v in init_theta(spec, layer, 8, 0).items()}
    patch = patch_from_phi(theta, torch.randn(3, 8), layer)
    w_key, b_key = models.patch_keys(layer)
    assert patch[w_key].shape == (3, width, width) and patch[b_key].shape == (3, width)
    params = models.to_torch(models.init_params(spec, 0))
    win, cand = torch.randint(0, 50, (3, 4, spec.window)), torch.randint(0, 50, (3, 4, 6))
    zero = patch_from_phi(theta, torch.zeros(3, 8), layer)
    plain = models.forward(params, win, cand)
    assert torch.equal(models.forward({**params, **zero}, win, cand), plain)
    assert not torch.allclose(models.forward({**params, **patch}, win, cand), plain)


def _batch(spec, b=4, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    win = torch.randint(0, spec.n_items, (b, n, spec.window), generator=g)
    cand = torch.randint(0, spec.n_items, (b, n, 5), generator=g)
    weight = torch.ones(b, n)
    weight[1, 3:] = 0  # a device with fewer samples
    return win, cand, weight


def test_vectorised_phi_training_equals_the_per_device_loop_and_only_phi_changes():
    spec = models.ModelSpec(n_items=60)
    params = models.to_torch(models.init_params(spec, 1))
    theta = {k: torch.from_numpy(v) for k, v in init_theta(spec, "encoder", 8, 1).items()}
    before = {k: v.clone() for k, v in {**params, **theta}.items()}
    win, cand, weight = _batch(spec)
    phi0 = torch.zeros(4, 8)
    phi, losses = train_phi(params, theta, phi0, win, cand, weight, "encoder", steps=5, lr=0.5)
    assert not torch.equal(phi, phi0)
    for b in range(4):
        one, loss1 = train_phi(params, theta, phi0[b : b + 1], win[b : b + 1], cand[b : b + 1], weight[b : b + 1],
                               "encoder", steps=5, lr=0.5)
        torch.testing.assert_close(phi[b : b + 1], one, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses[b : b + 1], loss1, rtol=1e-5, atol=1e-6)
    for k, v in {**params, **theta}.items():
        assert torch.equal(v, before[k]), k  # the body and Theta are bit-identical


def served(world: SmallWorld, rounds: int, **params):
    strategy = make_strategy("metapatch", {"fraction_train": 1.0, **params})
    w = world
    strategy.prepare(CloudContext(w.fleet.interactions, w.fleet.timeline.history_end, w.spec, w.initial,
                                  w.cfg.experiment.seed))
    grid = FleetGrid(w.fleet, w.pool, strategy.device_app, seed=3, deadline_s=1e9)
    with flower_patched(grid, 3):
        strategy.start(grid=grid, initial_arrays=array_record(w.initial), num_rounds=rounds, evaluate_fn=grid.round_hook)
    return strategy, grid


def test_phi_persists_across_rounds_is_uploaded_and_theta_is_shipped_once(always_online_world):
    w = always_online_world
    strategy, grid = served(w, rounds=1)
    host = w.pool.hosts[0]
    phi1 = {i: v.copy() for i, v in host.kv["metapatch.phi"].items()}
    assert phi1 and any(np.abs(v).sum() > 0 for v in phi1.values())
    # the device's held model is the cloud model (bit-identical) plus its patch
    dev = next(iter(phi1))
    assert set(host.personal[dev]) == set(models.patch_keys("encoder"))
    assert all(np.array_equal(host.versions[int(host.held[dev])][k], w.initial[k]) for k in w.initial)
    # training continues from the stored phi: the same round's work run again (same data,
    # same negatives) moves phi further instead of reproducing it from zeros
    from devices.runtime import Payload
    from strategies.metapatch import train

    cfg = {"server-round": 1, "patch-layer": "encoder", "patch-dim": 8}
    ids = host.device_ids[sorted(phi1)[:5]]
    host.run(1, 9, [(train, Payload(configs={"config": cfg}), ids)])
    again = host.kv["metapatch.phi"]
    assert all(not np.allclose(again[i], phi1[i]) for i in sorted(phi1)[:5])
    w2 = SmallWorld(w.cfg)
    strategy2, grid2 = served(w2, rounds=2)
    r1, r2 = (r.devices for r in grid2.results)
    theta_bytes = sum(v.nbytes for v in strategy.theta.values())
    assert (r1["bytes_down"][r1["selected"]] >= theta_bytes).all()
    assert (r2["bytes_down"][r2["selected"]] < theta_bytes).all()  # Theta is not sent again
    assert (r1["bytes_up"][r1["selected"]] >= 8 * 4).all()
    assert set(strategy2.phis) and len(next(iter(strategy2.phis.values()))) == 8


def test_same_seed_same_phi(always_online_world):
    cfg = always_online_world.cfg
    a = served(SmallWorld(cfg), rounds=2)[0].phis
    b = served(SmallWorld(cfg), rounds=2)[0].phis
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("params, key", [({"patch_dim": 0}, "patch_dim"), ({"local_steps": 0}, "local_steps"),
                                         ({"patch_layer": "nope"}, "patch_layer")])
def test_bad_parameters_name_the_key(params, key):
    from simulator.errors import ConfigError

    with pytest.raises(ConfigError, match=f"strategies\\.metapatch\\.{key}"):
        make_strategy("metapatch", params)


def test_chunked_training_by_sample_count_equals_one_batch(always_online_world, monkeypatch):
    """Devices are trained in chunks sorted by sample count: same phi as one big batch."""
    from devices.runtime import Payload
    import strategies.metapatch as mp

    w = always_online_world
    host = w.pool.hosts[0]
    theta = init_theta(w.spec, "encoder", 8, 0)
    cfg = {"config": {"server-round": 2, "patch-layer": "encoder", "patch-dim": 8}}
    results = []
    for chunk in (10_000, 3):
        monkeypatch.setattr(mp, "PHI_CHUNK", chunk)
        host.reset(w.initial)
        (res,) = host.run(2, 1, [(mp.train, Payload(arrays={"theta": theta}, configs=cfg), host.device_ids)])
        assert res.replies is not None, res.error
        results.append(np.stack([r.arrays["phi"]["phi"] for r in res.replies]))
    assert np.abs(results[0]).sum() > 0
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_metapatch_and_momodistill_share_one_learned_theta_per_run(always_online_world):
    w = always_online_world
    cloud = CloudContext(w.fleet.interactions, w.fleet.timeline.history_end, w.spec, w.initial, w.cfg.experiment.seed)
    # aux_epochs = 0: MoMoDistill's encoder pretraining would go on to refine its own copy of Theta
    a, b = make_strategy("metapatch", {"theta_epochs": 1}), make_strategy("momodistill", {"theta_epochs": 1, "aux_epochs": 0})
    a.prepare(cloud)
    b.prepare(cloud)
    assert len(cloud.cache) == 1  # learned once, reused
    assert all(np.array_equal(a.theta[k], b.theta[k]) for k in a.theta)
    assert not np.array_equal(a.theta["theta.w"], init_theta(w.spec, "encoder", 8, w.cfg.experiment.seed)["theta.w"])
    b.theta["theta.w"][:] = 0  # each strategy owns its copy
    assert np.abs(a.theta["theta.w"]).sum() > 0
    fresh = CloudContext(w.fleet.interactions, w.fleet.timeline.history_end, w.spec, w.initial, w.cfg.experiment.seed)
    c = make_strategy("metapatch", {"theta_epochs": 1})
    c.prepare(fresh)  # the same computation without the cache gives the same Theta
    assert all(np.array_equal(a.theta[k], c.theta[k]) for k in a.theta)


def test_theta_learned_a_block_of_batches_at_a_time_equals_all_at_once(always_online_world, monkeypatch):
    """Learning Theta builds samples and body outputs a block of batches at a time (a
    200,000-device history at once ran out of 24 GB); blocks of a few batches, one of them
    shorter, give the very Theta of one block."""
    from strategies import metapatch_theta as mt

    w = always_online_world
    cloud = lambda: CloudContext(w.fleet.interactions, w.fleet.timeline.history_end, w.spec, w.initial, w.cfg.experiment.seed)
    whole = mt.learn_theta(cloud(), "encoder", 8, epochs=2, batch_size=64)
    from strategies.cloud import history_rows

    n = len(history_rows(w.fleet.interactions, w.fleet.timeline.history_end))
    assert n > 5 * 64  # several blocks below
    import strategies.cloud as sc

    built = []
    real = sc.SampleBuilder.build
    monkeypatch.setattr(sc.SampleBuilder, "build", lambda self, rows, *a: built.append(len(rows)) or real(self, rows, *a))
    monkeypatch.setattr(mt, "THETA_BLOCK_SAMPLES", 150)  # 3 batches of about 64 per block, a short last one
    blocked = mt.learn_theta(cloud(), "encoder", 8, epochs=2, batch_size=64)
    assert len(built) >= 2 * 3 and max(built) <= 3 * 64 and sum(built) == 2 * n
    assert all(np.array_equal(whole[k], blocked[k]) for k in whole)
    assert not np.array_equal(whole["theta.w"], mt.init_theta(w.spec, "encoder", 8, w.cfg.experiment.seed)["theta.w"])
