"""Experiment configuration: the only code that reads TOML.

An experiment file has the sections ``[experiment]``, ``[data]``, ``[profiles]``,
``[model]``, ``[cloud]``, ``[device]`` and ``[strategies.<name>]``; each becomes a frozen,
validated dataclass. Each section's dataclass lives beside the code it configures
(``[data]``: its source's module, see ``devices.sources``; ``[profiles]``:
``devices.profiles``; ``[device]``: ``devices.runtime``); the rest are here.

``from_dict`` validates everything once -- every section and every strategy's
parameters -- with one mechanism (``devices.settings``), before the run writes anything:
unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming
``section.key``, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices import settings
from devices.models import ModelSpec
from devices.movielens import LEAVE_LAST_KEYS, PAPER_STRATEGIES, PROTOCOLS, MovieLensConfig  # noqa: F401 (re-exported)
from devices.profiles import ProfileConfig
from devices.runtime import DeviceSettings
from devices.sources import BUILTIN, resolve_source
from devices.synthetic import SyntheticConfig
from simulator.errors import ConfigError, FleetsimError
from simulator.results import strategy_dirname
from strategies.registry import SHORT_NAMES, make_strategy

DEFAULT_STRATEGIES = ("cloud_only", "local_finetune", "fedavg")
# Most host actors a run starts (experiment.hosts): each is a process; a run never starts
# more than it has devices either (devices.pool).
MAX_HOSTS = 1024
DEFAULT_EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.toml"


@dataclass(frozen=True)
class ExperimentSection:
    """``[experiment]``: what to run and how the fleet is coordinated."""

    name: str = "experiment"
    seed: int = 0
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    hosts: int = 0  # 0 = one per CPU Ray sees
    deadline_s: float = 600.0  # per exchange, simulated seconds
    wait_s: float = 300.0  # simulated seconds a strategy waits when too few devices are online
    # an exception in a device function: "stop" the strategy at that round (status failed),
    # or "record" it (errors per round, device status "error") and go on
    on_device_error: str = "stop"
    # a checkpoint (strategy, devices, clock, random streams) after every N rounds, so
    # ``fleetsim run --resume DIR`` continues exactly; 0 = none
    checkpoint_every: int = 1
    keep_checkpoints: bool = False  # keep a finished strategy's last checkpoint
    # whom prequential scoring evaluates each round: "all" devices, or a fixed seeded
    # sample of this many (the same users for every strategy and round)
    eval_users: int | str = "all"
    # a note on stderr when no round of a strategy has finished for this long (then after
    # twice as long, ...): a device function or strategy that never returns; 0 = never
    stall_note_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.strategies:
            raise ConfigError("experiment.strategies", list(self.strategies), "at least one strategy")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError("experiment.strategies", list(self.strategies), "each strategy once")
        for s in self.strategies:
            if s not in SHORT_NAMES and ":" not in s:
                raise ConfigError("experiment.strategies", s,
                                  f"a short name ({', '.join(SHORT_NAMES)}) or an import path 'package.module:Class'")
        folders: dict[str, str] = {}
        for s in self.strategies:  # one results folder each: a shared one would hold one strategy's rows
            other = folders.setdefault(strategy_dirname(s), s)
            if other != s:
                raise ConfigError("experiment.strategies", list(self.strategies),
                                  f"strategies whose results folders differ ({other!r} and {s!r} would both write "
                                  f"to {strategy_dirname(s)}/)")
        if not 0 <= self.seed < 2**63:  # numpy SeedSequence rejects negatives, torch > 64 bits
            raise ConfigError("experiment.seed", self.seed, "an integer in [0, 2**63)")
        if not 0 <= self.hosts <= MAX_HOSTS:
            raise ConfigError("experiment.hosts", self.hosts,
                              f"0 (one per CPU) or a positive integer, at most {MAX_HOSTS}")
        for key in ("deadline_s", "wait_s"):  # inf would make the simulated clock inf, then NaN
            settings.check_positive(f"experiment.{key}", getattr(self, key))
        if isinstance(self.stall_note_s, bool) or not (isinstance(self.stall_note_s, (int, float))
                                                       and 0 <= self.stall_note_s < float("inf")):
            raise ConfigError("experiment.stall_note_s", self.stall_note_s, "seconds: 0 (never) or a positive number")
        if self.checkpoint_every < 0:
            raise ConfigError("experiment.checkpoint_every", self.checkpoint_every,
                              "rounds between checkpoints: 0 (none) or a positive integer")
        if self.eval_users != "all" and (not isinstance(self.eval_users, int) or isinstance(self.eval_users, bool)
                                         or self.eval_users < 1):
            raise ConfigError("experiment.eval_users", self.eval_users, '"all" or a number of users >= 1')
        if self.on_device_error not in ("stop", "record"):
            raise ConfigError("experiment.on_device_error", self.on_device_error, '"stop" or "record"')


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the backbone (gru4rec, din or sasrec; ``devices.models.BACKBONES``)."""

    backbone: str = "gru4rec"
    dim: int = 32
    window: int = 10

    def __post_init__(self) -> None:
        self.spec()  # one set of rules: ModelSpec's

    def spec(self, n_items: int = 1) -> ModelSpec:
        """The ``devices.models.ModelSpec`` of this section (for ``n_items`` items)."""
        return ModelSpec(n_items=n_items, backbone=self.backbone, dim=self.dim, window=self.window)


