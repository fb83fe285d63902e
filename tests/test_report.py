"""Tests for simulator/report.py and results.load_run: a report built from a small real run
(files, PNG sizes, a self-contained HTML), the statistics with hand-computed or known
answers, and the CLI's one-line errors for folders that are not (current) runs."""
from __future__ import annotations

import base64
import json
import math
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import simulator.run as run_mod
from simulator import cli, report
from simulator.errors import FleetsimError
from simulator.results import LAYOUT_VERSION, load_run, read_devices, read_rounds
from conftest import hosts_in_process, small_config

STRATEGIES = ["cloud_only", "local_finetune", "fedavg"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small real run (40 devices, 3 rounds, three strategies, in-process hosts)."""
    out = tmp_path_factory.mktemp("run") / "small"
    run_mod.run_experiment(small_config(), str(out), use_ray=False, progress=False, log=lambda msg: None)
    return out


@pytest.fixture(scope="module")
def built(run_dir, tmp_path_factory) -> report.ReportFiles:
    return report.build_report([run_dir], tmp_path_factory.mktemp("report"))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class Collect(HTMLParser):
    """Every tag with its attributes, table cell texts and all text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[str] = []
        self.tables = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.tables += tag == "table"
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


# The results API ------------------------------------------------------------------------


def test_load_run(run_dir):
    run = load_run(run_dir)
    assert run.strategies == STRATEGIES
    assert run.config["experiment"]["strategies"] == STRATEGIES and run.config["data"]["n_devices"] == 40
    assert run.summary["layout_version"] == LAYOUT_VERSION
    assert run.fleet["n_rounds"] == 3 and run.drift_events == run.fleet["drift_events"]
    assert len(run.fleet_devices) == 40 and {"history_interactions", "bucket"} <= set(run.fleet_devices.columns)
    assert list(run.devices.columns[:1]) == ["strategy"]
    assert list(run.devices["strategy"].unique()) == STRATEGIES
    for s in STRATEGIES:
        mine = run.devices[run.devices["strategy"] == s].drop(columns="strategy").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, read_devices(run_dir, s))
        rounds = run.rounds[run.rounds["strategy"] == s].drop(columns="strategy").reset_index(drop=True)
        pd.testing.assert_frame_equal(rounds, read_rounds(run_dir, s))


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "no summary.json"),
    (lambda d: (d / "summary.json").write_text("{not json"), "not readable as JSON"),
    (lambda d: (d / "summary.json").write_text('{"layout_version": 2, "strategies": {}}'), "lists no strategy"),
    (lambda d: (d / "summary.json").write_text('{"protocol": "leave_last", "methods": {}}'), "leave_last"),
    (lambda d: (d / "summary.json").write_text('{"strategies": {"a": {}}}'), "layout_version missing"),
])
def test_load_run_rejects(tmp_path, make, needle):
    make(tmp_path)
    with pytest.raises(FleetsimError, match=needle):
        load_run(tmp_path)


# Files and HTML -------------------------------------------------------------------------


def test_every_figure_is_a_png_of_the_expected_size(built, drawn):
    assert [p.name for p in built.figures] == list(report.FIGURES)
    for p in built.figures:
        assert p.stat().st_size > 10_000, p.name
        _, w, h = report.FIGURES[p.name]
        assert png_size(p) == (round(w * report.DPI), round(h * report.DPI)), p.name
        fig = drawn[p.name]  # the figure object behind it: that size, and one legend entry per strategy
        assert tuple(fig.get_size_inches()) == (w, h), p.name
        labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
        labels += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        shown = [s for s in STRATEGIES if any(lab == s or lab.startswith(f"{s}:") for lab in labels)]
        # fig4 shows only the strategies compared with the baseline
        assert shown == (STRATEGIES[1:] if p.name == "fig4_user_gain.png" else STRATEGIES), (p.name, labels)


