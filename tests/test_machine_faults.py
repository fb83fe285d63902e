"""Faults of the machine, not of the run: a disk that fills up while results are written,
and a Ray that cannot start. Each is one line and exit code 2, never a traceback and never
a strategy marked ``failed``; what was written stays whole, and ``--resume`` continues
to the uninterrupted run's results."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_config
from simulator.errors import ResultsWriteError
from test_resume import _play_all, comparable_summary

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["fedavg", "local_finetune"]


def disk_fills_after(monkeypatch, n_parts: int) -> list[int]:
    """``pyarrow.parquet.write_table`` (every round file) fails with ENOSPC from its
    ``n_parts + 1``-th call on; returns the call counter."""
    import simulator.writer as writer

    calls, real = [0], writer.pq.write_table

    def write_table(table, where, *args, **kwargs):
        calls[0] += 1
        if calls[0] > n_parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(writer.pq, "write_table", write_table)
    return calls


def test_disk_full_mid_strategy_interrupts_it_and_resume_gives_the_uninterrupted_results(tmp_path, monkeypatch):
    cfg = small_config(experiment={"strategies": STRATEGIES}, data={"n_rounds": 4})
    _play_all(cfg, tmp_path / "a")
    with monkeypatch.context() as m:
        # fleet_devices.parquet, FedAvg's 4 rounds (2 files each), local_finetune's round 1;
        # its round 2 fails
        disk_fills_after(m, 1 + 2 * 4 + 2)
        with pytest.raises(ResultsWriteError) as info:
            _play_all(cfg, tmp_path / "b")
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"--out {tmp_path / 'b'}: cannot write ")
    assert "round-00002.parquet (No space left on device)" in line
    assert line.endswith(f"local_finetune stops here: free space (or make the folder writable), then fleetsim run "
                         f"--resume {tmp_path / 'b'}")
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())["strategies"]
    assert summary["fedavg"]["status"] == "complete"
    assert (summary["local_finetune"]["status"], summary["local_finetune"]["rounds_completed"]) == ("interrupted", 1)
    assert not (tmp_path / "b" / "local_finetune" / "error.log").exists()  # not the strategy's failure
    assert (tmp_path / "b" / "checkpoints" / "local_finetune" / "round-00001").is_dir()
    _play_all(cfg, tmp_path / "b", resume=True)
    assert comparable_summary(tmp_path / "a") == comparable_summary(tmp_path / "b")


@pytest.mark.parametrize("made_before", [False, True])
def test_disk_full_before_the_first_strategy_leaves_no_half_run_folder(tmp_path, monkeypatch, made_before):
    # fleet_devices.parquet, written after config.toml and fleet.json, does not fit
    cfg = small_config(experiment={"strategies": ["fedavg"]}, data={"n_rounds": 2})
    out = tmp_path / "b"
    if made_before:  # an empty folder made for the run stays, empty
        out.mkdir()
    with monkeypatch.context() as m:
        disk_fills_after(m, 0)
        with pytest.raises(ResultsWriteError) as info:
            _play_all(cfg, out)
    line = str(info.value)
    assert line == (f"--out {out}: cannot write {out / 'fleet_devices.parquet'} (No space left on device); the run "
                    f"did not start and its files are removed again: free space (or make the folder writable), "
                    f"then run again")
    assert out.is_dir() == made_before and (not made_before or list(out.iterdir()) == [])
    _play_all(cfg, out)  # the same --out takes the run once there is room
    _play_all(cfg, tmp_path / "a")
    assert comparable_summary(tmp_path / "a") == comparable_summary(out)


def test_a_checkpoint_that_does_not_fit_leaves_the_one_before_it(tmp_path, monkeypatch):
    import simulator.checkpoint as checkpoint

    cfg = small_config(experiment={"strategies": ["fedavg"]}, data={"n_rounds": 4})
    real, calls = checkpoint._entry, [0]

    def entry(data):  # one call per file: cloud.pkl, then the driver and 2 hosts a checkpoint
        calls[0] += 1
        if calls[0] == 1 + 3 + 2:  # round 2's second file: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data)

    monkeypatch.setattr(checkpoint, "_entry", entry)
    with pytest.raises(ResultsWriteError, match=r"cannot write .*checkpoints/fedavg/round-00002 \(No space left"):
        _play_all(cfg, tmp_path / "b")
    monkeypatch.undo()
    folder = tmp_path / "b" / "checkpoints" / "fedavg"
    assert sorted(p.name for p in folder.iterdir()) == ["round-00001"]  # no partial folder; round 1's whole
    assert checkpoint.verify(folder / "round-00001") is None
    _play_all(cfg, tmp_path / "b", resume=True)
    _play_all(cfg, tmp_path / "a")
    assert comparable_summary(tmp_path / "a") == comparable_summary(tmp_path / "b")


SITECUSTOMIZE = """\
import errno, os
import pyarrow.parquet as pq

