"""Files written whole or not at all: into a temporary file beside the target, renamed over it only
when everything was written, so that a crash or an error leaves the old file (or none) in place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

NEW_FILE_MODE = 0o666          # before the umask, as open() would create the file


def new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return NEW_FILE_MODE & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, text: bool = False,
                before_rename: Callable[[], int | None] = lambda: None) -> Iterator[IO]:
    """A binary (or UTF-8 text) stream that becomes `path` when the block ends without error; on error
    the temporary file goes and `path` is not touched. `before_rename` runs last, just before the rename:
    it may refuse by raising, and returns the permission bits the file keeps (None: a new file's)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") if text else os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        mode = before_rename()
        os.chmod(tmp, new_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)     # the rename itself survives a power loss
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
