"""Every built-in strategy on 2-3 devices against numbers worked out by hand.

Each test calls the strategy's real aggregation / generation / device function with
hand-built Flower messages or tiny arrays, and compares with literals (or a one-line numpy
expression that is visibly the formula), never with a second call into the code under test.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from conftest import SmallWorld
from devices import models
from devices.backbones.layers import apply_patch
from devices.models import PAD
from devices.runtime import Payload
from simulator.grid import FleetGrid, flower_patched
from simulator.records import array_record
from strategies.cloud_only import CloudOnly
from strategies.duet import Duet
from strategies.duet_generator import GeneratorConfig
from strategies.fedavg import FedAvg
from strategies.local_finetune import LocalFinetune
from strategies.local_finetune import train as finetune_train
from strategies.metapatch import MetaPatch, patch_from_phi
from strategies.metapatch import train as metapatch_train
from strategies.momodistill import MoMoDistill, kd_loss, predict_phi

TIGHT = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture
def flower():
    """Flower's task identity (messages need a run id), as a FleetGrid run sets it."""
    fake = SimpleNamespace(run=SimpleNamespace(run_id=7), wait=lambda s: None)
    with flower_patched(fake, 0):
        yield


def ask(node: int, rnd: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": rnd})}), dst_node_id=node,
                   message_type=message_type)


def reply(node: int, arrays: dict[str, dict[str, np.ndarray]] | None = None, metrics: dict | None = None,
          metrics_name: str = "metrics") -> Message:
    """A device's successful reply to a train message (as FleetGrid builds it)."""
    content = RecordDict({name: array_record(a) for name, a in (arrays or {}).items()})
    if metrics is not None:
        content[metrics_name] = MetricRecord(metrics)
    return Message(content, reply_to=ask(node))


def failed(node: int) -> Message:
    return Message(Error(code=1, reason="dropped out"), reply_to=ask(node))


def fake_grid(nodes: list[int]):
    return SimpleNamespace(get_node_ids=lambda: list(nodes))


# CloudOnly -----------------------------------------------------------------------------


def test_cloud_only_ignores_replies_and_never_changes_the_model(flower):
    s = CloudOnly()
    stray = [reply(1, {"arrays": {"w": np.ones(2, np.float32)}}, {"num-examples": 3})]
    assert s.aggregate_train(1, stray) == (None, None)
    assert list(s.configure_train(1, ArrayRecord(), ConfigRecord(), fake_grid([1, 2, 3]))) == []


def test_cloud_only_run_keeps_the_installed_model_on_every_device(always_online_world):
    w = always_online_world
    s = CloudOnly()
    grid = FleetGrid(w.fleet, w.pool, s.device_app, seed=3, deadline_s=1e9)
    seen = []

    def hook(rnd, arrays):
        seen.append((rnd, {k: arrays[k].numpy().tobytes() for k in arrays}))
        return grid.round_hook(rnd, arrays)

    with flower_patched(grid, 3):
        result = s.start(grid=grid, initial_arrays=array_record(w.initial), num_rounds=2, evaluate_fn=hook)
    assert len(result.arrays) == 0  # Flower's Result: no round ever aggregated a model
    initial = {k: v.tobytes() for k, v in w.initial.items()}
    assert seen == [(0, initial), (1, initial), (2, initial)]  # the global model after every round
    for r in grid.results:  # nobody asked, nothing moved
        d = r.devices
        assert not d["selected"].any()
        assert (d["bytes_up"] == 0).all() and (d["bytes_down"] == 0).all() and (d["device_flops"] == 0).all()
    for host in w.pool.hosts:
        assert host.personal == {}
        (vid,) = np.unique(host.held)
        assert all(np.array_equal(host.versions[int(vid)][k], w.initial[k]) for k in w.initial)


