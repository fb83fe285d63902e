"""``--resume`` of a folder it cannot use: a damaged checkpoint or cloud model, a folder
another fleetsim process is running in. Each is one line on stderr and exit code 2, and
every file of the folder -- checkpoints included -- stays as it was.

The interrupted run is made in process (FedAvg, 4 rounds, stopped by Ctrl-C after its
round 3: round files 1-3 and the round-2 checkpoint on disk), then copied per test.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import hosts_in_process, small_config
from test_resume import _play_all, cli, comparable_summary, snapshot

NAME = "fedavg"
CKPT = Path("checkpoints") / NAME / "round-00002"


def config():
    return small_config(experiment={"strategies": [NAME], "hosts": 2}, data={"n_rounds": 4})


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """(an uninterrupted run, the same run stopped after round 3)."""
    d = tmp_path_factory.mktemp("made")
    _play_all(config(), d / "whole")
    with pytest.raises(KeyboardInterrupt):
        _play_all(config(), d / "stopped", stop_at=(NAME, 3))
    stopped = d / "stopped"
    assert json.loads((stopped / "summary.json").read_text())["strategies"][NAME]["status"] == "interrupted"
    assert {"driver.pkl", "host-000.pkl", "host-001.pkl"} <= {p.name for p in (stopped / CKPT).iterdir()}
    assert sorted(p.name for p in (stopped / NAME / "rounds.parquet").iterdir()) == [
        f"round-0000{r}.parquet" for r in (1, 2, 3)]
    return d / "whole", stopped


@pytest.fixture
def out(tmp_path, made) -> Path:
    shutil.copytree(made[1], tmp_path / "out")
    return tmp_path / "out"


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip_last_byte(p: Path) -> None:  # same size: only the digest tells
    b = bytearray(p.read_bytes())
    b[-2] ^= 0xFF
    p.write_bytes(bytes(b))


DAMAGE = {
    "truncated driver": (lambda c: truncate(c / "driver.pkl"), "driver.pkl has {} bytes, {} were written"),
    "empty driver": (lambda c: (c / "driver.pkl").write_bytes(b""), "driver.pkl has 0 bytes"),
    "no driver": (lambda c: (c / "driver.pkl").unlink(), "driver.pkl is missing"),
    "truncated host": (lambda c: truncate(c / "host-001.pkl"), "host-001.pkl has {} bytes, {} were written"),
    "no host": (lambda c: (c / "host-001.pkl").unlink(), "host-001.pkl is missing"),
    "altered host": (lambda c: flip_last_byte(c / "host-000.pkl"), "host-000.pkl does not match its SHA-256"),
    "truncated host, no manifest": (lambda c: ((c / "manifest.json").unlink(missing_ok=True),
                                               (c.parent.parent / "cloud.manifest.json").unlink(missing_ok=True),
                                               truncate(c / "host-001.pkl")),
                                    "host-001.pkl cannot be read (UnpicklingError"),
    # a run that writes manifests (cloud.manifest.json) lost one: not taken for an older run's
    "altered host, manifest removed": (lambda c: ((c / "manifest.json").unlink(), flip_last_byte(c / "host-000.pkl")),
                                       "manifest.json is missing (this run writes one with every checkpoint)"),
}


def _expected_problem(ckpt: Path, text: str, name: str) -> str:
    if "{}" not in text:
        return text
    f = ckpt / name
    manifest = ckpt / "manifest.json"
    written = json.loads(manifest.read_text())["files"][name]["bytes"] if manifest.exists() else "?"
    return text.format(f.stat().st_size, written)


def _main(argv: list[str], capsys) -> tuple[int, list[str]]:
    from simulator import cli as cli_mod

    code = cli_mod.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_before_anything_changes(out, damage, monkeypatch, capsys):
    """Each damage to the checkpoint --resume would restore from: exit 2, one line naming
    the folder, the problem and what to do; not one file changed (without the check, the
    restore failed inside the strategy, which was recorded failed and its checkpoints and
    cloud model deleted)."""
    hosts_in_process(monkeypatch)  # were the refusal missing: no Ray in the test process
    make, text = DAMAGE[damage]
    ckpt = out / CKPT
    make(ckpt)
    problem = _expected_problem(ckpt, text, "driver.pkl" if "driver" in damage else "host-001.pkl")
    before = snapshot(out)
    code, err = _main(["run", "--resume", str(out), "--no-progress", "--no-report"], capsys)
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"fleetsim: error: --resume {out}: checkpoint {ckpt} is damaged: {problem}"), err
    assert err[0].endswith(f"delete that folder and --resume again to play {NAME} from round 1"), err
    assert snapshot(out) == before


@pytest.mark.parametrize("damage", ["a kept round's part", "summary's strategies a list", "a strategy a string"])
def test_damaged_results_are_refused_before_anything_changes(out, damage, monkeypatch, capsys):
    """A round file the resumed run would keep, or a summary.json of another structure:
    exit 2 and one line (resume used to go on over a cut round file and exit 0, leaving a
    run no report can read; a summary of lists gave a traceback)."""
    hosts_in_process(monkeypatch)
    part = out / NAME / "rounds.parquet" / "round-00002.parquet"
    summary = json.loads((out / "summary.json").read_text())
    if damage == "a kept round's part":
        truncate(part)
        needle = f"--resume {out}: {part}: unreadable ("
    else:
        summary["strategies"] = list(summary["strategies"]) if "list" in damage else {NAME: "oops"}
        (out / "summary.json").write_text(json.dumps(summary))
        needle = f"--resume {out}: summary.json's strategies are not fleetsim's"
    before = snapshot(out)
    code, err = _main(["run", "--resume", str(out), "--no-progress", "--no-report"], capsys)
    assert (code, len(err)) == (2, 1), err
    assert err[0].startswith(f"fleetsim: error: {needle}"), err
    assert snapshot(out) == before


def test_truncated_host_file_through_the_cli(out):
    """The same through a real process: exit code 2, one line, no traceback, nothing changed."""
    truncate(out / CKPT / "host-001.pkl")
    before = snapshot(out)
    res = cli(out.parent, "run", "--resume", "out", "--no-progress", "--no-report")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fleetsim: error: --resume out: checkpoint out/{CKPT.as_posix()} is damaged: "
                               f"host-001.pkl has "), lines
    assert snapshot(out) == before


def test_truncated_cloud_model_through_the_cli(out):
    """A truncated checkpoints/cloud.pkl: one line and exit 2 (was: a traceback, exit 1,
    the strategy left running); nothing changed."""
    truncate(out / "checkpoints" / "cloud.pkl")
    before = snapshot(out)
    res = cli(out.parent, "run", "--resume", "out", "--no-progress", "--no-report")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("fleetsim: error: --resume out: out/checkpoints/cloud.pkl is damaged: cloud.pkl has ")
    assert lines[0].endswith("delete it and --resume again to train the cloud model again (same seed, same model)")
    assert snapshot(out) == before


def test_following_the_advice_resumes_from_round_1_with_the_uninterrupted_results(out, made, monkeypatch, capsys):
    """The damaged checkpoint deleted as the line says: --resume plays FedAvg from round 1;
    records and summary equal the uninterrupted run's, no checkpoint left."""
    hosts_in_process(monkeypatch)
    truncate(out / CKPT / "host-001.pkl")
    shutil.rmtree(out / CKPT)
    code, err = _main(["run", "--resume", str(out), "--no-progress", "--no-report"], capsys)
    assert code == 0, err
    assert not any("resumed from" in line for line in err), err
    assert comparable_summary(made[0]) == comparable_summary(out)
    for table in ("devices.parquet", "rounds.parquet"):
        ta, tb = (pq.read_table(r / NAME / table).to_pandas() for r in (made[0], out))
        pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    assert not (out / "checkpoints").exists()


