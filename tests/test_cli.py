"""Tests for simulator/cli.py: every bad input is one stderr line, exit code 2, no traceback,
and nothing already on disk is damaged.

Most cases run ``simulator.cli.main`` in-process; cloud training and the host pool are
replaced by guards that fail the test, so each case also proves the error comes before any
expensive work (and before Ray). A few cases run the real ``python -m simulator.cli`` in a
subprocess, where stderr is exactly what a user sees (including library log lines).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


import simulator.run as run_mod  # imports Flower now, so its log handler exists before capture
from conftest import hosts_in_process
from simulator import cli, config
from simulator.results import read_rounds

TINY = """\
[experiment]
name = "tiny"
seed = 1
strategies = ["cloud_only", "fedavg"]

[data]
n_devices = 30
n_items = 40
n_rounds = 2
history_days = 3.0
mean_daily_interactions = 4.0

[cloud]
epochs = 1
"""

MOVIELENS = """\
[experiment]
strategies = ["cloud_only", "local_finetune", "fedavg"]

[data]
source = "movielens"
path = {path}
n_rounds = 2
"""

# A malformed line in each MovieLens format: (file name, content, 1-based bad line, problem).
MALFORMED = [
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,100\n1,oops,3.0,200\n2,10,5.0,300\n",
     3, "item id 'oops' is not an integer"),
    ("u.data", "1\t10\t4\t100\n2\t10\t3\n2\t11\t3\t300\n", 2, "expected 4 fields"),
    ("ratings.dat", "1::10::4::100\n1::11::5::150\n\n2::10::x::200\n", 4, "rating 'x' is not a number"),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_experiment(tmp_path: Path, text: str = TINY, name: str = "exp.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def movielens_experiment(tmp_path: Path, data_file: Path) -> str:
    return write_experiment(tmp_path, MOVIELENS.format(path=json.dumps(str(data_file))), "ml.toml")


def fake_previous_run(folder: Path) -> dict[str, bytes]:
    """A results directory as an earlier run leaves it; returns its snapshot."""
    (folder / "cloud_only" / "rounds.parquet").mkdir(parents=True)
    (folder / "config.toml").write_bytes(b'[experiment]\nname = "earlier"\n')
    (folder / "summary.json").write_bytes(b'{"layout_version": 1, "strategies": {"cloud_only": {"uauc": 0.61}}}')
    (folder / "fleet.json").write_bytes(b'{"n_devices": 30}')
    (folder / "cloud_only" / "rounds.parquet" / "round-00001.parquet").write_bytes(b"PAR1 not really parquet")
    return snapshot(folder)


@pytest.fixture
def fleetsim(monkeypatch, capsys, caplog):
    """Run ``cli.main`` in-process; returns ``(exit code, stdout, stderr)``.

    Cloud training and the host pool are replaced by guards, so a case that slips past
    validation fails loudly instead of starting Ray.
    """
    def reached(what):
        def guard(*args, **kwargs):
            raise AssertionError(f"bad input was not rejected before {what}")
        return guard

    monkeypatch.setattr("simulator.fleetrun.train_cloud_model", reached("cloud training"))
    monkeypatch.setattr("simulator.fleetrun.HostPool", reached("the host pool (Ray)"))
    monkeypatch.setattr("simulator.fleetrun.HostProcesses", lambda *a, **k: None)  # started before the fleet: no Ray here
    caplog.set_level(logging.WARNING)

    def call(*argv: str) -> tuple[int, str, str]:
        caplog.clear()
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse errors exit from inside parse_args
            code = exc.code
        out, err = capsys.readouterr()
        # A library warning logged during the run would be a second stderr line.
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [], f"log output besides the error: {warnings}"
        return code, out, err

    return call


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("fleetsim: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# Configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra, needles", [
    ("[model]\ndims = 10\n", ["model.dims", "unknown key", "known keys: backbone, dim, window"]),
    ("[modle]\ndim = 8\n", ["modle", "unknown section"]),
    ("[cloud]\nepoch = 2\n", ["cloud.epoch", "unknown key"]),
])
def test_unknown_config_key(fleetsim, tmp_path, extra, needles):
    text = TINY.replace("[cloud]\nepochs = 1\n", "") + extra
    out = tmp_path / "out"
    code, _, err = fleetsim("run", write_experiment(tmp_path, text), "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()  # config errors come before the results folder is made


@pytest.mark.parametrize("setting, needles", [
    ("model.dim=3.5", ["model.dim = 3.5", "an integer"]),
    ("data.n_devices=\"many\"", ["data.n_devices = 'many'"]),
    ("experiment.strategies=\"fedavg\"", ["experiment.strategies", "a list"]),
    ("experiment.hosts=true", ["experiment.hosts = True", "an integer"]),
    ("cloud.lr=fast", ["cloud.lr = 'fast'", "a number"]),
    ("profiles.tier_gflops=[1, 2]", ["profiles.tier_gflops"]),
    # a value the strategy accepts, but not with this backbone (GRU4Rec has no attention unit)
    ("strategies.duet.generate=head+attention", ["strategies.duet.generate = 'head+attention'", "din.att.w1"]),
])
def test_wrong_type(fleetsim, tmp_path, setting, needles):
    out = tmp_path / "out"
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", setting, "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("text, needles", [
    ("data = 5\n", ["config: data = 5", "a table"]),
    ('experiment = "quick"\n', ["config: experiment = 'quick'", "a table"]),
    ("[data]\nsource = 3\n", ["data.source = 3"]),
])
def test_section_of_wrong_type(fleetsim, tmp_path, text, needles):
    code, _, err = fleetsim("run", write_experiment(tmp_path, text), "--seed", "3", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("setting, key", [
    ("data.n_devices=0", "data.n_devices"),
    ("data.n_rounds=-2", "data.n_rounds"),
    ("model.dim=0", "model.dim"),
    ("model.window=-1", "model.window"),
    ("cloud.batch_size=0", "cloud.batch_size"),
    ("cloud.epochs=-3", "cloud.epochs"),
    ("device.local_steps=0", "device.local_steps"),
    ("device.eval_negatives=0", "device.eval_negatives"),
    ("experiment.deadline_s=0", "experiment.deadline_s"),
    ("experiment.hosts=-1", "experiment.hosts"),
])
def test_non_positive_size(fleetsim, tmp_path, setting, key):
    value = setting.partition("=")[2]
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", setting, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"{key} = {value}")


def test_hosts_flag_is_checked_as_the_setting(fleetsim, tmp_path):
    """--hosts N is experiment.hosts, checked by the same rule; --resume keeps the run's own."""
    for bad in ("-1", "2000"):
        code, _, err = fleetsim("run", write_experiment(tmp_path), "--hosts", bad, "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, f"experiment.hosts = {bad}")
    assert not (tmp_path / "o").exists()
    code, _, err = fleetsim("run", "--resume", str(tmp_path / "o"), "--hosts", "0")
    assert_one_line_error(code, err, "--resume takes the run's own config and folder; drop --hosts")
    code, _, err = fleetsim("run", "--resume", str(tmp_path / "o"), "--seed", "0", "--out", "")  # 0 and "" count
    assert_one_line_error(code, err, "--resume takes the run's own config and folder; drop --out, --seed")
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--out", " ")
    assert_one_line_error(code, err, "--out is empty; give a folder for the results")


def test_hosts_flag_sets_the_pool_and_the_recorded_config(monkeypatch, capsys, tmp_path):
    from devices.pool import HostPool

    hosts_in_process(monkeypatch)
    made: list[int] = []

    def pool(*a, **k):
        made.append(k["n_hosts"])
        return HostPool(*a, **{**k, "use_ray": False})

    monkeypatch.setattr("simulator.fleetrun.HostPool", pool)
    out = tmp_path / "h"
    code = cli.main(["run", write_experiment(tmp_path), "--hosts", "3", "--set", "experiment.hosts=1", "--out", str(out),
                     "--no-progress", "--no-report"])
    assert code == 0, capsys.readouterr().err
    assert tomllib.loads((out / "config.toml").read_text())["experiment"]["hosts"] == 3
    assert made and set(made) == {3}


def test_non_positive_movielens_rounds(fleetsim, tmp_path):
    data = tmp_path / "ratings.csv"
    data.write_text("userId,movieId,rating,timestamp\n1,10,4.0,100\n")
    code, _, err = fleetsim("run", movielens_experiment(tmp_path, data), "--set", "data.n_rounds=0",
                            "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "data.n_rounds = 0")


def test_negative_seed(fleetsim, tmp_path):
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--seed", "-1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "experiment.seed = -1")


@pytest.mark.parametrize("setting, needles", [
    ("data.n_devices=1000000000000", ["data.n_devices = 1000000000000", "from 1 to 100,000,000"]),
    ("data.n_items=10000000000", ["data.n_items = 10000000000", "from 1 to 10,000,000"]),
    ("data.n_rounds=100000000000", ["data.n_rounds = 100000000000", "from 1 to 100,000"]),
    ("data.mean_daily_interactions=1e12", ["data.mean_daily_interactions = 1000000000000.0", "<= 10,000"]),
    ("data.history_days=1e300", ["data.history_days = 1e+300", "<= 36,500"]),
    ("data.round_hours=1e300", ["data.round_hours = 1e+300", "8,760 (a year)"]),
    ("data.round_hours=1e-300", ["data.round_hours = 1e-300", "from 1/60 (a minute)"]),  # rounds that hold nothing
    ("model.dim=100000000", ["model.dim = 100000000", "at most 4,096"]),
    ("model.window=100000000", ["model.window = 100000000", "at most 1,024"]),
    ("experiment.hosts=100000", ["experiment.hosts = 100000", "at most 1024"]),
])
def test_oversized_setting(fleetsim, tmp_path, setting, needles):
    """A size far beyond what the code can hold is a config error: before the fleet is
    built (the guards), before the folder is made (model.dim/window used to be refused only
    in cloud training, after config.toml and summary.json were written)."""
    out = tmp_path / "out"
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", setting, "--out", str(out))
    line = assert_one_line_error(code, err, *needles)
    assert line.count(" = ") == 1 and len(line) < 200
    assert not out.exists()


def test_fleet_too_large_for_memory(fleetsim, tmp_path, monkeypatch):
    def no_memory(cfg, seed):
        raise MemoryError("Unable to allocate 6.4 TiB")

    monkeypatch.setattr("devices.synthetic.generate", no_memory)
    out = tmp_path / "out"
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--out", str(out))
    assert_one_line_error(code, err, "not enough memory to build the fleet", "data.n_devices = 30",
                          "data.n_rounds = 2", "make it smaller")
    assert not out.exists()


def test_rounds_without_interactions(fleetsim, tmp_path):
    """Valid settings whose rounds hold no interaction: the run would score nothing and
    still say "complete"."""
    out = tmp_path / "out"
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--out", str(out), "--set", "data.n_devices=1",
                            "--set", "data.mean_daily_interactions=0.01", "--set", "data.round_hours=0.02")
    assert_one_line_error(code, err, "no interaction falls in rounds 1..2", "nothing would be scored",
                          "data.round_hours")
    assert not out.exists()