def test_html_is_self_contained_and_embeds_figures_and_tables(built):
    text = built.html.read_text(encoding="utf-8")
    parser = Collect()
    parser.feed(text)
    parser.close()

    images = [a.get("src") or "" for tag, a in parser.tags if tag == "img"]
    assert len(images) == len(report.FIGURES)
    for src, fig in zip(images, built.figures):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):]) == fig.read_bytes()
    # nothing is fetched from anywhere: no URL, no src/href to a file, no external CSS or script
    assert "http://" not in text and "https://" not in text
    for tag, attrs in parser.tags:
        for key in ("src", "href"):
            assert attrs.get(key) is None or attrs[key].startswith("data:"), (tag, attrs)
        assert tag not in ("link", "script", "iframe", "object", "embed")

    assert parser.tables >= 3  # runs, summary, paired comparison (and buckets)
    for header in ["overall AUC", "UAUC", "p10 per-user AUC", "NDCG@10", "HR@10", "tail UAUC", "MB up / device-round",
                   "MB down / device-round", "device GFLOPs / device-round", "simulated h", "wall s",
                   "mean UAUC difference", "95 % CI low", "95 % CI high", "users who gain"]:
        assert header in parser.cells, header
    for s in STRATEGIES:
        assert s in parser.cells


def test_summary_csv_matches_summary_json(built, run_dir):
    table = pd.read_csv(built.summary_csv)
    summary = json.loads((run_dir / "summary.json").read_text())["strategies"]
    assert list(table["strategy"]) == STRATEGIES
    for _, row in table.iterrows():
        s = summary[row["strategy"]]
        assert row["uauc"] == pytest.approx(s["uauc"], rel=1e-5)
        assert row["overall_auc"] == pytest.approx(s["overall_auc"], rel=1e-5)
        assert row["tail_uauc"] == pytest.approx(s["by_bucket"]["tail"]["uauc"], rel=1e-5)
        assert row["simulated_hours"] == pytest.approx(s["simulated_seconds"] / 3600, rel=1e-5)
    comparison = pd.read_csv(built.comparison_csv)
    assert list(comparison["strategy"]) == ["local_finetune", "fedavg"]
    assert set(comparison["baseline"]) == {"cloud_only"}
    for _, row in comparison.iterrows():
        assert row["ci_low"] <= row["mean_uauc_diff"] <= row["ci_high"]
        assert row["significant"] == ("no" if row["ci_low"] <= 0 <= row["ci_high"] else "yes")
    buckets = pd.read_csv(built.buckets_csv)
    assert len(buckets) == 3 * len(STRATEGIES) and set(buckets["bucket"]) == {"head", "torso", "tail"}
    for _, row in buckets.iterrows():
        s = summary[row["strategy"]]["by_bucket"][row["bucket"]]
        assert row["uauc"] == pytest.approx(s["uauc"], rel=1e-5)
        assert np.isnan(row["gain"]) == (row["strategy"] == "cloud_only")


def test_per_user_numbers_agree_with_the_summary(run_dir):
    """The report's per-user AUCs (metrics.user_auc of the records) give summary.json's UAUC."""
    run = load_run(run_dir)
    for e in report.make_entries([run]):
        ci = report.bootstrap_mean_ci(e.users["auc"].to_numpy(), n_boot=50)
        assert ci.mean == pytest.approx(e.summary["uauc"], abs=1e-12)
        assert ci.n == e.summary["n_users_auc"]


# Statistics ------------------------------------------------------------------------------