# In process, past check_resumable: a restore that fails records nothing, deletes nothing ---


@pytest.mark.parametrize("damage, n_hosts, needle", [
    ("truncated host", 2, "(UnpicklingError: pickle data was truncated)"),
    ("truncated driver", 2, "(UnpicklingError: pickle data was truncated)"),
    (None, 3, "(ValueError: it holds 2 host state(s), this run has 3 hosts"),
])
def test_a_restore_that_fails_records_nothing_and_keeps_the_checkpoints(out, monkeypatch, damage, n_hosts, needle):
    from simulator.errors import FleetsimError
    from simulator.fleetrun import FleetRun

    if damage is not None:
        DAMAGE[damage][0](out / CKPT)
    if n_hosts != 2:
        real = FleetRun.__init__
        monkeypatch.setattr(FleetRun, "__init__", lambda self, *a, **k: real(self, *a, **{**k, "n_hosts": n_hosts}))
    before = snapshot(out)
    with pytest.raises(FleetsimError) as info:  # a ResumeError: the CLI's one line and exit 2
        _play_all(config(), out, resume=True)
    msg = str(info.value)
    assert msg.startswith(f"--resume {out}: cannot restore {NAME} from {out / CKPT} {needle}"), msg
    assert msg.endswith(f"nothing was changed; delete that folder and --resume again to play {NAME} from round 1")
    assert snapshot(out) == before  # status still interrupted, rounds 1-3, checkpoints and cloud.pkl kept


