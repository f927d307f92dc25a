"""The project's error types: each becomes a one-line message and a non-zero exit in the CLI."""

from __future__ import annotations

from collections.abc import Iterable


class FedMRError(Exception):
    """Base class for every error the CLI reports as ``error: <message>`` without a traceback."""


class ConfigError(FedMRError):
    """A bad config key, value or combination of values."""


class DataError(FedMRError):
    """A data set that is missing, corrupt or unusable."""


class PartitionError(FedMRError):
    """A partition that cannot be built or a partition file that is invalid."""


class CheckpointError(FedMRError):
    """A checkpoint that is missing, corrupt or does not match the run."""


class TrainingError(FedMRError):
    """A run that has stopped learning: no client update accepted for several rounds in a row."""


class PluginError(ConfigError):
    """A user model, data set or algorithm named by import string that cannot be used as one."""


def did_you_mean(word: object, choices: Iterable[str], prefix: str = "") -> str:
    """' (did you mean 'rounds'?)' for a near miss among ``choices`` (named with ``prefix``), else ''."""
    import difflib

    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""
