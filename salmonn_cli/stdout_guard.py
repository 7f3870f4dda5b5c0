"""Standard output that reports a failed write as the user's problem, in one line.

Answers and transcripts go to stdout; when it cannot take them (a full disk, a read-only file
system, a closed pipe) every later answer would be lost too. A closed pipe (`salmonn ... | head -1`)
is the reader's choice and ends the run quietly; any other failure is an `OutputError`.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, TextIO

from salmonn_cli.errors import OutputError

STDOUT_NAME = "standard output"


class StdoutClosed(Exception):
    """The reader of standard output has gone. Not an OSError: click would turn one with EPIPE
    into a silent exit code 1."""


class GuardedStdout:
    """Wraps a text stream: `write` and `flush` raise StdoutClosed for a closed pipe and
    OutputError for any other OSError; everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def _guarded(self, call: Callable, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise StdoutClosed() from None
        except OSError as e:
            raise OutputError(f"cannot write to {STDOUT_NAME}: {e.strerror or e}") from None

    def write(self, text: str) -> int:
        return self._guarded(self._stream.write, text)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def install() -> None:
    if not isinstance(sys.stdout, GuardedStdout) and sys.stdout is not None:
        sys.stdout = GuardedStdout(sys.stdout)


def discard_unwritten() -> None:
    """Point file descriptor 1 at /dev/null, so that the interpreter's last flush of what could
    not be written does not fail (and print) a second time at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