def test_bootstrap_ci_covers_a_known_difference():
    """Per-user differences drawn around a true mean of 0.03: one CI covers it, and over 200
    independent samples about 95 % of the CIs do."""
    rng = np.random.default_rng(7)
    truth = 0.03
    base = rng.beta(8, 2, 2000)
    other = base + truth + rng.normal(0, 0.05, 2000)
    ci = report.bootstrap_mean_ci(other - base, seed=1)
    assert ci.lo < truth < ci.hi and ci.significant
    assert ci.hi - ci.lo == pytest.approx(2 * 1.96 * 0.05 / math.sqrt(2000), rel=0.15)

    covered = 0
    for k in range(200):
        d = truth + rng.normal(0, 0.05, 100)
        c = report.bootstrap_mean_ci(d, n_boot=400, seed=k)
        covered += c.lo <= truth <= c.hi
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_edge_cases():
    empty = report.bootstrap_mean_ci([np.nan])
    assert empty.n == 0 and math.isnan(empty.mean) and not empty.significant
    one = report.bootstrap_mean_ci([0.7])
    assert (one.mean, one.lo, one.hi, one.n) == (0.7, 0.7, 0.7, 1)
    same = report.bootstrap_mean_ci([0.0, 0.0, 0.0])
    assert (same.lo, same.hi) == (0.0, 0.0) and not same.significant
    assert report.bootstrap_mean_ci([1.0, 2.0, 3.0], seed=4) == report.bootstrap_mean_ci([1.0, 2.0, 3.0], seed=4)


def test_paired_comparison_uses_only_users_in_both():
    """Strategy A saw users 0-3 and 5, the baseline 1-5 with no defined AUC for user 5:
    only users 1, 2, 3 pair."""
    a = pd.DataFrame({"device_id": [5, 0, 1, 2, 3], "auc": [0.9, 0.1, 0.8, 0.6, 0.5]})
    b = pd.DataFrame({"device_id": [1, 2, 3, 4, 5], "auc": [0.7, 0.6, 0.7, 0.2, np.nan]})
    d = report.paired_user_diff(a, b)
    assert list(d["device_id"]) == [1, 2, 3]
    np.testing.assert_allclose(d["diff"], [0.1, 0.0, -0.2])
    pc = report.paired_comparison(a, b, n_boot=200)
    assert pc.n_users == 3
    assert pc.diff.mean == pytest.approx(-0.1 / 3)
    assert (pc.frac_gain, pc.frac_loss) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert pc.diff.lo >= -0.2 - 1e-12 and pc.diff.hi <= 0.1 + 1e-12


def test_comparison_table_pairs_different_device_subsets(run_dir):
    """A strategy that only saw the even devices is paired with the baseline on those alone."""
    entries = report.make_entries([load_run(run_dir)])
    base, _ = report.pick_baseline(entries, None)
    fedavg = next(e for e in entries if e.strategy == "fedavg")
    fedavg.users = fedavg.users[fedavg.users["device_id"] % 2 == 0]
    table = report.comparison_table(entries, base, n_boot=100).set_index("strategy")
    both = fedavg.users.merge(base.users, on="device_id").dropna(subset=["auc_x", "auc_y"])
    assert 0 < len(both) < base.users["auc"].notna().sum()
    assert table.loc["fedavg", "paired_users"] == len(both)
    assert table.loc["fedavg", "mean_uauc_diff"] == pytest.approx((both["auc_x"] - both["auc_y"]).mean())
    assert table.loc["local_finetune", "paired_users"] == base.users["auc"].notna().sum()


def test_round_pair_auc_weights_by_pairs():
    records = pd.DataFrame({"round": [1, 1, 2], "device_id": [0, 1, 0], "auc": [1.0, 0.5, 0.25],
                            "n_pos": [1, 3, 2], "n_neg": [99, 297, 198]})
    got = report.round_pair_auc(records)
    assert list(got["round"]) == [1, 2]
    np.testing.assert_allclose(got["auc"], [(99 * 1.0 + 891 * 0.5) / 990, 0.25])


