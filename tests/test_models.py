"""Backbones (GRU4Rec, DIN, SASRec): shapes, batching over models, heads, training, FLOPs."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import small_config
from devices import models
from devices.backbones import layers
from devices.pool import HostPool
from devices.runtime import DeviceContext, train_held_models
from strategies.cloud import train_cloud_model
from simulator.errors import ConfigError
from simulator.fleet import build_fleet

N_ITEMS, L = 40, 10


@pytest.fixture(autouse=True)
def one_thread():
    # as on hosts: these tiny ops only lose to intra-op threads (100x slower on a busy box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec_for(backbone: str, n_items: int = N_ITEMS) -> models.ModelSpec:
    return models.ModelSpec(n_items=n_items, backbone=backbone, window=L)


def batched(spec: models.ModelSpec, m: int) -> dict[str, torch.Tensor]:
    """``m`` differently seeded models stacked (M = m)."""
    return models.stack([models.init_params(spec, seed) for seed in range(m)])


def samples(m: int, n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (left-padded by a random amount, some rows all PAD) and candidates."""
    rng = np.random.default_rng(seed)
    win = rng.integers(0, N_ITEMS, (m, n, L))
    pad = rng.integers(0, L + 1, (m, n))
    win[np.arange(L)[None, None] < pad[..., None]] = models.PAD
    win[:, 0] = models.PAD
    return torch.from_numpy(win), torch.from_numpy(rng.integers(0, N_ITEMS, (m, n, c)))


def model(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in params.items()}


backbones = pytest.mark.parametrize("backbone", models.BACKBONES)


@backbones
def test_init_matches_shapes_and_names(backbone):
    spec = spec_for(backbone)
    p = models.init_params(spec, 0)
    assert {k: v.shape for k, v in p.items()} == spec.shapes()
    assert all(v.dtype == np.float32 for v in p.values())
    prefix = {"gru4rec": "gru.", "din": "din.", "sasrec": "sas."}[backbone]
    assert {"item_emb", "item_bias"} <= set(p)
    assert all(k in ("item_emb", "item_bias", "target.w") or k.startswith((prefix, "head.")) for k in p)
    assert [b for b, key in models.BACKBONE_MARKERS.items() if key in p] == [backbone]
    assert set(spec.head_keys()) == {k for k in p if k.startswith("head.")}
    if backbone == "sasrec":
        assert np.all(p["sas.ln1.w"] == 1) and np.all(p["sas.ln2.b"] == 0) and np.all(p["sas.b_qkv"] == 0)
    # reproducible from the seed
    assert all(np.array_equal(v, models.init_params(spec, 0)[k]) for k, v in p.items())


def test_head_sizes_are_the_ones_duet_ships():
    # DIN: 64*128+128 + 128*64+64 + 64*1+1 = 16,641 floats (~66 KB)
    din = spec_for("din")
    din_head = {k: v for k, v in models.init_params(din, 0).items() if k in din.head_keys()}
    assert sum(v.size for v in din_head.values()) == 16_641
    assert models.num_bytes(din_head) == 16_641 * 4 == 66_564
    # GRU4Rec, SASRec: 2 * (32*32 + 32) = 2,112 floats (~8.4 KB)
    for backbone in ("gru4rec", "sasrec"):
        spec = spec_for(backbone)
        assert spec.head_keys() == models.HEAD_KEYS
        head = {k: v for k, v in models.init_params(spec, 0).items() if k in spec.head_keys()}
        assert models.num_bytes(head) == 2 * (32 * 32 + 32) * 4 == 8_448


def test_spec_and_dispatch_validation():
    with pytest.raises(ConfigError, match="gru4rec, din, sasrec"):
        models.ModelSpec(n_items=5, backbone="bert")
    with pytest.raises(ConfigError, match="model.dim"):
        models.ModelSpec(n_items=5, backbone="sasrec", dim=30)
    with pytest.raises(ValueError, match="marker"):
        models.backbone_of({"item_emb": torch.zeros(1, 5, 32)})


