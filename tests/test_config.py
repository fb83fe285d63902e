"""Tests for simulator/config.py: the shipped experiments, --set / --seed, to_toml, and
ConfigError naming the offending key in every section."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from devices.profiles import ProfileConfig
from devices.runtime import DeviceSettings
from devices.synthetic import SyntheticConfig
from simulator import config
from simulator.config import (
    CloudConfig,
    ExperimentConfig,
    ExperimentSection,
    ModelConfig,
    MovieLensConfig,
    from_dict,
    load,
    parse_override,
)
from simulator.errors import ConfigError, FleetsimError

EXPERIMENTS = Path(config.__file__).resolve().parent.parent / "experiments"
ALL = ("cloud_only", "local_finetune", "fedavg")


def roundtrip(cfg: ExperimentConfig) -> ExperimentConfig:
    return from_dict(tomllib.loads(cfg.to_toml()))


# The shipped experiments ----------------------------------------------------------------


def test_quickstart():
    cfg = load(EXPERIMENTS / "quickstart.toml")
    # the default run shows every strategy that exists, baselines first
    assert set(cfg.experiment.strategies) == set(config.SHORT_NAMES)
    order = ("cloud_only", "local_finetune", "fedavg", "duet", "metapatch", "momodistill")
    assert cfg.experiment == ExperimentSection(name="quickstart", seed=0, strategies=order, deadline_s=600.0)
    assert cfg.source == "synthetic"
    assert cfg.data == SyntheticConfig(n_devices=2000, n_items=1000, history_days=14.0, round_hours=4.0,
                                       n_rounds=10, drift="gradual")
    assert cfg.model == ModelConfig("gru4rec", 32, 10)
    assert cfg.cloud == CloudConfig(epochs=3)  # lr, batch_size, negatives: defaults
    assert cfg.device == DeviceSettings(local_steps=5, recent=30)
    assert cfg.profiles == ProfileConfig()
    assert cfg.strategies == {"fedavg": {"fraction_train": 0.1}, "local_finetune": {"fraction_train": 1.0},
                              "duet": {"fraction_train": 0.5}, "metapatch": {"fraction_train": 1.0, "patch_dim": 8},
                              "momodistill": {"fraction_train": 1.0, "patch_dim": 8, "distill_every": 2}}


def test_default_experiment_is_quickstart():
    assert config.DEFAULT_EXPERIMENT == EXPERIMENTS / "quickstart.toml"
    assert load() == load(EXPERIMENTS / "quickstart.toml")


def test_movielens_needs_a_path():
    with pytest.raises(ConfigError) as e:
        load(EXPERIMENTS / "movielens.toml")
    assert e.value.key == "data.path"


def test_movielens_with_path_override():
    path = "../shared/data/ml-latest-small/ratings.csv"
    cfg = load(EXPERIMENTS / "movielens.toml", [f"data.path={path}"])
    assert cfg.source == "movielens"
    assert cfg.data == MovieLensConfig(path=path, n_rounds=10, history_fraction=0.8)
    assert cfg.experiment.name == "movielens"
    assert cfg.experiment.strategies == ALL
    assert cfg.cloud.epochs == 3
    assert cfg.strategies == {"fedavg": {"fraction_train": 0.1}}


# --set and --seed -------------------------------------------------------------------------


@pytest.mark.parametrize("text, keys, value", [
    ("data.n_devices=500", ["data", "n_devices"], 500),
    ("cloud.lr=0.01", ["cloud", "lr"], 0.01),
    ("cloud.lr=1e-3", ["cloud", "lr"], 0.001),
    ("profiles.tier_fractions=[0.2, 0.5, 0.3]", ["profiles", "tier_fractions"], [0.2, 0.5, 0.3]),
    ('experiment.strategies=["fedavg", "cloud_only"]', ["experiment", "strategies"], ["fedavg", "cloud_only"]),
    ("data.drift=sudden", ["data", "drift"], "sudden"),  # bare string
    ("experiment.name=my run", ["experiment", "name"], "my run"),  # bare string with a space
    ('experiment.name="42"', ["experiment", "name"], "42"),  # quoted: a string, not an int
    ("data.path=../data/ml-1m/ratings.dat", ["data", "path"], "../data/ml-1m/ratings.dat"),
    ("data.path=a=b", ["data", "path"], "a=b"),  # only the first '=' splits
    ("model.enabled=true", ["model", "enabled"], True),
    (" data.n_rounds = 7 ", ["data", "n_rounds"], 7),
    ("strategies.fedavg.fraction_train=0.5", ["strategies", "fedavg", "fraction_train"], 0.5),
    # the path is a TOML dotted key: a quoted part (a strategy's import path) loses its quotes
    ('strategies."pkg:Cls".x=1', ["strategies", "pkg:Cls", "x"], 1),
    ('strategies."pkg.mod:Cls".lr=0.1', ["strategies", "pkg.mod:Cls", "lr"], 0.1),
    ("strategies.'pkg.mod:Cls'.lr = 0.1", ["strategies", "pkg.mod:Cls", "lr"], 0.1),
    ("strategies.mod:Cls.lr=0.1", ["strategies", "mod:Cls", "lr"], 0.1),  # not TOML: split on dots, as before
])
def test_parse_override(text, keys, value):
    got_keys, got = parse_override(text)
    assert got_keys == keys
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["foo", "n_devices=3", "=3", "data.=3", ".n_devices=3", "data..x=1", 'data."".x=1'])
def test_parse_override_malformed(text):
    with pytest.raises(FleetsimError, match="expected section.key=value"):
        parse_override(text)


def test_overrides_applied_and_typed():
    cfg = load(EXPERIMENTS / "quickstart.toml", [
        "data.n_devices=500",
        "cloud.lr=1",  # an integer where a float is expected
        "profiles.tz_offsets_h=[0, 5.5]",
        "profiles.tz_weights=[0.25, 0.75]",
        "data.drift=sudden",
        "data.drift_rounds=[2, 4]",
        "strategies.fedavg.fraction_train=0.5",
    ])
    assert cfg.data.n_devices == 500
    assert cfg.cloud.lr == 1.0 and isinstance(cfg.cloud.lr, float)
    assert cfg.profiles.tz_offsets_h == (0.0, 5.5)
    assert cfg.profiles.tz_weights == (0.25, 0.75)
    assert cfg.data.drift == "sudden" and cfg.data.drift_rounds == (2, 4)
    assert cfg.strategies["fedavg"] == {"fraction_train": 0.5}
    assert cfg.data.n_items == 1000  # untouched keys keep the file's values


def test_override_sets_parameters_of_a_strategy_named_by_import_path(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('[experiment]\nstrategies = ["strategies.fedavg:FedAvg"]\n')
    cfg = config.load(path, ['strategies."strategies.fedavg:FedAvg".fraction_train=0.25'])
    assert cfg.strategies == {"strategies.fedavg:FedAvg": {"fraction_train": 0.25}}
    assert tomllib.loads(cfg.to_toml())["strategies"] == cfg.strategies  # and config.toml says the same


@pytest.mark.parametrize("raw, key, bound", [
    ({"data": {"n_devices": 10**12}}, "data.n_devices", "100,000,000"),
    ({"data": {"n_items": 10**10}}, "data.n_items", "10,000,000"),
    ({"data": {"latent_dim": 10**8}}, "data.latent_dim", "1,024"),
    ({"data": {"n_rounds": 10**11}}, "data.n_rounds", "100,000"),
    ({"data": {"mean_daily_interactions": 1e12}}, "data.mean_daily_interactions", "10,000"),
    ({"data": {"history_days": 1e300}}, "data.history_days", "36,500"),
    ({"data": {"round_hours": 1e300}}, "data.round_hours", "8,760"),
    ({"data": {"round_hours": 1e-300}}, "data.round_hours", "1/60"),
    ({"data": {"source": "movielens", "path": "r.csv", "n_rounds": 10**11}}, "data.n_rounds", "100,000"),
    ({"model": {"dim": 10**8}}, "model.dim", "4,096"),
    ({"model": {"window": 10**8}}, "model.window", "1,024"),
    ({"experiment": {"hosts": 100_000}}, "experiment.hosts", "1024"),
])
def test_sizes_have_upper_bounds(raw, key, bound):
    with pytest.raises(ConfigError) as e:
        config.from_dict(raw)
    assert e.value.key == key and bound in e.value.allowed


def test_sizes_at_their_bounds_are_valid():
    cfg = config.from_dict({
        "experiment": {"hosts": 1024},
        "data": {"n_devices": 100_000_000, "n_items": 10_000_000, "latent_dim": 1024, "n_rounds": 100_000,
                 "mean_daily_interactions": 10_000.0, "history_days": 36_500.0, "round_hours": 8_760.0},
        "model": {"dim": 4096, "window": 1024}})
    assert (cfg.data.n_devices, cfg.model.dim, cfg.experiment.hosts) == (100_000_000, 4096, 1024)
    assert config.from_dict({"data": {"round_hours": 1 / 60}}).data.round_hours == 1 / 60


def test_override_creates_missing_section():
    cfg = load(EXPERIMENTS / "movielens.toml", ["data.path=r.csv", "device.lr=0.1"])  # no [device] in the file
    assert cfg.device == DeviceSettings(lr=0.1)


def test_override_checked_like_the_file():
    with pytest.raises(ConfigError) as e:
        load(EXPERIMENTS / "quickstart.toml", ["data.n_devices=many"])
    assert e.value.key == "data.n_devices" and e.value.value == "many"


def test_narrowing_the_strategy_list_keeps_built_in_tables():
    # quickstart has [strategies.local_finetune]; running only fedavg must not fail on it
    cfg = load(EXPERIMENTS / "quickstart.toml", ['experiment.strategies=["fedavg"]'])
    assert cfg.experiment.strategies == ("fedavg",)
    assert cfg.strategies["local_finetune"] == {"fraction_train": 1.0}


def test_seed_override():
    assert load(EXPERIMENTS / "quickstart.toml").experiment.seed == 0
    assert load(EXPERIMENTS / "quickstart.toml", seed=7).experiment.seed == 7
    # --seed wins over --set experiment.seed
    assert load(EXPERIMENTS / "quickstart.toml", ["experiment.seed=3"], seed=9).experiment.seed == 9
    assert load(EXPERIMENTS / "quickstart.toml", ["experiment.seed=3"]).experiment.seed == 3


def test_seed_must_be_non_negative():
    with pytest.raises(ConfigError) as e:
        load(EXPERIMENTS / "quickstart.toml", seed=-1)
    assert e.value.key == "experiment.seed"


def test_load_file_errors(tmp_path):
    with pytest.raises(FleetsimError, match="experiment file not found"):
        load(tmp_path / "missing.toml")
    with pytest.raises(FleetsimError, match="is a directory"):
        load(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")
    with pytest.raises(FleetsimError, match="not valid TOML"):
        load(bad)
    import os

    os.mkfifo(tmp_path / "pipe.toml")  # reading it would wait for a writer forever
    with pytest.raises(FleetsimError, match=r"pipe\.toml: not a regular file \(a pipe or a device\?\)"):
        load(tmp_path / "pipe.toml")


@pytest.mark.parametrize("text", ["", "\n\n", "# settings to come\n", "\ufeff"])
def test_an_experiment_file_that_sets_nothing_is_refused(tmp_path, text):
    # from_dict({}) is not the quickstart: an emptied file must not run other settings unnoticed
    p = tmp_path / "exp.toml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(FleetsimError) as e:
        load(p, ["data.n_devices=50"])
    assert str(e.value) == (f"{p}: sets nothing (empty, or only comments); write the experiment's settings in it "
                            f"(see quickstart.toml), or leave the file out to run the quickstart")
    p.write_text("[data]\n", encoding="utf-8")  # a table, even an empty one, says what it means
    assert load(p).data == from_dict({}).data


def test_a_utf8_bom_is_read_past(tmp_path):
    """Some Windows editors start UTF-8 files with a byte-order mark, which TOML refuses."""
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf[data]\r\nn_devices = 77\r\n")
    assert load(p).data.n_devices == 77


# to_toml ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: load(EXPERIMENTS / "quickstart.toml"),
    lambda: load(EXPERIMENTS / "movielens.toml", ["data.path=../shared/data/ml-latest-small/ratings.csv"]),
    lambda: ExperimentConfig(),
    lambda: from_dict({
        "experiment": {"name": 'quote " and back\\slash', "seed": 5, "hosts": 3,
                       "strategies": ["fedavg", "strategies.local_finetune:LocalFinetune"]},
        "data": {"drift": "sudden", "drift_rounds": [2, 3], "n_rounds": 4, "start_hour": 6.5},
        "profiles": {"tier_fractions": [0.2, 0.3, 0.5], "tz_offsets_h": [1.0], "tz_weights": [1.0]},
        "strategies": {"fedavg": {"fraction_train": 0.25, "min_train_nodes": 4},
                       "strategies.local_finetune:LocalFinetune": {"local_steps": 2, "lr": 0.05}},
    }),
], ids=["quickstart", "movielens", "defaults", "non-default"])
def test_to_toml_roundtrip(make):
    cfg = make()
    assert roundtrip(cfg) == cfg


def test_to_toml_spells_out_defaults():
    raw = tomllib.loads(load(EXPERIMENTS / "movielens.toml", ["data.path=x.csv"]).to_toml())
    assert raw["data"] == {"source": "movielens", "path": "x.csv", "n_rounds": 10, "history_fraction": 0.8}
    assert raw["cloud"] == {"epochs": 3, "lr": 0.005, "batch_size": 512, "negatives": 4}
    assert raw["device"]["eval_negatives"] == 99
    assert raw["strategies"] == {"fedavg": {"fraction_train": 0.1}}


# ConfigError names the key ---------------------------------------------------------------


@pytest.mark.parametrize("raw, key", [
    # [experiment]
    ({"experiment": {"name": 3}}, "experiment.name"),
    ({"experiment": {"seed": 1.5}}, "experiment.seed"),
    ({"experiment": {"seed": -4}}, "experiment.seed"),
    ({"experiment": {"strategies": []}}, "experiment.strategies"),
    ({"experiment": {"strategies": ["fedavg", "fedavg"]}}, "experiment.strategies"),
    ({"experiment": {"strategies": ["fedsgd"]}}, "experiment.strategies"),
    ({"experiment": {"hosts": -1}}, "experiment.hosts"),
    ({"experiment": {"eval_users": 0}}, "experiment.eval_users"),
    ({"experiment": {"eval_users": "some"}}, "experiment.eval_users"),
    ({"experiment": {"eval_users": True}}, "experiment.eval_users"),
    ({"experiment": {"wait_s": 0}}, "experiment.wait_s"),
    ({"experiment": {"wait_s": float("inf")}}, "experiment.wait_s"),
    ({"experiment": {"deadline_s": float("inf")}}, "experiment.deadline_s"),
    ({"experiment": {"strategies": ["a.b:C", "a:b_C"]}}, "experiment.strategies"),  # one results folder
    ({"experiment": {"deadline": 5}}, "experiment.deadline"),
    ({"experiment": 5}, "experiment"),
    # [data] synthetic
    ({"data": {"n_devices": 0}}, "data.n_devices"),
    ({"data": {"n_items": "x"}}, "data.n_items"),
    ({"data": {"round_hours": -1.0}}, "data.round_hours"),
    ({"data": {"drift": "sideways"}}, "data.drift"),
    ({"data": {"drift_fraction": 1.5}}, "data.drift_fraction"),
    ({"data": {"drift": "sudden", "n_rounds": 3, "drift_rounds": [4]}}, "data.drift_rounds"),
    ({"data": {"activity_sigma": 6.0}}, "data.activity_sigma"),
    ({"data": {"start_hour": 24.0}}, "data.start_hour"),
    ({"data": {"path": "r.csv"}}, "data.path"),  # a movielens key without source = "movielens"
    ({"data": {"source": "imdb"}}, "data.source"),
    ({"data": []}, "data"),
    # [data] movielens
    ({"data": {"source": "movielens"}}, "data.path"),
    ({"data": {"source": "movielens", "path": "r.csv", "n_rounds": 0}}, "data.n_rounds"),
    ({"data": {"source": "movielens", "path": "r.csv", "history_fraction": 1.0}}, "data.history_fraction"),
    ({"data": {"source": "movielens", "path": "r.csv", "n_devices": 10}}, "data.n_devices"),
    # [profiles]
    ({"profiles": {"tier_fractions": [0.5, 0.5]}}, "profiles.tier_fractions"),
    ({"profiles": {"tier_fractions": [0.5, 0.5, 0.5]}}, "profiles.tier_fractions"),
    ({"profiles": {"rtt_ms": [0.0, 80.0, 40.0]}}, "profiles.rtt_ms"),
    ({"profiles": {"failure_rate": 1.5}}, "profiles.failure_rate"),
    ({"profiles": {"online_trough": 0.9}}, "profiles.online_trough"),
    ({"profiles": {"tz_weights": [1.0]}}, "profiles.tz_weights"),
    ({"profiles": {"up_mbps": "fast"}}, "profiles.up_mbps"),
    # [model]
    ({"model": {"backbone": "bert"}}, "model.backbone"),
    ({"model": {"dim": 0}}, "model.dim"),
    ({"model": {"window": 2.5}}, "model.window"),
    # [cloud]
    ({"cloud": {"epochs": -1}}, "cloud.epochs"),  # 0 is allowed: an untrained model
    ({"cloud": {"lr": 0.0}}, "cloud.lr"),
    ({"cloud": {"batch_size": -8}}, "cloud.batch_size"),
    ({"cloud": {"negatives": "4"}}, "cloud.negatives"),
    # [device]
    ({"device": {"local_steps": 0}}, "device.local_steps"),
    ({"device": {"lr": -0.5}}, "device.lr"),
    ({"device": {"recent": 2.5}}, "device.recent"),
    ({"device": {"eval_negatives": True}}, "device.eval_negatives"),
    # [strategies.<name>] and unknown sections
    ({"strategies": {"fedavg": 0.1}}, "strategies"),
    ({"experiment": {"strategies": ["fedavg"]}, "strategies": {"fedavgg": {"lr": 0.1}}},
     "strategies.fedavgg"),
    ({"modle": {"dim": 8}}, "modle"),
])
def test_config_error_names_key(raw, key):
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert e.value.key == key
    assert str(e.value).startswith(f"config: {key} = ")
    assert "\n" not in str(e.value)
