"""The exception types the CLI turns into a one-line message and a non-zero exit, and how those
messages name the user's files."""
from __future__ import annotations

import os

# Set (to anything) for tracebacks and native libraries' own diagnostics instead of one-line errors.
DEBUG_ENV = "SALMONN_DEBUG"
INTERRUPTED = 130   # exit code after Ctrl-C, as shells report SIGINT


class SalmonnError(Exception):
    """A problem the user can fix (bad file, bad model directory, bad option)."""

    exit_code = 2


class AudioError(SalmonnError):
    """The audio file cannot be read or holds no usable samples."""


class ModelError(SalmonnError):
    """The model directory is missing, incomplete, corrupted or of an unknown format."""


class OutputError(SalmonnError):
    """Standard output cannot be written (full disk, closed pipe, ...): every later answer would be
    lost too, so the whole run ends instead of going on to the next input."""


class ReportedError(SalmonnError):
    """A failure that a program of our own, run as a child process, has already reported in its one
    line on stderr: only its exit code is left to pass on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def quoted(name: str | os.PathLike) -> str:
    """A file name as messages show it: quoted and escaped like a Python string, so a newline or
    a control character in the name cannot split or garble the message's one line."""
    return repr(os.fspath(name))