@backbones
def test_forward_shapes_and_dispatch(backbone):
    spec = spec_for(backbone)
    for m in (1, 3):
        p = batched(spec, m)
        win, cand = samples(m, 7, 5)
        out = models.forward(p, win, cand)
        assert out.shape == (m, 7, 5)
        assert models.backbone_of(p) == backbone
        assert torch.equal(out, models.forward(p, win, cand, backbone))


@backbones
def test_batched_models_equal_single_models(backbone):
    spec = spec_for(backbone)
    p = batched(spec, 3)
    win, cand = samples(3, 6, 5)
    out = models.forward(p, win, cand)
    for i in range(3):
        single = models.forward(model(p, i), win[i : i + 1], cand[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], single, rtol=1e-5, atol=1e-6)
    # a shared body (M = 1) with per-device heads (M = 3), as DUET serves
    mixed = {k: (v if k in spec.head_keys() else v[:1]) for k, v in p.items()}
    out = models.forward(mixed, win, cand)
    for i in range(3):
        own = {k: (v[i : i + 1] if k in spec.head_keys() else v[:1]) for k, v in p.items()}
        torch.testing.assert_close(out[i : i + 1], models.forward(own, win[i : i + 1], cand[i : i + 1]),
                                   rtol=1e-5, atol=1e-6)
    # one set of samples (M = 1) scored by three models
    out = models.forward(p, win[:1], cand[:1])
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], models.forward(model(p, i), win[:1], cand[:1]),
                                   rtol=1e-5, atol=1e-6)


def test_din_equals_the_literal_concatenation():
    # the activation unit on [e_h, e_t, e_h - e_t, e_h * e_t] and the masked softmax, written out
    spec = spec_for("din")
    p = models.to_torch(models.init_params(spec, 1))
    p = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in enumerate(p.items())}
    win, cand = samples(1, 6, 5)
    q = {k: v[0] for k, v in p.items()}
    valid = (win[0] >= 0).float()
    e_h = q["item_emb"][win[0].clamp(min=0)] * valid[..., None]  # (N, L, d)
    e_t = q["item_emb"][cand[0]]  # (N, C, d)
    h = e_h[:, None].expand(-1, 5, -1, -1)
    t = e_t[:, :, None].expand_as(h)
    feats = torch.cat([h, t, h - t, h * t], -1)  # (N, C, L, 4d)
    a = (torch.sigmoid(feats @ q["din.att.w1"] + q["din.att.b1"]) @ q["din.att.w2"] + q["din.att.b2"])[..., 0]
    a = torch.where(valid[:, None] > 0, a, -torch.inf)  # (N, C, L): softmax over the valid items only
    a = torch.nan_to_num(torch.softmax(a, -1))  # an all-PAD window has no interest
    z = torch.cat([(a[..., None] * h).sum(2), e_t], -1)
    z = torch.relu(z @ q["head.w1"] + q["head.b1"])
    z = torch.relu(z @ q["head.w2"] + q["head.b2"])
    want = (z @ q["head.w3"] + q["head.b3"])[..., 0] + q["item_bias"][cand[0]]
    torch.testing.assert_close(models.forward(p, win, cand)[0], want, rtol=1e-5, atol=1e-5)


