"""The project's user-facing error types.

Front ends (CLI, napari widgets, MONAI bundle) catch :class:`StrainerError` and show its
message as one line; anything else is a bug.
"""


class StrainerError(Exception):
    """Base class of every error a user can cause."""


class BadInputError(StrainerError):
    """An input file or folder cannot be read as a scan (message names the path)."""


class CheckpointError(StrainerError):
    """An encoder checkpoint is missing, truncated, tampered with or does not match."""


class BadArgumentError(StrainerError):
    """A parameter value is out of range or inconsistent with the inputs."""


class OutputExistsError(StrainerError):
    """An output would overwrite an existing file (or an input)."""