@dataclass(frozen=True)
class CloudConfig:
    """``[cloud]``: training of the cloud model on history data (shared by all strategies)."""

    epochs: int = 3  # 0 = devices start from an untrained model
    lr: float = 0.005
    batch_size: int = 512
    negatives: int = 4

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError("cloud.epochs", self.epochs, "0 (install an untrained model) or a positive integer")
        for key in ("batch_size", "negatives"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"cloud.{key}", getattr(self, key), "a positive integer")
        if not 0 < self.lr < float("inf"):
            raise ConfigError("cloud.lr", self.lr, "a positive number")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one fleet, one or more strategies."""

    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    data: Any = field(default_factory=SyntheticConfig)  # the config of its data source (devices.sources)
    profiles: ProfileConfig = field(default_factory=ProfileConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_source: str | None = field(default=None, compare=False)  # [data] source; None: the built-in one of ``data``

    @property
    def source(self) -> str:
        if self.data_source is not None:
            return self.data_source
        return next(name for name, s in BUILTIN.items() if isinstance(self.data, s.config))

    def to_toml(self) -> str:
        """The resolved configuration as TOML (every default spelled out)."""
        out = []
        for name in ("experiment", "data", "profiles", "model", "cloud", "device"):
            table = dataclasses.asdict(getattr(self, name))
            if name == "data":
                table = {"source": self.source, **table}
                if table.get("protocol") == "fleet":  # the defaults: fleet runs' config.toml as before the keys existed
                    for key in ("protocol", *LEAVE_LAST_KEYS):
                        del table[key]
            out.append(f"[{name}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
            out.append("")
        for sname, params in self.strategies.items():
            out.append(f'[strategies."{sname}"]' if not sname.isidentifier() else f"[strategies.{sname}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in params.items()]
            out.append("")
        return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ``ExperimentConfig`` from parsed TOML."""
    known = {"experiment", "data", "profiles", "model", "cloud", "device", "strategies"}
    for key in raw:
        if key not in known:
            raise ConfigError(key, "...", f"unknown section; known sections: {', '.join(sorted(known))}")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise ConfigError("data", data, "a table")
    data = dict(data)
    source = resolve_source(data.pop("source", "synthetic"))
    data_cfg = settings.build(source.config, data, "data")
    strategies = raw.get("strategies", {})
    if not isinstance(strategies, dict) or not all(isinstance(v, dict) for v in strategies.values()):
        raise ConfigError("strategies", strategies, "tables [strategies.<name>] of strategy parameters")
    exp = settings.build(ExperimentSection, raw.get("experiment", {}), "experiment")
    for sname in strategies:
        # Tables of built-in strategies not run this time are kept (narrowing a run with
        # --set experiment.strategies=[...] must not fail); any other name is a typo.
        if sname not in exp.strategies and sname not in SHORT_NAMES:
            raise ConfigError(f"strategies.{sname}", "...", f"parameters for a strategy not in experiment.strategies {list(exp.strategies)}")
    model = settings.build(ModelConfig, raw.get("model", {}), "model")
    for sname in dict.fromkeys([*exp.strategies, *strategies]):  # every strategy's parameters, checked once
        strategy = make_strategy(sname, strategies.get(sname, {}))
        if hasattr(strategy, "check_model"):  # and what it needs of the model (FleetMixin.check_model)
            strategy.check_model(model.spec())
    if getattr(data_cfg, "protocol", "fleet") == "leave_last" and not set(exp.strategies) <= set(PAPER_STRATEGIES):
        raise ConfigError("experiment.strategies", list(exp.strategies),
                          f'with data.protocol = "leave_last", some of {list(PAPER_STRATEGIES)} (base, finetune, duet)')
    return ExperimentConfig(
        experiment=exp,
        data=data_cfg,
        profiles=settings.build(ProfileConfig, raw.get("profiles", {}), "profiles"),
        model=model,
        cloud=settings.build(CloudConfig, raw.get("cloud", {}), "cloud"),
        device=settings.build(DeviceSettings, raw.get("device", {}), "device"),
        strategies={k: dict(v) for k, v in strategies.items()},
        data_source=source.name,
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is TOML, else a bare string.

    The path is a TOML dotted key, so a quoted part may hold dots and colons
    (``strategies."pkg.mod:Cls".lr=0.1``); a path that is not one is split on its dots."""
    if "=" not in text:
        raise FleetsimError(f"--set {text!r}: expected section.key=value")
    path, _, value = text.partition("=")
    keys = _dotted_key(path)
    if len(keys) < 2 or not all(keys):
        raise FleetsimError(f"--set {text!r}: expected section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return keys, parsed


def _dotted_key(path: str) -> list[str]:
    """The parts of a dotted key as TOML reads it (quotes removed), else split on dots."""
    try:
        node = tomllib.loads(f"{path.strip()} = 0")
    except tomllib.TOMLDecodeError:
        return [k.strip() for k in path.strip().split(".")]
    keys = []
    while isinstance(node, dict) and len(node) == 1:
        (key, node), = node.items()
        keys.append(key)
    return keys


def load(path: str | Path | None = None, overrides: list[str] = (), seed: int | None = None) -> ExperimentConfig:
    """Read an experiment file (default: the quickstart), apply ``--set`` and ``--seed``."""
    p = Path(path) if path else DEFAULT_EXPERIMENT
    if p.exists() and not p.is_file() and not p.is_dir():  # a FIFO or a device: reading it could wait forever
        raise FleetsimError(f"{p}: not a regular file (a pipe or a device?); give the experiment's TOML file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM (some Windows editors) is not TOML's
    except FileNotFoundError:
        raise FleetsimError(f"experiment file not found: {p}") from None
    except IsADirectoryError:
        raise FleetsimError(f"experiment file is a directory: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetsimError(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise FleetsimError(f"{p}: not a text file") from None
    if not raw:  # a file emptied or cut to its comments by mistake would run other settings unnoticed
        raise FleetsimError(f"{p}: sets nothing (empty, or only comments); write the experiment's settings in it "
                            f"(see {DEFAULT_EXPERIMENT.name}), or leave the file out to run the quickstart")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise FleetsimError(f"--set {text!r}: {k} is not a section")
        node[keys[-1]] = value
    if seed is not None:
        exp = raw.setdefault("experiment", {})
        if not isinstance(exp, dict):
            raise ConfigError("experiment", exp, "a table")
        exp["seed"] = seed
    return from_dict(raw)