def test_sasrec_equals_a_full_torch_encoder_layer():
    # sas_encode runs only the last position's query; torch runs the whole layer
    spec = spec_for("sasrec")
    p = models.to_torch(models.init_params(spec, 2))
    p = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in enumerate(p.items())}
    q = {k: v[0] for k, v in p.items()}
    win, _ = samples(1, 8, 1)
    win = win[:, 1:]  # drop the all-PAD row: torch's layer gives NaN there
    layer = torch.nn.TransformerEncoderLayer(32, models.SAS_HEADS, models.SAS_FFN, dropout=0.0, batch_first=True)
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(q["sas.w_qkv"].T)
        layer.self_attn.in_proj_bias.copy_(q["sas.b_qkv"])
        layer.self_attn.out_proj.weight.copy_(q["sas.w_o"].T)
        layer.self_attn.out_proj.bias.copy_(q["sas.b_o"])
        layer.linear1.weight.copy_(q["sas.w_ff1"].T)
        layer.linear1.bias.copy_(q["sas.b_ff1"])
        layer.linear2.weight.copy_(q["sas.w_ff2"].T)
        layer.linear2.bias.copy_(q["sas.b_ff2"])
        for i in (1, 2):
            getattr(layer, f"norm{i}").weight.copy_(q[f"sas.ln{i}.w"])
            getattr(layer, f"norm{i}").bias.copy_(q[f"sas.ln{i}.b"])
    layer.train()  # the training path: no nested-tensor fast path
    valid = win[0] >= 0
    x = q["item_emb"][win[0].clamp(min=0)] * valid[..., None] + q["sas.pos"]
    want = layer(x, src_key_padding_mask=~valid)[:, -1]
    torch.testing.assert_close(models.sas_encode(p, win)[0], want, rtol=1e-5, atol=1e-5)


@backbones
def test_gradients_of_a_model_ignore_other_models_data(backbone):
    spec = spec_for(backbone)

    def grads(win, cand):
        p = {k: v.clone().requires_grad_(True) for k, v in batched(spec, 3).items()}
        loss = models.bce_loss(models.forward(p, win, cand), torch.ones(3, win.shape[1])).sum()
        return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))

    win, cand = samples(3, 6, 5)
    other_win, other_cand = samples(3, 6, 5, seed=1)
    win2, cand2 = win.clone(), cand.clone()
    win2[1], cand2[1] = other_win[1], other_cand[1]
    g, g2 = grads(win, cand), grads(win2, cand2)
    for k in g:
        assert torch.equal(g[k][0], g2[k][0]) and torch.equal(g[k][2], g2[k][2]), k
    assert any(not torch.equal(g[k][1], g2[k][1]) for k in g)


@backbones
def test_all_pad_windows_give_finite_scores_and_grads(backbone):
    spec = spec_for(backbone)
    p = {k: v.clone().requires_grad_(True) for k, v in batched(spec, 2).items()}
    win = torch.full((2, 4, L), models.PAD)
    cand = torch.arange(2 * 4 * 5).reshape(2, 4, 5) % N_ITEMS
    out = models.forward(p, win, cand)
    assert torch.isfinite(out).all()
    g = torch.autograd.grad(models.bce_loss(out, torch.ones(2, 4)).sum(), list(p.values()))
    assert all(torch.isfinite(x).all() for x in g)


@backbones
def test_padding_is_invisible(backbone):
    # PAD reads row 0 of the item table; padded slots must not reach the scores, whatever
    # that row (or, for SASRec, the position embedding of a padded slot) holds
    spec = spec_for(backbone)
    p = batched(spec, 2)
    rng = np.random.default_rng(5)
    win = torch.from_numpy(rng.integers(1, N_ITEMS, (2, 6, L)))
    win[..., :4] = models.PAD
    win[:, 0] = models.PAD  # an all-PAD window attends to nothing
    cand = torch.from_numpy(rng.integers(1, N_ITEMS, (2, 6, 5)))
    q = dict(p)
    q["item_emb"] = p["item_emb"].clone()
    q["item_emb"][:, 0] += 3.0
    if backbone == "sasrec":
        q["sas.pos"] = p["sas.pos"].clone()
        q["sas.pos"][:, :4] += 3.0
    torch.testing.assert_close(models.forward(q, win, cand), models.forward(p, win, cand), rtol=1e-5, atol=1e-6)