# FedAvg --------------------------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean_of_three_devices(flower):
    s = FedAvg()
    replies = [
        reply(1, {"arrays": {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.array([0.0], np.float32)}},
              {"num-examples": 1, "train_loss": 0.9}),
        reply(2, {"arrays": {"w": np.array([[5.0, 6.0], [7.0, 8.0]], np.float32), "b": np.array([4.0], np.float32)}},
              {"num-examples": 3, "train_loss": 0.5}),
        failed(3),  # an error reply carries no weight
        reply(4, {"arrays": {"w": np.array([[-1.0, 0.0], [1.0, 2.0]], np.float32), "b": np.array([-8.0], np.float32)}},
              {"num-examples": 4, "train_loss": 0.1}),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    # (1*w1 + 3*w2 + 4*w4) / 8, element by element
    np.testing.assert_allclose(arrays["w"].numpy(), [[(1 + 15 - 4) / 8, (2 + 18 + 0) / 8],
                                                     [(3 + 21 + 4) / 8, (4 + 24 + 8) / 8]], **TIGHT)
    assert arrays["w"].numpy().tolist() == [[1.5, 2.5], [3.5, 4.5]]
    np.testing.assert_allclose(arrays["b"].numpy(), [(0 + 12 - 32) / 8], **TIGHT)  # -2.5
    assert metrics["train_loss"] == pytest.approx((0.9 + 1.5 + 0.4) / 8, rel=1e-12)  # 0.35


def test_fedavg_average_equals_flowers_own_bit_for_bit(flower):
    """Our FedAvg reads reply arrays without np.load; the average must be Flower's exactly."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(3)
    replies = [reply(i, {"arrays": {"w": rng.normal(size=(7, 5)).astype(np.float32),
                                    "b": rng.normal(size=5).astype(np.float32)}},
                     {"num-examples": int(rng.integers(1, 40)), "train_loss": 0.5}) for i in range(1, 30)]
    ours, _ = FedAvg().aggregate_train(1, replies)
    theirs = aggregate_arrayrecords([r.content for r in replies], "num-examples")
    for k in ("w", "b"):
        assert ours[k].numpy().dtype == theirs[k].numpy().dtype == np.float32
        assert ours[k].numpy().tobytes() == theirs[k].numpy().tobytes()


@pytest.mark.parametrize("a", [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(2.5),
                               np.zeros((0, 4), np.int32), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
                               np.arange(4, dtype=">i4")])
def test_array_view_reads_what_flowers_numpy_reads(a):
    from flwr.app import Array

    from strategies.common import array_view

    arr = Array(a)
    got, want = array_view(arr), arr.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


def test_fedavg_keeps_the_global_model_when_no_valid_reply_trained_on_an_example(flower):
    s = FedAvg()
    replies = [reply(1, {"arrays": {"w": np.ones(2, np.float32)}}, {"num-examples": 0, "train_loss": 0.7}), failed(2)]
    assert s.aggregate_train(2, replies) == (None, None)
    assert s.aggregate_train(2, [failed(1), failed(2)]) == (None, None)


# LocalFinetune -------------------------------------------------------------------------


def test_local_finetune_never_aggregates_and_averages_metrics_by_examples(flower):
    s = LocalFinetune(lr=0.25, local_steps=2)
    replies = [reply(1, metrics={"num-examples": 2, "train_loss": 0.3}), failed(2),
               reply(3, metrics={"num-examples": 6, "train_loss": 0.7})]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is None
    assert dict(metrics) == {"train_loss": pytest.approx((2 * 0.3 + 6 * 0.7) / 8, rel=1e-12), "num-examples": 8}
    msgs = list(s.configure_train(4, ArrayRecord(), ConfigRecord(), fake_grid([5, 9, 11])))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [5, 9, 11]  # fraction 1.0: every online device
    for m in msgs:  # a config only: no weights go down
        assert list(m.content.array_records) == []
        assert dict(m.content["config"]) == {"server-round": 4, "local-steps": 2, "lr": 0.25}


def test_local_finetune_device_keeps_its_own_sgd_step_and_the_shared_model_is_untouched(always_online_world):
    w = always_online_world
    host = w.pool.hosts[0]
    local = np.array([0, 1])
    ids = host.device_ids[local]
    lr = 0.5
    (res,) = host.run(1, 1, [(finetune_train, Payload(configs={"config": {"server-round": 1, "local-steps": 1,
                                                                             "lr": lr}}), ids)])
    assert res.replies is not None, res.error
    win, cand, weight, counts = host.train_samples(local, 1, host.settings.negatives)
    assert (counts > 0).all()
    for j, i in enumerate(local):
        # one full-batch SGD step on device j's own samples only: theta - lr * grad of
        # mean_samples mean_candidates BCE(label = [1, 0, ..., 0])
        n = int(counts[j])
        p = {k: torch.from_numpy(v.copy())[None].requires_grad_(True) for k, v in w.initial.items()}
        logits = models.forward(p, win[j : j + 1, :n], cand[j : j + 1, :n])[0]
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        mine = host.held_params(np.array([i]))  # the device's effective model (personal over held)
        for k, v in w.initial.items():
            np.testing.assert_allclose(mine[k][0].numpy(), v - lr * grads[k][0].numpy(), rtol=1e-4, atol=1e-6,
                                       err_msg=k)
        assert res.replies[j].metrics["metrics"]["num-examples"] == n
        assert res.replies[j].metrics["metrics"]["train_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    a, b = host.held_params(np.array([0])), host.held_params(np.array([1]))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two devices, two models
    assert all(np.array_equal(host.versions[int(v)][k], w.initial[k])  # the shared copy never moves
               for v in np.unique(host.held) for k in w.initial)


# DUET ----------------------------------------------------------------------------------

SPEC2 = models.ModelSpec(n_items=5, dim=2, window=3)  # head: w1 (2, 2), b1 (2,), w2 (2, 2), b2 (2,)


def tiny_generator(m: int, z: float, a: float) -> dict[str, np.ndarray]:
    """z_dim = e_dim = 1; the encoder's last layer is zero with bias ``z``, so every window
    gets z = ``z`` and e_n = ``a`` * z for every layer."""
    d = SPEC2.dim
    f = lambda *shape: np.zeros(shape, np.float32)
    g = {"gen.enc.gru.w_ih": f(d, 3 * d), "gen.enc.gru.w_hh": f(d, 3 * d), "gen.enc.gru.b": f(3 * d),
         "gen.enc.w1": f(d, d), "gen.enc.b1": f(d), "gen.enc.w2": f(d, 1), "gen.enc.b2": np.array([z], np.float32)}
    for wk, bk, i, o in (("head.w1", "head.b1", 2, 2), ("head.w2", "head.b2", 2, 2)):
        g[f"gen.{wk}.A"] = np.array([[a]], np.float32)  # the bias layer uses its weight layer's e_n
        g[f"gen.{wk}.D"], g[f"gen.{wk}.d0"] = f(m, i * o, 1), f(m, i * o)
        g[f"gen.{bk}.C"], g[f"gen.{bk}.c0"] = f(m, o, 1), f(m, o)
    return g


def duet_with(gen: dict[str, np.ndarray], gcfg: GeneratorConfig) -> Duet:
    s = Duet(m=gcfg.m, tau=gcfg.tau, stabilizer=gcfg.stabilizer)
    s.spec, s.gcfg = SPEC2, gcfg
    s._install(models.init_params(SPEC2, 0), gen)
    return s


WINDOWS = np.array([[PAD, 1, 2], [4, 3, 0], [PAD, PAD, PAD]])


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_duet_stabilised_head_of_two_decoders_by_hand(tau):
    g = tiny_generator(m=2, z=0.5, a=2.0)  # e = 1 for every layer
    # head.w1: W^(0) = D_0 e + d_0 = [.5,0,0,0] + [.5,0,0,0] = [1,0,0,0]; W^(1) = [0,1,0,0] + [0,0,1,0] = [0,1,1,0]
    g["gen.head.w1.D"][0, :, 0] = [0.5, 0, 0, 0]
    g["gen.head.w1.d0"][0] = [0.5, 0, 0, 0]
    g["gen.head.w1.D"][1, :, 0] = [0, 1, 0, 0]
    g["gen.head.w1.d0"][1] = [0, 0, 1, 0]
    # head.b1: b^(0) = [1,1] (from C), b^(1) = [-1,1] (from c)
    g["gen.head.b1.C"][0, :, 0] = [1, 1]
    g["gen.head.b1.c0"][1] = [-1, 1]
    # head.w2: W^(0) = [3,0,0,0], W^(1) = [0,0,0,4] (offsets only); head.b2: both zero
    g["gen.head.w2.d0"][0] = [3, 0, 0, 0]
    g["gen.head.w2.d0"][1] = [0, 0, 0, 4]
    heads = duet_with(g, GeneratorConfig(z_dim=1, e_dim=1, m=2, tau=tau)).generate(WINDOWS)

    def softmax(x):
        x = np.array(x, np.float64) / tau
        return np.exp(x - x.max()) / np.exp(x - x.max()).sum()

    # S = W W^T; p' = row sums of S.  w1: S = [[1,0],[0,2]] -> p' = [1, 2]
    p = softmax([1, 2])
    w1 = np.array([[p[0], p[1]], [p[1], 0.0]])  # p0 [1,0,0,0] + p1 [0,1,1,0], row-major (2, 2)
    # b1: S = [[2,0],[0,2]] -> p = [.5, .5] -> .5 [1,1] + .5 [-1,1] = [0, 1]
    # w2: S = [[9,0],[0,16]] -> p' = [9, 16]
    q = softmax([9, 16])
    w2 = np.array([[3 * q[0], 0.0], [0.0, 4 * q[1]]])
    for n in range(len(WINDOWS)):  # z does not depend on the window: one head for all three
        np.testing.assert_allclose(heads["head.w1"][n], w1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(heads["head.b1"][n], [0.0, 1.0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(heads["head.w2"][n], w2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(heads["head.b2"][n], [0.0, 0.0], atol=1e-7)
    assert list(heads) == ["head.w1", "head.b1", "head.w2", "head.b2"]


def test_duet_without_stabiliser_is_one_linear_decoder_by_hand():
    g = tiny_generator(m=1, z=0.5, a=6.0)  # e = 3
    g["gen.head.w1.D"][0, :, 0] = [1, 2, 3, 4]
    g["gen.head.w1.d0"][0] = [0.5, 0, 0, -1]
    g["gen.head.b1.C"][0, :, 0] = [1, -1]
    g["gen.head.b1.c0"][0] = [0, 0.25]
    g["gen.head.w2.d0"][0] = [7, 7, 7, 7]
    heads = duet_with(g, GeneratorConfig(z_dim=1, e_dim=1, m=5, stabilizer=False)).generate(WINDOWS[:2])
    for n in range(2):
        np.testing.assert_allclose(heads["head.w1"][n], [[3.5, 6.0], [9.0, 11.0]], **TIGHT)  # 3 D + d
        np.testing.assert_allclose(heads["head.b1"][n], [3.0, -2.75], **TIGHT)
        np.testing.assert_allclose(heads["head.w2"][n], [[7.0, 7.0], [7.0, 7.0]], **TIGHT)
        np.testing.assert_allclose(heads["head.b2"][n], [0.0, 0.0], **TIGHT)


# MetaPatch -----------------------------------------------------------------------------

THETA = {"theta.w": np.array([[1, 0, 0, 1], [0, 1, 1, 0]], np.float32),  # phi (2,) -> W (2, 2)
         "theta.b": np.array([[0.5, -0.5], [1, 0]], np.float32)}


def test_metapatch_patch_from_phi_and_its_application_by_hand():
    theta = {k: torch.from_numpy(v) for k, v in THETA.items()}
    phi = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    patch = patch_from_phi(theta, phi, "encoder")
    # W = reshape(phi Theta_W), b = phi Theta_b
    np.testing.assert_array_equal(patch["patch.encoder.w"].numpy(), [[[1, 0], [0, 1]], [[1, 2], [2, 1]]])
    np.testing.assert_array_equal(patch["patch.encoder.b"].numpy(), [[0.5, -0.5], [2.5, -0.5]])
    # h <- h + h W + b, one patch per device, h = [1, 2] for both
    h = torch.tensor([[[1.0, 2.0]], [[1.0, 2.0]]])
    out = apply_patch(patch, h, "encoder")
    np.testing.assert_array_equal(out.numpy(), [[[2.5, 3.5]], [[8.5, 5.5]]])  # [1,2]+[1,2]+b ; [1,2]+[5,4]+b
    zero = patch_from_phi(theta, torch.zeros(1, 2), "encoder")
    assert torch.equal(apply_patch(zero, h[:1], "encoder"), h[:1])  # phi = 0: the plain cloud model


def test_metapatch_aggregation_keeps_phis_and_ships_theta_once(flower):
    s = MetaPatch(patch_dim=2, theta_epochs=0)
    s.prepare(SimpleNamespace(spec=models.ModelSpec(n_items=10), seed=0))
    replies = [reply(4, {"phi": {"phi": np.array([1.0, -2.0], np.float32)}}, {"num-examples": 3, "train_loss": 0.2}),
               failed(5),
               reply(6, {"phi": {"phi": np.array([0.5, 0.0], np.float32)}}, {"num-examples": 1, "train_loss": 0.6})]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is None  # the cloud model never changes
    assert dict(metrics) == {"train_loss": pytest.approx((3 * 0.2 + 0.6) / 4, rel=1e-12), "num-examples": 4}
    assert sorted(s.phis) == [4, 6] and s._has_theta == {4, 6}
    np.testing.assert_array_equal(s.phis[4], [1.0, -2.0])
    np.testing.assert_array_equal(s.phis[6], [0.5, 0.0])
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(2, ArrayRecord(), ConfigRecord(), fake_grid([4, 5, 6]))}
    assert sorted(msgs) == [4, 5, 6]
    assert "theta" not in msgs[4].content and "theta" not in msgs[6].content  # they hold Theta already
    assert "theta" in msgs[5].content  # its first reply failed: Theta goes again
    np.testing.assert_array_equal(msgs[5].content["theta"]["theta.w"].numpy(), s.theta["theta.w"])
    assert dict(msgs[4].content["config"]) == {"server-round": 2, "patch-layer": "encoder", "patch-dim": 2}


def test_metapatch_device_patch_is_phi_times_the_theta_it_was_sent(always_online_world):
    w = always_online_world
    host = w.pool.hosts[0]
    rng = np.random.default_rng(5)
    width = w.spec.dim
    theta = {"theta.w": (rng.standard_normal((3, width * width)) * 0.05).astype(np.float32),
             "theta.b": (rng.standard_normal((3, width)) * 0.05).astype(np.float32)}
    cfg = {"config": {"server-round": 1, "patch-layer": "encoder", "patch-dim": 3, "lr": 0.5, "local-steps": 2}}
    ids = host.device_ids[:2]
    for rnd, payload in ((1, Payload(arrays={"theta": theta}, configs=cfg)), (2, Payload(configs=cfg))):
        (res,) = host.run(rnd, 1, [(metapatch_train, payload, ids)])  # round 2: no Theta, the stored one is used
        assert res.replies is not None, res.error
        for j in range(2):
            phi = res.replies[j].arrays["phi"]["phi"]
            assert phi.shape == (3,) and np.abs(phi).sum() > 0
            np.testing.assert_array_equal(host.kv["metapatch.phi"][j], phi)
            own = host.personal[j]
            np.testing.assert_allclose(own["patch.encoder.w"], (phi @ theta["theta.w"]).reshape(width, width),
                                       rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(own["patch.encoder.b"], phi @ theta["theta.b"], rtol=1e-5, atol=1e-7)
    assert all(np.array_equal(host.versions[int(host.held[j])][k], w.initial[k]) for j in (0, 1) for k in w.initial)


# MoMoDistill ---------------------------------------------------------------------------


def test_momodistill_kd_loss_is_the_binary_kl_by_hand():
    student = torch.tensor([0.0, math.log(3.0), -math.log(4.0)])  # sigmoid: 1/2, 3/4, 1/5
    teacher = torch.tensor([0.8, 0.75, 0.5])
    kl = lambda t, s: t * math.log(t / s) + (1 - t) * math.log((1 - t) / (1 - s))
    np.testing.assert_allclose(kd_loss(student, teacher).numpy(), [kl(0.8, 0.5), 0.0, kl(0.5, 0.2)],
                               rtol=1e-5, atol=1e-6)


def test_momodistill_aux_encoder_prediction_by_hand():
    aux = {"aux.w1": torch.eye(2), "aux.b1": torch.tensor([0.0, -1.0]), "aux.w2": torch.tensor([[1.0], [2.0]]),
           "aux.b2": torch.tensor([0.5])}
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-3.0, 1.0]]])
    windows = torch.tensor([[PAD, 0, 2], [PAD, 3, 1], [PAD, PAD, PAD]])
    # mean of the non-PAD embeddings -> relu(. W1 + b1) W2 + b2
    # [1.5, 1] -> relu([1.5, 0]) -> 1.5 + .5 ; [-1.5, 1] -> relu([-1.5, 0]) -> .5 ; [0, 0] -> relu([0, -1]) -> .5
    np.testing.assert_allclose(predict_phi(aux, emb, windows).numpy(), [[2.0], [0.5], [0.5]], **TIGHT)


def tiny_momo(**params) -> MoMoDistill:
    """A MoMoDistill whose cloud state is tiny hand-made arrays (what ``prepare`` would set)."""
    s = MoMoDistill(patch_dim=2, **params)
    s.theta = dict(THETA)
    s.aux = {"aux.w2": np.zeros((2, 2), np.float32)}
    s.initial = {"w": np.array([1.0, 2.0], np.float32)}
    s.model = dict(s.initial)
    s.version, s.device_version, s.pending, s.reported, s.distillations = 0, {}, {}, set(), []
    s._make_bundle()
    return s


def test_momodistill_aggregation_versions_and_distillation_schedule(flower, monkeypatch):
    s = tiny_momo(distill_every=2, aux_epochs=0)
    assert set(s._bundle) == {"theta"}  # version 0, no pretrained encoder: Theta only
    replies = [reply(1, {"phi": {"phi": np.array([1.0, 2.0], np.float32)}, "data": {"items": np.array([3, 4, 5], np.int32)}},
                     {"num-examples": 4, "train_loss": 0.2, "targets": 2, "cold-start": 1}),
               reply(2, metrics={"num-examples": 0, "cold-start": 1}),  # a push-only reply: no phi, no data
               failed(3),
               reply(5, {"phi": {"phi": np.array([0.0, -1.0], np.float32)}, "data": {"items": np.array([7], np.int32)}},
                     {"num-examples": 1, "train_loss": 0.7, "targets": 0, "cold-start": 0})]
    calls = []

    def fake_distill(rnd):
        calls.append((rnd, sorted(s.pending)))
        s.model = {"w": np.array([9.0, 8.0], np.float32)}
        s.version += 1
        s._make_bundle()
        s.pending = {}
        return {"distilled_devices": 2}

    monkeypatch.setattr(s, "distill", fake_distill)
    arrays, m = s.aggregate_train(1, replies)
    assert arrays is None and calls == []  # round 1 of distill_every = 2: nothing distilled
    assert (m["version"], m["cold_starts"], m["reported_total"]) == (0, 2, 2)
    assert m["train_loss"] == pytest.approx((4 * 0.2 + 1 * 0.7) / 5, rel=1e-12)
    assert s.device_version == {1: 0, 2: 0, 5: 0} and s.reported == {1, 5}
    assert sorted(s.pending) == [1, 5] and s.pending[1][2] == 2 and s.pending[5][2] == 0
    np.testing.assert_array_equal(s.pending[1][1], [3, 4, 5])

    arrays, m = s.aggregate_train(2, [replies[0]])
    assert calls == [(2, [1, 5])]  # round 2: the pending uploads of both rounds' reporters
    np.testing.assert_array_equal(arrays["w"].numpy(), [9.0, 8.0])
    assert m["version"] == 0 and m["distilled_devices"] == 2 and s.version == 1
    assert set(s._bundle) == {"theta", "aux", "model"}  # from version 1 on, the model and encoder ship too

    # round 3: devices 1 and 5 hold version 0 (stale), 2 the new one, 7 never got anything
    s.device_version = {1: 0, 2: 1, 5: 0}
    msgs = list(s.configure_train(3, ArrayRecord(), ConfigRecord(), fake_grid([1, 2, 5, 7])))
    by_node = {}
    for msg in msgs:
        by_node.setdefault(msg.metadata.dst_node_id, []).append(msg)
    assert sorted(by_node) == [1, 2, 5, 7] and all(len(v) == 1 for v in by_node.values())
    for n, (msg,) in by_node.items():
        stale = n != 2
        assert ("model" in msg.content) == stale, n
        if stale:
            np.testing.assert_array_equal(msg.content["model"]["w"].numpy(), [9.0, 8.0])
        assert msg.content["config"]["train"] is True  # fraction_train = 1.0: all selected, all train

    s2 = tiny_momo(fraction_train=0.5, push="online")
    s2.version, s2.model, s2.device_version = 1, {"w": np.array([9.0, 8.0], np.float32)}, {2: 1, 4: 1}
    s2._make_bundle()
    msgs = list(s2.configure_train(3, ArrayRecord(), ConfigRecord(), fake_grid([1, 2, 3, 4])))
    train = {m.metadata.dst_node_id for m in msgs if m.content["config"]["train"]}
    push = {m.metadata.dst_node_id for m in msgs if not m.content["config"]["train"]}
    assert len(train) == 2  # int(4 * 0.5)
    assert push == {1, 3} - train  # stale, online and not selected: the model is pushed without training
    for msg in msgs:
        assert ("model" in msg.content) == (msg.metadata.dst_node_id in (1, 3))


def test_momodistill_measurement_means_and_gains_by_hand(flower):
    s = tiny_momo()
    reps = [reply(1, metrics={"num-examples": 1, "phi-norm": 2.0, "auc_initial": 0.6, "auc_distilled": 0.7,
                              "auc_aux": 0.9}),
            reply(2, metrics={"num-examples": 3, "phi-norm": 1.0, "auc_initial": 0.8, "auc_distilled": 0.7,
                              "auc_aux": 0.5}),
            reply(3, metrics={"num-examples": 0, "phi-norm": 5.0, "auc_initial": 0.0, "auc_distilled": 0.0,
                              "auc_aux": 0.0}),  # no AUC: counts for nothing
            failed(4)]
    m = s.aggregate_evaluate(2, reps)
    want = {"auc_initial": (0.6 + 2.4) / 4, "auc_distilled": (0.7 + 2.1) / 4, "auc_aux": (0.9 + 1.5) / 4,
            "phi-norm": (2.0 + 3.0) / 4}
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-12), k
    assert m["users"] == 4
    assert m["gain_distilled"] == pytest.approx(0.7 - 0.75, rel=1e-12)
    assert m["gain_aux"] == pytest.approx(0.6 - 0.7, rel=1e-12)
    assert s.aggregate_evaluate(2, [failed(4)]) is None