def test_movielens_timestamp_beyond_any_date(fleetsim, tmp_path):
    data = tmp_path / "ratings.csv"
    data.write_text("userId,movieId,rating,timestamp\n1,10,4.0,100\n1,11,4.0,200\n2,10,3.0,150\n"
                    "2,12,3.0,1e300\n")
    out = tmp_path / "out"
    code, _, err = fleetsim("run", movielens_experiment(tmp_path, data), "--out", str(out))
    assert_one_line_error(code, err, f"{data}:5: timestamp '1e300'", "years 1 to 9999")
    assert not out.exists()


def test_movielens_user_who_has_seen_every_item(fleetsim, tmp_path):
    """One user (so every item is one it rated): no negative can be drawn for it. Refused
    when the data is loaded, not in cloud training after the folder is written."""
    data = tmp_path / "ratings.csv"
    data.write_text("userId,movieId,rating,timestamp\n" + "".join(f"7,{i},4.0,{100 * i}\n" for i in range(1, 30)))
    out = tmp_path / "out"
    code, _, err = fleetsim("run", movielens_experiment(tmp_path, data), "--out", str(out))
    assert_one_line_error(code, err, f"{data}: user 7 has interacted with every one of the 29 items",
                          "no negative can be drawn")
    assert not out.exists()