@backbones
def test_sgd_learns_a_separable_problem(backbone):
    # positives are items 0..9, negatives 20..39: the model must rank 0..9 first
    spec = spec_for(backbone)
    rng = np.random.default_rng(4)
    win = torch.from_numpy(rng.integers(0, 10, (2, 16, L)))
    cand = torch.from_numpy(np.concatenate([rng.integers(0, 10, (2, 16, 1)), rng.integers(20, 40, (2, 16, 4))], -1))
    p = batched(spec, 2)
    before = models.bce_loss(models.forward(p, win, cand), torch.ones(2, 16))
    new, after = models.sgd_train(p, win, cand, torch.ones(2, 16), steps=30, lr=0.5)
    assert torch.all(after < 0.5 * before), (before, after)
    scores = models.forward(new, win, cand)
    assert torch.all(scores[..., :1] > scores[..., 1:])


@backbones
def test_device_finetuning_of_a_cloud_model_stays_stable(backbone):
    # the real path on the small synthetic fleet: cloud model -> every device fine-tunes
    # it with the default plain SGD (lr 0.5, 5 steps). DIN's unnormalised attention sum
    # diverged here (losses ~1e7, then NaN scores), hence its masked softmax.
    cfg = small_config()
    fleet = build_fleet(cfg)
    spec = models.ModelSpec(n_items=fleet.interactions.n_items, backbone=backbone)
    initial, _ = train_cloud_model(fleet.interactions, fleet.timeline.history_end, spec, epochs=1, lr=cfg.cloud.lr,
                                   batch_size=cfg.cloud.batch_size, negatives=cfg.cloud.negatives, seed=3)
    pool = HostPool(fleet.interactions, fleet.timeline, spec, cfg.device, 3, n_hosts=1, use_ray=False)
    pool.reset(initial)
    host = pool.hosts[0]
    ctx = DeviceContext(host, np.arange(len(host.device_ids)), 1, 0)
    new, losses, counts = train_held_models(ctx, cfg.device.local_steps, cfg.device.lr)
    assert counts.max() > 0 and np.all(losses < 2.0), losses.max()
    assert all(torch.isfinite(v).all() for v in new.values())


@backbones
def test_head_only_training_leaves_body_bit_identical(backbone):
    spec = spec_for(backbone)
    p = batched(spec, 2)
    win, cand = samples(2, 6, 5)
    new, _ = models.sgd_train(p, win, cand, torch.ones(2, 6), steps=3, lr=0.5, trainable=spec.head_keys())
    for k in p:
        assert torch.equal(new[k], p[k]) == (k not in spec.head_keys()), k


class _Ctx:
    """The slice of ``DeviceContext`` that ``train_held_models`` reads."""

    def __init__(self, spec, held, win, cand, weight):
        self.spec, self._held, self._data = spec, held, (win, cand, weight, (weight > 0).sum(1).numpy())

    def __len__(self):
        return self._data[0].shape[0]

    def train_samples(self):
        return self._data

    def held_params(self):
        return self._held

    def count_train(self, counts, steps, candidates, trainable=None):
        pass


@backbones
@pytest.mark.parametrize("shared", [False, True], ids=["personal", "shared"])
def test_local_vocabulary_training_equals_full_table_training(backbone, shared):
    # 3 devices, one with padding rows (weight 0, all-PAD window, candidates 0) as
    # pad_by_owner builds them; held as per-device models or one shared model (M = 1)
    spec = spec_for(backbone)
    win, cand = samples(3, 6, 5, seed=2)
    weight = torch.ones(3, 6)
    win[2, 4:], cand[2, 4:], weight[2, 4:] = models.PAD, 0, 0.0
    held = batched(spec, 1 if shared else 3)
    full_held = {k: v.expand(3, *v.shape[1:]) for k, v in held.items()}
    full, full_loss = models.sgd_train(full_held, win, cand, weight, steps=4, lr=0.5)
    local, local_loss, counts = train_held_models(_Ctx(spec, held, win, cand, weight), 4, 0.5)
    assert list(counts) == [6, 6, 4]
    np.testing.assert_allclose(local_loss, full_loss.numpy(), rtol=1e-5, atol=1e-6)
    for k in full:
        torch.testing.assert_close(local[k], full[k], rtol=1e-5, atol=1e-6)
    # rows a device never touched are bit-identical to what it held
    for i in range(3):
        touched = np.unique(np.concatenate([win[i][win[i] >= 0].numpy(), cand[i].ravel().numpy()]))
        untouched = np.setdiff1d(np.arange(N_ITEMS), touched)
        assert torch.equal(local["item_emb"][i, untouched], full_held["item_emb"][i, untouched])


