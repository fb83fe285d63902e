"""The leave_last protocol's settings (issue 16): ``data.holdout`` (test / validation),
``data.eval_candidates`` (uniform / popularity / all) and ``data.train_negatives``
(uniform / popularity), on hand-built streams and end to end on the tiny ratings file of
test_paper."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from devices.data import Interactions
from devices.errors import DataError
from devices.samples import SampleBuilder, stream_key
from simulator import paper
from simulator.errors import ConfigError
from test_paper import N_USERS, make_config, ratings  # noqa: F401 (ratings: fixture)


def stream(per_user: list[list[int]], n_items: int) -> Interactions:
    """Users' time-ordered item lists as ``Interactions`` (one interaction per minute)."""
    counts = np.array([len(x) for x in per_user])
    items = np.concatenate([np.asarray(x, np.int64) for x in per_user])
    return Interactions(n_users=len(per_user), n_items=n_items,
                        indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                        items=items, times=np.arange(len(items), dtype=np.float64) * 60.0)


# The split -----------------------------------------------------------------------------


def test_validation_holds_out_the_one_before_last_and_drops_the_last():
    inter = stream([[0, 1, 2, 3], [4, 5], [6, 7, 8]], 10)
    test = paper.leave_last_split(inter, "test")
    assert test.users.tolist() == [0, 1, 2] and test.test_rows.tolist() == [3, 5, 8]
    assert test.train_rows.tolist() == [1, 2, 7]  # >= 1 earlier item, before the held-out one
    val = paper.leave_last_split(inter, "validation")
    assert val.users.tolist() == [0, 2]  # user 1 has nothing before its one-before-last
    assert val.test_rows.tolist() == [2, 7]
    assert val.train_rows.tolist() == [1]  # row 3 (user 0's last) and 8 are dropped
    assert val.held_back == 2
    # the dropped last item is not counted in the popularity either
    assert paper.item_popularity(val).tolist() == [1, 1, 0, 0, 0, 0, 1, 0, 0, 0]  # user 1 holds back both
    assert paper.item_popularity(test).tolist() == [1, 1, 1, 0, 1, 0, 1, 1, 0, 0]


# Candidates and negatives --------------------------------------------------------------


def test_popularity_negatives_follow_the_weights_and_skip_seen_items():
    # 5,000 users saw items 0, 1 and 5,000 saw 2, 3 (draws hash user, position and slot)
    inter = stream([[0, 1]] * 5000 + [[2, 3]] * 5000, 6)
    w = np.array([50.0, 0.0, 0.0, 10.0, 30.0, 10.0])  # items 1 and 2 are never drawn
    b = SampleBuilder(inter, 2, item_weights=w)
    rows = inter.indptr[:-1] + 1
    neg = b.negatives(rows, 3, stream_key(7))
    u0, u1 = neg[:5000].ravel(), neg[5000:].ravel()
    # the first saw 0, 1: draws from {3, 4, 5} with weights 10 : 30 : 10
    assert set(np.unique(u0)) == {3, 4, 5}
    np.testing.assert_allclose(np.bincount(u0, minlength=6)[3:] / len(u0), [0.2, 0.6, 0.2], atol=0.015)
    # the others saw 2, 3: draws from {0, 4, 5} with weights 50 : 30 : 10
    assert set(np.unique(u1)) == {0, 4, 5}
    np.testing.assert_allclose(np.bincount(u1, minlength=6)[[0, 4, 5]] / len(u1), [5 / 9, 3 / 9, 1 / 9], atol=0.015)
    # uniform (no weights) is what it was: h mod n_items, seen items redrawn
    uni = SampleBuilder(inter, 2).negatives(rows[:5000], 3, stream_key(7))
    assert set(np.unique(uni)) == {2, 3, 4, 5}
    with pytest.raises(ValueError, match="item_weights"):
        SampleBuilder(inter, 2, item_weights=np.zeros(6))


def test_a_negative_that_cannot_be_drawn_is_an_error_not_a_seen_item():
    inter = stream([[0, 1], [2, 3]], 4)
    b = SampleBuilder(inter, 2, item_weights=np.array([1.0, 1.0, 0.0, 0.0]))  # user 0 saw every drawable item
    with pytest.raises(DataError, match="user 0: no unseen item"):
        b.negatives(np.array([1]), 2, stream_key(1))


def test_catalogue_candidates_are_every_never_seen_item():
    inter = stream([[0, 1, 2], [3, 4, 0, 5]], 7)
    s = paper.leave_last_split(inter, "test")
    cand, valid = paper.catalogue_samples(SampleBuilder(s.view, 3), s)
    assert cand.candidates.tolist() == [[2, 0, 1, 3, 4, 5, 6], [5, 0, 1, 2, 3, 4, 6]]
    # user 0 saw 0, 1, 2 -> negatives 3..6; user 1 saw 3, 4, 0, 5 -> negatives 1, 2, 6
    assert cand.candidates[0][valid[0]].tolist() == [2, 3, 4, 5, 6]
    assert cand.candidates[1][valid[1]].tolist() == [5, 1, 2, 6]
    assert cand.windows.tolist() == [[-1, 0, 1], [3, 4, 0]]


