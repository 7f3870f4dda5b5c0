"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SalmonnError(Exception):
    """A problem the user can fix (bad file, bad model directory, bad option)."""

    exit_code = 2


class AudioError(SalmonnError):
    """The audio file cannot be read or holds no usable samples."""


class ModelError(SalmonnError):
    """The model directory is missing, incomplete, corrupted or of an unknown format."""