# Strategies ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, needles", [
    ("fedsgd", ["experiment.strategies", "'fedsgd'", "a short name"]),
    ("no_such_package.module:Strategy", ["experiment.strategies", "cannot import module 'no_such_package.module'"]),
    ("strategies.fedavg:NoSuchClass", ["experiment.strategies", "has no 'NoSuchClass'"]),
    ("devices.runtime:DeviceSettings", ["experiment.strategies", "flwr.serverapp.strategy.Strategy"]),
])
def test_unknown_strategy(fleetsim, tmp_path, strategy, needles):
    out = tmp_path / "out"
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", f"experiment.strategies=[{json.dumps(strategy)}]",
                            "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not (out / "config.toml").exists() and not (out / "summary.json").exists()


def test_unknown_strategy_parameter(fleetsim, tmp_path):
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", 'experiment.strategies=["local_finetune"]',
                            "--set", "strategies.local_finetune.steps=3", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "strategies.local_finetune.steps = 3", "known: fraction_train, local_steps, lr")


def test_unknown_parameter_of_kwargs_strategy(fleetsim, tmp_path):
    # FedAvg passes **kwargs on to Flower, which rejects the name when it is constructed.
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", "strategies.fedavg.fraction_trian=0.5",
                            "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "strategies.fedavg", "unexpected keyword argument 'fraction_trian'")


