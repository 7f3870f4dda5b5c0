"""One audio input opened exactly once: a file, standard input (`-`), a FIFO or a process
substitution (`<(...)`), read as blocks of channel 0.

A regular file is read by libsndfile from its path. Anything else can be read only once, as it
arrives: WAV, AIFF, AU, W64 and Ogg (Vorbis, Opus) streams are decoded by libsndfile's own pipe
reader while they arrive, so memory stays bounded however long the stream is; formats whose
reader needs to seek (FLAC, MP3, CAF, RF64) are first copied into an unnamed temporary file of
at most SPOOL_LIMIT_BYTES. A stream is decoded in a background thread and handed over through a
short queue, so a stalled writer never blocks Ctrl-C.

A file cut short (its header promises more audio than it holds) is read as far as it goes;
`AudioInput.shortfall()` then says how much was promised and how much was there.
"""
from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import soundfile

from salmonn_cli.errors import DEBUG_ENV, AudioError, quoted

KEPT_CHANNEL = 0  # the official code keeps the first channel of a multi-channel file
# soundfile reports undecodable input as LibsndfileError (a RuntimeError); mp3/ogg decoders can
# also surface as other errors, so every one of these becomes an AudioError.
READ_ERRORS = (RuntimeError, ValueError, TypeError, OSError, EOFError)
# libsndfile's reason for an MP3 stream its decoder cannot parse, even when the path is a regular file.
MISLEADING_MPEG_REASON = "does not exist or is not a regular file"
DAMAGED_REASON = "damaged or cut-short audio data"
STDIN = "-"
STDIN_NAME = "<stdin>"
# What a stream in a seeking format may fill in the temporary directory (FLAC/MP3: many hours).
SPOOL_LIMIT_BYTES = 1 << 30
SPOOL_CHUNK = 1 << 16
PEEK_BYTES = 12                      # enough for every container's magic number
QUEUE_BLOCKS = 2                     # decoded blocks waiting for the consumer: memory stays bounded
QUEUE_POLL_SECONDS = 0.1             # the consumer's wait, so that Ctrl-C is seen at once
# Containers libsndfile can read only with seeking (its pipe reader loses sync or mis-decodes them;
# WAV, AIFF, AU, W64 and Ogg decode from a pipe exactly as from a file). Anything else goes to the
# pipe reader, which refuses what it does not know at once: no temporary file fills with a stream
# that is not audio.
SEEKING_MAGICS = {b"fLaC": "FLAC", b"ID3": "MP3", b"caff": "CAF", b"RF64": "RF64"}
# Headers that give no length: what streaming writers put before the length is known.
LENGTH_PLACEHOLDERS = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000, 0xFFFFFFFFFFFFFFFF}
MAX_PLAUSIBLE_FRAMES = 1 << 40       # libsndfile's "unknown length" on a pipe is far above this
# A file counts as cut short when this much of what its header promises is missing (decoders of
# compressed formats may end a frame early or late).
SHORTFALL_MIN_SECONDS = 0.1
SHORTFALL_MIN_FRACTION = 0.01
# libsndfile's log lines for the size of the audio data: WAV/W64 "data : N (should be M)",
# AIFF "SSND : N (should be M)", AU "Data Size : N (should be M)"; M is what the file holds.
DATA_SIZE_LINE = re.compile(r"^\s*(?:data|SSND|Data Size)\s*:\s*(?P<size>\d+)(?![\dxX])(?:\s*\(should be (?P<present>\d+)\))?",
                            re.MULTILINE)
_END = object()


def check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioError(f"audio file not found: {quoted(p)}")
    if p.is_dir():
        raise AudioError(f"audio path is a directory, not a file: {quoted(p)}")
    try:
        # libsndfile reports a permission problem as a bare "System error"
        with open(p, "rb"):
            pass
    except OSError as e:
        raise AudioError(f"cannot read audio file {quoted(p)}: {e.strerror or e}") from None
    return p


