"""Layers point one way, simulator -> strategies -> devices: ``devices/`` (the fleet)
imports nothing of ``simulator/`` (the coordinator) or ``strategies/``, ``strategies/``
imports nothing of ``simulator/`` and never touches Ray (only the host pool does), and the
project's modules import each other without a circle (imports inside functions count)."""
from __future__ import annotations

import ast
from pathlib import Path

import strategies

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("simulator", "devices", "strategies")


def sources(pkg: str) -> list[tuple[str, Path]]:
    """(module name, file) of every source file of a package, subpackages included."""
    out = []
    for f in sorted((ROOT / pkg).rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), f))
    return out


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function bodies included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module.split(".")[0] in PACKAGES:  # from simulator import metrics: maybe a module
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def graph() -> dict[str, set[str]]:
    g = {name: {m for m in imports(f) if m.split(".")[0] in PACKAGES} for pkg in PACKAGES for name, f in sources(pkg)}
    # edges to modules only; a package importing its own submodules is not a circle
    return {name: {m for m in deps if m in g and m != name} for name, deps in g.items()}


def test_devices_import_nothing_from_simulator_or_strategies():
    bad = {f.name: sorted(m for m in imports(f) if m.split(".")[0] in ("simulator", "strategies"))
           for _, f in sources("devices")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_strategies_import_only_devices_never_simulator():
    """Layers point one way: simulator -> strategies -> devices."""
    bad = {f.name: sorted(m for m in imports(f) if m.split(".")[0] == "simulator") for _, f in sources("strategies")}
    assert {k: v for k, v in bad.items() if v} == {}
    assert "devices.models" in imports(Path(strategies.__file__).with_name("cloud.py"))  # the scan reads them


def test_strategies_never_import_ray():
    bad = {f.name: sorted(m for m in imports(f) if m.split(".")[0] == "ray") for _, f in sources("strategies")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_import_circle():
    g = graph()
    assert {"devices.host", "simulator.run", "devices.backbones.din"} <= set(g)  # the scan sees the project
    circles = []
    for start in g:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in g.get(node, ()):
                if dep == start:
                    circles.append(" -> ".join(path + [start]))
                elif dep in g and dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
    assert circles == []


def test_the_scan_finds_an_import_inside_a_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from simulator.run import make_strategy\n    import ray\n")
    assert {"simulator.run", "ray"} <= imports(f)


def test_builtin_strategies_register_themselves_with_a_colour():
    """A built-in strategy is one file: its class registers its short name and colour."""
    from strategies.base import REGISTERED, FleetMixin
    from strategies.registry import SHORT_NAMES, STRATEGY_COLOURS, resolve_strategy

    expected = {"cloud_only", "local_finetune", "fedavg", "duet", "metapatch", "momodistill"}
    assert set(SHORT_NAMES) == set(STRATEGY_COLOURS) == expected
    assert len(set(STRATEGY_COLOURS.values())) == len(expected)  # one colour each
    for name in expected:
        cls = resolve_strategy(name)
        assert cls is REGISTERED[name] and issubclass(cls, FleetMixin) and cls.short_name == name


def test_a_second_class_cannot_take_a_registered_short_name():
    import pytest

    from strategies.base import FleetStrategy

    with pytest.raises(TypeError, match="'fedavg' is taken by FedAvg"):
        class Impostor(FleetStrategy, short_name="fedavg"):  # noqa: F841
            def configure_train(self, server_round, arrays, config, grid):
                return []

            def aggregate_train(self, server_round, replies):
                return None, None