def test_parameter_of_a_strategy_named_by_import_path(fleetsim, tmp_path):
    # the quoted key reaches the strategy's own rule (it was kept with its quotes, a
    # "strategy not in experiment.strategies")
    name = "strategies.local_finetune:LocalFinetune"
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", f'experiment.strategies=["{name}"]',
                            "--set", f'strategies."{name}".fraction_train=0', "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"strategies.{name}.fraction_train = 0 is invalid: a number in (0, 1]")


def test_strategy_parameter_out_of_range(fleetsim, tmp_path):
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", 'experiment.strategies=["local_finetune"]',
                            "--set", "strategies.local_finetune.fraction_train=0", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "strategies.local_finetune.fraction_train = 0 is invalid: a number in (0, 1]")


def test_parameters_for_an_unknown_unlisted_strategy(fleetsim, tmp_path):
    # a table for a strategy neither listed nor built in is a typo; one for a built-in
    # strategy left out of this run (narrowed with --set) is kept, not an error
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--set", "strategies.fedavgg.lr=0.1",
                            "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "strategies.fedavgg", "not in experiment.strategies")


def test_parameters_for_a_built_in_strategy_left_out_are_kept():
    cfg = config.from_dict({"experiment": {"strategies": ["cloud_only"]}, "strategies": {"fedavg": {"fraction_train": 0.2}}})
    assert cfg.strategies["fedavg"] == {"fraction_train": 0.2}


# Files -----------------------------------------------------------------------------------


def test_missing_experiment_file(fleetsim, tmp_path):
    missing = tmp_path / "nope.toml"
    code, _, err = fleetsim("run", str(missing), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "experiment file not found", str(missing))


