"""Reading audio files into the waveform SALMONN expects: mono (channel 0), 16 kHz, float64.

Follows the official `utils.prepare_one_sample`: soundfile read as float64, keep channel 0 (no
downmix), pad to 1 s, truncate to 30 s. Unlike the official code, other sample rates are resampled
(soxr, very high quality) instead of being rejected.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
import soxr

from salmonn_cli.errors import AudioError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30 s chunk
RESAMPLE_QUALITY = "VHQ"
KEPT_CHANNEL = 0  # the official code keeps the first channel of a multi-channel file

# soundfile reports undecodable input as LibsndfileError (a RuntimeError); mp3/ogg decoders can
# also surface as other errors, so every one of these becomes an AudioError.
READ_ERRORS = (RuntimeError, ValueError, TypeError, OSError, EOFError)


def check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioError(f"audio file not found: {p}")
    if p.is_dir():
        raise AudioError(f"audio path is a directory, not a file: {p}")
    return p


def read_error_reason(error: Exception) -> str:
    # LibsndfileError.error_string is libsndfile's own text, without the "Error opening '<path>'" prefix
    text = getattr(error, "error_string", None) or str(error) or type(error).__name__
    return text.splitlines()[0].rstrip(".")


def read_frames(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, int]:
    """Frames [start, stop) of channel 0 as float64 in [-1, 1], and the file's sample rate.

    Frame indices are at the file's own rate; no resampling happens here.
    """
    p = check_path(path)
    try:
        with soundfile.SoundFile(p) as f:
            sample_rate = f.samplerate
            if start:
                f.seek(start)
            n_frames = -1 if stop is None else max(stop - start, 0)
            block = f.read(n_frames, dtype="float64", always_2d=True)
    except READ_ERRORS as e:
        raise AudioError(f"cannot read audio file {p}: {read_error_reason(e)}") from None
    return np.ascontiguousarray(block[:, KEPT_CHANNEL]), sample_rate


def resample(wave: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    if from_rate == to_rate:
        return wave
    return soxr.resample(wave, from_rate, to_rate, quality=RESAMPLE_QUALITY)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The whole file as a 1-D float64 waveform at `sample_rate` (channel 0 of a multi-channel file)."""
    wave, file_rate = read_frames(path)
    if wave.size == 0:
        raise AudioError(f"audio file has no samples: {path}")
    if not np.isfinite(wave).all():
        raise AudioError(f"audio file contains NaN or infinite samples: {path}")
    return resample(wave, file_rate, sample_rate)


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
