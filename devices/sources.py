"""The data sources a ``[data]`` table can name with ``source``.

Built-in: ``synthetic`` (``devices.synthetic``, the default) and ``movielens``
(``devices.movielens``); each module defines its config beside its loader and exports a
``SOURCE`` (``devices.data.DataSource``). Any other source is named by the import path
of its ``DataSource``: ``source = "package.module:NAME"`` (docs/extending.md).
"""
from __future__ import annotations

from devices import movielens, synthetic
from devices.data import DataSource
from devices.errors import ConfigError
from devices.settings import load_object

BUILTIN = {s.name: s for s in (synthetic.SOURCE, movielens.SOURCE)}


def resolve_source(name: object) -> DataSource:
    """The ``DataSource`` of a ``source`` value: a built-in name or ``package.module:NAME``."""
    if isinstance(name, str) and name in BUILTIN:
        return BUILTIN[name]
    if not isinstance(name, str) or ":" not in name:
        raise ConfigError("data.source", name,
                          f"{' or '.join(BUILTIN)}, or the import path 'package.module:NAME' of a DataSource")
    source = load_object(name, "data.source", "a DataSource")
    if not isinstance(source, DataSource):
        raise ConfigError("data.source", name, f"{name} is not a devices.data.DataSource")
    return DataSource(name, source.config, source.load, source.reads_files)  # named as the experiment names it