def test_metrics_count_only_valid_candidates():
    scores = np.array([[2.0, 9.0, 1.0, 3.0, 0.0],
                       [1.0, 5.0, 0.5, 9.0, 9.0]])
    valid = np.array([[True, False, True, True, True],  # 9.0 is a seen item: ignored
                      [True, True, True, False, False]])
    m = paper.evaluate(scores, valid)
    # user 0: 2.0 vs 1, 3, 0 -> beats 2 of 3, rank 1; user 1: 1.0 vs 5, 0.5 -> 1 of 2, rank 1
    assert m["uauc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["ndcg10"] == pytest.approx(1 / math.log2(3))
    # pooled: positives 2.0, 1.0 against negatives 1, 3, 0, 5, 0.5:
    # 2.0 beats 1, 0, 0.5 (3); 1.0 ties 1 (0.5), beats 0, 0.5 (2) -> 5.5 of 10
    assert m["auc"] == pytest.approx(5.5 / 10)
    full = paper.evaluate(scores)
    assert full["auc"] != m["auc"]
    labels = np.array([[1, 0, 0, 0, 0]] * 2)
    assert m["auc"] == pytest.approx(roc_auc_score(labels[valid], scores[valid]))


# Config --------------------------------------------------------------------------------


def test_settings_are_validated_and_need_the_paper_protocol(ratings):  # noqa: F811
    for key, bad in (("holdout", "dev"), ("eval_candidates", "hard"), ("train_negatives", "all")):
        with pytest.raises(ConfigError) as e:
            make_config(ratings, **{f"data.{key}": bad})
        assert e.value.key == f"data.{key}"
    with pytest.raises(ConfigError, match="unless data.protocol"):
        make_config(ratings, **{"data.protocol": "fleet", "data.eval_candidates": "popularity"})
    cfg = make_config(ratings, **{"data.protocol": "fleet"})
    assert "eval_candidates" not in cfg.to_toml()  # fleet runs' config.toml as before


# End to end ----------------------------------------------------------------------------


def test_settings_end_to_end(ratings, tmp_path):  # noqa: F811
    quiet = dict(log=lambda _: None)
    base = paper.run_leave_last(make_config(ratings), str(tmp_path / "uniform"), **quiet)
    assert base["protocol_settings"] == {"holdout": "test", "eval_candidates": "uniform", "train_negatives": "uniform",
                                        "min_item_ratings": 0, "min_user_ratings": 0}
    assert base["data"]["n_candidates"] == N_USERS * 100
    val = paper.run_leave_last(make_config(ratings, **{"data.holdout": "validation"}), str(tmp_path / "val"), **quiet)
    assert val["data"]["n_train_samples"] == base["data"]["n_train_samples"] - N_USERS
    assert val["methods"]["base"]["n_users"] == N_USERS  # every user has >= 6 ratings
    assert val["methods"]["base"]["auc"] != base["methods"]["base"]["auc"]
    # all: each user's held-out item against the 150 - (its ratings - 1) items it never rated
    cat = paper.run_leave_last(make_config(ratings, **{"data.eval_candidates": "all"}), str(tmp_path / "all"), **quiet)
    from devices.movielens import load_ratings
    inter = load_ratings(ratings)
    assert cat["data"]["n_candidates"] == int((inter.n_items - inter.counts[:N_USERS] + 1).sum())
    # the base model is trained exactly as with uniform candidates: only the evaluation differs
    assert cat["train_losses"]["base"] == base["train_losses"]["base"]
    assert cat["methods"]["base"]["auc"] != base["methods"]["base"]["auc"]
    pop = paper.run_leave_last(make_config(ratings, **{"data.train_negatives": "popularity",
                                                       "data.eval_candidates": "popularity"}),
                               str(tmp_path / "pop"), **quiet)
    assert pop["train_losses"]["base"] != base["train_losses"]["base"]
    for run in (val, cat, pop):
        for m in run["methods"].values():
            assert all(math.isfinite(m[k]) for k in ("auc", "uauc", "ndcg10", "hr10"))


# The finetune baseline's layers --------------------------------------------------------


def test_finetune_head_only_trains_only_the_head(ratings):  # noqa: F811
    from devices import models
    from devices.movielens import load_ratings
    import torch

    inter = load_ratings(ratings)
    s = paper.leave_last_split(inter)
    spec = models.ModelSpec(inter.n_items, "din")
    base = models.init_params(spec, 3)
    b = SampleBuilder(s.view, 10)
    test = paper.build_test_samples(b, s, 99, 0)
    head = spec.head_keys()
    got = paper.finetune_scores(base, b, s, test, steps=3, lr=0.5, negatives=4, seed=0, trainable=head)
    every = paper.finetune_scores(base, b, s, test, steps=3, lr=0.5, negatives=4, seed=0)
    assert not np.allclose(got, every)
    train = b.build(s.train_rows, 4, stream_key(0, paper.FINETUNE_TAG))
    u = 4
    mine = train.owner == s.users[u]
    p, _ = models.sgd_train(models.to_torch(base), torch.from_numpy(train.windows[mine])[None],
                            torch.from_numpy(train.candidates[mine])[None], torch.ones(1, int(mine.sum())), 3, 0.5, head)
    assert all(torch.equal(p[k], models.to_torch(base)[k]) for k in p if k not in head)
    with torch.no_grad():
        want = models.forward(p, torch.from_numpy(test.windows[u : u + 1])[None],
                              torch.from_numpy(test.candidates[u : u + 1])[None])[0, 0].numpy()
    np.testing.assert_allclose(got[u], want, rtol=1e-4, atol=1e-5)


def test_finetune_settings_come_from_the_strategy_then_the_device(ratings):  # noqa: F811
    from devices import models

    spec = models.ModelSpec(1, "din")
    ft = paper.finetune_config(make_config(ratings), spec)
    assert (ft["steps"], ft["lr"], ft["trainable"]) == (5, 0.1, None)  # [device] of the experiment file
    ft = paper.finetune_config(make_config(ratings, **{"strategies.local_finetune.layers": "head",
                                                       "strategies.local_finetune.lr": 0.3}), spec)
    assert (ft["steps"], ft["lr"], ft["trainable"]) == (5, 0.3, spec.head_keys())
    with pytest.raises(ConfigError, match="layers"):
        paper.finetune_config(make_config(ratings, **{"strategies.local_finetune.layers": "body"}), spec)


def test_fleet_local_finetune_head_only(tmp_path):
    from simulator.run import run_experiment
    from tests.conftest import small_config

    out = {}
    for layers in ("all", "head"):
        cfg = small_config(experiment={"strategies": ["local_finetune"]},
                           strategies={"local_finetune": {"layers": layers}})
        out[layers] = run_experiment(cfg, str(tmp_path / layers), use_ray=False, progress=False,
                                     log=lambda _: None)["strategies"]["local_finetune"]
    a, h = out["all"], out["head"]
    assert h["selected_device_rounds"] == a["selected_device_rounds"] > 0
    assert 0 < h["device_flops"] < a["device_flops"]  # no gradient through the body
    assert h["overall_auc"] != a["overall_auc"] and h["bytes_down"] > a["bytes_down"]  # + the "layers" key


def test_methods_follow_experiment_strategies(ratings, tmp_path):  # noqa: F811
    cfg = make_config(ratings, **{"experiment.strategies": ["cloud_only", "local_finetune"]})
    s = paper.run_leave_last(cfg, str(tmp_path / "ft"), log=lambda _: None)
    full = paper.run_leave_last(make_config(ratings), str(tmp_path / "all"), log=lambda _: None)
    assert list(s["methods"]) == ["base", "finetune"]
    assert s["methods"]["finetune"] == full["methods"]["finetune"]  # the same numbers without DUET beside it
    with pytest.raises(ConfigError, match="experiment.strategies"):
        make_config(ratings, **{"experiment.strategies": ["cloud_only", "fedavg"]})


def test_min_ratings_filter_items_then_users():
    from devices.movielens import filter_min_ratings

    # item 0 rated by 3 users, item 1 by 2, item 2 by 1; user 2 has only item 1 and item 2 left after the item cut
    inter = stream([[0, 1, 2], [0, 1], [0], [1]], 3)
    inter = dataclasses.replace(inter, user_ids=np.array([10, 20, 30, 40]), item_ids=np.array([100, 200, 300]))
    f = filter_min_ratings(inter, 2, 2)  # item 2 goes; then users with < 2 left: 30 (item 0), 40 (item 1)
    assert f.user_ids.tolist() == [10, 20] and f.item_ids.tolist() == [100, 200]
    assert f.items.tolist() == [0, 1, 0, 1] and f.indptr.tolist() == [0, 2, 4]
    assert np.all(np.diff(f.times[:2]) >= 0)
    assert filter_min_ratings(inter, 0, 0) is inter
    with pytest.raises(Exception, match="no ratings left"):
        filter_min_ratings(inter, 5, 0)


def test_min_ratings_end_to_end(ratings, tmp_path):  # noqa: F811
    s = paper.run_leave_last(make_config(ratings, **{"data.min_user_ratings": 10}), str(tmp_path / "f"),
                             log=lambda _: None)
    from devices.movielens import load_ratings
    counts = load_ratings(ratings).counts
    assert s["data"]["n_users"] == int((counts >= 10).sum())
    with pytest.raises(ConfigError, match="min_item_ratings"):
        make_config(ratings, **{"data.protocol": "fleet", "data.min_item_ratings": 5})
