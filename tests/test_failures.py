"""No silent failures: code errors, non-finite values, failing strategies, Ray start-up and
clean-up, partial runs (issue 12).

Exit codes, stderr and processes are checked through ``python -m simulator.cli`` in a
subprocess (what a user sees); the numbers behind them in-process on small fleets.
"""
from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import simulator.run as run_mod
from devices.host import nonfinite_replies
from devices.replies import rows_of_one_array
from devices.reaper import descendants
from devices.runtime import Payload
from simulator import config
from strategies.cloud import check_losses
from simulator.errors import NonFiniteError
from simulator.results import load_run, read_devices, read_rounds
from simulator.run import run_experiment
from conftest import SmallWorld, hosts_in_process, small_config

ROOT = Path(__file__).resolve().parent.parent

TINY = """\
[experiment]
name = "tiny"
seed = 1
strategies = {strategies}
on_device_error = "{mode}"

[data]
n_devices = {n_devices}
n_items = 60
n_rounds = {n_rounds}
history_days = 3.0
mean_daily_interactions = 4.0

[cloud]
epochs = 1

[strategies.fedavg]
fraction_train = 0.5
"""

USER_STRATEGY = '''\
import os
import sys

from flwr.app import MessageType
from devices.runtime import DeviceApp
from strategies.fedavg import FedAvg


def train(ctx, payload):
    raise ValueError("boom in user code")


class Broken(FedAvg):
    device_app = DeviceApp({MessageType.TRAIN: train})


def exits(ctx, payload):
    sys.exit(3)


class Exits(FedAvg):
    device_app = DeviceApp({MessageType.TRAIN: exits})


def dies(ctx, payload):
    os._exit(3)  # the host process itself ends, as on a segfault or an OOM kill


class Dies(FedAvg):
    device_app = DeviceApp({MessageType.TRAIN: dies})
'''


def experiment(tmp_path: Path, strategies, mode="stop", n_devices=40, n_rounds=3, name="exp.toml") -> Path:
    (tmp_path / "userstrat.py").write_text(USER_STRATEGY)
    p = tmp_path / name
    p.write_text(TINY.format(strategies=json.dumps(strategies), mode=mode, n_devices=n_devices, n_rounds=n_rounds))
    return p


