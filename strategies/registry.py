"""The strategy registry: the built-in strategies by short name, and how a name in
``experiment.strategies`` becomes a checked strategy object.

A built-in strategy registers itself (``class X(FleetStrategy, short_name="x",
colour=...)``, see ``strategies.base``); the registry imports every module of this
package once to collect them, so adding a strategy touches only its own file. Any other
strategy is named by import path ``package.module:Class``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from flwr.serverapp.strategy import Strategy

import strategies
from devices import settings
from devices.errors import ConfigError, FleetsimError
from devices.runtime import DeviceApp
from strategies.base import COLOURS, REGISTERED


def _discover() -> None:
    for mod in pkgutil.iter_modules(strategies.__path__):
        importlib.import_module(f"strategies.{mod.name}")


_discover()
# Short name -> "module:Class", in the order modules define them (sorted by module name).
SHORT_NAMES = {name: f"{cls.__module__}:{cls.__qualname__}" for name, cls in REGISTERED.items()}
# Short name -> the colour that strategy keeps in every report figure.
STRATEGY_COLOURS = dict(COLOURS)


def resolve_strategy(name: str) -> type:
    """A strategy class from a short name or an import path ``package.module:Class``."""
    return settings.load_object(SHORT_NAMES.get(name, name), "experiment.strategies", "a strategy class")


def make_strategy(name: str, params: dict[str, Any]) -> Strategy:
    """Instantiate and check a strategy: a Flower ``Strategy`` with a ``device_app``."""
    cls = resolve_strategy(name)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError("experiment.strategies", name, "a subclass of flwr.serverapp.strategy.Strategy")
    try:  # one validation mechanism for sections and parameters (devices.settings)
        strategy = settings.call(cls, params, f"strategies.{name}")
    except FleetsimError:  # a ConfigError of a parameter, or the plug-in's own one-line error
        raise
    except (TypeError, ValueError) as exc:  # a parameter without a default; a plain Flower strategy's own check
        raise ConfigError(f"strategies.{name}", params, str(exc).splitlines()[0] if str(exc) else "TypeError") from None
    except Exception as exc:  # noqa: BLE001 -- a plug-in's constructor: one line, not a traceback
        first = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"strategies.{name}", params, f"its constructor raised {type(exc).__name__}: {first}") from None
    if not isinstance(getattr(strategy, "device_app", None), DeviceApp):
        raise ConfigError("experiment.strategies", name, "a strategy with a device_app (devices.runtime.DeviceApp)")
    return strategy