def test_experiment_file_not_toml(fleetsim, tmp_path):
    path = write_experiment(tmp_path, "[data\nn_devices = 3\n")
    code, _, err = fleetsim("run", path, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, path, "not valid TOML")


def test_missing_data_file(fleetsim, tmp_path):
    missing = tmp_path / "ml" / "ratings.csv"
    out = tmp_path / "out"
    code, _, err = fleetsim("run", movielens_experiment(tmp_path, missing), "--out", str(out))
    assert_one_line_error(code, err, "data file not found", str(missing))
    assert snapshot(out) == {}  # nothing written: the same --out works once the path is fixed


def test_movielens_without_path(fleetsim, tmp_path):
    out = tmp_path / "out"
    code, _, err = fleetsim("run", str(config.DEFAULT_EXPERIMENT.parent / "movielens.toml"), "--out", str(out))
    assert_one_line_error(code, err, "data.path = ''")
    assert not out.exists()


@pytest.mark.parametrize("name, content, lineno, problem", MALFORMED)
def test_malformed_data_line(fleetsim, tmp_path, name, content, lineno, problem):
    data = tmp_path / name
    data.write_text(content)
    out = tmp_path / "out"
    code, _, err = fleetsim("run", movielens_experiment(tmp_path, data), "--out", str(out))
    assert_one_line_error(code, err, f"{data}:{lineno}: ", problem)
    assert snapshot(out) == {}


# Output folder ---------------------------------------------------------------------------


def test_out_under_a_regular_file(fleetsim, tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"keep me")
    out = afile / "out"
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--out", str(out))
    assert_one_line_error(code, err, f"--out {out}", "not writable")
    assert afile.read_bytes() == b"keep me"


def test_out_is_a_regular_file(fleetsim, tmp_path):
    afile = tmp_path / "results.txt"
    afile.write_bytes(b"keep me")
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--out", str(afile))
    assert_one_line_error(code, err, f"--out {afile}", "not a directory")
    assert afile.read_bytes() == b"keep me"


@pytest.mark.parametrize("marker", ["config.toml", "summary.json", None])
def test_out_is_a_previous_run(fleetsim, tmp_path, marker):
    out = tmp_path / "previous"
    before = fake_previous_run(out)
    if marker:  # either file alone marks a folder as holding results
        other = {"config.toml": "summary.json", "summary.json": "config.toml"}[marker]
        (out / other).unlink()
        before = snapshot(out)
    code, _, err = fleetsim("run", write_experiment(tmp_path), "--out", str(out))
    assert_one_line_error(code, err, f"--out {out}", "already holds results")
    assert snapshot(out) == before


