"""Errors: the user's input, and a strategy's failures.

``FleetsimError`` and its subclasses are caused by the user's input (config, data, CLI
arguments); the CLI reports each as one line and exit code 2. ``StrategyFailure`` and its
subclasses end one strategy of a valid run (its code raised, or its numbers went
non-finite); the run records it as ``failed`` and goes on.

They live in the lowest layer because data sources, profiles, backbones and strategies
raise them; ``simulator.errors`` re-exports them with the run-level errors.
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

    def __init__(self, first, devices: int, note: str = "") -> None:
        """``first``: the first call that raised (a ``CodeError``); ``devices``: how many
        devices' calls raised in the exchange; ``note``: said after the line's facts."""
        ids = list(getattr(first, "device_ids", ()))[:3]
        if not ids:  # a device unknown (an error reply of Flower's names a node in its message)
            where = "" if devices == 1 else f" ({devices} devices)"
        elif devices == 1:
            where = f" (device {ids[0]})"
        else:
            more = devices - len(ids)
            where = f" ({devices} devices: {', '.join(map(str, ids))}" + (f" and {more} more)" if more > 0 else ")")
        super().__init__(
            f"round {first.round}: device function for {first.message_type!r} raised {first.error_type}: {first.message}"
            f"{where}{note}",
            round=first.round, stage="device function", message_type=first.message_type, devices=devices,
            error_type=first.error_type, detail=first.message, traceback=first.traceback)


class NonFiniteError(StrategyFailure):
    """Training reached NaN/Inf: every device reply of a round, or a cloud-side loss."""

    kind = "non-finite"

    def __init__(self, stage: str, setting: str, detail: str, *, round: int | None = None) -> None:
        super().__init__(f"{stage}: {detail}; look at {setting}", round=round, stage=stage, setting=setting,
                         detail=detail)


class HostLost(StrategyFailure):
    """A device host process died ``deaths`` times within one round (each time it was
    restarted and caught up): something in that round kills it, so the strategy stops."""

    kind = "device host lost"

    def __init__(self, host: int, round: int | None, deaths: int, cause: BaseException, traceback: str = "") -> None:
        where = f"round {round}: device host {host} died {deaths} times in this round" if round else \
            f"device host {host} died {deaths} times between rounds"
        first = (str(cause).splitlines() or [""])[0][:300]
        super().__init__(f"{where} ({type(cause).__name__}); the strategy stops", round=round or None,
                         stage="device host", error_type=type(cause).__name__, detail=first, traceback=traceback)
        self.host, self.deaths = host, deaths
