"""Where `salmonn transcribe -o` writes, decided before any audio is decoded.

The rules (README, section "-o"): an output never replaces one of the inputs, nor anything that is
not a regular file (a device, a FIFO, a socket, a directory); a symbolic link is written through,
not replaced. An existing regular file is replaced (atomically) only when its name ends in a
transcript extension (.txt, .srt, .vtt, .json), as subtitle tools replace their own outputs;
any other existing file is refused. `-o DIR/` (trailing slash) or an existing directory writes
NAME.FORMAT for each input into it; two inputs that would get the same name are refused.
"""
from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from salmonn_cli.errors import SalmonnError, quoted
from salmonn_cli.subtitles import DEFAULT_FORMAT, FORMATS, STDOUT_PATH, check_format

STDIN = "-"
STDIN_STEM = "stdin"           # `-o DIR/` names standard input's transcript stdin.FORMAT
TRANSCRIPT_SUFFIXES = tuple(f".{f}" for f in FORMATS)


@dataclass
class OutputPlan:
    format: str
    targets: list[Path | None]   # one per input, in order; None = standard output


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def format_from_suffix(path: str, fmt: str | None) -> str:
    """--format if given, else the one the extension names (none: txt); any other extension is
    refused, so `-o talk.wav` cannot silently become a text file."""
    if fmt:
        return check_format(fmt)
    suffix = Path(path).suffix.lower()
    if not suffix:
        return DEFAULT_FORMAT
    if suffix not in TRANSCRIPT_SUFFIXES:
        raise SalmonnError(f"cannot tell the output format from {suffix!r} in {quoted(path)}: "
                           f"use one of {', '.join(TRANSCRIPT_SUFFIXES)} or give --format")
    return suffix[1:]


def is_directory_target(output: str) -> bool:
    return output.endswith(os.sep) or os.path.isdir(output)


def stem_of(name: str) -> str:
    return STDIN_STEM if name == STDIN else Path(name).stem


def input_identities(inputs: list[str]) -> dict[tuple[int, int] | str, str]:
    """Each input file by (device, inode) when it exists (so hard links and symlinks match too),
    else by its resolved path; standard input has no file to protect."""
    known: dict[tuple[int, int] | str, str] = {}
    for name in inputs:
        if name == STDIN:
            continue
        try:
            st = os.stat(name)
            known[(st.st_dev, st.st_ino)] = name
        except OSError:
            known[os.path.realpath(name)] = name
    return known


def check_target(path: Path, inputs: dict, shown: str) -> Path:
    """The file `shown` resolves to (symbolic links followed), if writing there loses nothing."""
    resolved = Path(os.path.realpath(path))
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise SalmonnError(f"cannot write {quoted(shown)}: {e.strerror or e}") from None
    if st is None:
        if str(resolved) in inputs:
            raise SalmonnError(f"refusing to write {quoted(shown)}: it is the input {quoted(inputs[str(resolved)])}")
    else:
        if not stat.S_ISREG(st.st_mode):
            raise SalmonnError(f"refusing to write {quoted(shown)}: it is {kind_of(st.st_mode)}, not a regular file")
        if (st.st_dev, st.st_ino) in inputs:
            raise SalmonnError(f"refusing to write {quoted(shown)}: it is the input "
                               f"{quoted(inputs[(st.st_dev, st.st_ino)])}")
        if resolved.suffix.lower() not in TRANSCRIPT_SUFFIXES:
            raise SalmonnError(f"refusing to replace {quoted(shown)}: it exists and is not a transcript "
                               f"({', '.join(TRANSCRIPT_SUFFIXES)}); remove it or choose another name")
    parent = resolved.parent
    if not parent.is_dir():
        raise SalmonnError(f"output directory does not exist: {quoted(parent)}")
    probe_writable(parent, resolved.name, shown)
    return resolved


def probe_writable(directory: Path, name: str, shown: str) -> None:
    """Create and remove the kind of temporary file the atomic write will use, so that a
    read-only, full or forbidden directory is reported now, not after the audio is decoded."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as e:
        raise SalmonnError(f"cannot write {quoted(shown)}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def plan_outputs(inputs: list[str], output: str | None, fmt: str | None) -> OutputPlan:
    """Check `-o` against the inputs and return where each input's transcript goes."""
    if output is None or output == STDOUT_PATH:
        return OutputPlan(check_format(fmt) if fmt else DEFAULT_FORMAT, [None] * len(inputs))
    if not output:
        raise SalmonnError("the output path (-o) is empty")
    identities = input_identities(inputs)
    if is_directory_target(output):
        directory = Path(output)
        if not directory.is_dir():
            what = "does not exist" if not os.path.lexists(output) else "is not a directory"
            raise SalmonnError(f"output directory {quoted(output)} {what}")
        fmt = check_format(fmt) if fmt else DEFAULT_FORMAT
        targets: list[Path | None] = []
        claimed: dict[Path, str] = {}
        for name in inputs:
            shown = os.path.join(output, f"{stem_of(name)}.{fmt}")
            target = check_target(directory / f"{stem_of(name)}.{fmt}", identities, shown)
            if target in claimed:
                raise SalmonnError(f"{quoted(claimed[target])} and {quoted(name)} would both be written to "
                                   f"{quoted(shown)}; transcribe them into different directories")
            claimed[target] = name
            targets.append(target)
        return OutputPlan(fmt, targets)
    if len(inputs) > 1:
        raise SalmonnError(f"with several files, -o must be a directory (an existing one, or a path "
                           f"ending in /), not {quoted(output)}")
    fmt = format_from_suffix(output, fmt)
    return OutputPlan(fmt, [check_target(Path(output), identities, output)])
