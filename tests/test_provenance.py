"""What a run came from (``simulator.provenance``): recorded in ``summary.json``, checked on
``--resume`` before anything in the folder changes, and used by the report to pair users."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import small_config
from simulator import config, provenance
from test_resume import _play_all, comparable_summary, snapshot

N_USERS, N_ITEMS, PER_USER = 24, 120, 40


def write_ratings(path: Path, seed: int = 0) -> Path:
    """A small MovieLens-format file: every user rates PER_USER movies over 40 days."""
    rng = np.random.default_rng(seed)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(1, N_USERS + 1):
        items = rng.choice(N_ITEMS, PER_USER, replace=False) + 1
        times = np.sort(rng.integers(1_000_000_000, 1_000_000_000 + 40 * 86400, PER_USER))
        lines += [f"{u},{i},4.0,{t}" for i, t in zip(items, times)]
    path.write_text("\n".join(lines) + "\n")
    return path


def movielens_config(ratings: Path, strategies=("fedavg",)) -> config.ExperimentConfig:
    return config.from_dict({
        "experiment": {"seed": 1, "strategies": list(strategies)},
        "data": {"source": "movielens", "path": str(ratings), "n_rounds": 4, "history_fraction": 0.5},
        "cloud": {"epochs": 1},
    })


def interrupted(cfg, out: Path, strategy: str = "fedavg") -> None:
    """A run of ``cfg`` in ``out`` stopped by Ctrl-C at the end of ``strategy``'s round 2."""
    with pytest.raises(KeyboardInterrupt):
        _play_all(cfg, out, stop_at=(strategy, 2))
    assert json.loads((out / "summary.json").read_text())["strategies"][strategy]["status"] == "interrupted"


def test_a_run_records_the_digests_of_its_data_profiles_code_and_environment(tmp_path):
    cfg = small_config(experiment={"strategies": ["cloud_only"]})
    run = _play_all(cfg, tmp_path / "a")
    prov = json.loads((tmp_path / "a" / "summary.json").read_text())["provenance"]
    assert prov["data_sha256"] == provenance.data_digest(run.fleet)
    assert prov["profiles_sha256"] == provenance.profiles_digest(run.fleet)
    assert prov["code_sha256"] == provenance.code_digest()
    assert prov["environment"]["torch"] == __import__("torch").__version__
    assert prov["environment"]["numpy"] == np.__version__
    assert prov["resumes"] == []
    # one interaction's item changed: another data digest; the profiles' stays
    run.fleet.interactions.items[5] = (run.fleet.interactions.items[5] + 1) % run.fleet.interactions.n_items
    assert provenance.data_digest(run.fleet) != prov["data_sha256"]
    assert provenance.profiles_digest(run.fleet) == prov["profiles_sha256"]
    run.fleet.profiles.flops[0] *= 2
    assert provenance.profiles_digest(run.fleet) != prov["profiles_sha256"]


def test_resume_with_edited_data_is_refused_before_anything_changes(tmp_path):
    ratings = write_ratings(tmp_path / "ratings.csv")
    cfg = movielens_config(ratings)
    interrupted(cfg, tmp_path / "b")
    lines = ratings.read_text().splitlines()
    ratings.write_text("\n".join(lines[:-1]) + "\n")  # one rating dropped
    before = snapshot(tmp_path / "b")
    for allow in (False, True):  # --allow-code-change never accepts other data
        with pytest.raises(provenance.ProvenanceError, match="the devices' interaction data differ from the run's start"):
            _play_all(cfg, tmp_path / "b", resume=True, allow_code_change=allow)
        assert snapshot(tmp_path / "b") == before
    ratings.write_text("\n".join(lines) + "\n")  # restored: the resume goes on, to the uninterrupted results
    _play_all(cfg, tmp_path / "b", resume=True)
    _play_all(cfg, tmp_path / "a")
    resumes = json.loads((tmp_path / "b" / "summary.json").read_text())["provenance"]["resumes"]
    assert len(resumes) == 1 and resumes[0]["changes"] == []
    assert comparable_summary(tmp_path / "a") == comparable_summary(tmp_path / "b")


PLUGIN = '''\
from strategies.fedavg import FedAvg


class MyAvg(FedAvg):
    pass
'''


