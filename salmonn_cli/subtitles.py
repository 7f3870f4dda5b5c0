"""Transcript writers (txt, srt, vtt, json), to stdout or to a file written atomically.

A segment is anything with `start`, `end` (seconds) and `text` (e.g. `transcribe.Segment`).
`write_subtitles(..., path)` writes into a temporary file beside `path` and renames it over `path`
only when everything was written: a failure leaves no file (and an existing file untouched).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import IO, Callable, Iterator, Protocol, Sequence

from salmonn_cli.atomic_file import atomic_file
from salmonn_cli.clock import format_timestamp
from salmonn_cli.errors import SalmonnError, quoted

FORMATS = ("txt", "srt", "vtt", "json")
DEFAULT_FORMAT = "txt"
STDOUT_PATH = "-"
TIME_DECIMALS = 3              # json times, in seconds


class TimedText(Protocol):
    start: float
    end: float
    text: str


# --- timestamps and cue text ---------------------------------------------------------------------

def cue_text(text: str) -> str:
    """Text safe inside one cue: no blank line (it would end the cue), no "-->"."""
    text = re.sub(r"\n\s*\n+", "\n", text.strip().replace("\r\n", "\n").replace("\r", "\n"))
    return text.replace("-->", "->")


def vtt_escape(text: str) -> str:
    # WebVTT cue text is markup: a bare & or < would start an entity or a tag
    return text.replace("&", "&amp;").replace("<", "&lt;")


# --- writers -------------------------------------------------------------------------------------

def write_txt(segments: Sequence[TimedText], out: IO[str], metadata: dict | None = None) -> None:
    for segment in segments:
        out.write(segment.text.strip() + "\n")


def write_srt(segments: Sequence[TimedText], out: IO[str], metadata: dict | None = None) -> None:
    for number, segment in enumerate(segments, start=1):
        out.write(f"{number}\n{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}\n"
                  f"{cue_text(segment.text)}\n\n")


def write_vtt(segments: Sequence[TimedText], out: IO[str], metadata: dict | None = None) -> None:
    out.write("WEBVTT\n\n")
    for segment in segments:
        out.write(f"{format_timestamp(segment.start, '.')} --> {format_timestamp(segment.end, '.')}\n"
                  f"{vtt_escape(cue_text(segment.text))}\n\n")


def write_json(segments: Sequence[TimedText], out: IO[str], metadata: dict | None = None) -> None:
    document = dict(metadata or {})
    document["text"] = " ".join(s.text.strip() for s in segments)
    document["segments"] = [{"start": round(s.start, TIME_DECIMALS), "end": round(s.end, TIME_DECIMALS),
                             "text": s.text.strip()} for s in segments]
    json.dump(document, out, ensure_ascii=False, indent=2)
    out.write("\n")


WRITERS: dict[str, Callable[[Sequence[TimedText], IO[str], dict | None], None]] = {
    "txt": write_txt, "srt": write_srt, "vtt": write_vtt, "json": write_json,
}


def check_format(fmt: str) -> str:
    fmt = fmt.lower().lstrip(".")
    if fmt not in WRITERS:
        raise SalmonnError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


# --- output files --------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[IO[str]]:
    """A text stream that becomes `path` when the block ends without error (atomic_file); on error
    `path` is not touched. A symbolic link is written through (the file it points to is replaced, the
    link stays); anything but a regular file is refused."""
    shown = os.fspath(path)
    target = Path(os.path.realpath(path))
    check_replaceable(target, shown)
    if not target.parent.is_dir():
        raise SalmonnError(f"output directory does not exist: {quoted(target.parent)}")
    try:
        # checked again before the rename: the path may have changed while the transcript was being made
        with atomic_file(target, text=True, before_rename=lambda: check_replaceable(target, shown)) as out:
            yield out
    except OSError as e:
        raise SalmonnError(f"cannot write {quoted(shown)}: {e.strerror or e}") from None


def check_replaceable(target: Path, shown: str) -> int | None:
    """The permission bits of the regular file at `target`, None when nothing is there; anything
    else there (a directory, a device, a FIFO, a socket) must never be replaced."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SalmonnError(f"cannot write {quoted(shown)}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SalmonnError(f"output path is a directory: {quoted(shown)}")
    if not stat.S_ISREG(st.st_mode):
        raise SalmonnError(f"refusing to write {quoted(shown)}: it is not a regular file")
    return st.st_mode & 0o7777


def write_subtitles(segments: Sequence[TimedText], fmt: str, path: str | os.PathLike | None = None,
                    metadata: dict | None = None) -> None:
    """Write `segments` as `fmt` to `path` atomically, or to stdout when path is None or "-".
    `metadata` (e.g. `Transcript.metadata()`) goes into json output only."""
    writer = WRITERS[check_format(fmt)]
    if path is None or str(path) == STDOUT_PATH:
        writer(segments, sys.stdout, metadata)
        sys.stdout.flush()
        return
    with atomic_output(path) as out:
        writer(segments, out, metadata)
