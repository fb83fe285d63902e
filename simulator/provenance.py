"""What a run's results came from, recorded in ``summary.json`` and checked on ``--resume``.

A comparison is only as good as the claim that every strategy in it saw the same devices
through the same code. ``record`` writes, when a run starts:

- ``data_sha256``: the users' interaction streams as built (items, times, per-user cuts,
  original ids) and the round cut. It changes when a data file is edited, whatever the
  source (MovieLens, a plug-in source, the synthetic generator's code);
- ``profiles_sha256``: the devices' hardware profiles and activity buckets;
- ``code_sha256``: the source files of fleetsim's packages (``simulator``, ``devices``,
  ``strategies``) and the module of every plug-in the config names by import path
  (``devices.settings.PLUGIN_FILES``; the modules those import are not followed);
- ``environment``: fleetsim's, Python's, numpy's, torch's, Flower's and Ray's versions,
  the platform and the driver's CPU model (on another CPU model torch may pick other float
  kernels: the README's "The cloud model").

``--resume`` builds the fleet again and compares (``check_resume``) before anything in the
folder changes: other data or profiles are refused (the run's finished strategies saw
other devices, so nothing could be compared); other code or environment are refused
unless the user accepts it (``fleetsim run --resume DIR --allow-code-change``). Every
resume is appended to ``provenance.resumes`` with what differed, and the report's "Runs"
table shows it. ``fleet_id`` gives the report the data digest, so two runs are paired user
by user only if they saw the same interactions.
"""
from __future__ import annotations

import hashlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from devices.errors import FleetsimError

PACKAGES = ("simulator", "devices", "strategies")
_code_cache: dict[tuple, str] = {}


class ProvenanceError(FleetsimError):
    """``--resume`` of a run whose data, code or environment changed (one line, exit 2)."""


def _update(h: Any, *arrays: Any) -> None:
    for a in arrays:
        if a is None:
            h.update(b"-")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")


def data_digest(fleet: Any) -> str:
    """SHA-256 of the users' streams and the round cut (0.2 s per 30 M interactions)."""
    inter, tl = fleet.interactions, fleet.timeline
    h = hashlib.sha256(f"{inter.n_users} {inter.n_items} {tl.history_end!r} {tl.round_seconds!r} {tl.n_rounds} "
                       f"{tl.start_clock!r}".encode())
    _update(h, inter.indptr, inter.items, inter.times, inter.user_ids, inter.item_ids)
    return h.hexdigest()


def profiles_digest(fleet: Any) -> str:
    """SHA-256 of the devices' hardware profiles and activity buckets."""
    p = fleet.profiles
    h = hashlib.sha256()
    _update(h, p.tier, *(getattr(p, k) for k in p._FLOAT_FIELDS), p.device_id, np.asarray(fleet.buckets, dtype=str))
    return h.hexdigest()


def _source_files(config_text: str) -> list[tuple[str, Path]]:
    import importlib

    from devices.settings import PLUGIN_FILES

    files = []
    for pkg in PACKAGES:
        root = Path(importlib.import_module(pkg).__file__).resolve().parent
        files += [(f"{pkg}/{p.relative_to(root).as_posix()}", p) for p in sorted(root.rglob("*.py"))]
    files += [(f"plug-in {ref}", Path(path)) for ref, path in sorted(PLUGIN_FILES.items()) if ref in config_text]
    return files


def code_digest(config_text: str = "") -> str:
    """SHA-256 over fleetsim's source files and the modules of the plug-ins named in
    ``config_text`` (the run's ``config.toml``), each file's name and bytes; about 10 ms,
    cached per file set and modification time."""
    files = _source_files(config_text)
    key = tuple((name, p.stat().st_mtime_ns, p.stat().st_size) for name, p in files if p.is_file())
    if key not in _code_cache:
        h = hashlib.sha256()
        for name, p in files:
            h.update(name.encode() + b"\0")
            h.update(p.read_bytes() if p.is_file() else b"(missing)")
            h.update(b"\0")
        _code_cache.clear()
        _code_cache[key] = h.hexdigest()
    return _code_cache[key]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """Versions of fleetsim and the libraries its numbers depend on, platform and CPU."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("fleetsim", "numpy", "torch", "flwr", "ray"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    out["platform"] = f"{sys.platform} {platform.machine()}"
    out["cpu"] = _cpu_model()
    return out


def record(fleet: Any | None, config_text: str) -> dict[str, Any]:
    """The provenance of a run of ``config_text`` starting now (``fleet`` None: no data
    digests)."""
    out: dict[str, Any] = {}
    if fleet is not None:
        out["data_sha256"] = data_digest(fleet)
        out["profiles_sha256"] = profiles_digest(fleet)
    out.update(code_sha256=code_digest(config_text), environment=environment(), resumes=[])
    return out


def _short(digest: Any) -> str:
    return str(digest)[:12]


def check_resume(where: str, saved: dict[str, Any] | None, fleet: Any, config_text: str,
                 allow_code_change: bool) -> dict[str, Any] | None:
    """Compare the run's recorded provenance with this process's; return the entry to
    append to ``resumes`` (None for a run that recorded none: written before provenance
    existed). Raises ``ProvenanceError`` (nothing changed yet) for other data or profiles,
    and for other code or environment unless ``allow_code_change``."""
    if not isinstance(saved, dict):
        return None
    now = record(fleet, config_text)
    for key, what, why in (("data_sha256", "the devices' interaction data",
                            "a data file edited, or a relative data.path read from another directory?"),
                           ("profiles_sha256", "the devices' profiles", "the code that draws them changed?")):
        if saved.get(key) is not None and saved[key] != now.get(key):
            raise ProvenanceError(
                f"{where}: {what} differ from the run's start (digest {_short(saved[key])}, now {_short(now.get(key))}; "
                f"{why}), so its written rounds would not compare with the rest: restore what changed, or run the "
                f"config into a new --out")
    changes = []
    if saved.get("code_sha256") not in (None, now["code_sha256"]):
        changes.append(f"fleetsim's code or a plug-in module (sources {_short(saved['code_sha256'])} -> "
                       f"{_short(now['code_sha256'])})")
    env = saved.get("environment") or {}
    changes += [f"{k} {env[k]} -> {v}" for k, v in now["environment"].items() if k in env and env[k] != v]
    if changes and not allow_code_change:
        raise ProvenanceError(
            f"{where}: the run started under other code or environment ({'; '.join(changes)}), and the rounds it "
            f"has written came from there: run the config into a new --out, or add --allow-code-change to go on "
            f"with the change recorded in summary.json and the report")
    return {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code_sha256": now["code_sha256"],
            "environment": now["environment"], "changes": changes}


def fleet_id(summary: dict[str, Any]) -> str | None:
    """The data digest a run recorded (None if it recorded none)."""
    prov = summary.get("provenance")
    return prov.get("data_sha256") if isinstance(prov, dict) else None


def describe(summary: dict[str, Any]) -> str:
    """One cell for the report: code digest, versions, resumes and what changed at them."""
    prov = summary.get("provenance")
    if not isinstance(prov, dict):
        return "not recorded"
    env = prov.get("environment") or {}
    text = f"code {_short(prov.get('code_sha256'))}; " + ", ".join(
        f"{k} {env[k]}" for k in ("fleetsim", "torch", "flwr", "numpy") if k in env)
    resumes = prov.get("resumes") or []
    if resumes:
        changed = [c for r in resumes for c in r.get("changes", [])]
        text += f"; resumed {len(resumes)}x" + (f", CHANGED: {'; '.join(changed)}" if changed else ", nothing changed")
    return text