def test_error_after_results_keeps_them(monkeypatch, capsys, tmp_path):
    """A strategy that asks the fleet for the impossible fails alone: one line, exit 1, the
    earlier strategy's results intact, and the folder refuses a second run (in-process
    hosts instead of Ray)."""
    hosts_in_process(monkeypatch)
    out = tmp_path / "out"
    code = cli.main(["run", write_experiment(tmp_path), "--out", str(out), "--no-progress",
                     "--set", "strategies.fedavg.min_available_nodes=1000"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    about = [line for line in err.splitlines() if "fedavg" in line]
    assert len(about) == 1
    assert about[0].startswith("fleetsim: error: fedavg failed: round 1: the strategy waits for more devices")

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["strategies"]) == ["cloud_only", "fedavg"]
    assert summary["strategies"]["cloud_only"]["status"] == "complete"
    assert summary["strategies"]["fedavg"]["status"] == "failed"
    assert summary["strategies"]["cloud_only"]["selected_device_rounds"] == 0
    assert list(read_rounds(out, "cloud_only")["round"]) == [1, 2]
    assert config.from_dict(tomllib.loads((out / "config.toml").read_text())).experiment.name == "tiny"

    before = snapshot(out)
    code = cli.main(["run", write_experiment(tmp_path), "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, "already holds results")
    assert snapshot(out) == before


# Command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needles", [
    (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["run", "--seed", "abc"], ["--seed", "invalid int value: 'abc'"]),
    (["run", "--seed"], ["--seed", "expected one argument"]),
    (["run", "a.toml", "b.toml"], ["unrecognized arguments: b.toml"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["simulate"], ["invalid choice: 'simulate'"]),
    (["run", "--set", "foo"], ["--set 'foo'", "section.key=value"]),
    (["run", "--set", "=3"], ["--set '=3'", "section.key=value"]),
    (["run", "--set", "data.=3"], ["--set 'data.=3'", "section.key=value"]),
    (["run", "--set", "experiment.name.x=3"], ["--set 'experiment.name.x=3'", "name is not a section"]),
])
def test_bad_arguments(fleetsim, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)  # a run that wrongly starts would write runs/ here
    code, out, err = fleetsim(*argv)
    assert_one_line_error(code, err, *needles)
    assert out == ""
    assert list(tmp_path.iterdir()) == []


# Through a real process ------------------------------------------------------------------
# Each process pays ~2-6 s of torch/Flower imports, so the slow ones are started together.


def start_process(cwd: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulator.cli", *argv], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": ""})


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def assert_process_error(result: tuple[int, str, str], *needles: str) -> None:
    code, out, err = result
    assert code == 2, err
    assert_one_line_error(code, err, *needles)
    assert out == ""


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """Slow subprocess cases, started at once: name -> (folder, (exit code, stdout, stderr))."""
    cases: dict[str, tuple[Path, subprocess.Popen]] = {}

    # The default strategies include FedAvg, whose construction logs a Flower warning: the
    # error must still be the only stderr line.
    d = tmp_path_factory.mktemp("malformed")
    name, content, _, _ = MALFORMED[0]
    (d / name).write_text(content)
    cases["malformed"] = d, start_process(d, "run", movielens_experiment(d, d / name), "--out", "out")

    d = tmp_path_factory.mktemp("previous")
    fake_previous_run(d / "previous")
    cases["previous"] = d, start_process(d, "run", write_experiment(d), "--out", str(d / "previous"))

    return {k: (d, finish(proc)) for k, (d, proc) in cases.items()}


@pytest.mark.parametrize("source, needles", [
    ("def f(:\n    pass\n", ["cannot import module 'plug_broken'", "SyntaxError at ", "plug_broken.py:1: "]),
    ("import os\nraise RuntimeError('import-time boom')\n",
     ["cannot import module 'plug_broken'", "importing it raised RuntimeError: import-time boom"]),
])
def test_process_plug_in_module_that_does_not_import(tmp_path, source, needles):
    (tmp_path / "plug_broken.py").write_text(source)
    result = finish(start_process(tmp_path, "run", "--set", 'experiment.strategies=["plug_broken:Mine"]',
                                  "--out", "out"))
    assert_process_error(result, "experiment.strategies = 'plug_broken:Mine'", *needles)
    assert not (tmp_path / "out").exists()


def test_process_bad_seed(tmp_path):
    assert_process_error(finish(start_process(tmp_path, "run", "--seed", "abc")), "invalid int value: 'abc'")
    assert list(tmp_path.iterdir()) == []


def test_process_malformed_data_line(processes):
    d, result = processes["malformed"]
    name, _, lineno, problem = MALFORMED[0]
    assert_process_error(result, f"{d / name}:{lineno}: ", problem)
    assert snapshot(d / "out") == {}


def test_process_previous_run_untouched(processes, tmp_path):
    d, result = processes["previous"]
    assert_process_error(result, f"--out {d / 'previous'}", "already holds results")
    assert snapshot(d / "previous") == fake_previous_run(tmp_path / "same")


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fleetsim {version('fleetsim')}"