def test_din_scoring_in_chunks_equals_one_pass(monkeypatch):
    spec = spec_for("din")
    p = batched(spec, 2)
    win, cand = samples(2, 9, 7)
    with torch.no_grad():
        whole = models.forward(p, win, cand)
        monkeypatch.setattr(models, "DIN_CHUNK", 2 * 7 * L * models.DIN_ATTENTION * 2)  # 2 rows per pass
        torch.testing.assert_close(models.forward(p, win, cand), whole, rtol=1e-6, atol=1e-6)


@backbones
def test_flops_per_sample(backbone):
    spec = spec_for(backbone)
    for c in (5, 100):
        fwd = models.flops_per_sample(spec, c, backward=False)
        bwd = models.flops_per_sample(spec, c, backward=True)
        assert 0 < fwd < bwd
    assert models.flops_per_sample(spec, 100, False) > models.flops_per_sample(spec, 5, False)


def test_flops_per_sample_count_the_model_as_written():
    """GRU4Rec forward, by hand: input projection and recurrence 2 x L x d x 3d each, the
    user tower 2 x 2 x d x d, W_t e 2 x d x d per candidate (the dot products and gates
    are not matmuls). ``training_shortcuts`` (what the hosts run) leave the count alone."""
    spec, d, c = spec_for("gru4rec"), 32, 5
    by_hand = 2 * (2 * L * d * 3 * d) + 2 * 2 * d * d + c * 2 * d * d
    models.flops_per_sample.cache_clear()
    with layers.training_shortcuts():
        assert models.flops_per_sample(spec, c, backward=False) == by_hand
    assert models.flops_per_sample(spec, c, backward=True) > 2 * by_hand


@pytest.mark.parametrize("n_items,m", [(N_ITEMS, 3), (5000, 3), (N_ITEMS, 1)])
def test_training_shortcuts_give_the_gradients_of_the_model_as_written(n_items, m):
    """Under ``training_shortcuts`` GRU4Rec trains with its recurrence's backward written
    out, its item table projected once (fewer rows than window positions: N_ITEMS) or
    per position (5000), and W_t applied to the user vector: the same loss and gradients
    as autograd through the model as written, to 1e-12 in float64 and float32 rounding."""
    spec = spec_for("gru4rec", n_items)
    win, cand = samples(m, 9, 7, seed=4)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        p = {k: (v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5))).to(dtype)
             for k, v in batched(spec, m).items()}
        weight = torch.ones(m, 9, dtype=dtype)

        def loss_and_grads():
            q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            loss = models.bce_loss(models.forward(q, win, cand), weight).sum()
            return loss, torch.autograd.grad(loss, list(q.values()))

        plain_loss, plain = loss_and_grads()
        with layers.training_shortcuts():
            fast_loss, fast = loss_and_grads()
        torch.testing.assert_close(fast_loss, plain_loss, rtol=tol, atol=tol)
        for k, a, b in zip(p, fast, plain):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=k)
            assert a.abs().sum() > 0 or k == "item_emb" and n_items > N_ITEMS  # every layer has a gradient