def cli(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "simulator.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=env)


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err
    assert not any(line.lstrip().startswith('File "') for line in err.splitlines()), err


# Code errors -----------------------------------------------------------------------------


def test_user_device_error_stops_that_strategy_only(tmp_path):
    """stop mode: the broken strategy fails at round 1 (status, error, traceback in
    error.log, one stderr line); the strategies before and after it complete; exit 1."""
    exp = experiment(tmp_path, ["cloud_only", "userstrat:Broken", "fedavg"])
    res = cli(tmp_path, "run", str(exp), "--out", "out", "--no-progress", "--no-report")
    assert res.returncode == 1, res.stderr
    no_traceback(res.stderr)
    about = [line for line in res.stderr.splitlines() if "userstrat" in line]
    assert len(about) == 1 and "round 1" in about[0] and "ValueError: boom in user code" in about[0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    s = summary["strategies"]
    assert list(s) == ["cloud_only", "userstrat:Broken", "fedavg"]
    assert [v["status"] for v in s.values()] == ["complete", "failed", "complete"]
    assert s["cloud_only"]["rounds_completed"] == s["fedavg"]["rounds_completed"] == 3
    err = s["userstrat:Broken"]["error"]
    rounds = read_rounds(tmp_path / "out", "userstrat:Broken")
    assert err["round"] == 1 and err["message_type"] == "train" and err["error_type"] == "ValueError"
    assert err["message"] == "boom in user code"
    assert err["devices"] == int(rounds["errors"].iloc[0]) > 0  # every device asked to train, minus dropouts
    assert int(rounds["errors"].iloc[0]) == int(rounds["selected"].iloc[0] - rounds["dropped"].iloc[0])
    log = (tmp_path / "out" / "userstrat_Broken" / "error.log").read_text()
    assert "Traceback" in log and 'raise ValueError("boom in user code")' in log
    assert "status" in res.stdout and "failed in round 1" in res.stdout
    assert s["userstrat:Broken"]["rounds_completed"] == 0  # round 1 is written, but it did not complete

    # round 1's records stay on disk for the diagnosis, but the report's numbers are those
    # of the rounds a strategy completed (none here): round 1 stopped part-way
    from simulator.report import build_report

    assert (read_devices(tmp_path / "out", "userstrat:Broken")["round"] == 1).sum() > 0
    files = build_report([tmp_path / "out"], tmp_path / "rep", n_boot=50)
    cmp = pd.read_csv(files.comparison_csv).set_index("strategy")
    assert list(cmp.index) == ["fedavg"] and cmp.loc["fedavg", "paired_users"] > 0
    table = pd.read_csv(files.summary_csv).set_index("strategy")
    assert table.loc["userstrat:Broken", "status"] == "failed" and np.isnan(table.loc["userstrat:Broken", "uauc"])


def test_user_device_error_recorded_fails_when_nothing_comes_back(tmp_path):
    """record mode counts code errors and goes on while some device replies usably
    (``test_code_error_record_goes_on_while_some_device_succeeds``); a device function that
    raises for every device leaves nothing to aggregate, so the strategy fails in round 1
    with one line that says so (it used to complete with the cloud model's numbers), its
    round's records (every selected device an error) are kept, and the run exits 1."""
    exp = experiment(tmp_path, ["cloud_only", "userstrat:Broken"], mode="record")
    res = cli(tmp_path, "run", str(exp), "--out", "out", "--no-progress")
    assert res.returncode == 1, res.stderr
    no_traceback(res.stderr)
    lines = [line for line in res.stderr.splitlines() if "userstrat" in line]
    assert len(lines) == 1, res.stderr  # the failure, not also a warning that the run goes on
    assert lines[0].startswith("fleetsim: error: userstrat:Broken failed: round 1: device function for 'train' "
                               "raised ValueError: boom in user code (") and "no device of the exchange replied" in lines[0]
    out = tmp_path / "out"
    rounds = read_rounds(out, "userstrat:Broken")
    devices = read_devices(out, "userstrat:Broken")
    assert list(rounds["round"]) == [1] and rounds["ok"][0] == 0
    assert rounds["errors"][0] == rounds["selected"][0] - rounds["dropped"][0] > 0
    assert (devices["status"] == "error").sum() == rounds["errors"][0]
    s = json.loads((out / "summary.json").read_text())["strategies"]
    assert s["userstrat:Broken"]["status"] == "failed" and s["userstrat:Broken"]["error"]["round"] == 1
    assert s["cloud_only"]["status"] == "complete"


def test_a_dying_host_or_sys_exit_fails_only_that_strategy(tmp_path):
    """sys.exit in a device function is a code error; a host process that dies (os._exit)
    fails its strategy naming the device host, and the next strategy runs on a new pool."""
    exp = experiment(tmp_path, ["userstrat:Exits", "userstrat:Dies", "cloud_only"])
    res = cli(tmp_path, "run", str(exp), "--out", "out", "--no-progress")
    assert res.returncode == 1, res.stderr
    no_traceback(res.stderr)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert [v["status"] for v in s.values()] == ["failed", "failed", "complete"]
    assert s["userstrat:Exits"]["error"]["error_type"] == "SystemExit"
    assert s["userstrat:Dies"]["error"]["stage"] == "device host"
    assert s["cloud_only"]["rounds_completed"] == 3
    errors = [line for line in res.stderr.splitlines() if line.startswith("fleetsim: error")]
    assert len(errors) == 2 and all(len([x for x in errors if n in x]) == 1 for n in ("Exits", "Dies"))


def test_open_port_that_is_not_ray_is_one_line(tmp_path):
    """A reachable address that does not speak Ray: one line, exit 2, within 30 s, nothing
    written (Ray's own warnings while it retries are held back)."""
    import socketserver
    import threading

    server = socketserver.TCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        t0 = time.monotonic()
        res = cli(tmp_path, "run", str(experiment(tmp_path, ["cloud_only"])), "--out", "out", "--ray-address", address,
                  timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith(f"fleetsim: error: --ray-address {address}")
    assert not (tmp_path / "out").exists()


def in_process(monkeypatch):
    hosts_in_process(monkeypatch)


def plug_in(monkeypatch, tmp_path: Path, module: str, source: str) -> None:
    """A plug-in strategy module ``module`` importable from ``tmp_path`` (the working
    directory), and runs with in-process hosts."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    in_process(monkeypatch)


AGG_BUG = '''\
from strategies.fedavg import FedAvg


class AggregateBug(FedAvg):
    def aggregate_train(self, server_round, replies):
        if server_round == 2:
            raise KeyError("no such layer")
        return super().aggregate_train(server_round, replies)
'''


def test_server_half_exception_is_a_failed_strategy(monkeypatch, tmp_path):
    (tmp_path / "aggbug_mod.py").write_text(AGG_BUG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(config.SHORT_NAMES, "aggbug", "aggbug_mod:AggregateBug")
    in_process(monkeypatch)
    lines: list[str] = []
    cfg = small_config(experiment={"strategies": ["aggbug", "cloud_only"]},
                       strategies={"aggbug": {"min_available_nodes": 1, "min_train_nodes": 1}})
    summary = run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lines.append)
    s = summary["strategies"]
    assert s["aggbug"]["status"] == "failed" and s["cloud_only"]["status"] == "complete"
    assert s["aggbug"]["error"]["stage"] == "aggregate_train" and s["aggbug"]["error"]["round"] == 2
    assert s["aggbug"]["rounds_completed"] == 1  # round 2 failed (its records up to the failure are kept)
    assert list(read_rounds(tmp_path / "out", "aggbug")["round"]) == [1, 2]
    assert [line for line in lines if "aggbug" in line] == [
        f"fleetsim: error: aggbug failed: round 2: aggregate_train raised KeyError: 'no such layer'; "
        f"traceback in {tmp_path / 'out' / 'aggbug' / 'error.log'}"]


NAN_SERVER = '''\
import numpy as np
from flwr.app import Array, ArrayRecord, MessageType
from devices.runtime import DeviceApp, Payload
from strategies.fedavg import FedAvg


class NaNAggregate(FedAvg):
    """FedAvg whose aggregate of round 1 is NaN: what it sends in round 2 must never reach a device."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        return ArrayRecord({k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}), metrics


def hold_nan(ctx, payload):
    """Each device keeps a NaN copy of the model it got and uploads the finite one unchanged."""
    ctx.hold({k: np.full_like(v, np.nan) for k, v in payload.arrays["arrays"].items()})
    return [Payload(arrays={"arrays": payload.arrays["arrays"]}, metrics={"metrics": {"num-examples": 1}})
            for _ in range(len(ctx))]


class HoldsNaN(FedAvg):
    device_app = DeviceApp({MessageType.TRAIN: hold_nan})


class NaNLr(FedAvg):
    """FedAvg that asks devices to train with lr = NaN from round 2."""

    def configure_train(self, server_round, arrays, config, grid):
        config["lr"] = float("nan") if server_round >= 2 else 0.05
        return super().configure_train(server_round, arrays, config, grid)
'''


SHAPES = '''\
import numpy as np
from flwr.app import MessageType
from devices.runtime import DeviceApp
from strategies.fedavg import FedAvg, train


def train_then_shrink(ctx, payload):
    """FedAvg's device training, but the last device of each call uploads a (1,)-shaped item table."""
    out = train(ctx, payload)
    out[-1].arrays["arrays"]["item_emb"] = np.zeros(1, np.float32)
    return out


class Shrinks(FedAvg):
    device_app = DeviceApp({MessageType.TRAIN: train_then_shrink})
'''


def run_plug_in(monkeypatch, tmp_path, module: str, source: str, strategy: str, log=lambda _: None,
                **experiment) -> dict:
    """The summary entry of plug-in ``strategy`` (every device trains) run alone."""
    plug_in(monkeypatch, tmp_path, module, source)
    cfg = small_config(experiment={"strategies": [strategy], **experiment},
                       strategies={strategy: {"fraction_train": 1.0}})
    return run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=log)["strategies"][strategy]


def test_a_reply_of_another_shape_is_a_code_error_not_a_broadcast(monkeypatch, tmp_path):
    s = run_plug_in(monkeypatch, tmp_path, "shape_mod", SHAPES, "shape_mod:Shrinks")
    err = s["error"]
    assert s["status"] == "failed" and err["round"] == 1 and err["error_type"] == "ValueError"
    assert "returned arrays/item_emb of shape (1,) for device " in err["message"]
    assert err["message"].endswith("it was sent with shape (150, 32)")


DROPS = SHAPES.replace('out[-1].arrays["arrays"]["item_emb"] = np.zeros(1, np.float32)',
                      'del out[-1].arrays["arrays"]["item_emb"]').replace("Shrinks", "Drops")


def test_a_reply_without_an_array_it_was_sent_is_a_code_error_naming_the_device(monkeypatch, tmp_path):
    s = run_plug_in(monkeypatch, tmp_path, "drop_mod", DROPS, "drop_mod:Drops")
    err = s["error"]
    assert s["status"] == "failed" and err["round"] == 1 and err["error_type"] == "ValueError"
    assert re.fullmatch(r"train_then_shrink returned arrays without item_emb for device \d+; it was sent 10 arrays "
                        r"there \(a record the server sent comes back whole, or under a new name\)", err["message"])


SLOW = SHAPES.replace('out[-1].arrays["arrays"]["item_emb"] = np.zeros(1, np.float32)\n    return out',
                     'if payload.configs["config"]["server-round"] == 2:\n        import time\n        '
                     'time.sleep(1.5)  # a stuck call, here one that ends\n    return out').replace(
    "train_then_shrink", "train_slowly").replace("Shrinks", "Slow")


def test_a_round_that_does_not_finish_is_noted_with_what_runs(monkeypatch, tmp_path):
    """A device function (or strategy) that never returns used to hang the run without a
    word: after experiment.stall_note_s without a finished round, one note says what runs
    (then after twice as long); the run itself is untouched."""
    lines: list[str] = []
    s = run_plug_in(monkeypatch, tmp_path, "slow_mod", SLOW, "slow_mod:Slow", lines.append, stall_note_s=0.5)
    assert s["status"] == "complete"
    notes = [line for line in lines if "no round has finished" in line]
    slow = [n for n in notes if "round 2 under way; the hosts are running device function train_slowly" in n]
    assert slow, lines  # the 1.5 s call outlasts 0.5 s (a loaded machine may add notes elsewhere)
    assert re.fullmatch(rf"fleetsim: note: slow_mod:Slow: no round has finished for \d+ s \(round 2 under way; the "
                        rf"hosts are running device function train_slowly\); a loop that never ends looks like this; "
                        rf"Ctrl-C stops the run and fleetsim run --resume {re.escape(str(tmp_path / 'out'))} "
                        rf"continues it", slow[0])
    # then after twice as long, not every poll: at most 0.5, 1, 2 s into the round (and 4 s on a slow machine)
    assert len(slow) <= 4 and len(notes) <= 8
    from simulator.config import ConfigError

    for bad in (-1, float("inf"), "soon"):
        with pytest.raises(ConfigError, match="experiment.stall_note_s"):
            small_config(experiment={"stall_note_s": bad})


def test_check_replies_names_the_device_and_what_flower_would_refuse():
    from flwr.app import MetricRecord
    from devices.replies import check_replies

    def fn(ctx, payload):
        return []

    sent = Payload(arrays={"arrays": {"w": np.zeros((2, 3), np.float32)}})
    good = [Payload(arrays={"arrays": {"w": np.ones((2, 3), np.float32), "new": np.ones(7, np.float32)}},
                    metrics={"m": {"n": 3, "loss": 0.5, "l": [1.0, 2.0], "e": []}})]
    check_replies(fn, sent, good, np.array([5]))
    MetricRecord(good[0].metrics["m"])  # what passes here passes Flower
    for bad, what in ((np.float32(0.5), "(float32)"), (True, "(bool)"), ([1, 2.0], "(list)"), ((1, 2), "(tuple)")):
        with pytest.raises(TypeError):
            MetricRecord({"x": bad})
        reply = Payload(metrics={"m": {"n": 3, "x": bad}})
        with pytest.raises(ValueError, match=rf"fn returned metric m/x = .* {re.escape(what)} for device 9; a Flower"):
            check_replies(fn, sent, [good[0], reply], np.array([5, 9]))
    with pytest.raises(ValueError, match=r"returned arrays/w of shape \(6,\) for device 9; it was sent with shape \(2, 3\)"):
        check_replies(fn, sent, [good[0], Payload(arrays={"arrays": {"w": np.ones(6, np.float32)}})], np.array([5, 9]))
    with pytest.raises(ValueError, match=r"returned arrays/w as int32 for device 9; it was sent as float32"):
        check_replies(fn, sent, [good[0], Payload(arrays={"arrays": {"w": np.ones((2, 3), np.int32)}})], np.array([5, 9]))
    check_replies(fn, sent, [Payload(arrays={"arrays": {"w": np.ones((2, 3), np.float64)}})], np.array([5]))  # float
    with pytest.raises(ValueError, match=r"fn returned arrays without w for device 9; it was sent 1 array there \(a record"):
        check_replies(fn, sent, [good[0], Payload(arrays={"arrays": {"new": np.ones(7, np.float32)}})],
                      np.array([5, 9]))
    # not a list of Payload, one per device: fleetsim's check says so (it does not crash on len(None))
    with pytest.raises(TypeError, match=r"^fn returned NoneType; a device function returns a list of devices.runtime"
                                        r".Payload, one per device of the call \(2 here\)$"):
        check_replies(fn, sent, None, np.array([5, 9]))
    with pytest.raises(TypeError, match=r"^fn returned a dict for device 9; each reply is a devices.runtime.Payload"):
        check_replies(fn, sent, [good[0], {"metrics": {}}], np.array([5, 9]))
    with pytest.raises(RuntimeError, match=r"^fn returned 1 replies for 2 devices$"):
        check_replies(fn, sent, good, np.array([5, 9]))


def test_weighted_mean_refuses_replies_of_other_names_or_shapes():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from strategies.common import weighted_mean_arrays

    def content(**arrays):
        return RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
                           "metrics": MetricRecord({"n": 1})})

    mean = weighted_mean_arrays([content(w=[1.0, 2.0]), content(w=[3.0, 6.0])], "n")
    assert mean["w"].numpy().tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match=r"replies 0 and 1 hold different arrays \(arrays/w: \(2,\) vs \(1,\)\)"):
        weighted_mean_arrays([content(w=[1.0, 2.0]), content(w=[3.0])], "n")
    with pytest.raises(ValueError, match=r"replies 0 and 2 hold different arrays \(arrays/b: missing vs \(1,\)\)"):
        weighted_mean_arrays([content(w=[1.0]), content(w=[1.0]), content(w=[3.0], b=[1.0])], "n")
    idle = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}), "metrics": MetricRecord({"n": 0})})
    with pytest.raises(ValueError, match=r"^weighted_mean_arrays: the replies' 'n' sum to 0 \(no device trained"):
        weighted_mean_arrays([idle, idle], "n")


def test_nan_sent_by_the_server_fails_the_strategy_before_a_device_adopts_it(monkeypatch, tmp_path):
    plug_in(monkeypatch, tmp_path, "nan_mod", NAN_SERVER)
    lines: list[str] = []
    cfg = small_config(experiment={"strategies": ["nan_mod:NaNAggregate", "cloud_only"]},
                       strategies={"nan_mod:NaNAggregate": {"min_available_nodes": 1, "min_train_nodes": 1}})
    s = run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lines.append)["strategies"]
    nan = s["nan_mod:NaNAggregate"]
    assert nan["status"] == "failed" and s["cloud_only"]["status"] == "complete"
    assert nan["error"]["kind"] == "non-finite" and nan["error"]["round"] == 2
    assert nan["error"]["stage"] == "the strategy's server side"
    assert nan["rounds_completed"] == 1
    devices = read_devices(tmp_path / "out", "nan_mod:NaNAggregate")
    assert sorted(devices["round"].unique()) == [1, 2] and not devices["nonfinite"].any()
    msg = [line for line in lines if "NaNAggregate" in line]
    assert len(msg) == 1 and msg[0].startswith("fleetsim: error: nan_mod:NaNAggregate failed: the strategy's server "
                                               "side: round 2: what it sends to devices holds NaN/Inf (arrays/")
    assert run_mod.failed_strategies({"strategies": s}) == ["nan_mod:NaNAggregate"]


WRONG_SHAPE_SERVER = NAN_SERVER.replace("np.full_like(v.numpy(), np.nan)", "v.numpy()[:1]").replace(
    "NaNAggregate", "CutAggregate")


def test_a_model_of_another_shape_sent_by_the_server_fails_the_strategy_not_the_devices(monkeypatch, tmp_path):
    # its aggregate keeps one row of every parameter: the device function would be blamed for loading it
    s = _run_plug_in(monkeypatch, tmp_path, "cut_mod", WRONG_SHAPE_SERVER, "CutAggregate", "cloud_only")
    cut = s["cut_mod:CutAggregate"]
    assert cut["status"] == "failed" and s["cloud_only"]["status"] == "complete"
    assert (cut["error"]["round"], cut["error"]["error_type"], cut["rounds_completed"]) == (2, "ValueError", 1)
    assert cut["error"]["message"] == ("round 2: the strategy sends arrays/item_emb of shape (1, 32), but the devices' "
                                       "model has item_emb of shape (150, 32) (made by its configure or aggregate "
                                       "step, before any device ran)")
    assert (cut["error"]["kind"], cut["error"]["stage"]) == ("failure", "start")  # not a device's code error


WRONG_RETURN_SERVER = NAN_SERVER.replace(
    "return ArrayRecord({k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}), metrics",
    "return {'arrays': arrays}").replace("NaNAggregate", "DictAggregate")


def _run_plug_in(monkeypatch, tmp_path, module: str, source: str, strategy: str, *others: str) -> dict:
    """The strategies' summaries of a small in-process run of plug-in ``module:strategy``
    (1 device may train) beside ``others``."""
    plug_in(monkeypatch, tmp_path, module, source)
    key = f"{module}:{strategy}"
    cfg = small_config(experiment={"strategies": [key, *others]},
                       strategies={key: {"min_available_nodes": 1, "min_train_nodes": 1}})
    return run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lambda _: None)["strategies"]


def test_aggregate_train_returning_another_type_is_named(monkeypatch, tmp_path):
    err = _run_plug_in(monkeypatch, tmp_path, "dict_mod", WRONG_RETURN_SERVER, "DictAggregate")["dict_mod:DictAggregate"]["error"]
    assert (err["round"], err["error_type"], err["stage"]) == (1, "TypeError", "start")
    assert err["message"] == "aggregate_train returned dict; it returns (ArrayRecord or None, MetricRecord or None)"


NAN_METRIC_SERVER = NAN_SERVER.replace(
    "return ArrayRecord({k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}), metrics",
    "from flwr.app import MetricRecord\n        return arrays, MetricRecord({'loss': float('nan'), 'n': 3})").replace(
    "NaNAggregate", "NaNMetric")


def test_a_nan_metric_of_aggregate_train_is_a_warning(monkeypatch, tmp_path):
    """summary.json writes NaN as null; the run says so in one line (it used to be silent)."""
    plug_in(monkeypatch, tmp_path, "nanm_mod", NAN_METRIC_SERVER)
    lines: list[str] = []
    cfg = small_config(experiment={"strategies": ["nanm_mod:NaNMetric"]},
                       strategies={"nanm_mod:NaNMetric": {"min_available_nodes": 1, "min_train_nodes": 1}})
    s = run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lines.append)["strategies"]
    assert s["nanm_mod:NaNMetric"]["status"] == "complete"
    warned = [line for line in lines if "non-finite metrics" in line]
    assert warned == ["fleetsim: warning: nanm_mod:NaNMetric: its aggregate_train returned non-finite metrics (loss in "
                      "round(s) 1, 2, 3); summary.json writes them as null"]


def test_a_nan_config_value_sent_by_the_server_fails_the_strategy(monkeypatch, tmp_path):
    s = _run_plug_in(monkeypatch, tmp_path, "nan_mod", NAN_SERVER, "NaNLr")
    err = s["nan_mod:NaNLr"]["error"]
    assert s["nan_mod:NaNLr"]["status"] == "failed" and err["kind"] == "non-finite" and err["round"] == 2
    assert err["stage"] == "the strategy's server side" and "holds NaN/Inf (config/lr)" in err["message"]


def test_nan_scores_are_a_status_an_exit_code_and_no_significance(monkeypatch, tmp_path):
    """Devices that hold a NaN model score NaN: the means leave them out, so the table and
    the report say so, the run's exit code is 1, and no comparison claims significance."""
    plug_in(monkeypatch, tmp_path, "nan_mod", NAN_SERVER)
    cfg = small_config(experiment={"strategies": ["cloud_only", "nan_mod:HoldsNaN", "fedavg"]},
                       strategies={"nan_mod:HoldsNaN": {"min_available_nodes": 1, "min_train_nodes": 1}})
    summary = run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lambda _: None)
    s = summary["strategies"]
    devices = read_devices(tmp_path / "out", "nan_mod:HoldsNaN")
    n = int(devices["nonfinite"].sum())
    assert n > 0 and s["nan_mod:HoldsNaN"]["nonfinite_score_device_rounds"] == n
    assert s["nan_mod:HoldsNaN"]["status"] == "complete"  # every round ran; summary.json keeps the machine status
    assert run_mod.failed_strategies(summary) == ["nan_mod:HoldsNaN"]
    table = run_mod.format_table(summary).splitlines()
    row = [line for line in table if line.startswith("nan_mod:HoldsNaN")]
    assert len(row) == 1 and f"NaN scores ({n} device-rounds)" in row[0]
    assert sum("complete" in line for line in table) == 2

    from simulator.report import build_report

    files = build_report([tmp_path / "out"], tmp_path / "rep", n_boot=50)
    csv = pd.read_csv(files.summary_csv).set_index("strategy")
    assert csv.loc["nan_mod:HoldsNaN", "status"] == f"NaN scores ({n} device-rounds)"
    assert csv.loc["fedavg", "status"] == "complete"
    cmp = pd.read_csv(files.comparison_csv).set_index("strategy")
    assert cmp.loc["nan_mod:HoldsNaN", "significant"] == f"n/a: nan_mod:HoldsNaN NaN scores ({n} device-rounds), left out"
    assert cmp.loc["fedavg", "significant"] in ("yes", "no")
    assert "NaN scores" in Path(files.html).read_text()


# Non-finite values -----------------------------------------------------------------------


def test_nonfinite_replies_flags_nan_inf_in_arrays_and_metrics():
    ok = Payload(arrays={"a": {"w": np.ones((2, 3), np.float32)}}, metrics={"m": {"loss": 0.5, "n": 3}})
    nan_array = Payload(arrays={"a": {"w": np.array([[1, np.nan, 0], [0, 0, 0]], np.float32)}},
                        metrics={"m": {"loss": 0.5, "n": 3}})
    inf_metric = Payload(arrays={"a": {"w": np.ones((2, 3), np.float32)}}, metrics={"m": {"loss": math.inf, "n": 3}})
    huge = Payload(arrays={"a": {"w": np.full((2, 3), 1e308)}}, metrics={})  # float64 sum overflows; finite
    ints = Payload(arrays={"ids": {"items": np.array([1, 2], np.int64)}})
    assert nonfinite_replies([ok, nan_array, inf_metric, huge, ints]).tolist() == [False, True, True, False, False]
    assert nonfinite_replies([]).tolist() == []


def test_nonfinite_replies_cut_from_one_stacked_result():
    """Replies that are rows of one array (how the built-in device functions cut theirs)
    are checked on that array in place: the same answer as for separate copies, for rows
    given out of order and for a subset, with a huge finite float64 row not flagged."""
    stacked = np.ones((6, 4, 3), np.float32)
    stacked[1, 2, 0], stacked[4, 0, 2] = np.nan, -np.inf
    wide = np.full((6, 2), 1e308)  # float64 sums overflow, elements finite
    wide[3, 1] = np.nan
    order = [5, 4, 3, 1, 0]
    views = [Payload(arrays={"a": {"w": stacked[j], "x": wide[j]}}) for j in order]
    copies = [Payload(arrays={"a": {"w": stacked[j].copy(), "x": wide[j].copy()}}) for j in order]
    assert nonfinite_replies(views).tolist() == nonfinite_replies(copies).tolist() == [False, True, True, True, False]
    assert rows_of_one_array([stacked[j] for j in order])[1].tolist() == order
    assert rows_of_one_array([stacked[2], stacked[3, :2]]) is None  # not whole rows
    assert rows_of_one_array([stacked[2], stacked[3].copy()]) is None  # not all from one array
    assert rows_of_one_array([stacked[:, 0][2]]) is None  # rows of a strided view


@pytest.mark.parametrize("strategy", ["fedavg", "local_finetune"])
def test_diverging_device_training_is_quarantined(monkeypatch, tmp_path, strategy):
    """device.lr = 1e6: replies with NaN/Inf are quarantined, never adopted or averaged,
    so every model a device holds keeps scoring finite."""
    in_process(monkeypatch)
    cfg = small_config(experiment={"strategies": [strategy]}, device={"lr": 1e6},
                       data={"n_devices": 80, "n_rounds": 3}, profiles={"failure_rate": 0.0},
                       strategies={"fedavg": {"fraction_train": 1.0, "min_available_nodes": 1, "min_train_nodes": 1}})
    summary = run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lambda m: None)
    rounds = read_rounds(tmp_path / "out", strategy)
    devices = read_devices(tmp_path / "out", strategy)
    assert rounds["quarantined"].sum() > 0
    assert summary["strategies"][strategy]["quarantined"] == rounds["quarantined"].sum()
    assert (devices["status"] == "quarantined").sum() == rounds["quarantined"].sum()
    assert rounds["nonfinite_scores"].sum() == 0 and not devices["nonfinite"].any()
    scored = devices[devices["n_pos"] > 0]
    assert np.isfinite(scored["auc"].dropna()).all() and len(scored["auc"].dropna()) > 0


@pytest.mark.parametrize("strategy", ["local_finetune", "metapatch"])
def test_divergence_in_the_last_step_is_quarantined_and_said(monkeypatch, tmp_path, strategy):
    """One SGD step at lr 1e6: the loss a device reports is from before the step, so only
    the loss where the step left the model shows the divergence; those replies are
    quarantined (state rolled back: every held model keeps scoring finite) and one
    warning line says so."""
    in_process(monkeypatch)
    lines: list[str] = []
    cfg = small_config(experiment={"strategies": [strategy]}, device={"lr": 1e6, "local_steps": 1},
                       data={"n_devices": 80, "n_rounds": 2}, profiles={"failure_rate": 0.0})
    summary = run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lines.append)
    rounds = read_rounds(tmp_path / "out", strategy)
    assert rounds["quarantined"].iloc[0] > 0
    assert rounds["nonfinite_scores"].sum() == 0
    warned = [line for line in lines if line.startswith(f"fleetsim: warning: {strategy}:")]
    s = summary["strategies"][strategy]
    if s["status"] == "complete":
        assert len(warned) == 1 and f"{s['quarantined']} device replies were quarantined" in warned[0]
    else:  # every reply diverged: it stopped, naming the stage
        assert s["error"]["stage"] == "device training"


def test_a_cloud_model_without_history_is_refused(monkeypatch, tmp_path):
    """No device with two history interactions: the cloud model would keep its random
    start ("loss 0.000 -> 0.000") and every strategy would score about 0.5, exit 0."""
    from simulator.errors import DataError

    in_process(monkeypatch)
    cfg = small_config(experiment={"strategies": ["cloud_only"]}, data={"history_days": 0.001})
    with pytest.raises(DataError, match=r"^the cloud model has no history to train on: no device has two "
                                        r"interactions before the first round \(\d+ history interactions in all\); "
                                        r"give the fleet more history \(data.history_days\)"):
        run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()  # refused before the run folder (a rerun into it is not refused)


def test_a_weighting_key_no_reply_carries_fails_the_round(monkeypatch, tmp_path):
    """strategies.fedavg.weighted_by_key that no device reports: FedAvg used to find a total
    weight of 0 every round and keep the cloud model, completing without a word."""
    in_process(monkeypatch)
    cfg = small_config(experiment={"strategies": ["fedavg"]}, strategies={"fedavg": {"weighted_by_key": "nope"}})
    s = run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lambda m: None)["strategies"]
    err = s["fedavg"]["error"]
    assert s["fedavg"]["status"] == "failed" and (err["round"], err["stage"]) == (1, "aggregate_train")
    assert err["message"] == ("no reply carries the metric 'nope' it weights by (strategies.fedavg.weighted_by_key; "
                              "FedAvg's devices report 'num-examples')")


def test_every_reply_quarantined_stops_with_the_stage(monkeypatch, tmp_path):
    """A round in which no reply is finite stops the strategy naming device training and
    device.lr; the round's records (all quarantined) are kept."""
    from strategies import local_finetune

    def nan_train(ctx, payload):
        out = local_finetune.train(ctx, payload)
        for p in out:
            p.metrics["metrics"]["train_loss"] = float("nan")
        return out

    from devices.runtime import DeviceApp
    from flwr.app import MessageType

    monkeypatch.setattr(local_finetune.LocalFinetune, "device_app", DeviceApp({MessageType.TRAIN: nan_train}))
    in_process(monkeypatch)
    lines: list[str] = []
    cfg = small_config(experiment={"strategies": ["local_finetune", "cloud_only"]})
    summary = run_experiment(cfg, str(tmp_path / "out"), use_ray=False, progress=False, log=lines.append)
    s = summary["strategies"]["local_finetune"]
    assert s["status"] == "failed" and s["error"]["stage"] == "device training" and s["error"]["round"] == 1
    rounds = read_rounds(tmp_path / "out", "local_finetune")
    assert len(rounds) == 1 and rounds["ok"][0] == 0 and rounds["errors"][0] == 0
    assert rounds["quarantined"][0] == rounds["selected"][0] - rounds["dropped"][0] > 0
    assert summary["strategies"]["cloud_only"]["status"] == "complete"
    msg = [line for line in lines if "local_finetune" in line]
    assert len(msg) == 1 and "device training" in msg[0] and "device.lr" in msg[0]


def test_nonfinite_scores_are_recorded_not_averaged():
    """A held model that emits NaN: its devices are flagged, their metrics are NaN (not a
    number averaged in), and the pooled histogram leaves their rows out."""
    w = SmallWorld(small_config(), n_hosts=1)
    host = w.pool.hosts[0]
    good = host.score(1)
    bad = {k: v.copy() for k, v in w.initial.items()}
    bad["item_emb"][:] = np.nan
    host.reset(bad)
    res = host.score(1)
    assert len(res["device_id"]) == len(good["device_id"]) > 0
    assert res["nonfinite"].all() and np.isnan(res["auc"]).all()
    assert res["histogram"].n_pos == 0 and good["histogram"].n_pos == int(good["n_pos"].sum())
    assert not good["nonfinite"].any()


def test_check_losses_names_stage_and_setting():
    assert check_losses([0.7, 0.4], "cloud model", "cloud.lr") == [0.7, 0.4]
    with pytest.raises(NonFiniteError, match=r"^cloud model: training loss non-finite in epoch 2; look at cloud.lr$"):
        check_losses([0.7, float("nan")], "cloud model", "cloud.lr")
    with pytest.raises(NonFiniteError, match=r"diverged \(4\.4e\+26 > 69\.3\) in epoch 1"):
        check_losses([4.4e26], "cloud model", "cloud.lr")


def test_diverging_cloud_model_is_one_line_naming_the_stage(tmp_path):
    exp = experiment(tmp_path, ["cloud_only", "fedavg"])
    res = cli(tmp_path, "run", str(exp), "--out", "out", "--no-progress", "--set", "cloud.lr=1e6")
    assert res.returncode == 1
    no_traceback(res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("fleetsim: error")]
    assert len(errors) == 1 and "cloud model" in errors[0] and "look at cloud.lr" in errors[0]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert [v["status"] for v in s.values()] == ["failed", "failed"]
    assert {v["error"]["stage"] for v in s.values()} == {"cloud model"}
    csv = pd.read_csv(tmp_path / "out" / "summary.csv")  # the report still shows who failed, and why
    assert csv["status"].tolist() == ["failed", "failed"] and (tmp_path / "out" / "report.html").exists()


# Ray start-up and clean-up ---------------------------------------------------------------


def test_unreachable_ray_address_fails_fast_and_writes_nothing(tmp_path):
    exp = experiment(tmp_path, ["cloud_only"])
    (tmp_path / "kept").mkdir()
    for out in ("new", "kept"):
        t0 = time.monotonic()
        res = cli(tmp_path, "run", str(exp), "--out", out, "--ray-address", "127.0.0.1:1", timeout=60)
        assert time.monotonic() - t0 < 30
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            "fleetsim: error: --ray-address 127.0.0.1:1: no Ray cluster answers there (Connection refused)"]
    assert not (tmp_path / "new").exists()
    assert list((tmp_path / "kept").iterdir()) == []


def _wait_for(cond, timeout: float, step: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _run_until_rounds(tmp_path: Path, strategies, n_rounds: int, *extra: str, stderr=subprocess.DEVNULL):
    """``fleetsim run`` in the background until local_finetune has written 2 rounds: the
    process and every process it started by then (pid -> start time)."""
    exp = experiment(tmp_path, strategies, n_devices=500, n_rounds=n_rounds)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "simulator.cli", "run", str(exp), "--out", "out", "--no-progress",
                             *extra], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    parts = tmp_path / "out" / "local_finetune" / "rounds.parquet"
    seen: dict[int, int] = {}
    try:
        assert _wait_for(lambda: (seen.update(descendants(proc.pid)) or True) and parts.is_dir()
                         and len(list(parts.glob("round-*.parquet"))) >= 2, 240)
    except BaseException:
        proc.kill()
        raise
    seen.update(descendants(proc.pid))
    return proc, seen


def test_kill_9_leaves_no_process_and_a_readable_partial_run(tmp_path):
    """kill -9 of the driver mid-strategy: within 30 s no process it started is alive;
    the run reads back with that strategy ``interrupted`` and its completed rounds."""
    proc, seen = _run_until_rounds(tmp_path, ["cloud_only", "local_finetune"], 100)
    try:
        assert any(True for _ in seen)  # Ray's processes and the reaper
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    alive = lambda: [p for p, start in seen.items() if _start_time(p) == start]
    assert _wait_for(lambda: not alive(), 30), f"still alive after 30 s: {alive()}"

    run = load_run(tmp_path / "out")
    assert run.status == {"cloud_only": "complete", "local_finetune": "interrupted"}
    done = run.summary["strategies"]["local_finetune"]["rounds_completed"]
    assert done >= 2 and sorted(run.rounds[run.rounds["strategy"] == "local_finetune"]["round"]) == list(range(1, done + 1))
    assert run.summary["strategies"]["local_finetune"]["uauc"] is not None
    res = cli(tmp_path, "report", "out", "--out", "rep")
    assert res.returncode == 0, res.stderr
    csv = pd.read_csv(tmp_path / "rep" / "summary.csv").set_index("strategy")
    assert csv.loc["local_finetune", "status"] == "interrupted" and csv.loc["local_finetune", "rounds_completed"] == done
    assert "Not complete, or not all finite: local_finetune (interrupted" in (tmp_path / "rep" / "report.html").read_text()


@pytest.mark.parametrize("sig, code, last_line", [
    (signal.SIGINT, 130, "fleetsim: interrupted; rounds already written are kept"),
    (signal.SIGTERM, 143, "fleetsim: terminated (SIGTERM); rounds already written are kept"),
    (signal.SIGHUP, 129, "fleetsim: terminated (SIGHUP); rounds already written are kept")])
def test_ctrl_c_or_sigterm_marks_the_strategy_in_flight_interrupted(tmp_path, sig, code, last_line):
    exp = experiment(tmp_path, ["cloud_only", "local_finetune", "fedavg"], n_devices=500, n_rounds=100)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "simulator.cli", "run", str(exp), "--out", "out", "--no-progress"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "out" / "local_finetune" / "rounds.parquet"
    try:
        assert _wait_for(lambda: parts.is_dir() and len(list(parts.glob("round-*.parquet"))) >= 2, 240)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code
    no_traceback(err)
    assert err.splitlines()[-1] == last_line
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert [v["status"] for v in s.values()] == ["complete", "interrupted", "pending"]  # fedavg never started
    done = s["local_finetune"]["rounds_completed"]
    assert done >= 2 and sorted(read_rounds(tmp_path / "out", "local_finetune")["round"]) == list(range(1, done + 1))
    assert s["local_finetune"]["uauc"] is not None  # its summary covers the rounds it completed
    assert load_run(tmp_path / "out").status["local_finetune"] == "interrupted"
    assert not (tmp_path / "out" / ".fleetsim-run.pid").exists()


def test_sigterm_while_the_cloud_model_trains_is_one_line_and_leaves_nothing(tmp_path):
    """Before any strategy starts (the cloud model training): exit 143, the one
    "terminated" line, no traceback, every strategy still pending, no process left."""
    exp = experiment(tmp_path, ["cloud_only"], n_devices=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "simulator.cli", "run", str(exp), "--out", "out", "--no-progress",
                             "--set", "cloud.epochs=400"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: dict[int, int] = {}
    try:
        # the run folder is written and the reaper and Ray have begun (on a loaded machine
        # Ray's first process may come seconds after the folder)
        assert _wait_for(lambda: (seen.update(descendants(proc.pid)) or True) and len(seen) >= 2
                         and (tmp_path / "out" / "summary.json").exists(), 120)
        time.sleep(1.0)  # into the training
        seen.update(descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    no_traceback(err)
    assert err.splitlines()[-1] == "fleetsim: terminated (SIGTERM); rounds already written are kept"
    assert "cloud model ready" not in err  # the signal came while it trained
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert [v["status"] for v in s.values()] == ["pending"]
    assert seen  # Ray's processes and the reaper
    alive = lambda: [p for p, start in seen.items() if _start_time(p) == start]
    assert _wait_for(lambda: not alive(), 30), f"still alive after 30 s: {alive()}"


def test_a_lost_ray_gcs_is_one_line_exit_2_and_the_strategy_interrupted(tmp_path):
    """kill -9 of the embedded Ray's GCS mid-strategy: Ray's core worker would end the
    driver 60 s later with exit status 1 and a line of its own log, the strategy left
    ``running``. Now: fleetsim's line naming the GCS within seconds, exit 2, the strategy
    ``interrupted``, no process left; ``--resume`` then completes the run."""
    proc, seen = _run_until_rounds(tmp_path, ["cloud_only", "local_finetune"], 16, "--no-report",
                                   stderr=subprocess.PIPE)
    try:
        gcs = [p for p in seen if Path(f"/proc/{p}/comm").exists() and Path(f"/proc/{p}/comm").read_text().strip() == "gcs_server"]
        assert len(gcs) == 1
        killed_at = time.monotonic()
        os.kill(gcs[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=50)  # well before Ray's own end of the driver, 60 s after the loss
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    no_traceback(err)
    assert err.splitlines()[-1] == (f"fleetsim: error: Ray's GCS process (pid {gcs[0]}) ended (killed by SIGKILL), and "
                                    f"the run cannot go on without it; rounds already written are kept, and `fleetsim "
                                    f"run --resume out` continues it")  # --out as given
    assert took < 20, took
    alive = lambda: [p for p, start in seen.items() if _start_time(p) == start]
    assert _wait_for(lambda: not alive(), 30), f"still alive after 30 s: {alive()}"
    run = load_run(tmp_path / "out")
    assert run.status == {"cloud_only": "complete", "local_finetune": "interrupted"}
    assert run.summary["strategies"]["local_finetune"]["rounds_completed"] >= 2

    res = cli(tmp_path, "run", "--resume", "out", "--no-progress", "--no-report")
    assert res.returncode == 0, res.stderr
    assert load_run(tmp_path / "out").status == {"cloud_only": "complete", "local_finetune": "complete"}


def test_the_ray_watch_names_a_lost_process_only_while_ray_is_connected():
    """``devices.raywatch.check``: a process that ended is a loss only while Ray is still
    connected (``ray.shutdown`` disconnects before it stops its processes) and the driver
    has not stood down (its handler of a signal sent to the whole group)."""
    from devices import raywatch
    from devices.raywatch import check

    raywatch.reset()

    class Ended:
        def __init__(self, code):
            self.code, self.pid = code, 4242

        def poll(self):
            return self.code

    running = {"GCS": Ended(None), "raylet": Ended(None)}
    assert check(running, lambda: True) is None
    assert check({**running, "raylet": Ended(-9)}, lambda: False) is None  # a shutdown stopped it
    line = check({**running, "raylet": Ended(-9)}, lambda: True)
    assert line.startswith("fleetsim: error: Ray's raylet process (pid 4242) ended (killed by SIGKILL), and the run")
    assert "; rounds already written are kept, and `fleetsim run --resume" in line
    assert "(exit status 3)" in check({**running, "GCS": Ended(3)}, lambda: True, grace_s=0.01)
    # SIGTERM to the whole group: the driver's handler stands down, and the GCS's or the
    # raylet's end (exit status 0) within the grace is not a loss
    assert "(killed by SIGTERM)" in check({**running, "GCS": Ended(-15)}, lambda: True, grace_s=0.01)
    raywatch.stand_down()
    try:
        assert check({**running, "GCS": Ended(-15)}, lambda: True, grace_s=0.01) is None
        assert check({**running, "raylet": Ended(0)}, lambda: True, grace_s=0.01) is None
        assert check({**running, "GCS": Ended(-9)}, lambda: True) is None
    finally:
        raywatch.reset()


def _start_time(pid: int) -> int | None:
    from devices.reaper import proc_stat

    st = proc_stat(pid)
    return st[2] if st else None


def test_result_files_are_readable_by_all(tmp_path, monkeypatch):
    in_process(monkeypatch)
    old = os.umask(0o022)
    try:
        run_experiment(small_config(experiment={"strategies": ["cloud_only"]}), str(tmp_path / "out"), use_ray=False,
                       progress=False, log=lambda m: None)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


# The grid and host, by hand --------------------------------------------------------------


def _grid(w, fn, **kw):
    from devices.runtime import DeviceApp
    from flwr.app import MessageType
    from simulator.grid import FleetGrid

    return FleetGrid(w.fleet, w.pool, DeviceApp({MessageType.TRAIN: fn}), seed=w.cfg.experiment.seed,
                     deadline_s=1e9, **kw)


def _send(grid, nodes):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    return list(grid.send_and_receive([Message(content, dst_node_id=int(n), message_type=MessageType.TRAIN)
                                       for n in nodes]))


def nan_for_even(ctx, payload):
    """Even devices store a NaN personal model and reply NaN; odd ones reply 1.0."""
    import torch

    even = (ctx.device_ids % 2 == 0)
    ctx.set_personal({"head.0.b": torch.from_numpy(np.where(even[:, None], np.nan, 0.0).astype(np.float32)
                                                   * np.ones((len(ctx), 1), np.float32))})
    ctx.state("marks").update({int(i): "touched" for i in ctx.local})
    return [Payload(metrics={"m": {"v": float("nan") if e else 1.0, "num-examples": 1}}) for e in even]


def test_quarantined_replies_are_errors_and_their_state_is_rolled_back():
    from simulator.grid import ERR_NONFINITE, flower_patched

    w = SmallWorld(small_config(profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}), n_hosts=2)
    grid = _grid(w, nan_for_even)
    with flower_patched(grid, 0):
        nodes = list(range(10))
        replies = _send(grid, nodes)
        grid.finish_round()
    for n, r in zip(nodes, replies):
        if n % 2 == 0:
            assert r.has_error() and r.error.code == ERR_NONFINITE and r.error.reason == "non-finite update"
        else:
            assert not r.has_error() and r.content["m"]["v"] == 1.0
    info = grid.results[0].info
    assert (info["quarantined"], info["ok"], info["errors"]) == (5, 5, 0)
    for host in w.pool.hosts:  # even devices kept nothing of the call, odd ones kept both changes
        for local, dev in enumerate(host.device_ids):
            if dev >= 10:
                continue
            assert (local in host.personal) == (dev % 2 == 1)
            assert (host.kv["marks"].get(local) == "touched") == (dev % 2 == 1)


def test_every_reply_nonfinite_raises_after_writing_the_round():
    from simulator.grid import flower_patched

    w = SmallWorld(small_config(profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}), n_hosts=2)
    written = []
    grid = _grid(w, nan_for_even, on_round=written.append)
    with flower_patched(grid, 0), pytest.raises(NonFiniteError, match="device training: round 1: every device reply"):
        _send(grid, [0, 2, 4, 6])
    assert [r.info["quarantined"] for r in written] == [4]


def nan_for_even_idle_odd(ctx, payload):
    """Even devices train (they count FLOPs) and reply NaN; odd ones had nothing to train on."""
    even = (ctx.device_ids % 2 == 0)
    ctx.flops += np.where(even, 1e6, 0.0)
    return [Payload(metrics={"m": {"v": float("nan") if e else 0.0, "num-examples": int(e)}}) for e in even]


def test_quarantined_with_only_idle_devices_beside_them_raises():
    """A round whose only finite replies come from devices that did no work (nothing to
    train on) aggregates nothing: it fails as if every reply were quarantined."""
    from simulator.grid import flower_patched

    w = SmallWorld(small_config(profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}), n_hosts=2)
    written = []
    grid = _grid(w, nan_for_even_idle_odd, on_round=written.append)
    with flower_patched(grid, 0), pytest.raises(
            NonFiniteError, match=r"round 1: every reply with work behind it was non-finite or diverged \(2 "
                                  r"quarantined; the 3 other replies came from devices that did no work, such as "
                                  r"having no example to train on\)"):
        _send(grid, [0, 1, 2, 3, 5])
    assert [(r.info["quarantined"], r.info["ok"]) for r in written] == [(2, 3)]
    # the idle devices got another message (one that asks for no work, as MoMoDistill's pushes beside
    # its trainers): their replies are usable, and the round goes on
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    grid = _grid(w, nan_for_even_idle_odd)
    train, push = (RecordDict({"config": ConfigRecord({"server-round": 1, "train": t})}) for t in (True, False))
    with flower_patched(grid, 0):
        replies = list(grid.send_and_receive([Message(train if n % 2 == 0 else push, dst_node_id=n,
                                                      message_type=MessageType.TRAIN) for n in (0, 1, 2, 3, 5)]))
    assert [r.has_error() for r in replies] == [True, False, True, False, False]


def raise_on_three(ctx, payload):
    if 3 in ctx.device_ids:
        raise RuntimeError("device 3 is cursed")
    return [Payload(metrics={"m": {"num-examples": 1}}) for _ in ctx.device_ids]


@pytest.mark.parametrize("mode", ["stop", "record"])
def test_code_error_stop_raises_record_counts(mode):
    from simulator.errors import DeviceCodeError
    from simulator.grid import ERR_CODE, flower_patched

    w = SmallWorld(small_config(profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}), n_hosts=1)
    seen, written = [], []
    grid = _grid(w, raise_on_three, on_device_error=mode, on_code_error=seen.append, on_round=written.append)
    with flower_patched(grid, 0):
        if mode == "stop":
            with pytest.raises(DeviceCodeError, match="RuntimeError: device 3 is cursed") as info:
                _send(grid, range(6))
            assert info.value.info["devices"] == 6 and "Traceback" in info.value.traceback
        else:  # every device's call raised: nothing to aggregate, so "record" stops too, and says why
            with pytest.raises(DeviceCodeError, match=r"^round 1: device function for 'train' raised RuntimeError: "
                                                      r"device 3 is cursed \(6 devices: 0, 1, 2 and 3 more\); no device "
                                                      r"of the exchange replied usably"):
                _send(grid, range(6))
    # one host: one call; "record" that stops reports it as its failure, not as a recorded error
    assert [(e.round, e.devices, e.error_type) for e in seen] == ([(1, 6, "RuntimeError")] if mode == "stop" else [])
    assert [r.info["errors"] for r in written] == [6]


def test_messages_must_carry_their_round_and_a_device_function():
    """FleetGrid refuses a message without 'server-round' (or of an earlier round) before
    any device runs, and a message type without a device function is a code error whose
    line names it whole and names the devices."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from simulator.errors import DeviceCodeError
    from simulator.grid import flower_patched

    w = SmallWorld(small_config(profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}), n_hosts=1)
    ran = []
    grid = _grid(w, lambda ctx, p: ran.append(1) or [Payload() for _ in ctx.device_ids])

    def send(config, mtype=MessageType.TRAIN, nodes=(0, 1)):
        content = RecordDict({"config": ConfigRecord(config)})
        return list(grid.send_and_receive([Message(content, dst_node_id=n, message_type=mtype) for n in nodes]))

    with flower_patched(grid, 0):
        with pytest.raises(ValueError, match=r"^round 1: the strategy sent a 'train' message to device 0 without "
                                             r"'server-round' in its config"):
            send({"lr": 0.1})
        assert len(send({"server-round": 2})) == 2 and grid.round == 2
        with pytest.raises(ValueError, match=r"^round 2: the strategy sent messages of round 1"):
            send({"server-round": 1})
        with pytest.raises(DeviceCodeError, match=r"^round 2: device function for 'query' raised LookupError: no device "
                                                  r"function for message type 'query' \(3 devices: 0, 1, 2\)$"):
            send({"server-round": 2}, MessageType.QUERY, nodes=(2, 0, 1))
    assert len(ran) == 1  # only the good exchange ran a device


def test_code_error_record_goes_on_while_some_device_succeeds():
    from simulator.grid import ERR_CODE, flower_patched

    w = SmallWorld(small_config(profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}), n_hosts=2)
    other = int(np.flatnonzero(w.pool.host_of != w.pool.host_of[3])[0])  # on the host without device 3
    seen, written = [], []
    grid = _grid(w, raise_on_three, on_device_error="record", on_code_error=seen.append, on_round=written.append)
    with flower_patched(grid, 0):
        replies = _send(grid, [3, other])
        grid.finish_round()
    assert replies[0].has_error() and replies[0].error.code == ERR_CODE
    assert replies[0].error.reason == "code error: RuntimeError: device 3 is cursed"
    assert not replies[1].has_error()
    assert [(e.devices, e.device_ids) for e in seen] == [(1, (3,))]
    assert [(r.info["errors"], r.info["ok"]) for r in written] == [(1, 1)]


def test_fedavg_global_model_stays_finite_under_diverging_devices():
    """device.lr = 1e6 with Flower's FedAvg on the grid: NaN replies are quarantined, so the
    aggregate and every model a device adopts stay finite."""
    from simulator.grid import FleetGrid, flower_patched
    from simulator.records import array_record
    from strategies.fedavg import FedAvg

    cfg = small_config(device={"lr": 1e6}, profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0})
    w = SmallWorld(cfg)
    strategy = FedAvg(fraction_train=0.5, min_available_nodes=1, min_train_nodes=1)
    grid = FleetGrid(w.fleet, w.pool, strategy.device_app, seed=3, deadline_s=1e9)
    stopped = None
    try:
        with flower_patched(grid, 3):
            strategy.start(grid=grid, initial_arrays=array_record(w.initial), num_rounds=3, evaluate_fn=grid.round_hook)
            grid.finish_round()
    except NonFiniteError as exc:  # a round in which every reply diverged stops it
        stopped = exc
    # some round aggregated its good replies while others were quarantined ...
    assert any(r.info["ok"] > 0 and r.info["quarantined"] > 0 for r in grid.results[:-1])
    # ... and devices adopted that aggregate, which is finite
    adopted = [ver for h in w.pool.hosts for ver in h.versions.values()
               if not np.array_equal(ver["item_emb"], w.initial["item_emb"])]
    assert adopted and all(np.isfinite(v).all() for ver in adopted for v in ver.values())
    assert stopped is None or "device training" in str(stopped)


def test_a_running_strategy_is_interrupted_once_its_driver_is_gone(tmp_path, monkeypatch):
    """load_run: ``running`` on disk is ``running`` while the recorded driver lives, and
    ``interrupted`` when it is gone or its pid was reused by another process."""
    in_process(monkeypatch)
    out = tmp_path / "out"
    run_experiment(small_config(experiment={"strategies": ["cloud_only"]}), str(out), use_ray=False, progress=False,
                   log=lambda m: None)
    summary = json.loads((out / "summary.json").read_text())
    summary["strategies"]["cloud_only"] = {"status": "running", "rounds_completed": 2}
    (out / "summary.json").write_text(json.dumps(summary))
    me = _start_time(os.getpid())
    (out / ".fleetsim-run.pid").write_text(f"{os.getpid()} {me}")
    assert load_run(out).status == {"cloud_only": "running"}
    (out / ".fleetsim-run.pid").write_text(f"{os.getpid()} 1")  # same pid, another process
    run = load_run(out)
    assert run.status == {"cloud_only": "interrupted"}
    assert run.summary["strategies"]["cloud_only"]["rounds_completed"] == 2
    assert run.summary["strategies"]["cloud_only"]["n_positives"] == int(run.devices["n_pos"].sum())
    (out / ".fleetsim-run.pid").unlink()
    assert load_run(out).status == {"cloud_only": "interrupted"}


# Flower's own engine (simulator.flower_app) --------------------------------------------


class _Answers:
    """Stands in for Flower's grid: answers each message with ``answer(message)``."""

    def __init__(self, answer) -> None:
        self.answer, self.calls = answer, 0

    def send_and_receive(self, messages, *, timeout=None):
        self.calls += 1
        return [a for a in (self.answer(m) for m in messages) if a is not None]


def _sent(n: int, weight: float = 1.0):
    from flwr.app import ConfigRecord, Message, RecordDict

    from simulator.records import array_record

    content = RecordDict({"arrays": array_record({"w": np.full((2, 3), weight, np.float32)}),
                          "config": ConfigRecord({"server-round": 4})})
    return [Message(content, dst_node_id=10 + i, message_type="train") for i in range(n)]


def _error(m, code: int, reason: str):
    from flwr.app import Error, Message

    return Message(Error(code=code, reason=reason), reply_to=m)


def _ok(m):
    from flwr.app import Message

    return Message(m.content, reply_to=m)


@pytest.fixture
def flower_identity():
    """Flower's task identity (messages need a run id), as a FleetGrid run sets it."""
    from types import SimpleNamespace

    from simulator.grid import flower_patched

    with flower_patched(SimpleNamespace(run=SimpleNamespace(run_id=7), wait=lambda s: None), 0):
        yield


def test_checked_grid_applies_fleetgrids_rules_on_flowers_engine(flower_identity):
    """Error replies on Flower's engine are never skipped silently: a device function's
    error ends the run naming the device; quarantined replies are skipped unless every reply
    is; a missing reply ends the run; NaN or a wrong shape sent never reaches a device."""
    from simulator.errors import DeviceCodeError
    from simulator.flower_app import CheckedGrid
    from simulator.grid import ERR_CODE, ERR_NONFINITE

    shapes = {"w": (2, 3)}
    fine = CheckedGrid(_Answers(_ok), shapes)
    assert len(fine.send_and_receive(_sent(3))) == 3

    def one_raises(m):
        return _error(m, ERR_CODE, "device 7: ValueError: boom") if m.metadata.dst_node_id == 11 else _ok(m)

    with pytest.raises(DeviceCodeError) as err:
        CheckedGrid(_Answers(one_raises), shapes).send_and_receive(_sent(3))
    assert str(err.value) == "round 4: device function for 'train' raised ValueError: boom (device 7)"
    assert err.value.info["error_type"] == "ValueError" and err.value.info["round"] == 4

    def one_quarantined(m):
        return _error(m, ERR_NONFINITE, "device 3: non-finite update") if m.metadata.dst_node_id == 10 else _ok(m)

    replies = CheckedGrid(_Answers(one_quarantined), shapes).send_and_receive(_sent(3))
    assert [r.has_error() for r in replies] == [True, False, False]  # skipped by the strategy, as on FleetGrid
    with pytest.raises(NonFiniteError, match="round 4: every device reply was non-finite or diverged \\(2 quarantined"):
        CheckedGrid(_Answers(lambda m: _error(m, ERR_NONFINITE, "device 1: x")), shapes).send_and_receive(_sent(2))

    with pytest.raises(RuntimeError, match="round 4: 1 of 3 messages got no reply"):
        CheckedGrid(_Answers(lambda m: None if m.metadata.dst_node_id == 12 else _ok(m)), shapes) \
            .send_and_receive(_sent(3), timeout=5.0)

    # another error reply (Flower could not load or run the ClientApp) keeps Flower's code, the last line
    # of its reason (a colored traceback) and the node
    with pytest.raises(DeviceCodeError, match=r"raised error reply: Flower's error code 2: <class 'flwr.*LoadClientAppError"
                                              r"'>:<'x'> \(node 10\)$"):
        CheckedGrid(_Answers(lambda m: _error(m, 2, "<class 'flwr.clientapp.LoadClientAppError'>:<'x'>")), shapes) \
            .send_and_receive(_sent(1))
    colored = "\x1b[36mray::ClientAppActor.run()\x1b[39m\n  File x, line 3\n    raise\nKeyError: 'no function'\n"
    with pytest.raises(DeviceCodeError, match=r"Flower's error code 2: KeyError: 'no function' \(node 10\)$"):
        CheckedGrid(_Answers(lambda m: _error(m, 2, colored)), shapes).send_and_receive(_sent(1))
    no_round = _sent(2)  # one content shared by both messages
    del no_round[0].content.config_records["config"]["server-round"]
    inner = _Answers(_ok)
    with pytest.raises(ValueError, match=r"the strategy sent a 'train' message to device 10 without 'server-round'"):
        CheckedGrid(inner, shapes).send_and_receive(no_round)
    assert inner.calls == 0
    later = CheckedGrid(inner, shapes)
    later.round = 5  # round 5 was sent before: _sent's round 4 is stale
    with pytest.raises(ValueError, match=r"^round 5: the strategy sent messages of round 4"):
        later.send_and_receive(_sent(1))
    assert inner.calls == 0

    for shapes_known, msgs, error, needle in (
            (shapes, _sent(2, weight=np.nan), NonFiniteError, "round 4: what it sends to devices holds NaN/Inf \\(arrays/w\\)"),
            ({"w": (3, 2)}, _sent(2), ValueError, "round 4: the strategy sends arrays/w of shape \\(2, 3\\)")):
        inner = _Answers(_ok)
        with pytest.raises(error, match=needle):
            CheckedGrid(inner, shapes_known).send_and_receive(msgs)
        assert inner.calls == 0  # refused before any device ran


def _raises(ctx, payload):
    raise ValueError("boom in user code")


def _nan_update(ctx, payload):
    from flwr.app import MessageType

    from strategies.fedavg import FedAvg

    replies = FedAvg.device_app.function_for(MessageType.TRAIN)(ctx, payload)
    for r in replies:
        for arrays in r.arrays.values():
            for k in arrays:
                arrays[k] = arrays[k] * np.float32("nan")
    return replies


@pytest.mark.slow
@pytest.mark.parametrize("train, error, needle", [
    (_raises, "DeviceCodeError", r"round 1: device function for 'train' raised ValueError: boom in user code "
                                 r"\(device [0-5]\)"),
    (_nan_update, "NonFiniteError", r"round 1: every device reply was non-finite or diverged \(6 quarantined"),
    (None, "DeviceCodeError", r"round 1: device function for 'train' raised LookupError: no device function for "
                              r"message type 'train' \(device [0-5]\)$"),
])
def test_a_device_error_or_nan_on_flowers_engine_ends_the_run(train, error, needle):
    """Through Flower's ``run_simulation``: a device function that raises, or whose every
    update is NaN, used to end in a ``Result`` with an empty model (every reply an error
    reply, each skipped by the strategy); a missing one gave Flower's colored traceback
    without the device."""
    from flwr.app import MessageType

    from devices.runtime import DeviceApp
    from simulator import errors
    from simulator.flower_app import run_on_flower
    from strategies.fedavg import FedAvg

    class Broken(FedAvg):
        device_app = DeviceApp({MessageType.TRAIN: train} if train else {})

    cfg = small_config(data={"n_devices": 6, "n_rounds": 2},
                       profiles={"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0})
    w = SmallWorld(cfg)
    with pytest.raises(getattr(errors, error), match=needle):
        run_on_flower(cfg, Broken(fraction_train=1.0, min_train_nodes=6, min_available_nodes=6), w.initial, 2)
