"""Errors caused by the user's input (config, data, CLI arguments).

They live in the lowest layer because data sources, profiles and backbones validate
their own settings; ``simulator.errors`` re-exports them with the run-level failures.
Each is reported by the CLI as one line and exit code 2.
"""


class FleetsimError(Exception):
    """Base of every error caused by the user's input (config, data, CLI arguments)."""


class ConfigError(FleetsimError):
    """An experiment setting is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config: {key} = {value!r} is invalid: {allowed}")


class DataError(FleetsimError):
    """A data file is missing or malformed; the message names the file (and line)."""
