"""The errors of the merge engine (a bad configuration; bad checkpoints are
:class:`fastmerge.io.CheckpointError`)."""

from __future__ import annotations

from ..io import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "Interrupted"]


class ConfigError(ValueError):
    """A merge configuration fastmerge cannot run; the message names the key (and the
    tensor group or model where there is one) and says what is accepted.

    Example:
        >>> raise ConfigError("cfg.yaml: density: must be in (0, 1], got 1.5")
        Traceback (most recent call last):
        ...
        fastmerge.engine.errors.ConfigError: cfg.yaml: density: must be in (0, 1], got 1.5
    """


class Interrupted(BaseException):
    """The merge was stopped by a signal (SIGTERM, SIGINT); what it had written was
    removed. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    swallows it.

    Example:
        >>> import signal
        >>> Interrupted(signal.SIGTERM).name
        'SIGTERM'
    """

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signum)
        self.signum = int(signum)
        self.name = signal.Signals(signum).name