_real, _calls = pq.write_table, [0]


def _write_table(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] > int(os.environ["FLEETSIM_TEST_PARTS"]):
        raise OSError(errno.ENOSPC, "No space left on device")
    return _real(*args, **kwargs)


pq.write_table = _write_table
"""


def test_cli_disk_full_is_one_line_exit_2_and_resume_completes(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    exp = tmp_path / "exp.toml"
    exp.write_text('[experiment]\nseed = 3\nstrategies = ["fedavg"]\nhosts = 1\n[data]\nn_devices = 40\nn_items = 150\n'
                   'n_rounds = 3\nhistory_days = 7.0\n[cloud]\nepochs = 1\n')
    env = {**os.environ, "FLEETSIM_TEST_PARTS": "3",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "simulator.cli", "run", *a, "--no-progress", "--no-report"],
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    res = run(str(exp), "--out", "out")
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and last.startswith("fleetsim: error: --out out: cannot write out/fedavg/")
    assert last.endswith("(No space left on device); the files written before it are whole; fedavg stops here: free "
                         "space (or make the folder writable), then fleetsim run --resume out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]["fedavg"]["status"] == "interrupted"
    env["FLEETSIM_TEST_PARTS"] = "1000"  # space again
    res = run("--resume", "out")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]["fedavg"]["status"] == "complete"


def test_ray_that_cannot_start_is_one_line_exit_2(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    env = {**os.environ, "TMPDIR": str(tmp_path / "not-a-folder"), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_TMPDIR", None)
    res = subprocess.run([sys.executable, "-m", "simulator.cli", "run", "--out", "out", "--no-progress", "--no-report",
                          "--set", "data.n_devices=40", "--set", "data.n_rounds=2", "--set",
                          'experiment.strategies=["cloud_only"]'], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("fleetsim: error: cannot start Ray (NotADirectoryError: ")
    assert last.endswith(f"Ray needs a writable folder with free space in {tmp_path / 'not-a-folder'} (RAY_TMPDIR, "
                         f"else TMPDIR, else /tmp) and no file-size limit (ulimit -f)")


def test_closing_a_host_start_stuck_on_a_dead_ray_returns(monkeypatch):
    """SIGTERM to the process group kills Ray's GCS too; a host start waiting for it must
    not hold the driver's exit (it used to wait 60 s, then Ray ended the process with 1)."""
    import threading
    import time

    from devices import pool

    stuck = threading.Event()
    monkeypatch.setattr(pool.HostProcesses, "_start", lambda self: stuck.wait())  # never sets _done
    processes = pool.HostProcesses(2)
    t0 = time.monotonic()
    processes.close(wait_s=0.2)
    assert time.monotonic() - t0 < 2.0
    stuck.set()


WATCHED = """
import ctypes, sys
from devices.reaper import start_reaper, watchdog
start_reaper()
with watchdog(5, "fleetsim: error: it did not finish"):
    pass  # finished in time: disarmed
with watchdog({seconds}, "fleetsim: error: it did not finish"):
    ctypes.PyDLL(None).sleep({blocks})  # libc sleep holding the GIL, as Ray's blocked start does
print("returned", flush=True)
"""


