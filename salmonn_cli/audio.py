"""Reading audio files into the waveform SALMONN expects: mono (channel 0), 16 kHz, float64.

Follows the official `utils.prepare_one_sample`: soundfile read as float64, keep channel 0 (no
downmix), pad to 1 s, truncate to 30 s. Unlike the official code, other sample rates are resampled
(soxr, very high quality) instead of being rejected.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile
import soxr

from salmonn_cli.errors import DEBUG_ENV, AudioError, quoted

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30 s chunk
RESAMPLE_QUALITY = "VHQ"
KEPT_CHANNEL = 0  # the official code keeps the first channel of a multi-channel file
# Rates outside this range come from damaged headers, not recordings; they would also resample a
# few bytes into nothing, or into gigabytes.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000

# soundfile reports undecodable input as LibsndfileError (a RuntimeError); mp3/ogg decoders can
# also surface as other errors, so every one of these becomes an AudioError.
READ_ERRORS = (RuntimeError, ValueError, TypeError, OSError, EOFError)
# libsndfile's reason for an MP3 stream its decoder cannot parse, even when the path is a regular file.
MISLEADING_MPEG_REASON = "does not exist or is not a regular file"
DAMAGED_REASON = "damaged or cut-short audio data"


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


def check_sample_rate(rate: int, name) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"audio file {quoted(name)} claims a sample rate of {rate} Hz, outside "
                         f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz: its header is damaged")


def too_short_error(name, sample_rate: int = SAMPLE_RATE) -> AudioError:
    return AudioError(f"audio file is shorter than one sample at {sample_rate} Hz: {quoted(name)}")


def read_frames(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, int]:
    """Frames [start, stop) of channel 0 as float64 in [-1, 1], and the file's sample rate.

    Frame indices are at the file's own rate; no resampling happens here.
    """
    p = check_path(path)
    try:
        with native_stderr_silenced(), soundfile.SoundFile(p) as f:
            sample_rate = f.samplerate
            if start:
                f.seek(start)
            n_frames = -1 if stop is None else max(stop - start, 0)
            block = f.read(n_frames, dtype="float64", always_2d=True)
    except READ_ERRORS as e:
        raise AudioError(f"cannot read audio file {quoted(p)}: {read_error_reason(e)}") from None
    return np.ascontiguousarray(block[:, KEPT_CHANNEL]), sample_rate


def resample(wave: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    if from_rate == to_rate:
        return wave
    return soxr.resample(wave, from_rate, to_rate, quality=RESAMPLE_QUALITY)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The whole file as a 1-D float64 waveform at `sample_rate` (channel 0 of a multi-channel file)."""
    wave, file_rate = read_frames(path)
    if wave.size == 0:
        raise AudioError(f"audio file has no samples: {quoted(path)}")
    check_sample_rate(file_rate, path)
    if not np.isfinite(wave).all():
        raise AudioError(f"audio file contains NaN or infinite samples: {quoted(path)}")
    wave = resample(wave, file_rate, sample_rate)
    if wave.size == 0:
        raise too_short_error(path, sample_rate)
    return wave


def fit_to_window(wave: np.ndarray, sample_rate: int, min_seconds: float,
                  max_seconds: float) -> tuple[np.ndarray, bool]:
    """Right-pad with zeros to `min_seconds`, cut to `max_seconds`; returns (wave, was_truncated)."""
    min_len = int(round(min_seconds * sample_rate))
    max_len = int(round(max_seconds * sample_rate))
    if len(wave) < min_len:
        wave = np.pad(wave, (0, min_len - len(wave)))
    truncated = len(wave) > max_len
    if truncated:
        wave = wave[:max_len]
    return wave, truncated
