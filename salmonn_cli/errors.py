"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

# Set (to anything) for tracebacks and native libraries' own diagnostics instead of one-line errors.
DEBUG_ENV = "SALMONN_DEBUG"


class SalmonnError(Exception):
    """A problem the user can fix (bad file, bad model directory, bad option)."""

    exit_code = 2


class AudioError(SalmonnError):
    """The audio file cannot be read or holds no usable samples."""


class ModelError(SalmonnError):
    """The model directory is missing, incomplete, corrupted or of an unknown format."""
