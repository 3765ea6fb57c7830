"""Typed errors for user input and run failures.

Every error here is something a user can fix or must know about. The CLI prints ``str(err)`` on one
line and exits with code 2; the library never calls ``sys.exit``.
"""

from __future__ import annotations


class LmtuneError(Exception):
    """Base class: an error caused by input, configuration or the run itself, not a bug in lmtune."""


class ConfigError(LmtuneError):
    """A flag or config field has an invalid value. The message names the flag.

    ``key`` (``"train.learning_rate"``) and ``detail`` (``"must be > 0, got the number -1"``) are set when one
    field is at fault, so a caller that read the value from a YAML file can name the key instead of the flag.
    """

    def __init__(self, message: str, *, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key = key
        self.detail = detail


class DataError(LmtuneError):
    """A data file cannot be used as given. The message names the file and, where known, line and column."""


class LabelError(DataError):
    """Labels are missing, unknown or unusable (e.g. only one class)."""


class ModelError(LmtuneError):
    """A model cannot be found or loaded."""


class CheckpointError(LmtuneError):
    """A checkpoint is missing, corrupt or does not match the run being resumed."""


class DivergenceError(LmtuneError):
    """The loss became NaN or infinite; the run was stopped before writing a broken model."""


class SearchSpaceError(ConfigError):
    """A search-space declaration is invalid."""


class StudyError(LmtuneError):
    """A study cannot be created, resumed or read."""


class Interrupted(LmtuneError):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was written (exit code 130 on the CLI)."""
