"""The study scripts (experiments/duet_gap.py): a resumed study reuses finished runs only."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
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