def test_running_median():
    x = np.array([3.0, 1.0, 2.0, 2.0, 4.0, 5.0])
    y = np.array([30.0, 10.0, 20.0, 22.0, 40.0, 50.0])
    mx, my = report.running_median(x, y, window=3)
    assert list(mx) == [1.0, 2.0, 3.0, 4.0, 5.0]
    # sorted y: 10, 20, 22, 30, 40, 50; centred window 3 (edges use 2 points)
    np.testing.assert_allclose(my, [15.0, (20.0 + 22.0) / 2, 30.0, 40.0, 45.0])


def test_colours_are_fixed_per_strategy():
    assert report.strategy_colours(["fedavg", "x", "cloud_only"]) == [
        report.KNOWN_COLOURS["fedavg"], report.EXTRA_COLOURS[0], report.KNOWN_COLOURS["cloud_only"]]
    two = report.strategy_colours(["fedavg", "fedavg"])
    assert two[0] == report.KNOWN_COLOURS["fedavg"] and two[1] != two[0]


# Command line ----------------------------------------------------------------------------


def call(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetsim: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_report_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(*call(capsys, "report", str(tmp_path))[::2], str(tmp_path), "not a fleetsim run")
    assert_one_line_error(*call(capsys, "report", str(tmp_path / "missing"))[::2], "no such directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("part", ["devices.parquet", "rounds.parquet"])
def test_cli_report_on_a_run_missing_a_round_part(capsys, run_dir, tmp_path, part):
    """A run folder that lost one round's part file is refused (one line, exit 2), not
    reported over the rounds that are left."""
    gap = tmp_path / "gap"
    shutil.copytree(run_dir, gap)
    strategy = json.loads((gap / "summary.json").read_text())["strategies"]
    name = next(iter(strategy))
    assert strategy[name]["rounds_completed"] >= 2
    folder = gap / name.replace(":", "_") / part
    (folder / "round-00002.parquet").unlink()
    code, _, err = call(capsys, "report", str(gap))
    assert_one_line_error(code, err, str(folder), "round(s) 2 missing")


def _edit_part(folder: Path, edit) -> None:
    part = folder / "round-00002.parquet"
    edit(pd.read_parquet(part)).to_parquet(part, index=False)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


DAMAGE = [  # (what is done to a copy of the run, the file the line names, what it says)
    (lambda d: _edit_part(d / "fedavg/devices.parquet", lambda df: pd.concat([df, df.iloc[:1]])),
     "fedavg/devices.parquet", "appears twice in round 2"),
    (lambda d: _edit_part(d / "fedavg/devices.parquet", lambda df: df.assign(auc=df["auc"] * 5)),
     "fedavg/devices.parquet", "is outside [0, 1]"),
    (lambda d: _edit_part(d / "fedavg/devices.parquet", lambda df: df.assign(device_id=df["device_id"] + 1000)),
     "fedavg/devices.parquet", "is not in the fleet of 40"),
    (lambda d: _edit_part(d / "fedavg/rounds.parquet", lambda df: df.drop(columns="active")),
     "fedavg/rounds.parquet/round-00002.parquet", "column(s) active missing"),
    (lambda d: _edit_part(d / "fedavg/rounds.parquet", lambda df: pd.concat([df, df])),
     "fedavg/rounds.parquet", "round 2 appears twice"),
    (lambda d: pd.read_parquet(d / "fleet_devices.parquet").iloc[:20].to_parquet(d / "fleet_devices.parquet"),
     "fleet_devices.parquet", "holds 20 rows, not devices 0..39"),
    (lambda d: (d / "fleet.json").write_text("[]"), "fleet.json", "expected a JSON object"),
    (lambda d: _edit_json(d / "fleet.json", lambda f: f.update(drift_events="gradual")), "fleet.json",
     "drift_events is not a list"),
    (lambda d: _edit_json(d / "summary.json", lambda s: s["strategies"]["fedavg"].update(uauc="high")),
     "summary.json", 'fedavg: uauc = "high" is not what fleetsim writes'),
    (lambda d: _edit_json(d / "summary.json", lambda s: s["strategies"].update(fedavg="oops")),
     "summary.json", "strategy 'fedavg' is str, not an object"),
    (lambda d: _edit_json(d / "summary.json", lambda s: s["strategies"]["fedavg"].update(status="bogus")),
     "summary.json", "status 'bogus' is not one of"),
    (lambda d: _edit_json(d / "summary.json", lambda s: s["strategies"]["fedavg"].pop("status")),
     "summary.json", "fedavg: status None is not one of"),
    (lambda d: (d / "config.toml").write_text((d / "config.toml").read_text().replace("seed = 3", "seed = 4")),
     "", "summary.json does not belong to config.toml"),
]


@pytest.mark.parametrize("damage, where, what", DAMAGE, ids=[f"{w or 'config'}-{x[:14]}" for _, w, x in DAMAGE])
def test_cli_report_refuses_records_no_run_writes(capsys, run_dir, tmp_path, damage, where, what):
    """Edited or mixed run files gave tracebacks or, worse, plausible numbers (a drill: a
    comparison 'significant' at +0.41 over AUCs x5, another run's summary beside these
    records)."""
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("*.png", "*.html", "*.csv"))
    assert (bad / "config.toml").read_text().count("seed = 3") == 1
    damage(bad)
    code, _, err = call(capsys, "report", str(bad), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, f"{bad / where}" if where else str(bad), what)


def test_cli_report_refuses_an_out_that_would_damage_a_run(capsys, run_dir, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)
    before = {p: p.stat().st_mtime_ns for p in twin.rglob("*")}
    inside = twin / "fedavg" / "devices.parquet"
    for argv, what in ((["--out", str(inside)], f"inside {inside}, a run's records"),
                       (["--out", str(inside / "x")], f"inside {inside}, a run's records"),
                       (["--out", str(twin)], "holds another run, whose own report would be replaced"),
                       (["--out", ""], "--out is empty")):
        assert_one_line_error(*call(capsys, "report", str(run_dir), *argv)[::2], what)
    assert_one_line_error(*call(capsys, "report", str(twin), str(twin) + "/", "--out", str(tmp_path / "r"))[::2],
                          f"{twin}/ is given twice (as {twin} too)")
    assert {p: p.stat().st_mtime_ns for p in twin.rglob("*")} == before
    assert call(capsys, "report", str(twin), str(run_dir), "--out", str(twin))[0] == 0  # a run of the report


def test_a_failed_strategys_numbers_are_those_of_the_rounds_it_completed(tmp_path):
    """FedAvg waits for more devices than are online and fails in round 1: its records of
    round 1 stay on disk, but its summary and report numbers (it completed no round) are
    empty; they used to be round 1's, shown beside the baseline's three rounds."""
    cfg = small_config(experiment={"strategies": ["cloud_only", "fedavg"]},
                       strategies={"fedavg": {"min_available_nodes": 1000}})
    out = tmp_path / "run"
    s = run_mod.run_experiment(cfg, str(out), use_ray=False, progress=False, log=lambda msg: None)["strategies"]
    assert (s["fedavg"]["status"], s["fedavg"]["rounds_completed"], s["fedavg"]["error"]["round"]) == ("failed", 0, 1)
    assert s["fedavg"].get("uauc") is None or math.isnan(s["fedavg"]["uauc"])
    assert s["fedavg"].get("n_users_auc", 0) == 0 and s["fedavg"]["simulated_seconds"] == 0.0
    assert len(read_devices(out, "fedavg")) > 0  # round 1's records, for the diagnosis
    run = load_run(out)
    assert (run.devices["strategy"] == "fedavg").sum() == 0
    files = report.build_report([out], tmp_path / "r")
    table = pd.read_csv(files.summary_csv).set_index("strategy")
    assert math.isnan(table.loc["fedavg", "uauc"]) and table.loc["fedavg", "status"] == "failed"
    assert len(pd.read_csv(files.comparison_csv)) == 0


def test_a_report_that_cannot_be_written_whole_leaves_the_one_before(capsys, run_dir, tmp_path):
    out = tmp_path / "r"
    assert call(capsys, "report", str(run_dir), "--out", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "fig4_user_gain.png").unlink()
    (out / "fig4_user_gain.png").mkdir()  # in the way of the new figure
    code, _, err = call(capsys, "report", str(run_dir), "--out", str(out), "--baseline", "fedavg")
    assert_one_line_error(code, err, f"cannot write {out / 'fig4_user_gain.png'} (Is a directory); the report there "
                                     f"before, if any, is unchanged")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == \
        {k: v for k, v in before.items() if k != "fig4_user_gain.png"}  # the old tables, not fedavg-based ones
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_baseline_that_completed_no_round_is_named_as_such(tmp_path):
    cfg = small_config(experiment={"strategies": ["cloud_only", "fedavg"]},
                       strategies={"fedavg": {"min_available_nodes": 1000}})
    out = tmp_path / "run"
    run_mod.run_experiment(cfg, str(out), use_ray=False, progress=False, log=lambda msg: None)
    with pytest.raises(FleetsimError, match=r"^--baseline fedavg: it completed no round \(failed\), so nothing can "
                                            r"be compared with it$"):
        report.build_report([out], tmp_path / "r", baseline="fedavg")


def test_fewer_than_ten_paired_users_are_never_significant():
    from simulator.report_stats import MIN_SIGNIFICANT_N, bootstrap_mean_ci

    assert MIN_SIGNIFICANT_N == 10
    assert not bootstrap_mean_ci([0.38]).significant  # a one-user "CI" is the value itself
    assert not bootstrap_mean_ci([0.3, 0.31] * 4 + [0.3]).significant  # 9 values, all > 0
    assert bootstrap_mean_ci([0.3, 0.31] * 5).significant  # 10 values, all > 0


def test_cli_report_on_an_older_layout(capsys, run_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    summary = json.loads((old / "summary.json").read_text())
    summary["layout_version"] = 0
    (old / "summary.json").write_text(json.dumps(summary))
    before = sorted(p.name for p in old.iterdir())
    assert_one_line_error(*call(capsys, "report", str(old))[::2], str(old), "older result layout",
                          "layout_version 0")
    assert sorted(p.name for p in old.iterdir()) == before  # nothing written


def test_cli_report_unknown_baseline(capsys, run_dir, tmp_path):
    code, _, err = call(capsys, "report", str(run_dir), "--out", str(tmp_path / "r"), "--baseline", "nope")
    assert_one_line_error(code, err, "--baseline nope", "cloud_only, local_finetune, fedavg")


def test_cli_report_combines_runs(capsys, run_dir, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin, ignore=shutil.ignore_patterns("*.png", "*.html", "*.csv"))
    out = tmp_path / "both"
    # a strategy name in both runs is ambiguous: it used to pick the first run's silently
    assert_one_line_error(*call(capsys, "report", str(run_dir), str(twin), "--out", str(out), "--baseline",
                                "fedavg")[::2], "--baseline fedavg: in more than one run; name one of small/fedavg, "
                                                "twin/fedavg")
    code, stdout, err = call(capsys, "report", str(run_dir), str(twin), "--out", str(out), "--baseline", "small/fedavg")
    assert code == 0, err
    assert stdout.strip() == f"report: {out / 'report.html'}"
    table = pd.read_csv(out / "summary.csv")
    assert list(table["strategy"]) == [f"{r}/{s}" for r in ("small", "twin") for s in STRATEGIES]
    comparison = pd.read_csv(out / "comparison.csv")
    assert set(comparison["baseline"]) == {"small/fedavg"} and len(comparison) == 5
    same = comparison.set_index("strategy").loc["twin/fedavg"]
    assert same["mean_uauc_diff"] == 0 and same["significant"] == "no"
    assert not (twin / "report.html").exists()


def test_run_writes_its_report_unless_told_not_to(monkeypatch, capsys, tmp_path):
    hosts_in_process(monkeypatch)
    exp = tmp_path / "tiny.toml"
    exp.write_text('[experiment]\nstrategies = ["cloud_only", "fedavg"]\n[data]\nn_devices = 30\nn_items = 40\n'
                   "n_rounds = 2\nhistory_days = 3.0\nmean_daily_interactions = 4.0\n[cloud]\nepochs = 1\n")
    code, out, err = call(capsys, "run", str(exp), "--out", str(tmp_path / "a"), "--no-progress")
    assert code == 0, err
    assert f"report: {tmp_path / 'a' / 'report.html'}" in out
    assert {"report.html", "summary.csv", *report.FIGURES} <= {p.name for p in (tmp_path / "a").iterdir()}

    code, out, err = call(capsys, "run", str(exp), "--out", str(tmp_path / "b"), "--no-progress", "--no-report")
    assert code == 0, err
    assert "report:" not in out and not (tmp_path / "b" / "report.html").exists()
    assert load_run(tmp_path / "b").strategies == ["cloud_only", "fedavg"]


# What the figures draw -------------------------------------------------------------------


@pytest.fixture(scope="module")
def drawn(run_dir, tmp_path_factory) -> dict:
    """The matplotlib Figure of every report figure (captured as it is saved)."""
    import simulator.report_figures as rf

    figs = {}
    real_save = rf._save

    def keep(fig, path):
        figs[Path(path).name] = fig
        real_save(fig, path)

    mp = pytest.MonkeyPatch()
    mp.setattr(rf, "_save", keep)
    try:
        report.build_report([run_dir], tmp_path_factory.mktemp("drawn"), n_boot=50)
    finally:
        mp.undo()
    return figs


def _lines_of(ax, colour: str):
    from matplotlib.colors import same_color

    return [ln for ln in ax.get_lines() if same_color(ln.get_color(), colour)]


def test_figures_draw_the_runs_numbers_in_each_strategys_colour(drawn, run_dir):
    from matplotlib.colors import same_color

    from strategies.registry import STRATEGY_COLOURS

    assert sorted(drawn) == sorted(report.FIGURES)
    summary = json.loads((run_dir / "summary.json").read_text())["strategies"]
    devices = pd.concat([read_devices(run_dir, s).assign(strategy=s) for s in STRATEGIES])
    colours = [STRATEGY_COLOURS[s] for s in STRATEGIES]
    assert len(set(colours)) == 3

    # Figure 1: one UAUC and one AUC line per strategy over rounds 1..3
    ax_u, ax_a = drawn["fig1_rounds.png"].axes[:2]
    for s, c in zip(STRATEGIES, colours):
        (lu,), (la,) = _lines_of(ax_u, c), _lines_of(ax_a, c)
        per_round = summary[s]["per_round"]
        assert list(lu.get_xdata()) == [1, 2, 3] == [r["round"] for r in per_round]
        np.testing.assert_allclose(lu.get_ydata(), [r["uauc"] for r in per_round], rtol=1e-12)
        # pooled AUC of the round: device AUCs weighted by n_pos x n_neg (from the parquet)
        d = devices[(devices["strategy"] == s) & devices["auc"].notna()]
        pairs = d["n_pos"] * d["n_neg"]
        want = (d["auc"] * pairs).groupby(d["round"]).sum() / pairs.groupby(d["round"]).sum()
        assert list(la.get_xdata()) == list(want.index)
        np.testing.assert_allclose(la.get_ydata(), want.to_numpy(), rtol=1e-9)
        # the per-round UAUC is the plain mean of the devices' AUCs that round
        np.testing.assert_allclose(lu.get_ydata(), d.groupby("round")["auc"].mean().to_numpy(), rtol=1e-9)

    # Figure 2: p10 / p50 / p90 markers at summary.json's per-user percentiles
    (ax,) = drawn["fig2_user_auc_ecdf.png"].axes[:1]
    for s, c in zip(STRATEGIES, colours):
        points = sorted((float(ln.get_ydata()[0]), float(ln.get_xdata()[0])) for ln in _lines_of(ax, c)
                        if len(ln.get_xdata()) == 1)
        assert points == [(0.1, pytest.approx(summary[s]["user_auc_p10"])), (0.5, pytest.approx(summary[s]["user_auc_p50"])),
                          (0.9, pytest.approx(summary[s]["user_auc_p90"]))]

    # Figure 3: bars start at 0.5 and reach each bucket's UAUC, strategies side by side in their colour
    ax_u, ax_g = drawn["fig3_buckets.png"].axes[:2]
    bars = ax_u.patches
    assert len(bars) == 3 * len(STRATEGIES)
    for i, (s, c) in enumerate(zip(STRATEGIES, colours)):
        mine = bars[3 * i : 3 * i + 3]
        assert all(same_color(b.get_facecolor(), c) for b in mine)
        assert [b.get_y() for b in mine] == [0.5] * 3
        want = [summary[s]["by_bucket"][b]["uauc"] for b in ("head", "torso", "tail")]
        np.testing.assert_allclose([b.get_y() + b.get_height() for b in mine], want, rtol=1e-9)
    assert len(ax_g.patches) == 3 * 2  # gain bars for the two non-baseline strategies only
    assert all(same_color(b.get_facecolor(), STRATEGY_COLOURS["local_finetune"]) for b in ax_g.patches[:3])

    # Figure 5: one point per strategy at (MB up + down per device-round, UAUC) and (GFLOPs, UAUC)
    ax_b, ax_f = drawn["fig5_cost_quality.png"].axes[:2]
    for s, c in zip(STRATEGIES, colours):
        mb = (summary[s]["mb_up_per_device_round"] or 0.0) + (summary[s]["mb_down_per_device_round"] or 0.0)
        gf = summary[s]["gflops_per_device_round"] or 0.0
        for ax, x in ((ax_b, mb), (ax_f, gf)):
            pts = [ln for ln in _lines_of(ax, c) if ln.get_marker() not in ("_", "|")]  # not the CI caps
            assert len(pts) == 1, s
            assert float(pts[0].get_xdata()[0]) == pytest.approx(x, rel=1e-12)
            assert float(pts[0].get_ydata()[0]) == pytest.approx(summary[s]["uauc"], abs=1e-12)
    assert summary["cloud_only"]["uauc"] is not None
    assert float(_lines_of(ax_b, STRATEGY_COLOURS["cloud_only"])[0].get_xdata()[0]) == 0.0  # no traffic at all

    # Figure 6: devices selected per round, counted from the device parquet (every selected device has a row)
    fleet = drawn["fig6_fleet.png"]
    by_title = {ax.get_title(): ax for ax in fleet.axes if ax.get_visible()}
    selected_ax = by_title["devices selected by the strategy"]
    ok_ax = by_title["selected devices that replied in time (ok)"]
    for s, c in zip(STRATEGIES, colours):
        d = devices[devices["strategy"] == s]
        sel = d[d["selected"]].groupby("round").size().reindex([1, 2, 3], fill_value=0)
        ok = d[d["selected"] & (d["status"] == "ok")].groupby("round").size().reindex([1, 2, 3], fill_value=0)
        (ls,), (lo,) = _lines_of(selected_ax, c), _lines_of(ok_ax, c)
        assert list(ls.get_xdata()) == [1, 2, 3]
        assert list(ls.get_ydata()) == sel.astype(float).tolist()
        assert list(lo.get_ydata()) == ok.astype(float).tolist()
    assert list(_lines_of(selected_ax, STRATEGY_COLOURS["cloud_only"])[0].get_ydata()) == [0.0, 0.0, 0.0]
