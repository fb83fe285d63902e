"""The one way a setting is validated: experiment sections and strategy parameters alike.

A setting is a typed field -- of a frozen dataclass (a config section) or a keyword
parameter of a constructor (a strategy) -- plus, where a type is not enough, a rule that
raises ``ConfigError(key, value, allowed)``. ``build`` and ``call`` check every key of a
TOML table against those fields before anything is constructed:

- an unknown key names the known ones;
- a value of the wrong type names the type (an integer is accepted for a float);
- a rule raised inside the constructor keeps its own words, and its key is prefixed
  with the table's name (``patch_dim`` -> ``strategies.metapatch.patch_dim``).

So every error reads ``config: <section.key> = <value> is invalid: <what is allowed>``.
The config is validated once, in ``simulator.config.from_dict``, before any output
folder exists. (pydantic would do the type part; the rules, with their domain words,
would stay ours, so it would add a dependency and delete little.)
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import sys
import typing
from typing import Any, Callable

from devices.errors import ConfigError

_NONE = type(None)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint`` (int -> float allowed); ``key`` names it."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(hint)
        if value is None and _NONE in args:
            return None
        inner = [a for a in args if a is not _NONE]
        if len(inner) == 1:
            return coerce(key, value, inner[0])
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        inner = typing.get_args(hint)[0]
        return tuple(coerce(key, v, inner) for v in value)
    return value


def _prefixed(exc: ConfigError, section: str, table: dict[str, Any]) -> ConfigError:
    """``exc`` keyed under ``section``, quoting the value as the table gave it (not as coerced)."""
    key = exc.key if exc.key == section or exc.key.startswith(section + ".") else f"{section}.{exc.key}"
    name = key[len(section) + 1:]
    value = table[name] if name in table and table[name] == exc.value else exc.value
    return exc if (key, value) == (exc.key, exc.value) else ConfigError(key, value, exc.allowed)


def build(cls: type, table: Any, section: str) -> Any:
    """A config dataclass ``cls`` from the TOML table of ``section``."""
    if not isinstance(table, dict):
        raise ConfigError(section, table, "a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            raise ConfigError(f"{section}.{key}", table[key], f"unknown key; known keys: {', '.join(names)}")
    kwargs = {k: coerce(f"{section}.{k}", v, hints[k]) for k, v in table.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise _prefixed(exc, section, table) from None


def call(fn: Callable[..., Any], params: dict[str, Any], section: str) -> Any:
    """``fn(**params)`` (a strategy class, say) with ``params`` checked against its keyword
    parameters and their annotations; rules raised inside are re-keyed under ``section``."""
    sig = inspect.signature(fn)
    init = fn.__init__ if isinstance(fn, type) else fn
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 -- an annotation that does not resolve is not checked
        hints = {}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    known = [k for k, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    kwargs = {}
    for key, value in params.items():
        if key not in known and not open_ended:
            raise ConfigError(f"{section}.{key}", value, f"unknown parameter; known: {', '.join(known) or 'none'}")
        kwargs[key] = coerce(f"{section}.{key}", value, hints[key]) if key in hints else value
    try:
        return fn(**kwargs)
    except ConfigError as exc:
        raise _prefixed(exc, section, params) from None


# -- rules shared by many settings ---------------------------------------------------------


def check_fraction(key: str, value: object, allow_zero: bool = False) -> float:
    """A fraction in (0, 1] (or [0, 1])."""
    low_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low_ok(value) and value <= 1):
        raise ConfigError(key, value, f"a number in {'[' if allow_zero else '('}0, 1]")
    return float(value)


def check_positive(key: str, value: object, integer: bool = False) -> float | int:
    """A positive (integer) number."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
        raise ConfigError(key, value, f"a positive {'integer' if integer else 'number'}")
    return value


def check_non_negative(key: str, value: object, integer: bool = False, meaning: str = "") -> float | int:
    """A number (integer) >= 0; ``meaning`` is appended in parentheses."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 <= value < math.inf:
        why = f" ({meaning})" if meaning else ""
        raise ConfigError(key, value, f"{'an integer' if integer else 'a number'} >= 0{why}")
    return value


def check_choice(key: str, value: object, choices: typing.Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ConfigError(key, value, f"one of {', '.join(choices)}")
    return value  # type: ignore[return-value]


# import path ("package.module:NAME") -> source file of its module, for every plug-in
# ``load_object`` resolved in this process (a run records their digest: ``simulator.provenance``)
PLUGIN_FILES: dict[str, str] = {}


def load_object(path: str, key: str, what: str) -> Any:
    """The object an import path ``package.module:NAME`` names -- how a setting names a user
    strategy, backbone or data source. The current directory is importable (as under
    ``python -m``); a path that does not resolve raises ``ConfigError(key, path, ...)``."""
    module_name, _, attr = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not module_name or not attr:
        raise ConfigError(key, path, f"the import path 'package.module:NAME' of {what}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, path, f"cannot import module {module_name!r} ({exc})") from None
    except SyntaxError as exc:  # the user's module (or one it imports) is not valid Python
        raise ConfigError(key, path, f"cannot import module {module_name!r}: SyntaxError at "
                                     f"{exc.filename}:{exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 -- the module's own code raised while it was imported
        first = (str(exc).splitlines() or [""])[0][:300]
        raise ConfigError(key, path, f"cannot import module {module_name!r}: importing it raised "
                                     f"{type(exc).__name__}" + (f": {first}" if first else "")) from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise ConfigError(key, path, f"module {module_name!r} has no {attr!r}")
    if getattr(module, "__file__", None):
        PLUGIN_FILES[path] = module.__file__
    return obj
