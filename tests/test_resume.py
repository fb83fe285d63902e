"""Checkpoints and ``fleetsim run --resume``, through the CLI in real processes.

A run is killed (``kill -9``, or Ctrl-C) at one of five points, then resumed; its
``summary.json`` (wall-clock fields aside), ``devices.parquet`` and ``rounds.parquet``
must equal those of one uninterrupted run of the same config, exactly.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["fedavg", "duet", "momodistill"]
EXPERIMENT = """
[experiment]
name = "resume"
seed = 3
strategies = {strategies}
hosts = 2

[data]
source = "synthetic"
n_devices = 200
n_items = 300
history_days = 7.0
round_hours = 4.0
n_rounds = 3

[cloud]
epochs = 1

[device]
local_steps = 2

[strategies.fedavg]
fraction_train = 0.5

[strategies.momodistill]
distill_every = 1
theta_epochs = 1
aux_epochs = 1
"""
# wall-clock fields: everything else must be equal
WALL_KEYS = {"wall_seconds", "prepare_seconds"}
WALL_METRIC = re.compile(r"(_s|_seconds|_ms_per_device)$")


def write_experiment(d: Path, strategies=STRATEGIES) -> Path:
    p = d / "exp.toml"
    p.write_text(EXPERIMENT.format(strategies=json.dumps(strategies)))
    return p


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env())


def comparable_summary(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    s.get("provenance", {}).pop("resumes", None)  # what each resume found (tests/test_provenance.py)
    for entry in s["strategies"].values():
        for k in WALL_KEYS:
            entry.pop(k)
        for per_round in entry.get("strategy_metrics", {}).values():
            for k in [k for k in per_round if WALL_METRIC.search(k)]:
                del per_round[k]
    return s


def assert_same_results(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> None:
    assert comparable_summary(a) == comparable_summary(b)
    for name in STRATEGIES:
        for table in ("devices.parquet", "rounds.parquet"):
            ta, tb = (pq.read_table(r / name / table).to_pandas().drop(columns=list(ignore), errors="ignore")
                      for r in (a, b))
            assert len(ta) > 0
            pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    assert not (b / "checkpoints").exists()  # a finished run keeps no checkpoint


def status(out: Path, name: str) -> str | None:
    try:
        return json.loads((out / "summary.json").read_text())["strategies"][name]["status"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("whole")
    res = cli(d, "run", str(write_experiment(d)), "--out", "out", "--no-progress", "--no-report")
    assert res.returncode == 0, res.stderr
    return d / "out"


KILL_POINTS = {
    # FedAvg's round 2 is written: round 3 is in flight
    "fedavg_mid_round": lambda out: (out / "fedavg" / "rounds.parquet" / "round-00002.parquet").exists(),
    # FedAvg complete, DUET not yet started (or just)
    "between_strategies": lambda out: status(out, "fedavg") == "complete",
    # DUET trains its generator for a few seconds before its round 1
    "duet_prepare": lambda out: status(out, "duet") == "running" and not (out / "duet").exists(),
    # MoMoDistill's checkpoint after round 1 is written: between its rounds 1 and 2
    "momodistill_between_rounds": lambda out: (out / "checkpoints" / "momodistill" / "round-00001").exists(),
}


def run_until(cwd: Path, argv: list[str], point: str, sig: int) -> int:
    """Start ``fleetsim`` with ``argv``, send ``sig`` once ``point`` is reached; its exit code."""
    out = cwd / "out"
    proc = subprocess.Popen([sys.executable, "-m", "simulator.cli", *argv, "--no-progress", "--no-report"], cwd=cwd,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 300
        while not KILL_POINTS[point](out):
            assert proc.poll() is None, f"the run ended before {point}: {proc.stderr.read()}"
            assert time.monotonic() < end, f"{point} not reached in 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_killed_four_times_then_resumed_equals_uninterrupted(tmp_path, uninterrupted):
    """kill -9 mid-round of FedAvg, Ctrl-C between two strategies, kill -9 during DUET's
    prepare and between two rounds of MoMoDistill, each followed by ``--resume``: the
    results equal those of the uninterrupted run, file by file."""
    exp = write_experiment(tmp_path)
    argv = ["run", str(exp), "--out", "out"]
    for point, sig in [("fedavg_mid_round", signal.SIGKILL), ("between_strategies", signal.SIGINT),
                       ("duet_prepare", signal.SIGKILL), ("momodistill_between_rounds", signal.SIGKILL)]:
        code = run_until(tmp_path, argv, point, sig)
        assert code == (130 if sig == signal.SIGINT else -9), point
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert any(s["status"] not in ("complete", "failed") for s in summary["strategies"].values()), point
        argv = ["run", "--resume", "out"]
        time.sleep(0.5)  # the reaper ends the killed driver's Ray processes
    res = cli(tmp_path, *argv, "--no-progress", "--no-report")
    assert res.returncode == 0, res.stderr
    assert "fleetsim: resuming out: kept fedavg, duet; to run: momodistill" in res.stderr
    assert "fleetsim: momodistill: resumed from its round-1 checkpoint" in res.stderr
    assert_same_results(uninterrupted, tmp_path / "out")


# Refusals: one line, exit 2, nothing touched ------------------------------------------------


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_line_refusal(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetsim: error: --resume"), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_resume_refuses_a_complete_run(uninterrupted):
    before = snapshot(uninterrupted)
    one_line_refusal(cli(uninterrupted.parent, "run", "--resume", "out"), "the run is complete", "nothing to resume")
    assert snapshot(uninterrupted) == before


def test_resume_refuses_an_edited_config(tmp_path, uninterrupted):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    s = json.loads((out / "summary.json").read_text())
    s["strategies"]["momodistill"]["status"] = "interrupted"  # so that only the edit stands in the way
    (out / "summary.json").write_text(json.dumps(s))
    (out / "config.toml").write_text((out / "config.toml").read_text().replace("n_devices = 200", "n_devices = 201"))
    before = snapshot(out)
    one_line_refusal(cli(tmp_path, "run", "--resume", "out"), "config.toml was edited after the run started")
    assert snapshot(out) == before


def test_resume_refuses_a_folder_without_a_run(tmp_path):
    (tmp_path / "x").mkdir()
    one_line_refusal(cli(tmp_path, "run", "--resume", "x"), "holds no fleetsim run")
    assert list((tmp_path / "x").iterdir()) == []


@pytest.mark.parametrize("make, argv, needle", [
    (lambda d: None, [], "no such directory"),
    (lambda d: (d.mkdir(), (d / "summary.json").write_text("[1]"), (d / "config.toml").write_text("")), [],
     "summary.json is not a fleetsim summary"),
    (lambda d: (d.mkdir(), (d / "summary.json").write_text('{"layout_version": 1, "strategies": {}}'),
                (d / "config.toml").write_text("")), [], "written with result layout 1"),
    (lambda d: (d.mkdir(), (d / "summary.json").write_text('{"protocol": "leave_last", "layout_version": 2}'),
                (d / "config.toml").write_text("")), [], "paper protocol"),
    (lambda d: None, ["--set", "data.n_devices=3"], "drop --set"),
    (lambda d: None, ["--seed", "3"], "drop --seed"),
])
def test_resume_refusals_in_process(tmp_path, capsys, make, argv, needle):
    from simulator import cli as cli_mod

    make(tmp_path / "x")
    before = snapshot(tmp_path)
    code = cli_mod.main(["run", "--resume", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    one_line_refusal(subprocess.CompletedProcess([], code, "", err), needle)
    assert snapshot(tmp_path) == before


# In process: every built-in strategy, interrupted after round 2, resumed -----------------


def _play_all(cfg, out, *, resume=False, stop_at=None, allow_code_change=False):
    from simulator.fleetrun import FleetRun
    from strategies.registry import make_strategy

    names = list(cfg.experiment.strategies)
    run = FleetRun(cfg, str(out), use_ray=False, n_hosts=2, resume=resume, log=lambda m: None,
                   allow_code_change=allow_code_change)

    def on_round(result):
        if stop_at is not None and result.round == stop_at[1] and current[0] == stop_at[0]:
            raise KeyboardInterrupt

    current = [None]
    with run:
        run.build_fleet()
        run.open(names)
        run.train_cloud()
        run.start_pool()
        for name in names:
            if run.summary["strategies"][name]["status"] in ("complete", "failed"):
                continue
            current[0] = name
            run.play(name, make_strategy(name, cfg.strategies.get(name, {})), on_round=on_round)
    return run


@pytest.mark.parametrize("strategy, params", [
    ("local_finetune", {}), ("fedavg", {}), ("duet", {"epochs": 1, "retrain_every": 1}), ("metapatch", {"theta_epochs": 1}),
    ("momodistill", {"distill_every": 1, "theta_epochs": 1, "aux_epochs": 1, "fraction_evaluate": 0.5}),
])
def test_interrupted_strategy_resumes_exactly_in_process(tmp_path, strategy, params):
    """Each built-in strategy (DUET with retraining, which rebuilds its transient caches;
    MoMoDistill with federated evaluation), stopped by Ctrl-C at the end of round 2, then
    resumed from its round-1 checkpoint: same records and summary as without the stop."""
    from conftest import small_config

    cfg = small_config(experiment={"strategies": [strategy]}, strategies={strategy: params},
                       data={"n_rounds": 4})
    _play_all(cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _play_all(cfg, tmp_path / "b", stop_at=(strategy, 2))
    assert (tmp_path / "b" / "checkpoints" / strategy / "round-00001" / "driver.pkl").exists()
    assert (tmp_path / "b" / "checkpoints" / strategy / "round-00001" / "host-001.pkl").exists()
    run = _play_all(cfg, tmp_path / "b", resume=True)
    assert [c["round"] for c in run.checkpoint_log] == [2, 3]  # rounds 2..4 played again; none after the last
    a, b = comparable_summary(tmp_path / "a"), comparable_summary(tmp_path / "b")
    assert a == b
    for table in ("devices.parquet", "rounds.parquet"):
        ta, tb = (pq.read_table(r / strategy / table).to_pandas() for r in (tmp_path / "a", tmp_path / "b"))
        pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    assert not (tmp_path / "b" / "checkpoints").exists()


# A host process killed mid-round, through the CLI ---------------------------------------------


def host_pids(driver: int) -> list[int]:
    from devices.reaper import descendants

    out = []
    for pid in descendants(driver):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::DeviceHost"):
                out.append(pid)
        except OSError:
            pass
    return sorted(out)


def test_host_killed_mid_round_run_goes_on_with_identical_results(tmp_path, uninterrupted):
    """kill -9 of one DeviceHost process while FedAvg's round 2 is in flight: exit 0, the
    round counts the restart, one warning line, results equal the uninterrupted run's."""
    exp = write_experiment(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "simulator.cli", "run", str(exp), "--out", "out", "--no-progress",
                             "--no-report"], cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        end = time.monotonic() + 300
        while not KILL_POINTS["fedavg_mid_round"](tmp_path / "out"):
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.05)
        hosts = host_pids(proc.pid)
        assert len(hosts) == 2, hosts
        os.kill(hosts[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    warnings = [line for line in err.splitlines() if "died" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fleetsim: warning: device host "), err
    restarts = pd.concat(pq.read_table(tmp_path / "out" / n / "rounds.parquet").to_pandas() for n in STRATEGIES)
    assert restarts["host_restarts"].sum() == 1
    assert_same_results(uninterrupted, tmp_path / "out", ignore=("host_restarts",))
