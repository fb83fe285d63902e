"""The data sources a ``[data]`` table can name with ``source``.

Built-in: ``synthetic`` (``devices.synthetic``, the default) and ``movielens``
(``devices.movielens``); each module defines its config beside its loader and exports a
``SOURCE`` (``devices.data.DataSource``). Any other source is named by the import path
of its ``DataSource``: ``source = "package.module:NAME"`` (docs/extending.md).
"""
from __future__ import annotations

import importlib
import os
import sys

from devices import movielens, synthetic
from devices.data import DataSource
from devices.errors import ConfigError

BUILTIN = {s.name: s for s in (synthetic.SOURCE, movielens.SOURCE)}


def resolve_source(name: object) -> DataSource:
    """The ``DataSource`` of a ``source`` value: a built-in name or ``package.module:NAME``."""
    if isinstance(name, str) and name in BUILTIN:
        return BUILTIN[name]
    allowed = f"{' or '.join(BUILTIN)}, or the import path 'package.module:NAME' of a DataSource"
    if not isinstance(name, str) or ":" not in name:
        raise ConfigError("data.source", name, allowed)
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path:  # user sources next to the experiment, as `python -m` would
        sys.path.insert(0, os.getcwd())
    try:
        source = getattr(importlib.import_module(module_name), attr, None)
    except ImportError as exc:
        raise ConfigError("data.source", name, f"cannot import module {module_name!r} ({exc})") from None
    if not isinstance(source, DataSource):
        raise ConfigError("data.source", name, f"module {module_name!r} has no DataSource {attr!r}")
    return DataSource(name, source.config, source.load)  # named as the experiment names it
