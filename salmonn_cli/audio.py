"""Audio inputs (files, standard input, streams; opened by salmonn_cli/audio_input.py) as the
waveform SALMONN expects: mono (channel 0), 16 kHz, float64, read and resampled in blocks.

Follows the official `utils.prepare_one_sample`: soundfile read as float64, keep channel 0 (no
downmix), pad to 1 s, truncate to 30 s. Unlike the official code, other sample rates are resampled
(soxr, very high quality) instead of being rejected. One streaming resampler serves a whole input,
so block edges leave no seams: the output equals resampling the whole file at once.
"""
from __future__ import annotations

import os
from typing import BinaryIO, Iterator

import numpy as np
import soxr

from salmonn_cli.audio_input import AudioInput, open_audio
from salmonn_cli.errors import AudioError, quoted

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30 s chunk
RESAMPLE_QUALITY = "VHQ"
# Rates outside this range come from damaged headers, not recordings; they would also resample a
# few bytes into nothing, or into gigabytes.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000
READ_BLOCK_SECONDS = 5.0       # decoded per read, at the file's own rate


def check_sample_rate(rate: int, name) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"audio file {quoted(name)} claims a sample rate of {rate} Hz, outside "
                         f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz: its header is damaged")


def resample(wave: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    if from_rate == to_rate:
        return wave
    return soxr.resample(wave, from_rate, to_rate, quality=RESAMPLE_QUALITY)


def read_resampled_blocks(source: str | os.PathLike | BinaryIO | AudioInput, sample_rate: int = SAMPLE_RATE,
                          block_seconds: float = READ_BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Channel 0 of the input at `sample_rate`, as consecutive float64 blocks (the input is closed
    at the end)."""
    with open_audio(source) as audio_in:
        name, file_rate = audio_in.name, audio_in.samplerate
        check_sample_rate(file_rate, name)
        stream = None if file_rate == sample_rate else soxr.ResampleStream(
            file_rate, sample_rate, 1, dtype="float64", quality=RESAMPLE_QUALITY)
        n_out = 0
        for block in audio_in.blocks(max(1, int(block_seconds * file_rate))):
            if not np.isfinite(block).all():
                raise AudioError(f"audio file contains NaN or infinite samples: {quoted(name)}")
            out = block if stream is None else stream.resample_chunk(np.ascontiguousarray(block))
            n_out += len(out)
            if len(out):
                yield out
        if audio_in.frames_read == 0:
            raise AudioError(f"audio file has no samples: {quoted(name)}")
        tail = np.zeros(0) if stream is None else stream.resample_chunk(np.zeros(0), last=True)
        n_out += len(tail)
        if n_out == 0:
            raise AudioError(f"audio file is shorter than one sample at {sample_rate} Hz: {quoted(name)}")
        if len(tail):
            yield tail


def load_audio(source: str | os.PathLike | BinaryIO | AudioInput, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The whole input as one 1-D float64 waveform at `sample_rate` (channel 0 of a multi-channel file)."""
    return np.concatenate(list(read_resampled_blocks(source, sample_rate)))


def fit_to_chunk(wave: np.ndarray, sample_rate: int, min_seconds: float,
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
