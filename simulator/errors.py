"""Errors: the user's input (one line, exit code 2) and failures of a strategy.

``FleetsimError``, ``ConfigError`` and ``DataError`` are defined in ``devices.errors``
(data sources and backbones raise them) and re-exported here.
"""
from devices.errors import ConfigError, DataError, FleetsimError  # noqa: F401


class RayAddressError(FleetsimError):
    """``--ray-address`` names no Ray cluster that answers. ``ray.init`` may still be
    retrying in a helper thread, so the CLI ends the process at once after the line."""

    hard_exit = True


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C (the strategy in flight is marked ``interrupted``)."""


class StrategyFailure(Exception):
    """A strategy cannot go on; the run records it as ``failed`` and runs the next one.

    Not a ``FleetsimError``: the input was valid, the strategy (its code or its numbers)
    failed. ``info`` is what ``summary.json`` records under the strategy's ``error``.
    """

    kind = "failure"

    def __init__(self, message: str, *, round: int | None = None, stage: str | None = None,
                 error_type: str | None = None, detail: str | None = None, message_type: str | None = None,
                 devices: int | None = None, setting: str | None = None, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback
        self.info = {k: v for k, v in dict(kind=self.kind, round=round, stage=stage, message_type=message_type,
                                            devices=devices, error_type=error_type, message=detail or message,
                                            setting=setting).items() if v is not None}


class DeviceCodeError(StrategyFailure):
    """A device function raised (``experiment.on_device_error = "stop"``)."""

    kind = "device code error"

    def __init__(self, first, devices: int) -> None:
        super().__init__(
            f"round {first.round}: device function for {first.message_type!r} raised {first.error_type}: {first.message} "
            f"({devices} device(s))",
            round=first.round, stage="device function", message_type=first.message_type, devices=devices,
            error_type=first.error_type, detail=first.message, traceback=first.traceback)


class NonFiniteError(StrategyFailure):
    """Training reached NaN/Inf: every device reply of a round, or a cloud-side loss."""

    kind = "non-finite"

    def __init__(self, stage: str, setting: str, detail: str, *, round: int | None = None) -> None:
        super().__init__(f"{stage}: {detail}; look at {setting}", round=round, stage=stage, setting=setting,
                         detail=detail)