def test_a_truncated_cloud_model_past_the_check_changes_nothing(out):
    from simulator.errors import FleetsimError

    truncate(out / "checkpoints" / "cloud.pkl")
    before = snapshot(out)
    with pytest.raises(FleetsimError, match=r"cloud\.pkl cannot be read \(UnpicklingError"):
        _play_all(config(), out, resume=True)
    assert snapshot(out) == before


def test_checkpoints_without_manifests_are_checked_by_unpickling(out):
    """A run folder from before the manifests: whole files pass, a truncated one is named."""
    from simulator.checkpoint import check_resumable
    from simulator.errors import FleetsimError

    (out / CKPT / "manifest.json").unlink(missing_ok=True)
    (out / "checkpoints" / "cloud.manifest.json").unlink(missing_ok=True)
    assert list(check_resumable(out).experiment.strategies) == [NAME]
    truncate(out / "checkpoints" / "cloud.pkl")
    with pytest.raises(FleetsimError, match=r"cloud\.pkl is damaged: cloud\.pkl cannot be read \(UnpicklingError"):
        check_resumable(out)


# One process per run folder -----------------------------------------------------------------


def _held(d: Path) -> int:
    """Hold the folder's lock from this (test) process, as a running fleetsim would."""
    fd = os.open(d, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_resume_of_a_folder_another_process_runs_in_is_refused(out):
    before = snapshot(out)
    fd = _held(out)
    try:
        res = cli(out.parent, "run", "--resume", "out", "--no-progress", "--no-report")
    finally:
        os.close(fd)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"fleetsim: error: --resume out: another fleetsim process is running in out (pid {os.getpid()})"]
    assert snapshot(out) == before


def test_a_fresh_run_into_a_folder_another_process_runs_in_is_refused(tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(config().to_toml())
    (tmp_path / "new").mkdir()
    fd = _held(tmp_path / "new")
    try:
        res = cli(tmp_path, "run", str(exp), "--out", "new", "--no-progress", "--no-report")
    finally:
        os.close(fd)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"fleetsim: error: --out new: another fleetsim process is running in new (pid {os.getpid()})"]
    assert list((tmp_path / "new").iterdir()) == []


def test_a_run_that_finds_results_written_meanwhile_refuses_them(tmp_path):
    """Two fresh runs with the same new --out: the later one to create the folder finds the
    other's results (it checked before they existed) and stops instead of writing over."""
    from simulator.errors import FleetsimError
    from simulator.writer import RunWriter

    first, second = RunWriter(tmp_path / "out"), RunWriter(tmp_path / "out")
    first.create()
    first.write_config("x = 1\n")
    first.release()
    getattr(first, "unlock", lambda: None)()  # the folder's lock (one process here: it is re-entrant)
    with pytest.raises(FleetsimError, match="already holds results"):
        second.create()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.toml"]


def test_the_lock_ends_with_its_process(out):
    """A fleetsim killed with -9 leaves no lock behind: the kernel drops it with the process."""
    code = ("import os, sys; from simulator.writer import lock_run_dir; lock_run_dir(sys.argv[1], '--out'); "
            "print('locked', flush=True); os.kill(os.getpid(), 9)")
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert res.returncode == -9 and res.stdout == "locked\n", res.stderr
    os.close(_held(out))
