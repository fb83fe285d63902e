"""DUET's parameter generator: shapes, gradients, stabiliser arithmetic, training, retraining, config."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from devices import models
from devices.samples import SampleBuilder
from devices.synthetic import SyntheticConfig, generate
from simulator.errors import ConfigError
from strategies.duet_generator import (
    GeneratorConfig,
    UploadedSamples,
    duet_logits,
    encode_windows,
    generate_heads,
    head_layers,
    head_nbytes,
    init_generator,
    is_basis,
    retrain_duet,
    train_duet,
    window_samples,
)
from strategies.cloud import history_rows

N_ITEMS = 60


def setup(backbone: str, gcfg: GeneratorConfig = GeneratorConfig(), seed: int = 0):
    spec = models.ModelSpec(n_items=N_ITEMS, backbone=backbone)
    p = models.init_params(spec, seed)
    gen = {k: torch.from_numpy(v) for k, v in init_generator(spec, gcfg, seed, head_init=p).items()}
    return spec, models.to_torch(p), gen


def random_windows(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, N_ITEMS, (n, 10), generator=g)
    w[0, :4] = models.PAD  # a short stream, left-padded
    return w


@pytest.fixture(scope="module")
def tiny_fleet():
    fleet = generate(SyntheticConfig(n_devices=25, n_items=N_ITEMS, n_rounds=1, history_days=4.0,
                                     mean_daily_interactions=4.0), seed=0)
    spec = models.ModelSpec(n_items=N_ITEMS)
    return fleet.interactions, fleet.timeline.history_end, spec, models.init_params(spec, 0)


def train(tiny_fleet, gcfg: GeneratorConfig, epochs: int):
    inter, end, spec, body0 = tiny_fleet
    return train_duet(inter, end, spec, gcfg, body0, epochs=epochs, lr=0.01, batch_size=64, negatives=4, seed=5)


@pytest.mark.parametrize("backbone", models.BACKBONES)
@pytest.mark.parametrize("n", [1, 7])
def test_head_shapes_match_spec(backbone, n):
    spec, body, gen = setup(backbone)
    heads = generate_heads(gen, body, random_windows(n), spec, GeneratorConfig())
    shapes = spec.shapes()
    assert list(heads) == list(spec.head_keys())
    for k, v in heads.items():
        assert v.shape == (n, *shapes[k]) and v.dtype == torch.float32
    assert all(k.startswith("gen.") and v.dtype == torch.float32 for k, v in gen.items())


def test_head_layers_and_nbytes():
    din = models.ModelSpec(n_items=N_ITEMS, backbone="din")
    assert head_layers(din) == [("head.w1", "head.b1", 64, 128), ("head.w2", "head.b2", 128, 64),
                                ("head.w3", "head.b3", 64, 1)]
    assert head_nbytes(din) == 66_564
    for bb in ("gru4rec", "sasrec"):
        spec = models.ModelSpec(n_items=N_ITEMS, backbone=bb)
        assert head_nbytes(spec) == 8_448
        _, body, gen = setup(bb)
        heads = generate_heads(gen, body, random_windows(1), spec, GeneratorConfig())
        assert models.num_bytes({k: v[0].numpy() for k, v in heads.items()}) == 8_448


ATT = ("din.att.w1", "din.att.b1", "din.att.w2", "din.att.b2")


def test_din_attention_generated_too_is_each_samples_own_and_sized_by_hand():
    # generate = "head+attention": DIN's activation unit is generated per window beside the
    # head. Bytes by hand (d = 32, 36 attention units): the head's 66,564 plus
    # 4 x (128 x 36 + 36 + 36 x 1 + 1) = 18,724.
    gcfg = GeneratorConfig(generate="head+attention")
    spec, body, gen = setup("din", gcfg)
    assert [layer[:2] for layer in head_layers(spec, gcfg)][-2:] == [ATT[:2], ATT[2:]]
    assert head_nbytes(spec, gcfg) == 66_564 + 18_724 == 85_288
    w = random_windows(5)
    heads = generate_heads(gen, body, w, spec, gcfg)
    assert list(heads) == [*spec.head_keys(), *ATT]
    assert not torch.equal(heads["din.att.w1"][1], heads["din.att.w1"][2])  # a function of the window
    cands = torch.randint(0, N_ITEMS, (5, 7), generator=torch.Generator().manual_seed(3))
    logits = duet_logits(body, gen, w, cands, spec, gcfg)
    for j in range(5):  # sample j is scored by the body with ITS generated layers, attention included
        own = {**body, **{k: v[j : j + 1] for k, v in heads.items()}}
        torch.testing.assert_close(logits[j], models.forward(own, w[j : j + 1][None], cands[j : j + 1][None])[0, 0])
    with_body_attention = {**body, **{k: v for k, v in heads.items() if k not in ATT}}
    assert not torch.allclose(logits, models.forward(with_body_attention, w[:, None], cands[:, None])[:, 0])


def test_attention_generation_needs_din():
    with pytest.raises(ConfigError, match="generate"):
        GeneratorConfig(generate="everything")
    for bb in ("gru4rec", "sasrec"):
        with pytest.raises(ConfigError, match=r"strategies\.duet\.generate.*no din\.att\.w1"):
            head_layers(models.ModelSpec(n_items=N_ITEMS, backbone=bb), GeneratorConfig(generate="head+attention"))


@pytest.mark.parametrize("backbone", ["gru4rec", "din"])
def test_gradients_reach_every_basis_decoder_and_encoder(backbone):
    spec, body, gen = setup(backbone)
    gen = {k: v.clone().requires_grad_(True) for k, v in gen.items()}
    body = {k: v.clone().requires_grad_(True) for k, v in body.items()}
    cands = torch.randint(0, N_ITEMS, (16, 5), generator=torch.Generator().manual_seed(2))
    logits = duet_logits(body, gen, random_windows(16), cands, spec, GeneratorConfig())
    models.bce_loss(logits[None], torch.ones(1, 16)).sum().backward()
    kinds = set()
    for k, v in gen.items():
        assert v.grad is not None, k
        kinds.add(k.rsplit(".", 1)[-1])
        if is_basis(k):
            assert v.shape[0] == 5
            for i in range(5):  # every one of the m decoders
                assert v.grad[i].abs().sum() > 0, (k, i)
        else:
            assert v.grad.abs().sum() > 0, k
    assert {"A", "D", "d0", "C", "c0", "w_ih", "w_hh", "w1", "w2"} <= kinds
    assert sum(k.endswith(".A") for k in gen) == len(head_layers(spec))
    assert body["item_emb"].grad.abs().sum() > 0


def test_stabilizer_weights_match_hand_computation():
    gcfg = GeneratorConfig(m=3, tau=2.0)
    spec, body, gen = setup("gru4rec", gcfg)
    gen = dict(gen)
    gen["gen.head.w1.D"] = gen["gen.head.w1.D"] * 40  # decoders far apart: p is far from uniform
    windows = random_windows(4)
    out = generate_heads(gen, body, windows, spec, gcfg, return_weights=True)
    z = encode_windows(gen, body, windows).double().numpy()
    A, D, d0 = (gen[f"gen.head.w1.{k}"].double().numpy() for k in ("A", "D", "d0"))
    for n in range(4):
        e = A @ z[n]
        W = np.stack([D[i] @ e + d0[i] for i in range(3)])  # (m, in*out) flattened candidates
        S = W @ W.T
        logit = S.sum(1) / 2.0
        p = np.exp(logit - logit.max())
        p /= p.sum()
        got = out["stabilizer_weights"]["head.w1"][n].numpy()
        np.testing.assert_allclose(got, p, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["head.w1"][n].numpy().ravel(), p @ W, rtol=1e-4, atol=1e-5)
    p_all = out["stabilizer_weights"]["head.w1"]
    assert float(p_all.max() - p_all.min()) > 0.05
    for k, p in out["stabilizer_weights"].items():
        assert p.shape == (4, 3) and (p >= 0).all(), k
        torch.testing.assert_close(p.sum(-1), torch.ones(4))


def test_stabilizer_off_is_one_plain_decoder():
    gcfg = GeneratorConfig(stabilizer=False)
    spec, body, gen = setup("din", gcfg)
    assert gen["gen.head.w2.D"].shape == (1, 128 * 64, 32) and gen["gen.head.b2.c0"].shape == (1, 64)
    windows = random_windows(3)
    out = generate_heads(gen, body, windows, spec, gcfg, return_weights=True)
    e = encode_windows(gen, body, windows) @ gen["gen.head.w2.A"].T
    expect = (e @ gen["gen.head.w2.D"][0].T + gen["gen.head.w2.d0"][0]).reshape(3, 128, 64)
    torch.testing.assert_close(out["head.w2"], expect)
    assert all(torch.equal(p, torch.ones(3, 1)) for p in out["stabilizer_weights"].values())


@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_all_pad_window_gives_finite_head_and_logits(backbone):
    spec, body, gen = setup(backbone)
    windows = torch.full((2, 10), models.PAD)
    heads = generate_heads(gen, body, windows, spec, GeneratorConfig())
    assert all(torch.isfinite(v).all() for v in heads.values())
    logits = duet_logits(body, gen, windows, torch.zeros(2, 5, dtype=torch.long), spec, GeneratorConfig())
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_duet_logits_equal_per_sample_loop(backbone):
    spec, body, gen = setup(backbone)
    windows = random_windows(4)
    cands = torch.randint(0, N_ITEMS, (4, 6), generator=torch.Generator().manual_seed(3))
    batched = duet_logits(body, gen, windows, cands, spec, GeneratorConfig())
    assert batched.shape == (4, 6)
    for j in range(4):
        heads = generate_heads(gen, body, windows[j : j + 1], spec, GeneratorConfig())
        one = models.forward({**body, **heads}, windows[j][None, None], cands[j][None, None])[0, 0]
        torch.testing.assert_close(batched[j], one, rtol=1e-5, atol=1e-5)


def test_init_is_seeded():
    spec = models.ModelSpec(n_items=N_ITEMS)
    a, b = init_generator(spec, GeneratorConfig(), 4), init_generator(spec, GeneratorConfig(), 4)
    c = init_generator(spec, GeneratorConfig(), 5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["gen.head.w1.D"], c["gen.head.w1.D"])
    assert all(k.startswith("gen.") and v.dtype == np.float32 for k, v in a.items())


def test_train_duet_learns_deterministically_and_trains_every_basis(tiny_fleet):
    gcfg = GeneratorConfig()
    body, gen, losses = train(tiny_fleet, gcfg, epochs=2)
    body2, gen2, losses2 = train(tiny_fleet, gcfg, epochs=2)
    assert losses == losses2 and len(losses) == 2
    assert all(np.array_equal(gen[k], gen2[k]) for k in gen) and all(np.array_equal(body[k], body2[k]) for k in body)
    assert losses[1] < losses[0]
    _, _, spec, body0 = tiny_fleet
    for k in spec.head_keys():  # the universal head is returned unchanged
        assert np.array_equal(body[k], body0[k])
    assert not np.array_equal(body["gru.w_hh"], body0["gru.w_hh"])
    gen0 = init_generator(spec, gcfg, 5, head_init=body0)
    for k in gen:
        if is_basis(k):
            for i in range(gcfg.m):
                assert not np.array_equal(gen[k][i], gen0[k][i]), (k, i)
        else:
            assert not np.array_equal(gen[k], gen0[k]), k
    b, g = models.to_torch(body), {k: torch.from_numpy(v) for k, v in gen.items()}
    h1 = generate_heads(g, b, random_windows(5), spec, gcfg)
    h2 = generate_heads(g, b, random_windows(5), spec, gcfg)
    assert all(torch.equal(h1[k], h2[k]) for k in h1)


def test_frozen_bases_stay_bit_identical(tiny_fleet):
    gcfg = GeneratorConfig(frozen_bases=True)
    _, gen, losses = train(tiny_fleet, gcfg, epochs=1)
    _, _, spec, body0 = tiny_fleet
    gen0 = init_generator(spec, gcfg, 5, head_init=body0)
    assert np.isfinite(losses).all()
    for k in gen:
        if is_basis(k):
            assert np.array_equal(gen[k], gen0[k]), k
        else:
            assert not np.array_equal(gen[k], gen0[k]), k


def test_from_scratch_starts_at_the_fresh_init_not_the_universal_model(tiny_fleet):
    inter, end, spec, body0 = tiny_fleet
    universal = {k: v + np.float32(0.5) for k, v in body0.items()}  # stands in for a trained model
    fresh = models.init_params(spec, 5)
    kw = dict(lr=0.01, batch_size=64, negatives=4, seed=5)
    scratch = GeneratorConfig(from_scratch=True)
    body, gen, losses = train_duet(inter, end, spec, scratch, universal, epochs=0, **kw)
    assert losses == []
    for k in body:  # body from the fresh init; the (unused) universal head is returned unchanged
        assert np.array_equal(body[k], universal[k] if k in spec.head_keys() else fresh[k]), k
    gen0 = init_generator(spec, scratch, 5, head_init=fresh)  # decoder offsets = the fresh head + noise
    assert all(np.array_equal(gen[k], gen0[k]) for k in gen)
    body_u, gen_u, _ = train_duet(inter, end, spec, GeneratorConfig(), universal, epochs=0, **kw)
    assert all(np.array_equal(body_u[k], universal[k]) for k in body_u)
    assert not np.array_equal(gen_u["gen.head.w1.d0"], gen["gen.head.w1.d0"])
    b1, g1, l1 = train_duet(inter, end, spec, scratch, universal, epochs=2, **kw)
    b2, g2, l2 = train_duet(inter, end, spec, scratch, body0, epochs=2, **kw)  # the start ignores body_init
    assert l1 == l2 and l1[1] < l1[0]
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
    assert all(np.array_equal(b1[k], b2[k]) for k in b1 if k not in spec.head_keys())


@pytest.mark.parametrize("field,value", [("m", 0), ("tau", 0), ("tau", -1.0), ("tau", float("inf")),
                                         ("z_dim", 0), ("e_dim", 2.5), ("m", True), ("stabilizer", 1),
                                         ("from_scratch", "yes")])
def test_invalid_config_names_the_key(field, value):
    with pytest.raises(ConfigError) as err:
        GeneratorConfig(**{field: value})
    assert err.value.key == f"strategies.duet.{field}"


def test_window_samples_are_prefix_to_next_item_inside_the_window():
    P = models.PAD
    w = np.array([[P, P, 3, 5, 7], [1, 2, 3, 4, 5], [P, P, P, P, 9]])
    wins, pos, own = window_samples(w, np.array([10, 11, 12]))
    got = sorted((int(o), tuple(x), int(p)) for x, p, o in zip(wins, pos, own))
    assert got == sorted([(10, (P, P, P, P, 3), 5), (10, (P, P, P, 3, 5), 7)]
                         + [(11, (P,) * (5 - t) + tuple(range(1, t + 1)), t + 1) for t in range(1, 5)])


def test_uploaded_samples_avoid_known_items_mix_history_and_are_seeded(tiny_fleet):
    inter, end, spec, _ = tiny_fleet
    rows = history_rows(inter, end)
    rng = np.random.default_rng(0)
    windows, owners = rng.integers(0, N_ITEMS, (6, 10)), np.arange(6)
    up = UploadedSamples(windows, owners, SampleBuilder(inter, 10), rows, history=0.5)
    assert len(up) == 6 * 9 and up.n_history == 27
    s = up.build(np.arange(len(up)), 4, np.uint64(7))
    assert len(s) == len(up) + up.n_history
    assert np.array_equal(s.candidates[: len(up), 0], up.positives)
    user = inter.user_of()
    for j in range(len(up)):  # window-sample negatives: not in the device's history nor its windows
        o = up.owners[j]
        known = set(windows[o]) | set(inter.items[rows[user[rows] == o]])
        assert not known & set(s.candidates[j, 1:].tolist())
    s2 = up.build(np.arange(len(up)), 4, np.uint64(7))
    assert np.array_equal(s.candidates, s2.candidates) and np.array_equal(s.windows, s2.windows)
    assert not np.array_equal(up.build(np.arange(len(up)), 4, np.uint64(8)).candidates, s.candidates)


def test_retrain_trains_on_every_uploaded_and_history_sample_each_epoch(tiny_fleet, monkeypatch):
    """``fit`` builds a ``SampleBuilder``'s samples a block at a time, but DUET's uploads
    (``UploadedSamples``) are built at once: they return their history samples after the
    window samples, which a per-row block would drop (it did: half of each retraining)."""
    import strategies.duet_generator as dg

    inter, end, spec, _ = tiny_fleet
    gcfg = GeneratorConfig()
    body, gen, _ = train(tiny_fleet, gcfg, epochs=1)
    windows = np.random.default_rng(1).integers(0, N_ITEMS, (8, 10))
    up = UploadedSamples(windows, np.arange(8), SampleBuilder(inter, 10), history_rows(inter, end), history=1.0)
    assert len(up) == 72 and up.n_history == 72
    seen_windows = []
    real = dg.duet_logits

    def counting(b, g, w, c, *a):
        if torch.is_grad_enabled():  # the training steps, not the check after the last one
            seen_windows.append(w.numpy().copy())
        return real(b, g, w, c, *a)

    monkeypatch.setattr(dg, "duet_logits", counting)
    retrain_duet(body, gen, up, spec, gcfg, rnd=3, epochs=2, lr=0.01, batch_size=64, negatives=4, seed=5)
    trained = np.concatenate(seen_windows)
    assert len(trained) == 2 * (72 + 72)  # two epochs, each over 72 window and 72 history samples
    epoch = trained[:144]
    # every uploaded window sample is trained on once an epoch (a prefix of an uploaded window)
    want = np.sort(np.ascontiguousarray(up.windows).view(np.dtype((np.void, up.windows.dtype.itemsize * 10))).ravel())
    got = epoch.astype(up.windows.dtype).view(np.dtype((np.void, up.windows.dtype.itemsize * 10))).ravel()
    assert np.isin(want, got).all()


def test_retrain_continues_from_the_given_model_deterministically(tiny_fleet):
    inter, end, spec, _ = tiny_fleet
    gcfg = GeneratorConfig()
    body, gen, _ = train(tiny_fleet, gcfg, epochs=1)
    windows = np.random.default_rng(1).integers(0, N_ITEMS, (8, 10))
    up = UploadedSamples(windows, np.arange(8), SampleBuilder(inter, 10), history_rows(inter, end), history=1.0)
    kw = dict(epochs=2, lr=0.01, batch_size=64, negatives=4, seed=5)
    b1, g1, l1 = retrain_duet(body, gen, up, spec, gcfg, rnd=3, **kw)
    b2, g2, l2 = retrain_duet(body, gen, up, spec, gcfg, rnd=3, **kw)
    assert l1 == l2 and len(l1) == 2 and np.isfinite(l1).all()
    assert all(np.array_equal(g1[k], g2[k]) for k in g1) and all(np.array_equal(b1[k], b2[k]) for k in b1)
    assert all(not np.array_equal(g1[k], gen[k]) for k in gen)  # every generator parameter moves
    assert not np.array_equal(b1["item_emb"], body["item_emb"])
    assert all(np.array_equal(b1[k], body[k]) for k in spec.head_keys())  # universal head untouched
    _, g3, _ = retrain_duet(body, gen, up, spec, GeneratorConfig(frozen_bases=True), rnd=3, **kw)
    assert all(np.array_equal(g3[k], gen[k]) == is_basis(k) for k in gen)
