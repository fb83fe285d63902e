"""What the study scripts (``duet_gap.py``, ``dccl_departure.py``) share: one ``fleetsim
run`` of an experiment file with ``--set`` overrides, and the table they end with."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fleetsim_run(experiment: Path, out: Path, seed: int, sets: list[str], *extra: str) -> None:
    """``fleetsim run experiment --seed S --out out --set ...`` in a subprocess; a failure
    ends the study with one line naming the run and the end of its error output."""
    cmd = [sys.executable, "-m", "simulator.cli", "run", str(experiment), "--seed", str(seed), "--out", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{out.name} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")


def finish(out_root: Path, text: str) -> int:
    """Print the study's table and keep it as ``table.md`` beside its runs."""
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "table.md").write_text(text + "\n")
    print(text)
    return 0


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2`` (an argparse type: a bad value ends with one line and exit 2)."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, not {text!r}") from None
