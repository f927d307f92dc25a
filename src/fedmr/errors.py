"""The project's error types: each becomes a one-line message and a non-zero exit in the CLI."""


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


class PluginError(ConfigError):
    """A user model, data set or algorithm named by import string that cannot be used as one."""