def test_resume_after_a_plug_in_edit_is_refused_unless_accepted_and_then_recorded(tmp_path, monkeypatch):
    (tmp_path / "myavg.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small_config(experiment={"strategies": ["myavg:MyAvg"]}, data={"n_rounds": 4})
    interrupted(cfg, tmp_path / "b", "myavg:MyAvg")
    (tmp_path / "myavg.py").write_text(PLUGIN + "# edited\n")
    before = snapshot(tmp_path / "b")
    with pytest.raises(provenance.ProvenanceError, match=r"other code or environment \(fleetsim's code or a plug-in "
                                                          r"module \(sources [0-9a-f]{12} -> [0-9a-f]{12}\)\).*--allow-code-change"):
        _play_all(cfg, tmp_path / "b", resume=True)
    assert snapshot(tmp_path / "b") == before
    _play_all(cfg, tmp_path / "b", resume=True, allow_code_change=True)
    prov = json.loads((tmp_path / "b" / "summary.json").read_text())["provenance"]
    assert [r["changes"][0][:30] for r in prov["resumes"]] == ["fleetsim's code or a plug-in m"]
    assert prov["resumes"][0]["code_sha256"] != prov["code_sha256"]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["strategies"]["myavg:MyAvg"]["status"] == "complete"


def test_resume_under_another_library_version_names_it(tmp_path, monkeypatch):
    cfg = small_config(experiment={"strategies": ["fedavg"]}, data={"n_rounds": 4})
    interrupted(cfg, tmp_path / "b")
    real = provenance.environment()
    monkeypatch.setattr(provenance, "environment", lambda: {**real, "torch": "9.9.9", "cpu": "Other CPU"})
    with pytest.raises(provenance.ProvenanceError,
                       match=re.escape(f"other code or environment (torch {real['torch']} -> 9.9.9; cpu {real['cpu']} -> Other CPU)")):
        _play_all(cfg, tmp_path / "b", resume=True)


def test_cli_refuses_changed_data_in_one_line_and_allow_code_change_needs_resume(tmp_path):
    from test_resume import cli, one_line_refusal

    cfg = small_config(experiment={"strategies": ["fedavg"], "hosts": 1}, data={"n_rounds": 4})
    interrupted(cfg, tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    s["provenance"]["data_sha256"] = "0" * 64  # as if the run had started on other data
    (tmp_path / "out" / "summary.json").write_text(json.dumps(s))
    before = snapshot(tmp_path / "out")
    one_line_refusal(cli(tmp_path, "run", "--resume", "out", "--allow-code-change"),
                     "the devices' interaction data differ from the run's start (digest 000000000000, now ")
    assert snapshot(tmp_path / "out") == before
    res = cli(tmp_path, "run", "--allow-code-change", "--out", "x")
    assert res.returncode == 2 and res.stderr.strip() == "fleetsim: error: --allow-code-change goes with --resume DIR only"
    assert not (tmp_path / "x").exists()


def test_report_pairs_users_only_of_runs_on_the_same_data(tmp_path):
    from simulator.report import build_report

    a, b = tmp_path / "a", tmp_path / "b"
    _play_all(small_config(experiment={"strategies": ["cloud_only", "fedavg"]}), a)
    shutil.copytree(a, b)
    files = build_report([a, b], tmp_path / "same", n_boot=50)
    rows = [line.split(",") for line in files.comparison_csv.read_text().splitlines()[1:]]
    assert len(rows) == 3 and not any("other fleet" in ",".join(r) for r in rows)  # same data and seed: paired
    s = json.loads((b / "summary.json").read_text())
    s["provenance"]["data_sha256"] = "f" * 64  # same data settings, other data (an edited file)
    s["provenance"]["resumes"] = [{"at": "x", "code_sha256": "1" * 64, "environment": {}, "changes": ["torch 1 -> 2"]}]
    (b / "summary.json").write_text(json.dumps(s))
    files = build_report([a, b], tmp_path / "other", n_boot=50)
    rows = [line.split(",") for line in files.comparison_csv.read_text().splitlines()[1:]]
    other = [r for r in rows if r[0].startswith("b/")]
    assert len(other) == 2 and all("n/a: other fleet (data or seed differ)" in ",".join(r) for r in other)
    assert not any("other fleet" in ",".join(r) for r in rows if r[0].startswith("a/"))
    html = files.html.read_text()
    code = json.loads((a / "summary.json").read_text())["provenance"]["code_sha256"][:12]
    assert f"code {code}; fleetsim 0.1.0" in html
    assert "resumed 1x, CHANGED: torch 1 -&gt; 2" in html


def test_old_runs_without_provenance_still_resume_and_report(tmp_path):
    cfg = small_config(experiment={"strategies": ["fedavg"]}, data={"n_rounds": 4})
    interrupted(cfg, tmp_path / "b")
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    del s["provenance"]
    (tmp_path / "b" / "summary.json").write_text(json.dumps(s))
    _play_all(cfg, tmp_path / "b", resume=True)
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "provenance" not in s and s["strategies"]["fedavg"]["status"] == "complete"
    assert provenance.describe(s) == "not recorded"