@pytest.mark.parametrize("seconds, blocks, code", [(1, 30, -9), (20, 2, 0)])
def test_the_reaper_ends_a_driver_blocked_inside_a_watched_call(tmp_path, seconds, blocks, code):
    """Under a process-count limit Ray's start blocks holding the GIL: no thread, signal or
    Ctrl-C of the driver runs (drill B5). The reaper's watchdog prints the line and ends it."""
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WATCHED.format(seconds=seconds, blocks=blocks)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    if code:
        assert proc.stderr.splitlines() == ["fleetsim: error: it did not finish"] and proc.stdout == ""
        assert time.monotonic() - t0 < 15
    else:
        assert proc.stdout == "returned\n" and proc.stderr == ""


ENDS = """
import os, signal, sys, time
from devices import reaper
reaper.start_reaper()
reaper.run_folder("runs/my run")
print("started", flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer, or Ray's core worker ending its process
elif sys.argv[1] == "leave":
    reaper.farewell()
    os._exit(143)  # the CLI's way out after its own line
elif sys.argv[1] == "raise":
    raise ValueError("a code error: its traceback is fleetsim's word")
elif sys.argv[1] == "closed":
    reaper.farewell()  # FleetRun.close: the run's folder is whole
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("how, code", [("kill", -9), ("leave", 143), ("raise", 1), ("return", 0), ("closed", -9)])
def test_a_run_that_ends_abruptly_gets_the_reapers_line(how, code):
    """Killed, crashed or ended by Ray's core worker (on a lost raylet or GCS, before the
    raylet watch could speak) while its run is open: the reaper names the run folder and
    --resume on the driver's stderr. Every way fleetsim ends the process itself, and an
    end after the run has closed, get no line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", ENDS, how], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and proc.stdout == "started\n", proc.stderr
    said = [x for x in proc.stderr.splitlines() if "abruptly" in x]
    if how == "kill":
        assert proc.stderr.splitlines() == said == [
            f"fleetsim: error: the run's process (pid {int(said[0].split('pid ')[1].split(')')[0])}) ended abruptly: "
            f"killed (kill -9, the out-of-memory killer), crashed, or ended by Ray after losing its raylet or GCS; "
            f"rounds already written are kept, and `fleetsim run --resume 'runs/my run'` continues it"]
    else:
        assert said == []


def test_host_processes_that_never_answer_are_one_note_then_one_line(monkeypatch):
    """Under a looser limit (pids.max 200 here) Ray starts but its workers do not, and the
    pool's first call used to wait forever."""
    from types import SimpleNamespace

    import ray

    from devices import pool

    waits, killed, lines = [], [], []

    def wait(answers, num_returns, timeout):
        waits.append(timeout)
        return answers[:1], answers[1:]  # one host answers, the others never

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "kill", killed.append)
    fake = SimpleNamespace(log=lines.append, hosts=["h0", "h1", "h2"])
    with pytest.raises(pool.RayStartError) as info:
        pool.HostPool._await_hosts(fake, ["a0", "a1", "a2"])
    limit = pool.HOST_START_TIMEOUT_S + 3 * pool.HOST_START_S_PER_HOST
    assert waits == [pool.HOST_START_NOTE_S, limit - pool.HOST_START_NOTE_S]
    assert lines == [f"fleetsim: 1 of 3 device hosts have started after {pool.HOST_START_NOTE_S:.0f} s; waiting up "
                     f"to {limit:.0f} s in all"]
    assert str(info.value).startswith(f"2 of 3 device host processes did not start within {limit:.0f} s, and Ray "
                                      f"names no cause: its processes may be unable to start threads")
    assert killed == ["h0", "h1", "h2"] and info.value.hard_exit
    monkeypatch.setattr(ray, "wait", lambda answers, num_returns, timeout: (answers, []))
    pool.HostPool._await_hosts(fake, ["a0", "a1", "a2"])  # all answered: nothing said
    assert len(lines) == 1


def test_more_hosts_than_cpus_is_warned_once_with_the_way_out():
    from devices.pool import oversubscribed

    assert oversubscribed(2, 2.0) is None and oversubscribed(1, 0.5) is None and oversubscribed(8, 16.0) is None
    line = oversubscribed(64, 2.0)
    assert line == ("fleetsim: warning: 64 device hosts on a Ray cluster of 2 CPUs: each host is a process (about "
                    "0.3 GB) and they take turns on the cores, which is slower and may exhaust memory; "
                    "experiment.hosts = 0 (or --hosts 0) starts one per CPU")
