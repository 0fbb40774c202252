"""Errors raised at the package boundary. Each message says what was wrong and what to do."""


class MobileDiffusionError(ValueError):
    """Base class: bad input that the user can fix (the CLI prints it as one line)."""


class CheckpointError(MobileDiffusionError):
    """A file or folder that cannot be read as a supported checkpoint."""


class ConfigError(MobileDiffusionError):
    """A configuration or argument that the model cannot use."""
