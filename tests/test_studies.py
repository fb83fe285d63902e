"""The study scripts (experiments/duet_gap.py, dccl_departure.py): a resumed study reuses
finished runs only, and the departure study's table combines the seeds' CIs as documented."""
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


def test_departure_study_mean_ci_combines_the_seeds_bootstrap_cis(tmp_path):
    # seed 0: tail gain 0.002, CI width 2 x 1.96 x 0.001 (se 0.001); seed 1: 0.004, se 0.002
    write_buckets(tmp_path / "crowd_head-encoder8-seed0", {("metapatch", "head"): (0.001, 0.0, 0.002),
                                                           ("metapatch", "tail"): (0.002, 0.002 - 0.00196, 0.002 + 0.00196)})
    write_buckets(tmp_path / "crowd_head-encoder8-seed1", {("metapatch", "head"): (-0.001, -0.002, 0.0),
                                                           ("metapatch", "tail"): (0.004, 0.004 - 0.00392, 0.004 + 0.00392)})
    per_seed = {s: dccl_departure.read_buckets(dccl_departure.run_one(
        "crowd_head", "encoder8", s, ["cloud_only", "metapatch"], tmp_path)) for s in (0, 1)}
    mean, se, positive = dccl_departure.seed_mean(per_seed, "metapatch", "tail")
    assert mean == pytest.approx(0.003) and positive == 2
    assert se == pytest.approx((0.001 ** 2 + 0.002 ** 2) ** 0.5 / 2)  # 0.001118
    head, head_se, head_positive = dccl_departure.seed_mean(per_seed, "metapatch", "head")
    assert (head, head_positive) == (pytest.approx(0.0), 1)
    # means: the head gain (0) is not > 0; CIs: neither
    assert dccl_departure.table({("crowd_head", "encoder8"): per_seed}, ["cloud_only", "metapatch"],
                                [0, 1]).splitlines()[-1].endswith("| no | no |")
    # a head gain of 0.001 (se 0.0005/sqrt(2)) above 0, tail 0.003: yes on the means; on the
    # CIs the head's lies above 0 and tail - head = 0.002 has se sqrt(0.00112^2 + 0.00035^2) = 0.00117,
    # so its CI reaches below 0: no
    for s in (0, 1):
        per_seed[s][("metapatch", "head")].update(gain=0.001, gain_lo=0.001 - 0.00098, gain_hi=0.001 + 0.00098)
    assert dccl_departure.table({("crowd_head", "encoder8"): per_seed}, ["cloud_only", "metapatch"],
                                [0, 1]).splitlines()[-1].endswith("| yes | no |")
    # with tail gains of 0.006 on both seeds, the difference's CI clears 0: yes on both
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
    # the tail's taste departs from the crowd, yet its ground truth is about as good as the head's
    assert abs(r["true taste"]["head"] - r["true taste"]["tail"]) < 0.01


def test_offset_probe_windows_and_negatives_by_hand():
    import dccl_user_offset as probe
    # two users: user 0 has items 5, 6, 7; user 1 has items 8, 9
    items, indptr = np.array([5, 6, 7, 8, 9]), np.array([0, 3, 5])
    user = np.array([0, 0, 0, 1, 1])
    w = probe.windows_of(items, indptr, np.array([0, 2, 4]), user, 2)
    assert w.tolist() == [[-1, -1], [5, 6], [-1, 8]]  # never a window across users
    seen = np.zeros((2, 4), dtype=bool)
    seen[0, [0, 1, 2]] = True  # user 0 has one unseen item: 3
    neg = probe.negatives(np.random.default_rng(0), seen, np.array([0, 1, 0]), 50)
    assert (neg[[0, 2]] == 3).all() and not seen[1, neg[1]].any() and set(neg[1]) == {0, 1, 2, 3}