def test_sgd_train_takes_the_shortcuts_and_lands_where_plain_sgd_does(monkeypatch):
    spec = spec_for("gru4rec")
    p = batched(spec, 4)
    win, cand = samples(4, 12, 5, seed=6)
    weight = torch.ones(4, 12)
    fast, fast_loss = models.sgd_train(p, win, cand, weight, steps=5, lr=0.5)
    monkeypatch.setattr(models, "training_shortcuts", contextlib.nullcontext)
    plain, plain_loss = models.sgd_train(p, win, cand, weight, steps=5, lr=0.5)
    assert not all(torch.equal(fast[k], plain[k]) for k in p)  # another summation order ...
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)  # ... the same training
    for k in p:
        torch.testing.assert_close(fast[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)


@backbones
@pytest.mark.parametrize("n_items", [N_ITEMS, 5000])  # full-catalogue matmul / candidate gather
def test_shared_tables_score_as_the_plain_forward(backbone, n_items):
    """Scoring with a shared model's precomputed item tables gives the plain forward's
    logits: bit for bit for DIN (no table), to float32 rounding for the others (the plain
    forward without gradients scores e . (u W_t^T); the tables hold W_t e, every item may
    be scored by one matmul, and the GRU runs its scoring recurrence)."""
    spec = spec_for(backbone, n_items)
    p = models.to_torch(models.init_params(spec, 3))
    p = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in p.items()}
    win, cand = samples(1, 64, 100, seed=2)
    cand = cand * (n_items // N_ITEMS)  # reach the whole catalogue
    with torch.no_grad():
        plain = models.forward(p, win, cand)
        shared = models.shared_tables(p)
        fast = models.forward(shared, win, cand)
    added = set(shared) - set(p)
    assert added == ({"~target.items", "~gru.items"} if backbone == "gru4rec" else
                     {"~target.items"} if backbone == "sasrec" else set())
    if backbone == "din":
        assert torch.equal(fast, plain)
    else:
        assert not torch.equal(fast, plain) or backbone != "gru4rec"  # another summation order ...
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)  # ... the same logits


def test_gru_scoring_recurrence_matches_the_general_loop():
    """The scoring recurrence (shared model, no gradients) gives ``encode``'s general loop's
    hidden states to float32 rounding, whatever the rows' PAD counts and order: all-PAD
    windows stay 0, a row's state does not depend on where it sits in the batch, and a
    PAD after an item falls back to the general loop."""
    from devices.backbones import gru4rec

    spec = spec_for("gru4rec")
    p = models.to_torch(models.init_params(spec, 3))
    p = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in p.items()}
    shared = models.shared_tables(p)
    rng = np.random.default_rng(4)
    win = torch.from_numpy(rng.integers(0, N_ITEMS, (1, 300, L)))
    pads = torch.from_numpy(rng.integers(0, L + 1, 300))
    pads[::3] = 0
    pads[1] = L  # an all-PAD window
    for i, k in enumerate(pads.tolist()):
        win[0, i, :k] = models.PAD
    order = torch.argsort(pads, stable=True)
    with torch.no_grad():
        general = gru4rec.encode(p, win)  # no shared table: the general loop
        fast = gru4rec.encode(shared, win)
        fast_sorted = gru4rec.encode(shared, win[:, order])
    assert not torch.equal(fast, general)  # tanh as 2 sigmoid(2x) - 1 ...
    torch.testing.assert_close(fast, general, rtol=0, atol=1e-6)  # ... the same states
    assert torch.equal(fast_sorted[0], fast[0, order])
    empty = pads == L
    assert int(empty.sum()) >= 1 and torch.equal(fast[0, empty], torch.zeros(int(empty.sum()), spec.dim))
    # a non-finite model is not scored finite where the general loop (grad mode on) is not:
    # an Inf hidden weight, a NaN reset-gate input of item 7, on the batch above and on
    # windows of one item (only the step where h = 0, whose hidden product is skipped)
    one = torch.full_like(win, models.PAD)
    one[0, :, -1] = 7
    for key, at in (("gru.w_hh", (0, 0, 3)), ("~gru.items", (0, 7, 5))):
        bad = {k: v.clone() for k, v in shared.items()}
        bad[key][at] = float("inf") if key == "gru.w_hh" else float("nan")
        for w in (win, one):
            with torch.enable_grad():
                general_bad = gru4rec.encode(bad, w)
            with torch.no_grad():
                fast_bad = gru4rec.encode(bad, w)
            assert torch.equal(torch.isfinite(fast_bad), torch.isfinite(general_bad))
    with torch.no_grad():  # the NaN reset gate of the one item: a NaN in every state, as in the general loop
        assert torch.isnan(gru4rec.encode(bad, one)).any(-1).all()
    holes = win.clone()
    holes[0, 0, 4] = models.PAD  # row 0 has no leading PAD: a PAD after an item
    with torch.no_grad():
        assert gru4rec._encode_scoring(shared["~gru.items"][0], shared["gru.w_hh"][0], holes) is None
        torch.testing.assert_close(gru4rec.encode(shared, holes), gru4rec.encode(p, holes), rtol=0, atol=1e-6)


