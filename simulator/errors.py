"""Errors: the user's input (one line, exit code 2) and failures of a strategy.

The input errors and the strategy failures are defined in ``devices.errors`` (data
sources, backbones and strategies raise them) and re-exported here.
"""
from devices.errors import (  # noqa: F401
    ConfigError, DataError, DeviceCodeError, FleetsimError, NonFiniteError, StrategyFailure)


class RayAddressError(FleetsimError):
    """``--ray-address`` names no Ray cluster that answers. ``ray.init`` may still be
    retrying in a helper thread, so the CLI ends the process at once after the line."""

    hard_exit = True


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C (the strategy in flight is marked
    ``interrupted``).

    ``received`` stays set once the signal came, so the exit code is 128 + its number (143,
    129) even if a library (Ray's ``get``) re-raises the interrupt as a plain
    ``KeyboardInterrupt``."""

    received = 0  # the signal's number once one came (SIGTERM 15, SIGHUP 1)


class ResultsWriteError(FleetsimError):
    """Writing into the run folder failed: a full disk, a quota, a file-size limit, a
    read-only or vanished folder (``simulator.writer.writing``). Not the strategy's fault:
    one line, exit 2; every file written before stays whole (each is replaced atomically),
    the strategy in flight is left ``interrupted`` where the summary can still be written,
    and ``--resume`` continues once the folder takes files again. ``cause`` is the
    failed write alone ("cannot write PATH (reason)")."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause or message
