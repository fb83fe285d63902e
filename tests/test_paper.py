"""Tests for simulator/paper.py: the leave-last split (no leakage), never-seen negatives,
finetune on local vocabularies = finetune of a full copy, the three methods end to end,
determinism, and ``fleetsim run`` on a tiny ratings.csv written here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from devices import models
from devices.movielens import load_ratings
from devices.samples import SampleBuilder, stream_key
from simulator import cli, config, paper
from simulator.errors import ConfigError
from simulator.results import LAYOUT_VERSION, load_run

EXPERIMENT = Path(config.__file__).resolve().parent.parent / "experiments" / "duet_movielens.toml"
N_USERS, N_ITEMS = 30, 150


def write_ratings(folder: Path) -> Path:
    """30 users with 6-17 ratings each (tastes: two item groups) plus one single-rating user."""
    rng = np.random.default_rng(0)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(1, N_USERS + 1):
        group = np.arange(N_ITEMS)[(np.arange(N_ITEMS) % 2) == u % 2]
        items = rng.choice(group, 6 + u % 12, replace=False)
        t0 = 1_000_000 + 1000 * u
        for j, it in enumerate(items):
            lines.append(f"{u},{3 * it + 1},4.0,{t0 + 60 * j}")
    lines.append(f"{N_USERS + 1},1,3.0,5000000")  # one rating: nothing to predict it from
    path = folder / "ratings.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ratings(tmp_path_factory) -> Path:
    return write_ratings(tmp_path_factory.mktemp("ml"))


@pytest.fixture(scope="module")
def split(ratings):
    inter = load_ratings(ratings)
    return inter, paper.leave_last_split(inter)


def make_config(ratings: Path, **sections) -> config.ExperimentConfig:
    overrides = [f"data.path={json.dumps(str(ratings))}", "cloud.epochs=2", "strategies.duet.epochs=1",
                 "cloud.batch_size=64", "model.backbone=gru4rec"]
    overrides += [f"{k}={json.dumps(v)}" for k, v in sections.items()]
    return config.load(EXPERIMENT, overrides)


# The split ------------------------------------------------------------------------------


def test_split_holds_out_each_users_last_interaction(split):
    inter, s = split
    last = inter.indptr[1:] - 1
    assert list(s.users) == list(range(N_USERS))  # the single-rating user is not evaluated
    assert np.array_equal(s.test_rows, last[:N_USERS])
    # training = every interaction after the user's first, except its last
    assert len(s.train_rows) == int((inter.counts[:N_USERS] - 2).sum())
    user = inter.user_of()
    first = inter.indptr[:-1]
    assert not np.isin(s.train_rows, last).any() and not np.isin(s.train_rows, first).any()
    assert np.array_equal(np.bincount(user[s.train_rows], minlength=inter.n_users)[:N_USERS],
                          inter.counts[:N_USERS] - 2)


def test_no_training_sample_sees_a_test_item(split):
    inter, s = split
    b = SampleBuilder(s.view, 10)
    train = b.build(s.train_rows, 4, stream_key(0, 1))
    test_item = inter.items[s.test_rows]
    for j, u in enumerate(s.users):
        mine = train.owner == u
        assert mine.any()
        assert not (train.candidates[mine, 0] == test_item[j]).any()  # never a target
        assert not (train.windows[mine] == test_item[j]).any()  # never in a window
    # each test window is the L items just before the test item
    test = paper.build_test_samples(b, s, 99, 0)
    u = 5
    start, end = inter.indptr[u], inter.indptr[u + 1] - 1
    expect = inter.items[max(start, end - 10) : end]
    assert list(test.windows[u][test.windows[u] >= 0]) == list(expect)
    assert test.candidates[u, 0] == inter.items[end]


def test_negatives_were_never_interacted_with(split):
    inter, s = split
    b = SampleBuilder(s.view, 10)
    test = paper.build_test_samples(b, s, 99, 0)
    train = b.build(s.train_rows, 4, stream_key(0, 1))
    for j, u in enumerate(s.users):
        seen = set(inter.items[inter.indptr[u] : inter.indptr[u + 1]].tolist())  # test item included
        assert not seen & set(test.candidates[j, 1:].tolist())
        assert not seen & set(train.candidates[train.owner == u, 1:].ravel().tolist())
    assert test.candidates.shape == (N_USERS, 100)


# Finetune -------------------------------------------------------------------------------


def test_finetune_on_local_vocabularies_equals_full_copies(split):
    """Batched local-vocabulary SGD scores what SGD on a full copy of the model scores."""
    inter, s = split
    spec = models.ModelSpec(inter.n_items, "din")
    base = models.init_params(spec, 3)
    b = SampleBuilder(s.view, 10)
    test = paper.build_test_samples(b, s, 99, 0)
    got = paper.finetune_scores(base, b, s, test, steps=3, lr=0.5, negatives=4, seed=0)
    train = b.build(s.train_rows, 4, stream_key(0, paper.FINETUNE_TAG))
    for u in (0, 7):
        mine = train.owner == s.users[u]
        p, _ = models.sgd_train(models.to_torch(base), torch.from_numpy(train.windows[mine])[None],
                                torch.from_numpy(train.candidates[mine])[None], torch.ones(1, int(mine.sum())), 3, 0.5)
        with torch.no_grad():
            want = models.forward(p, torch.from_numpy(test.windows[u : u + 1])[None],
                                  torch.from_numpy(test.candidates[u : u + 1])[None])[0, 0].numpy()
        np.testing.assert_allclose(got[u], want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, paper.score_shared(base, test))


# Metrics --------------------------------------------------------------------------------


def test_evaluate_hand_computed():
    scores = np.array([[3.0, 1.0, 2.0, 4.0],  # positive beats 2 of 3 negatives -> rank 1
                       [0.0, 1.0, 2.0, 3.0]])  # positive last -> rank 3
    m = paper.evaluate(scores)
    assert m["uauc"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["hr10"] == 1.0
    assert m["ndcg10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)
    # pooled over 2 x 6 pairs: 3.0 beats 1, 2, 1, 2 and ties the other row's 3 (0.5); 0.0 beats none
    assert m["auc"] == pytest.approx(4.5 / 12)
    assert m["n_users"] == 2


# The three methods ----------------------------------------------------------------------


def test_three_methods_finite_different_and_deterministic(ratings, tmp_path):
    cfg = make_config(ratings)
    a = paper.run_leave_last(cfg, str(tmp_path / "a"), log=lambda _: None)
    b = paper.run_leave_last(cfg, str(tmp_path / "b"), log=lambda _: None)
    assert list(a["methods"]) == ["base", "finetune", "duet"]
    for m in a["methods"].values():
        assert m["n_users"] == N_USERS
        assert all(math.isfinite(m[k]) for k in ("auc", "uauc", "ndcg10", "hr10"))
        assert 0 <= m["auc"] <= 1 and 0 <= m["hr10"] <= 1
    aucs = [m["auc"] for m in a["methods"].values()]
    assert len(set(aucs)) == 3  # base, finetune and DUET score differently
    assert a["methods"] == b["methods"]  # same seed, same numbers
    c = paper.run_leave_last(config.load(EXPERIMENT, [f"data.path={json.dumps(str(ratings))}", "cloud.epochs=2",
                                                      "strategies.duet.epochs=1", "cloud.batch_size=64",
                                                      "model.backbone=gru4rec"], seed=1),
                             str(tmp_path / "c"), log=lambda _: None)
    assert c["seed"] == 1 and c["methods"] != a["methods"]


def test_protocol_is_validated(ratings):
    with pytest.raises(ConfigError) as e:
        make_config(ratings, **{"data.protocol": "leave_one"})
    assert e.value.key == "data.protocol"
    assert config.MovieLensConfig(path="x.csv").protocol == "fleet"
    assert make_config(ratings).data.protocol == "leave_last"


def test_cli_end_to_end(ratings, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", str(EXPERIMENT), "--out", str(out), "--set", f"data.path={json.dumps(str(ratings))}",
                     "--set", "cloud.epochs=1", "--set", "strategies.duet.epochs=1", "--seed", "2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "leave_last" and summary["backbone"] == "din" and summary["seed"] == 2
    assert set(summary["methods"]) == {"base", "finetune", "duet"}
    assert set(summary["methods"]["duet"]) >= {"auc", "uauc", "ndcg10", "hr10", "n_users"}
    assert {"base_s", "finetune_s", "duet_s", "total_s"} <= set(summary["timings"])
    assert 'protocol = "leave_last"' in (out / "config.toml").read_text()
    printed = capsys.readouterr().out
    assert "duet" in printed and "NDCG@10" in printed
    # the fleet layout: load_run and the report read it; each method is a one-round strategy
    run = load_run(out)
    assert run.strategies == ["base", "finetune", "duet"] and run.status == dict.fromkeys(run.strategies, "complete")
    assert summary["layout_version"] == LAYOUT_VERSION
    for name, m in summary["methods"].items():
        recs = run.devices[run.devices["strategy"] == name]
        assert len(recs) == m["n_users"] and (recs["round"] == 1).all() and (recs["n_pos"] == 1).all()
        assert recs["auc"].mean() == pytest.approx(m["uauc"], abs=1e-12)
        assert recs["hr10"].mean() == pytest.approx(m["hr10"], abs=1e-12)
        assert summary["strategies"][name]["uauc"] == pytest.approx(m["uauc"], abs=1e-12)
        assert summary["strategies"][name]["overall_auc"] == pytest.approx(m["auc"], abs=1e-12)
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in printed
    assert set(run.fleet_devices["bucket"]) == {"head", "torso", "tail"}


@pytest.mark.parametrize("overrides, message", [
    ([], "data.path"),  # the shipped experiment leaves the path to the user
    (["--set", "data.path=does/not/exist.csv"], "data file not found"),
    (["--set", "data.path=x.csv", "--set", "strategies.duet.tau=0"], "strategies.duet.tau"),
    # every user's ratings but the held-out one give no training sample (used to be sklearn's traceback)
    (["--set", "data.path=two.csv"], "too few ratings for leave_last (holdout 'test'): of 2 users 1 have the 2 a "
                                     "held-out one needs, and the rest gives 0 training samples"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    (tmp_path / "two.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,4.0,20\n2,1,3.0,15\n")
    assert cli.main(["run", str(EXPERIMENT), "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fleetsim: error:") and message in err[0]
    assert not out.exists()
