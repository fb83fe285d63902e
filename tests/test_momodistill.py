"""MoMoDistill + MetaPatch loop: KD term, cloud-side samples, distillation and push,
cold start from the auxiliary encoder, measurement on users that never reported, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SmallWorld, small_config
from test_cli import TINY, assert_one_line_error, fleetsim, write_experiment  # noqa: F401 (fleetsim: fixture)
from devices import models
from devices.models import PAD
from strategies.cloud import CloudContext
from simulator.errors import ConfigError
from simulator.grid import FleetGrid, flower_patched
from simulator.records import array_record
from simulator.run import make_strategy
from strategies.metapatch import init_theta, patch_from_phi
from strategies.momodistill import (contexts, init_aux, kd_loss, last_windows, patched_logits, predict_phi,
                                    sequence_samples)


def test_kd_is_zero_when_the_device_model_equals_the_cloud_model():
    logits = torch.randn(50, 5) * 3
    assert torch.allclose(kd_loss(logits, torch.sigmoid(logits)), torch.zeros(50, 5), atol=1e-5)
    assert (kd_loss(logits, torch.sigmoid(logits + 1.0)) > 0).all()
    # and through the real models: phi = 0 is the unpatched cloud model, so KD(f_u || f) = 0
    spec = models.ModelSpec(n_items=40)
    cloud = models.to_torch(models.init_params(spec, 0))
    theta = {k: torch.from_numpy(v) for k, v in init_theta(spec, "encoder", 8, 0).items()}
    rng = np.random.default_rng(0)
    s = sequence_samples([rng.integers(0, 40, 15), rng.integers(0, 40, 12)], [5, 5], spec.window, 40, 4, rng)
    teacher = patched_logits(cloud, theta, torch.zeros(2, 8), s, "encoder")
    student = models.forward(cloud, torch.from_numpy(s.windows)[None], torch.from_numpy(s.candidates)[None])[0]
    assert torch.allclose(kd_loss(student, torch.sigmoid(teacher)).sum(), torch.zeros(()), atol=1e-4)
    moved = patched_logits(cloud, theta, torch.ones(2, 8), s, "encoder")
    assert kd_loss(student, torch.sigmoid(moved)).sum() > 1e-3


def test_sequence_samples_take_the_last_targets_with_their_windows_and_unseen_negatives():
    seqs = [np.arange(10, 25), np.array([3, 4]), np.array([7])]
    s = sequence_samples(seqs, [4, 30, 30], window=5, n_items=60, negatives=6, rng=np.random.default_rng(1))
    assert s.owner.tolist() == [0, 0, 0, 0, 1]  # a 1-item sequence has no target
    assert s.candidates[:4, 0].tolist() == [21, 22, 23, 24]
    assert s.windows[0].tolist() == [16, 17, 18, 19, 20]
    assert s.windows[4].tolist() == [PAD, PAD, PAD, PAD, 3] and s.candidates[4, 0] == 4
    for i, o in enumerate(s.owner):
        assert not np.isin(s.candidates[i, 1:], seqs[o]).any()


def test_last_windows_pad_short_and_empty_uploads():
    w = last_windows([np.arange(10, 25), np.array([3, 4]), np.array([], np.int32)], 5)
    assert w.tolist() == [[20, 21, 22, 23, 24], [PAD, PAD, PAD, 3, 4], [PAD] * 5]  # empty: MovieLens found it


def test_the_encoder_is_fitted_on_the_items_before_the_targets_never_on_the_targets():
    seqs = [np.arange(10, 25), np.array([3, 4]), np.array([7])]
    targets = [4, 30, 30]
    s = sequence_samples(seqs, targets, window=5, n_items=60, negatives=2, rng=np.random.default_rng(1))
    ctx = contexts(seqs, targets, 6)
    assert ctx.tolist() == [[15, 16, 17, 18, 19, 20], [PAD] * 5 + [3], [PAD] * 5 + [7]]
    for i, o in enumerate(s.owner):  # no sample's positive is in its owner's encoder input
        assert s.candidates[i, 0] not in ctx[o]


def run_loop(world: SmallWorld, rounds: int, **params):
    strategy = make_strategy("momodistill", {"fraction_train": 0.5, "distill_every": 2, **params})
    w = world
    strategy.prepare(CloudContext(w.fleet.interactions, w.fleet.timeline.history_end, w.spec, w.initial,
                                  w.cfg.experiment.seed))
    grid = FleetGrid(w.fleet, w.pool, strategy.device_app, seed=3, deadline_s=1e9)
    strategy.evaluate_log = []  # (round, online nodes, reported before it, nodes asked to evaluate)
    configure_evaluate = strategy.configure_evaluate

    def spy(server_round, arrays, config, grid):
        online, reported = sorted(grid.get_node_ids()), set(strategy.reported)
        msgs = list(configure_evaluate(server_round, arrays, config, grid))
        strategy.evaluate_log.append((server_round, online, reported, [m.metadata.dst_node_id for m in msgs]))
        return msgs

    strategy.configure_evaluate = spy
    with flower_patched(grid, 3):
        result = strategy.start(grid=grid, initial_arrays=array_record(w.initial), num_rounds=rounds,
                                evaluate_fn=grid.round_hook)
    return strategy, grid, result


@pytest.fixture(scope="module")
def loop():
    """Three rounds, distillation after round 2, its result pushed in round 3."""
    world = SmallWorld(small_config(data={"n_rounds": 3},
                                    profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}))
    strategy, grid, result = run_loop(world, 3, fraction_evaluate=1.0)
    return world, strategy, grid, result


def test_distillation_changes_the_cloud_model_theta_and_encoder(loop):
    world, strategy, grid, result = loop
    assert strategy.version == 1 and [d["round"] for d in strategy.distillations] == [2]
    assert any(not np.array_equal(strategy.model[k], world.initial[k]) for k in world.initial)
    fresh = init_theta(world.spec, "encoder", 8, world.cfg.experiment.seed)
    assert not np.array_equal(strategy.theta["theta.w"], fresh["theta.w"])
    assert np.abs(strategy.aux["aux.w2"]).sum() > 0  # the encoder left its phi = 0 start
    assert result.arrays is not None and set(result.arrays) == set(world.initial)  # Flower's Result: the cloud model


def test_the_push_reaches_every_online_device_bit_identical_and_devices_train_only_phi(loop):
    world, strategy, grid, _ = loop
    r2, r3 = grid.results[1].devices, grid.results[2].devices
    model_bytes = sum(v.nbytes for v in world.initial.values())
    assert r2["selected"].sum() < len(r2["selected"])  # fraction 0.5 before the push
    assert r3["selected"].all() and (r3["bytes_down"] >= model_bytes).all()  # every online device gets it
    for host in world.pool.hosts:
        (vid,) = np.unique(host.held)
        assert all(np.array_equal(host.versions[int(vid)][k], strategy.model[k]) for k in strategy.model)
        for own in host.personal.values():  # phi's patch is the only thing a device owns
            assert set(own) == set(models.patch_keys("encoder"))


def test_cold_devices_get_a_metapatch_from_the_auxiliary_encoder(loop):
    world, strategy, grid, result = loop
    assert result.train_metrics_clientapp[3]["cold_starts"] > 0
    aux = {k: torch.from_numpy(v) for k, v in strategy.aux.items()}
    emb = torch.from_numpy(strategy.model["item_emb"])[None]
    theta = {k: torch.from_numpy(v) for k, v in strategy.theta.items()}
    checked = 0
    for host in world.pool.hosts:
        first_seen_late = [i for i in range(len(host.device_ids)) if int(host.device_ids[i]) not in strategy.reported]
        phis = host.kv["momodistill.phi"]
        for i in first_seen_late:  # pushed in round 3, never trained: phi is the encoder's
            context = last_windows(host.recent_items(np.array([i]), 3, strategy.aux_history), strategy.aux_history)
            want = predict_phi(aux, emb, torch.from_numpy(context))[0]
            assert np.allclose(phis[i], want.numpy(), atol=1e-6)
            assert np.abs(phis[i]).sum() > 0
            patch = patch_from_phi(theta, want[None], "encoder")
            assert all(np.allclose(host.personal[i][k], patch[k][0].numpy(), atol=1e-6) for k in patch)
            checked += 1
    assert checked > 0


def test_measurement_on_users_that_never_reported(loop):
    from sklearn.metrics import roc_auc_score

    world, strategy, grid, result = loop
    ev = result.evaluate_metrics_clientapp
    assert set(ev) == {2}
    for m in ev.values():
        assert {"auc_initial", "auc_distilled", "auc_aux", "gain_distilled", "gain_aux", "users"} <= set(m)
        assert 0 <= m["auc_initial"] <= 1 and m["users"] >= 1
    # who was asked: with fraction_evaluate = 1, exactly the online devices that had not reported by then
    # (asked only in the distillation round 2; round 3 has no new version to measure)
    assert [r for r, *_ in strategy.evaluate_log] == [1, 2, 3]
    assert [len(asked) > 0 for *_, asked in strategy.evaluate_log] == [False, True, False]
    _, online, reported, asked = strategy.evaluate_log[1]
    assert asked == sorted(set(online) - reported)
    assert 0 < len(reported) < len(online)  # a real split of the fleet (fraction_train 0.5 for two rounds)
    m = ev[2]
    # per-user AUC (sklearn) on each asked user's round-2 samples, for the initial and the distilled model
    per_user: dict[str, list[float]] = {"initial": [], "distilled": []}
    models_ = {"initial": world.initial, "distilled": strategy.model}
    for host in world.pool.hosts:
        local = np.flatnonzero(np.isin(host.device_ids, asked))
        win, cand, _, counts = host.window_samples(local, 2)
        for j in np.flatnonzero(counts > 0):
            n = int(counts[j])
            for name, params in models_.items():
                p = {k: torch.from_numpy(np.asarray(v, np.float32))[None] for k, v in params.items()}
                with torch.no_grad():
                    logits = models.forward(p, win[j : j + 1, :n], cand[j : j + 1, :n])[0].numpy()
                labels = np.zeros_like(logits)
                labels[:, 0] = 1
                per_user[name].append(roc_auc_score(labels.ravel(), logits.ravel()))
    assert m["users"] == len(per_user["initial"])
    assert m["auc_initial"] == pytest.approx(np.mean(per_user["initial"]), abs=1e-6)
    assert m["auc_distilled"] == pytest.approx(np.mean(per_user["distilled"]), abs=1e-6)
    assert m["gain_distilled"] == pytest.approx(np.mean(per_user["distilled"]) - np.mean(per_user["initial"]), abs=1e-6)
    assert m["gain_aux"] == pytest.approx(m["auc_aux"] - m["auc_distilled"], abs=1e-12)
    # and the same initial-model AUCs are what the prequential scoring of round 2 recorded for them:
    # never contacted before round 2, they held the installed cloud model when round 2 was scored
    r2 = grid.results[1].devices
    mine = np.isin(r2["device_id"], asked)
    pre = r2["auc"][mine]
    assert int(np.isfinite(pre).sum()) == m["users"]
    assert m["auc_initial"] == pytest.approx(float(np.nanmean(pre)), abs=1e-6)


def test_same_seed_same_loop():
    cfg = small_config(data={"n_rounds": 2})
    a, _, _ = run_loop(SmallWorld(cfg), 2)
    b, _, _ = run_loop(SmallWorld(cfg), 2)
    assert all(np.array_equal(a.model[k], b.model[k]) for k in a.model)
    assert all(np.array_equal(a.aux[k], b.aux[k]) for k in a.aux)
    assert a.phis.keys() == b.phis.keys() and all(np.array_equal(a.phis[k], b.phis[k]) for k in a.phis)


def test_predict_phi_ignores_padding_and_starts_at_zero():
    spec = models.ModelSpec(n_items=30)
    aux = {k: torch.from_numpy(v) for k, v in init_aux(spec, 8, 0).items()}
    emb = torch.from_numpy(models.init_params(spec, 0)["item_emb"])[None]
    win = torch.tensor([[PAD, PAD, 1, 2, 3, 4, 5, 6, 7, 8], [PAD] * 9 + [4]])
    assert torch.equal(predict_phi(aux, emb, win), torch.zeros(2, 8))
    aux["aux.w2"] = torch.randn(32, 8)
    one = predict_phi(aux, emb, win[1:])
    assert torch.allclose(one, predict_phi(aux, emb, torch.tensor([[4] * 10])), atol=1e-6)


@pytest.mark.parametrize("params, key", [({"distill_every": 0}, "distill_every"), ({"patch_dim": 0}, "patch_dim"),
                                         ({"local_steps": -1}, "local_steps"), ({"patch_layer": "nope"}, "patch_layer"),
                                         ({"push": "all"}, "push"), ({"kd_weight": -1}, "kd_weight"),
                                         ({"fraction_evaluate": 2}, "fraction_evaluate"),
                                         ({"aux_history": 0}, "aux_history"), ({"aux_epochs": -1}, "aux_epochs"),
                                         ({"aux_lr": 0}, "aux_lr")])
def test_bad_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=f"strategies\\.momodistill\\.{key}"):
        make_strategy("momodistill", params)


@pytest.mark.parametrize("setting, needles", [
    ("strategies.momodistill.distill_every=0", ["strategies.momodistill.distill_every = 0", "positive integer"]),
    ("strategies.momodistill.patch_dim=0", ["strategies.momodistill.patch_dim = 0", "positive integer"]),
    ("strategies.momodistill.local_steps=0", ["strategies.momodistill.local_steps = 0", "positive integer"]),
    ("strategies.momodistill.patch_layer=nope", ["strategies.momodistill.patch_layer = 'nope'", "encoder"]),
    ("strategies.momodistill.aux_history=0", ["strategies.momodistill.aux_history = 0", "positive integer"]),
    ("strategies.momodistill.aux_lr=abc", ["strategies.momodistill.aux_lr = 'abc'", "invalid: a number"]),
])
def test_bad_parameters_are_one_line_errors_from_the_cli(fleetsim, tmp_path, setting, needles):
    code, _, err = fleetsim("run", write_experiment(tmp_path, TINY), "--set", 'experiment.strategies=["momodistill"]',
                            "--set", setting, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def cold_start_gains(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cold start on the default synthetic fleet (2,000 devices, 10 rounds): MoMoDistill
    prepares (Theta, auxiliary encoder) on the history of the even devices only; every odd
    device -- one the cloud-side patch training never saw -- is then first contacted in
    rounds 2..10 with the device's own federated-evaluation function: it predicts its
    metapatch from its items before the round and scores the round's interactions with the
    plain cloud model and with cloud model + that patch. Returns per device-round AUC gains
    (patched - plain) and phi norms."""
    from devices.data import Interactions
    from devices.runtime import Payload
    import strategies.momodistill as momo

    world = SmallWorld(small_config(experiment={"seed": seed}, data={"n_devices": 2000, "n_items": 1000,
                                    "n_rounds": 10, "history_days": 14.0, "mean_daily_interactions": 2.0},
                                    cloud={"epochs": 3}), n_hosts=1)
    inter = world.fleet.interactions
    keep = (inter.user_of() % 2 == 0)
    seen = Interactions(inter.n_users, inter.n_items, np.concatenate([[0], np.cumsum(np.bincount(
        inter.user_of()[keep], minlength=inter.n_users))]), inter.items[keep], inter.times[keep])
    strategy = make_strategy("momodistill", {})
    strategy.prepare(CloudContext(seen, world.fleet.timeline.history_end, world.spec, world.initial, seed))
    payload = Payload(arrays={"initial": world.initial, "model": world.initial, "theta": strategy.theta, "aux": strategy.aux},
                      configs={"config": {"patch-layer": "encoder", "aux-history": strategy.aux_history}})
    host = world.pool.hosts[0]
    new_users = host.device_ids[host.device_ids % 2 == 1]
    gains, norms = [], []
    for r in range(2, 11):
        (res,) = host.run(r, 1, [(momo.evaluate, payload, new_users)])
        assert res.replies is not None, res.error
        m = [p.metrics["metrics"] for p in res.replies]
        gains += [x["auc_aux"] - x["auc_distilled"] for x in m if x["num-examples"]]
        norms += [x["phi-norm"] for x in m]
    return np.array(gains), np.array(norms)


def test_cold_start_patch_improves_auc_of_users_the_encoder_never_saw():
    gains, norms = cold_start_gains(0)
    assert (norms > 0).all()  # every new device's metapatch differs from zeros
    assert len(gains) > 1000
    assert gains.mean() > 0, f"cold-start patch lowered AUC on average: {gains.mean():+.5f}"
