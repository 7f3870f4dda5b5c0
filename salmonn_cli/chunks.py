"""Audio of any length as chunks of at most 30 s, cut at quiet seams.

The input is never decoded whole: its 16 kHz blocks (`audio.read_resampled_blocks`) are appended
to a buffer that never holds much more than one chunk (`audio.CHUNK_SECONDS`, the most the model
hears at once). When the buffer is longer than a chunk, the chunk ends at the quietest point of its
last `SEAM_SEARCH_SECONDS` (lowest short-time energy), so words are not cut.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from salmonn_cli.audio import CHUNK_SECONDS, READ_BLOCK_SECONDS, SAMPLE_RATE, read_resampled_blocks
from salmonn_cli.audio_input import AudioInput

SEAM_SEARCH_SECONDS = 5.0      # a chunk may end this much early to end in a pause
ENERGY_FRAME_SECONDS = 0.025   # short-time energy: 25 ms frames ...
ENERGY_HOP_SECONDS = 0.010     # ... every 10 ms ...
ENERGY_SMOOTH_FRAMES = 10      # ... averaged over 100 ms, so one quiet frame inside a word loses to a pause
# Frames this close to the quietest one count as equally quiet; among them the longest quiet run
# wins and the cut goes to its middle (a pause is cut in its centre, not at its first sample).
QUIET_TIE_RATIO = 1.05
QUIET_TIE_FLOOR = 1e-12


@dataclass
class AudioChunk:
    index: int
    start_s: float             # position in the file
    end_s: float
    wave: np.ndarray           # 16 kHz mono float64 samples of [start_s, end_s)

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


def short_time_energy(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mean square of `ENERGY_FRAME_SECONDS` frames every `ENERGY_HOP_SECONDS`, smoothed over
    `ENERGY_SMOOTH_FRAMES` frames; frame i starts at sample i * hop."""
    frame = max(1, int(ENERGY_FRAME_SECONDS * sample_rate))
    hop = max(1, int(ENERGY_HOP_SECONDS * sample_rate))
    if len(wave) < frame:
        return np.array([np.mean(np.square(wave))]) if len(wave) else np.zeros(1)
    cumulative = np.concatenate([[0.0], np.cumsum(np.square(wave, dtype=np.float64))])
    starts = np.arange(0, len(wave) - frame + 1, hop)
    energy = (cumulative[starts + frame] - cumulative[starts]) / frame
    # centred moving average; near the edges it averages fewer frames (zero padding would make the
    # region's edges look quiet)
    half = ENERGY_SMOOTH_FRAMES // 2
    summed = np.concatenate([[0.0], np.cumsum(energy)])
    index = np.arange(len(energy))
    lo = np.maximum(index - half, 0)
    hi = np.minimum(index + half + 1, len(energy))
    return (summed[hi] - summed[lo]) / (hi - lo)


def quietest_cut(wave: np.ndarray, sample_rate: int, earliest: int, latest: int) -> int:
    """A sample index in [earliest, latest] at the middle of the quietest stretch of `wave` there."""
    earliest = max(0, min(earliest, latest))
    region = wave[earliest:latest]
    frame = max(1, int(ENERGY_FRAME_SECONDS * sample_rate))
    if len(region) < 2 * frame:
        return latest
    hop = max(1, int(ENERGY_HOP_SECONDS * sample_rate))
    energy = short_time_energy(region, sample_rate)
    quiet = energy <= energy.min() * QUIET_TIE_RATIO + QUIET_TIE_FLOOR
    # the longest run of quiet frames
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    run_starts, run_ends = edges[::2], edges[1::2]
    best = int(np.argmax(run_ends - run_starts))
    middle_frame = (run_starts[best] + run_ends[best] - 1) / 2
    cut = earliest + int(round(middle_frame * hop + frame / 2))
    return min(max(cut, earliest + 1), latest)


def iter_chunks(source: str | os.PathLike | BinaryIO | AudioInput, sample_rate: int = SAMPLE_RATE,
                chunk_seconds: float = CHUNK_SECONDS,
                seam_search_seconds: float = SEAM_SEARCH_SECONDS,
                block_seconds: float = READ_BLOCK_SECONDS) -> Iterator[AudioChunk]:
    """Consecutive chunks covering the whole input, each at most `chunk_seconds` long.

    Memory stays at about one chunk plus one block, whatever the input's length.
    """
    if not 0 <= seam_search_seconds < chunk_seconds:
        raise ValueError("seam_search_seconds must be in [0, chunk_seconds)")
    chunk_len = int(round(chunk_seconds * sample_rate))
    search_len = int(round(seam_search_seconds * sample_rate))
    pending: list[np.ndarray] = []
    n_pending = 0
    offset = 0          # file position (16 kHz samples) of the first pending sample
    index = 0
    for block in read_resampled_blocks(source, sample_rate, block_seconds):
        pending.append(block)
        n_pending += len(block)
        # A chunk is only cut once more than a full chunk is buffered, so the last chunk can
        # still be a full 30 s when the file ends exactly there.
        while n_pending > chunk_len:
            buffer = np.concatenate(pending)
            cut = quietest_cut(buffer, sample_rate, chunk_len - search_len, chunk_len)
            yield AudioChunk(index, offset / sample_rate, (offset + cut) / sample_rate, buffer[:cut].copy())
            index += 1
            offset += cut
            pending = [buffer[cut:]]
            n_pending = len(pending[0])
    if n_pending:
        rest = np.concatenate(pending)
        yield AudioChunk(index, offset / sample_rate, (offset + len(rest)) / sample_rate, rest)
