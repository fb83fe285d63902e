"""The study scripts (experiments/duet_gap.py, dccl_departure.py): a resumed study reuses
finished runs only; the departure study's intervals are over seeds; the offline probes
compute UAUC as a run does."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import dccl_departure  # noqa: E402
import duet_gap  # noqa: E402


def write_summary(folder: Path, statuses: dict[str, str], aucs: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "protocol_settings": {"holdout": "validation"},
        "strategies": {m: {"status": st} for m, st in statuses.items()},
        "methods": {m: {"auc": a} for m, a in aucs.items()}}))


def test_a_finished_run_is_read_and_an_interrupted_one_is_never_taken_as_done(tmp_path):
    write_summary(tmp_path / "base_protocol-seed0", dict.fromkeys(duet_gap.METHODS, "complete"),
                  {"base": 0.90, "finetune": 0.91, "duet": 0.92})
    assert duet_gap.run_one("base_protocol", 0, "unused.csv", "validation", tmp_path) == \
        {"base": 0.90, "finetune": 0.91, "duet": 0.92}
    # killed during DUET: summary.json exists (it is written as the run goes), duet is not complete
    write_summary(tmp_path / "layers_head_attention-seed0", {"base": "complete", "finetune": "complete",
                                                              "duet": "running"}, {"base": 0.90, "finetune": 0.91})
    with pytest.raises(SystemExit, match=r"layers_head_attention-seed0: an unfinished run \(duet not complete\)"):
        duet_gap.run_one("layers_head_attention", 0, "unused.csv", "validation", tmp_path)
    # a DUET-only variant needs base and duet, not finetune (it borrows finetune from the reference)
    write_summary(tmp_path / "gen_16-seed0", {"base": "complete", "duet": "complete"}, {"base": 0.90, "duet": 0.93})
    assert duet_gap.run_one("gen_16", 0, "unused.csv", "validation", tmp_path) == {"base": 0.90, "duet": 0.93}


def write_buckets(folder: Path, gains: dict[tuple[str, str], tuple[float, float, float]]) -> None:
    folder.mkdir(parents=True)
    lines = ["strategy,bucket,users,uauc,uauc_lo,uauc_hi,gain,gain_lo,gain_hi,gain_users",
             "cloud_only,head,10,0.9,0.8,0.95,,,,0", "cloud_only,tail,10,0.8,0.7,0.9,,,,0"]
    lines += [f"{s},{b},10,0.9,0.8,0.95,{g},{lo},{hi},10" for (s, b), (g, lo, hi) in gains.items()]
    (folder / "buckets.csv").write_text("\n".join(lines) + "\n")


def test_departure_study_intervals_are_over_seeds_and_the_target_reads_paired_differences(tmp_path):
    write_buckets(tmp_path / "crowd_head-encoder8-seed0", {("metapatch", "head"): (0.001, 0.0, 0.002),
                                                           ("metapatch", "tail"): (0.002, -0.001, 0.005)})
    write_buckets(tmp_path / "crowd_head-encoder8-seed1", {("metapatch", "head"): (-0.001, -0.002, 0.0),
                                                           ("metapatch", "tail"): (0.004, 0.001, 0.007)})
    per_seed = {s: dccl_departure.read_buckets(dccl_departure.run_one(
        "crowd_head", "encoder8", s, ["cloud_only", "metapatch"], tmp_path)) for s in (0, 1)}
    tail = dccl_departure.gains(per_seed, "metapatch", "tail")
    assert tail == [0.002, 0.004]
    # mean 0.003; sd 0.002 / sqrt(2) = 0.0014142, over sqrt(2) seeds: 0.001; t(0.975, 1 df) = 12.7062
    mean, lo, hi = dccl_departure.t_interval(tail)
    assert (mean, lo, hi) == (pytest.approx(0.003), pytest.approx(0.003 - 0.0127062), pytest.approx(0.003 + 0.0127062))
    assert np.isnan(dccl_departure.t_interval([0.5])[1])
    # head gains 0.001 and -0.001: mean 0 is not > 0, on the means nor on the intervals
    assert dccl_departure.table({("crowd_head", "encoder8"): per_seed}, ["cloud_only", "metapatch"],
                                [0, 1]).splitlines()[-1].endswith("| no | no |")
    # head 0.001 on both seeds (interval [0.001, 0.001]); tail - head = 0.001, 0.003: mean 0.002
    # with half-width 12.7062 x 0.001, below 0 -> yes on the means, no on the intervals
    for s in (0, 1):
        per_seed[s][("metapatch", "head")]["gain"] = 0.001
    assert dccl_departure.table({("crowd_head", "encoder8"): per_seed}, ["cloud_only", "metapatch"],
                                [0, 1]).splitlines()[-1].endswith("| yes | no |")
    # tail 0.006 on both seeds: the difference is 0.005 on both, its interval [0.005, 0.005]
    for s in (0, 1):
        per_seed[s][("metapatch", "tail")]["gain"] = 0.006
    assert dccl_departure.table({("crowd_head", "encoder8"): per_seed}, ["cloud_only", "metapatch"],
                                [0, 1]).splitlines()[-1].endswith("| yes | yes |")


def test_departure_study_never_reads_a_finished_run_without_a_requested_strategy(tmp_path):
    write_buckets(tmp_path / "own-encoder8-seed0", {("metapatch", "head"): (0.001, 0.0, 0.002),
                                                    ("metapatch", "tail"): (0.001, 0.0, 0.002)})
    with pytest.raises(SystemExit, match=r"own-encoder8-seed0: a run without momodistill; remove the folder"):
        dccl_departure.run_one("own", "encoder8", 0, ["cloud_only", "metapatch", "momodistill"], tmp_path)


def test_headroom_ranks_the_ground_truth_above_what_knows_less():
    import dccl_headroom
    r = dccl_headroom.headroom("crowd_head", 0)
    for b in ("all", *dccl_headroom.BUCKETS):
        # the round's true taste generated the data; the history taste misses the drift since;
        # popularity knows nothing of the user
        assert r["true taste"][b] > r["history taste"][b] > r["popularity"][b] + 0.1
        # ranking repeats first can only raise a positive: never below the generating model
        assert r["true taste, repeats first"][b] >= r["true taste"][b]
    # the tail's taste departs from the crowd, yet its ground truth is about as good as the head's
    assert abs(r["true taste"]["head"] - r["true taste"]["tail"]) < 0.01