def test_shared_tables_leave_patched_and_batched_models_alone():
    spec = spec_for("gru4rec")
    one = models.to_torch(models.init_params(spec, 0))
    assert models.shared_tables(batched(spec, 3)).keys() == batched(spec, 3).keys()
    patched = {**one, "patch.encoder.w": torch.zeros(1, 32, 32), "patch.encoder.b": torch.zeros(1, 32)}
    assert models.shared_tables(patched).keys() == patched.keys()


@pytest.mark.parametrize("bitmap_bytes", [1 << 26, 0])
def test_seen_pairs_bitmap_and_sorted_keys_answer_alike(bitmap_bytes, monkeypatch):
    from devices.samples import SeenPairs

    monkeypatch.setattr(SeenPairs, "BITMAP_MAX_BYTES", bitmap_bytes)
    users, items = np.array([0, 0, 2, 2, 2, 3]), np.array([1, 4, 0, 4, 4, 999])
    seen = SeenPairs(users, items, n_users=4, n_items=1000)  # 500 bytes of bitmap, 48 of keys
    assert (seen.bitmap is not None) == (bitmap_bytes > 0)
    got = seen.contains(np.arange(4)[:, None], np.arange(1000)[None, :])
    want = np.zeros((4, 1000), bool)
    want[users, items] = True
    np.testing.assert_array_equal(got, want)


@backbones
def test_flops_do_not_depend_on_the_callers_grad_mode(backbone):
    """Scoring without gradients takes the e . (u W_t^T) shortcut; a device's FLOPs are
    those of the model as written whichever mode the device function calls from."""
    spec = spec_for(backbone)
    models.flops_per_sample.cache_clear()
    with torch.no_grad():
        quiet = models.flops_per_sample(spec, 100, backward=False)
    models.flops_per_sample.cache_clear()
    loud = models.flops_per_sample(spec, 100, backward=False)
    assert quiet == loud and loud > 100 * spec.dim * spec.dim * 2 * (backbone != "din")


def test_cloud_training_builds_its_samples_a_block_of_batches_at_a_time(monkeypatch):
    """``fit`` builds samples a block of whole batches at a time (a million-device history
    at once takes GBs); blocks of three batches give the very model and losses of one block."""
    import strategies.cloud as sc

    cfg = small_config()
    fleet = build_fleet(cfg)
    spec = models.ModelSpec(n_items=fleet.interactions.n_items)
    train = lambda: train_cloud_model(fleet.interactions, fleet.timeline.history_end, spec, epochs=2, lr=cfg.cloud.lr,
                                      batch_size=64, negatives=cfg.cloud.negatives, seed=3)
    whole, losses = train()
    built = []
    real = sc.SampleBuilder.build
    monkeypatch.setattr(sc.SampleBuilder, "build", lambda self, rows, *a: built.append(len(rows)) or real(self, rows, *a))
    monkeypatch.setattr(sc, "FIT_BLOCK_SAMPLES", 150)  # blocks of 3 batches of 64, a shorter last one
    blocked, losses_b = train()
    n = len(sc.history_rows(fleet.interactions, fleet.timeline.history_end))
    assert n > 4 * 192 and max(built) == 192 and min(built) < 192 and sum(built) == 2 * n
    assert losses_b == losses and all(np.array_equal(whole[k], blocked[k]) for k in whole)