def read_error_reason(error: Exception) -> str:
    # LibsndfileError.error_string is libsndfile's own text, without the "Error opening '<path>'" prefix
    text = getattr(error, "error_string", None) or str(error) or type(error).__name__
    if MISLEADING_MPEG_REASON in text:   # callers have checked that the file exists
        return DAMAGED_REASON
    return text.splitlines()[0].rstrip(".")


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration: libsndfile's MP3 decoder (libmpg123)
    prints its own warnings for damaged streams, beside the one-line error the reader raises.
    With $SALMONN_DEBUG set they are kept."""
    if os.environ.get(DEBUG_ENV):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):   # no stderr to protect
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()      # what Python wrote meanwhile goes where the C output went
        os.dup2(saved, 2)
        os.close(saved)


class MemoryAudio(io.BytesIO):
    """Audio bytes (standard input) as a seekable file for libsndfile. A seek before the start,
    which damaged headers make libsndfile try, fails as fseek does (the position stays) instead of
    raising inside libsndfile's callback, where Python can only print the traceback."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return super().seek(offset, whence)
        except ValueError:
            return self.tell()


class AudioInput:
    """Channel 0 of one input as float64 blocks at its own sample rate (`blocks`), once."""

    name: str                        # as messages show it
    samplerate: int
    length_frames: int | None        # the reader's length (a cut-short file's is what it holds); None: unknown
    header_frames: int | None        # what the header promises; None when it does not say
    frames_read: int = 0
    finished: bool = False           # read to its end

    def blocks(self, block_frames: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def seconds(self) -> float | None:
        """Its length: what was read once read to the end, else what the reader knows (None for
        a stream that does not say)."""
        if self.finished:
            return self.frames_read / self.samplerate
        return None if self.length_frames is None else self.length_frames / self.samplerate

    def shortfall(self) -> tuple[float, float] | None:
        """(seconds promised, seconds there) when the input was read to its end and held clearly
        less audio than its header promised; else None."""
        if not self.finished or self.header_frames is None:
            return None
        missing = self.header_frames - self.frames_read
        if missing <= max(SHORTFALL_MIN_SECONDS * self.samplerate, SHORTFALL_MIN_FRACTION * self.header_frames):
            return None
        return self.header_frames / self.samplerate, self.frames_read / self.samplerate

    def __enter__(self) -> "AudioInput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def frame_counts(f: soundfile.SoundFile) -> tuple[int | None, int | None]:
    """(frames the reader will deliver, frames the header promises); None where unknown.

    libsndfile shortens `frames` to what a cut-short WAV, AIFF or AU file holds and logs the
    header's own data size beside what is there; the promise is scaled back from those. A header
    with a streaming writer's placeholder size promises nothing; on a pipe, where nothing says what
    is there, its length is unknown too."""
    frames = f.frames if 0 < f.frames < MAX_PLAUSIBLE_FRAMES else None
    match = DATA_SIZE_LINE.search(f.extra_info)
    if match is None:
        return frames, frames
    size = int(match["size"])
    present = int(match["present"]) if match["present"] else 0
    if size in LENGTH_PLACEHOLDERS:
        return (frames if present else None), None
    if frames is not None and 0 < present < size:
        return frames, round(frames * size / present)
    return frames, frames


def read_block(f: soundfile.SoundFile, block_frames: int, name: str) -> np.ndarray:
    try:
        with native_stderr_silenced():
            block = f.read(block_frames, dtype="float64", always_2d=True)
    except READ_ERRORS as e:
        raise AudioError(f"cannot read audio file {quoted(name)}: {read_error_reason(e)}") from None
    return np.ascontiguousarray(block[:, KEPT_CHANNEL])     # not a view: the other channels go now


def open_soundfile(target, name: str, closefd: bool = True) -> soundfile.SoundFile:
    try:
        with native_stderr_silenced():
            return soundfile.SoundFile(target, closefd=closefd)
    except READ_ERRORS as e:
        raise AudioError(f"cannot read audio file {quoted(name)}: {read_error_reason(e)}") from None


class FileInput(AudioInput):
    """A regular file (by path), an in-memory file, or a spooled stream, read in the caller's thread."""

    def __init__(self, f: soundfile.SoundFile, name: str, keep_open: BinaryIO | None = None):
        self._file = f
        self._keep_open = keep_open        # the spool file behind `f`, closed (and gone) with it
        self.name = name
        self.samplerate = f.samplerate
        self.length_frames, self.header_frames = frame_counts(f)

    def blocks(self, block_frames: int) -> Iterator[np.ndarray]:
        while True:
            block = read_block(self._file, block_frames, self.name)
            self.frames_read += len(block)
            if len(block):
                yield block
            if len(block) < block_frames:
                self.finished = True
                return

    def close(self) -> None:
        self._file.close()
        if self._keep_open is not None:
            self._keep_open.close()


class PipeInput(AudioInput):
    """A stream decoded by libsndfile's pipe reader in a background thread.

    A pump thread feeds libsndfile's end of a private pipe: first the bytes already taken to
    recognise the format, then the rest of the source. The decoder thread puts blocks into a
    queue of QUEUE_BLOCKS; the consumer waits on it in short steps, so Ctrl-C ends the wait at
    once even when the writer has stalled (the two daemon threads are then left behind)."""

    def __init__(self, source_fd: int, head: bytes, name: str, close_source: bool):
        self.name = name
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._stop = threading.Event()
        self._block_frames = 0
        self._block_size_set = threading.Event()
        read_end, write_end = os.pipe()
        threading.Thread(target=self._pump, args=(source_fd, head, write_end, close_source),
                         name="salmonn-stream-pump", daemon=True).start()
        threading.Thread(target=self._decode, args=(read_end,), name="salmonn-stream-decoder",
                         daemon=True).start()
        opened = self._next()
        if isinstance(opened, BaseException):
            raise opened
        self.samplerate, self.length_frames, self.header_frames = opened

    def _pump(self, source_fd: int, head: bytes, write_end: int, close_source: bool) -> None:
        try:
            data = head
            while data and not self._stop.is_set():
                view = memoryview(data)
                while view:
                    view = view[os.write(write_end, view):]
                data = os.read(source_fd, SPOOL_CHUNK)
        except OSError:
            pass            # the decoder has gone (a broken pipe) or the source failed: both end it
        finally:
            os.close(write_end)
            if close_source:
                os.close(source_fd)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=QUEUE_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _decode(self, read_end: int) -> None:
        # Not under native_stderr_silenced: that redirects the whole process's stderr, and the
        # pipe formats' decoders print nothing of their own.
        try:
            with soundfile.SoundFile(read_end, closefd=False) as f:
                if not self._put((f.samplerate, *frame_counts(f))):
                    return
                self._block_size_set.wait()
                while not self._stop.is_set():
                    block = np.ascontiguousarray(
                        f.read(self._block_frames, dtype="float64", always_2d=True)[:, KEPT_CHANNEL])
                    if len(block) and not self._put(block):
                        return
                    if len(block) < self._block_frames:
                        self._put(_END)
                        return
        except READ_ERRORS as e:          # never lost in the thread: the consumer raises it
            self._put(AudioError(f"cannot read audio file {quoted(self.name)}: {read_error_reason(e)}"))
        except BaseException as e:        # anything else too, or the consumer would wait for ever
            self._put(AudioError(f"cannot read audio file {quoted(self.name)}: {type(e).__name__}: {e}"))
        finally:
            os.close(read_end)            # the pump's next write fails, and it stops

    def _next(self):
        while True:
            try:
                return self._queue.get(timeout=QUEUE_POLL_SECONDS)
            except queue.Empty:
                continue

    def blocks(self, block_frames: int) -> Iterator[np.ndarray]:
        self._block_frames = block_frames
        self._block_size_set.set()
        while True:
            item = self._next()
            if item is _END:
                self.finished = True
                return
            if isinstance(item, BaseException):
                raise item
            self.frames_read += len(item)
            yield item

    def close(self) -> None:
        self._stop.set()
        self._block_size_set.set()


def read_head(fd: int, n: int = PEEK_BYTES) -> bytes:
    head = b""
    while len(head) < n:
        chunk = os.read(fd, n - len(head))
        if not chunk:
            break
        head += chunk
    return head


def seeking_format(head: bytes) -> str | None:
    for magic, label in SEEKING_MAGICS.items():
        if head.startswith(magic):
            return label
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:     # an MPEG audio frame
        return "MP3"
    return None


def size_text(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n} bytes"


def spool(fd: int, head: bytes, name: str, label: str, limit: int = SPOOL_LIMIT_BYTES) -> BinaryIO:
    """The whole stream in an unnamed temporary file (gone when closed), refused past `limit`."""
    spooled = tempfile.TemporaryFile()
    try:
        total = len(head)
        spooled.write(head)
        while chunk := os.read(fd, SPOOL_CHUNK):
            total += len(chunk)
            if total > limit:
                raise AudioError(f"{quoted(name)} is a {label} stream of more than {size_text(limit)}; "
                                 f"{label} cannot be decoded as it arrives, so salmonn keeps it in a temporary "
                                 "file up to that size: save it to a file and give its path")
            spooled.write(chunk)
        spooled.flush()
        spooled.seek(0)
    except OSError as e:
        spooled.close()
        raise AudioError(f"cannot keep {quoted(name)} in a temporary file: {e.strerror or e}") from None
    except BaseException:
        spooled.close()
        raise
    return spooled


def open_stream(fd: int, name: str, close_source: bool, spool_limit: int = SPOOL_LIMIT_BYTES) -> AudioInput:
    """Standard input or an opened FIFO / device: read once."""
    try:
        if os.isatty(fd):
            raise AudioError(f"{quoted(name)} is a terminal, not audio: pipe or redirect a file into it")
        head = read_head(fd)
    except OSError as e:
        raise AudioError(f"cannot read audio file {quoted(name)}: {e.strerror or e}") from None
    if not head:
        raise AudioError("no audio on standard input" if name == STDIN_NAME else f"no audio in {quoted(name)}")
    label = seeking_format(head)
    if label is None:
        return PipeInput(fd, head, name, close_source)
    try:
        spooled = spool(fd, head, name, label, spool_limit)
    finally:
        if close_source:
            os.close(fd)
    try:
        f = open_soundfile(spooled.fileno(), name, closefd=False)
    except BaseException:
        spooled.close()
        raise
    return FileInput(f, name, keep_open=spooled)


def open_audio(source: str | os.PathLike | BinaryIO | AudioInput) -> AudioInput:
    """`source` opened once: "-" is standard input; a path is opened by what it names; a
    readable file object (e.g. `MemoryAudio`) is read as it is."""
    if isinstance(source, AudioInput):
        return source
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        return FileInput(open_soundfile(source, name), name)
    if os.fspath(source) == STDIN:
        st = os.fstat(sys.stdin.fileno())
        if stat.S_ISREG(st.st_mode):           # `< file.wav`: an ordinary seekable file
            return FileInput(open_soundfile(sys.stdin.fileno(), STDIN_NAME, closefd=False), STDIN_NAME)
        return open_stream(sys.stdin.fileno(), STDIN_NAME, close_source=False)
    name = os.fspath(source)
    try:
        mode = os.stat(name).st_mode
    except OSError:
        mode = 0
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode):
        try:
            fd = os.open(name, os.O_RDONLY)      # a FIFO waits here for its writer (Ctrl-C ends the wait)
        except OSError as e:
            raise AudioError(f"cannot read audio file {quoted(name)}: {e.strerror or e}") from None
        return open_stream(fd, name, close_source=True)
    path = check_path(name)
    return FileInput(open_soundfile(path, name), name)
