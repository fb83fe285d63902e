"""The worked examples of docs/extending.md run: a user data source and a user backbone,
each named by import path in an experiment, with no edit outside their own files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from devices import models
from devices.errors import ConfigError, DataError
from examples import csv_source, mean_pool
from simulator import config
from simulator.results import load_run
from simulator.run import run_experiment


@pytest.fixture
def csv_file(tmp_path):
    rng = np.random.default_rng(0)
    n = 1500
    df = pd.DataFrame({"user": rng.integers(100, 130, n), "item": rng.integers(5000, 5060, n),
                       "timestamp": np.sort(rng.uniform(1e9, 1e9 + 30 * 86400, n))})
    path = tmp_path / "log.csv"
    df.to_csv(path, index=False)
    return path, df


def test_csv_source_loads_users_in_time_order(csv_file):
    path, df = csv_file
    inter, timeline = csv_source.load(csv_source.CsvConfig(path=str(path), n_rounds=3), 0)
    assert inter.n_users == df["user"].nunique() == 30 and inter.n_items == df["item"].nunique()
    assert list(inter.counts) == list(df.groupby("user").size())
    u0 = df[df["user"] == df["user"].min()].sort_values("timestamp")
    np.testing.assert_array_equal(inter.times[: inter.counts[0]], u0["timestamp"].to_numpy() - df["timestamp"].min())
    assert timeline.n_rounds == 3


def test_a_user_source_failing_on_its_data_is_one_line(csv_file, tmp_path):
    """The example refuses a NaN timestamp itself; a plug-in source that raises something
    else (a string timestamp) is one DataError line naming the source, not a traceback."""
    from simulator.fleet import build_fleet

    path, df = csv_file
    for bad, needle in ((np.nan, r"no rows, or a timestamp that is not a finite number"),
                        ("soon", r"^data.source examples.csv_source:SOURCE: its load raised ValueError: ")):
        df.astype({"timestamp": object}).assign(timestamp=lambda d: d["timestamp"].where(d.index != 3, bad)) \
            .to_csv(tmp_path / "bad.csv", index=False)
        cfg = config.from_dict({"data": {"source": "examples.csv_source:SOURCE", "path": str(tmp_path / "bad.csv")}})
        with pytest.raises(DataError, match=needle):
            build_fleet(cfg)


def test_mean_pool_is_the_mean_of_real_items_through_the_tower():
    spec = models.ModelSpec(n_items=6, backbone="examples.mean_pool:BACKBONE", dim=4, window=3)
    p = models.to_torch(models.init_params(spec, 0))
    windows = np.array([[[-1, 2, 4]]])
    got = models.body_output(p, __import__("torch").from_numpy(windows))[0, 0].numpy()
    emb = p["item_emb"][0].numpy()
    np.testing.assert_allclose(got, ((emb[2] + emb[4]) / 2) @ p["pool.w"][0].numpy(), rtol=1e-6)
    assert models.backbone_of(p) == "examples.mean_pool:BACKBONE"
    assert spec.head_keys() == mean_pool.BACKBONE.head_keys


def test_unknown_plugins_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="model.backbone"):
        config.from_dict({"model": {"backbone": "examples.mean_pool:NOPE"}})
    with pytest.raises(ConfigError, match="data.source"):
        config.from_dict({"data": {"source": "examples.csv_source:NOPE"}})
    with pytest.raises(ConfigError, match="data.path"):
        config.from_dict({"data": {"source": "examples.csv_source:SOURCE"}})


def test_a_run_on_a_user_source_with_a_user_backbone_and_user_strategy(csv_file, tmp_path):
    path, _ = csv_file
    cfg = config.from_dict({
        "experiment": {"seed": 1, "strategies": ["cloud_only", "examples.head_finetune:HeadFinetune"]},
        "data": {"source": "examples.csv_source:SOURCE", "path": str(path), "n_rounds": 2},
        "model": {"backbone": "examples.mean_pool:BACKBONE", "dim": 8},
        "cloud": {"epochs": 1},
    })
    summary = run_experiment(cfg, str(tmp_path / "run"), use_ray=False, progress=False, log=lambda _: None)
    run = load_run(tmp_path / "run")
    assert run.status == dict.fromkeys(run.strategies, "complete")
    assert 'source = "examples.csv_source:SOURCE"' in (tmp_path / "run" / "config.toml").read_text()
    tuned = summary["strategies"]["examples.head_finetune:HeadFinetune"]
    assert tuned["selected_device_rounds"] > 0 and tuned["device_flops"] > 0
    assert summary["strategies"]["cloud_only"]["device_flops"] == 0


def test_hr10_by_bucket_metric_and_its_plot(tmp_path):
    from examples import hr_by_bucket
    from tests.conftest import small_config

    run_experiment(small_config(), str(tmp_path / "run"), use_ray=False, progress=False, log=lambda _: None)
    run = load_run(tmp_path / "run")
    table = hr_by_bucket.hr10_by_bucket(run)
    assert len(table) == 3 * len(run.strategies)
    d = run.devices
    sel = d[(d["strategy"] == "fedavg") & (d["bucket"] == "tail") & (d["n_pos"] > 0)]
    expected = (sel["hr10"] * sel["n_pos"]).sum() / sel["n_pos"].sum()  # hits over positives, by hand
    got = table[(table["strategy"] == "fedavg") & (table["bucket"] == "tail")]["hr10"].item()
    assert got == pytest.approx(expected, rel=1e-12)
    fig = hr_by_bucket.plot(run, str(tmp_path / "hr.png"))
    bars = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(bars, table.set_index(["strategy", "bucket"]).loc[
        [(s, b) for s in run.strategies for b in ("head", "torso", "tail")], "hr10"].to_numpy())
    assert (tmp_path / "hr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_example_strategy_takes_the_median_of_three_devices():
    from test_hand_computed import flower_patched, reply  # noqa: F401 (messages as FleetGrid builds them)
    from types import SimpleNamespace

    from examples.median_fedavg import MedianFedAvg
    from strategies.registry import make_strategy

    strategy = make_strategy("examples.median_fedavg:MedianFedAvg", {"fraction_train": 0.5})

    def device(node, w, loss):
        return reply(node, {"arrays": {"w": np.array(w, np.float32)}}, {"num-examples": 1, "train_loss": loss})

    with flower_patched(SimpleNamespace(run=SimpleNamespace(run_id=7), wait=lambda s: None), 0):
        arrays, metrics = strategy.aggregate_train(1, [device(1, [1.0, 10.0], 0.3), device(2, [2.0, -5.0], 0.1),
                                                       device(3, [100.0, 0.0], 0.9)])
    np.testing.assert_array_equal(arrays["w"].numpy(), [2.0, 0.0])  # per coordinate: median(1,2,100), median(10,-5,0)
    assert metrics["train_loss"] == pytest.approx(0.3)
    assert isinstance(strategy, MedianFedAvg)


def test_both_example_strategies_run_beside_the_built_ins(tmp_path):
    from tests.conftest import small_config

    cfg = small_config(experiment={"strategies": ["fedavg", "examples.head_finetune:HeadFinetune",
                                                  "examples.median_fedavg:MedianFedAvg"]})
    summary = run_experiment(cfg, str(tmp_path / "run"), use_ray=False, progress=False, log=lambda _: None)
    assert {s["status"] for s in summary["strategies"].values()} == {"complete"}
    assert summary["strategies"]["examples.median_fedavg:MedianFedAvg"]["bytes_up"] > 0
