"""Energy-based voice-activity detection: cut a stream of 16 kHz samples into utterances.

Each 20 ms frame's energy (dB relative to full scale) is compared with an adaptive noise floor: the
quietest frame of the last few seconds. A frame is voiced when it is `threshold_db` above that floor
and above an absolute minimum level (so digital silence plus a little hiss is not speech). An
utterance starts at the first voiced frame (with some earlier audio kept as pre-roll, so the first
syllable's onset is not lost), and ends after `hangover_s` of unvoiced frames; it is dropped if its
voiced span is shorter than `min_speech_s`, and it is cut when it reaches `max_utterance_s`.
Works offline and in streaming mode (push blocks of any size; the result is the same).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from salmonn_cli.audio import SAMPLE_RATE

FRAME_SECONDS = 0.02
# Energies are floored here so that digital silence has a finite level.
SILENCE_DB = -120.0


@dataclass
class VadOptions:
    threshold_db: float = 12.0        # voiced: this far above the noise floor ...
    min_level_db: float = -55.0       # ... and at least this loud (dB re full scale, mean square)
    floor_window_s: float = 5.0       # the noise floor is the quietest frame of this much recent audio
    hangover_s: float = 0.6           # unvoiced time that ends an utterance
    min_speech_s: float = 0.25        # shorter voiced spans (clicks, knocks) are dropped
    max_utterance_s: float = 30.0     # longest utterance handed on (the model's chunk), pre-roll included
    pre_roll_s: float = 0.3           # audio kept before the first voiced frame
    post_roll_s: float = 0.2          # audio kept after the last voiced frame

    def __post_init__(self):
        if self.post_roll_s > self.hangover_s:
            raise ValueError("post_roll_s cannot exceed hangover_s")
        if self.pre_roll_s + self.min_speech_s > self.max_utterance_s:
            raise ValueError("max_utterance_s is too short for pre_roll_s + min_speech_s")


@dataclass
class Utterance:
    start_s: float          # first voiced frame, seconds since the stream started
    end_s: float            # end of the last voiced frame
    audio_start_s: float    # where `samples` begins (start_s minus the pre-roll that was available)
    samples: np.ndarray     # float32 audio: pre-roll + speech + post-roll

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


def frame_energy_db(frame: np.ndarray) -> float:
    mean_square = float(np.mean(np.square(frame, dtype=np.float64))) if len(frame) else 0.0
    return max(10.0 * math.log10(mean_square) if mean_square > 0 else SILENCE_DB, SILENCE_DB)


class SlidingMinimum:
    """Minimum of the last `size` values pushed, in O(1) amortised per value."""

    def __init__(self, size: int):
        self.size = size
        self.count = 0
        self.candidates: deque[tuple[int, float]] = deque()  # (index, value), values increasing

    def push(self, value: float) -> float:
        while self.candidates and self.candidates[-1][1] >= value:
            self.candidates.pop()
        self.candidates.append((self.count, value))
        if self.candidates[0][0] <= self.count - self.size:
            self.candidates.popleft()
        self.count += 1
        return self.candidates[0][1]


class EnergyVad:
    """Streaming detector: `push(block)` returns the utterances that block finished; `flush()` ends the stream."""

    def __init__(self, options: VadOptions | None = None, sample_rate: int = SAMPLE_RATE):
        self.options = o = options or VadOptions()
        self.sample_rate = sample_rate
        self.frame_len = int(round(FRAME_SECONDS * sample_rate))
        self.hangover_frames = max(1, int(round(o.hangover_s / FRAME_SECONDS)))
        self.pre_roll = int(round(o.pre_roll_s * sample_rate))
        self.post_roll = int(round(o.post_roll_s * sample_rate))
        self.max_len = int(round(o.max_utterance_s * sample_rate))
        self.min_speech = int(round(o.min_speech_s * sample_rate))
        self.floor = SlidingMinimum(max(1, int(round(o.floor_window_s / FRAME_SECONDS))))
        self.pending = np.zeros(0, dtype=np.float32)   # samples not yet making a whole frame
        self.position = 0                              # stream sample index of pending[0]
        self.recent: deque[np.ndarray] = deque()       # unvoiced frames kept for the pre-roll
        self.recent_len = 0
        self.speech: list[np.ndarray] | None = None    # frames of the open utterance
        self.speech_len = 0
        self.audio_start = self.voiced_start = self.voiced_end = 0
        self.unvoiced_run = 0

    # --- stream interface ------------------------------------------------------------------
    def push(self, block: np.ndarray) -> list[Utterance]:
        block = np.array(block, dtype=np.float32).reshape(-1)  # a copy: frames are kept past this call
        data = np.concatenate([self.pending, block]) if len(self.pending) else block
        done: list[Utterance] = []
        n_frames = len(data) // self.frame_len
        for i in range(n_frames):
            frame = data[i * self.frame_len:(i + 1) * self.frame_len]
            done.extend(self._frame(frame, self.position))
            self.position += self.frame_len
        self.pending = data[n_frames * self.frame_len:].copy()
        return done

    def flush(self) -> list[Utterance]:
        """End of stream: the partial last frame counts, and an open utterance is closed."""
        done: list[Utterance] = []
        if len(self.pending):
            frame, self.pending = self.pending, np.zeros(0, dtype=np.float32)
            done.extend(self._frame(frame, self.position))
            self.position += len(frame)
        if self.speech is not None:
            done.extend(self._close(keep_until=self.voiced_end + self.post_roll)[0])
        return done

    # --- one frame ---------------------------------------------------------------------------
    def is_voiced(self, energy_db: float) -> bool:
        floor = self.floor.push(energy_db)
        return energy_db >= max(floor + self.options.threshold_db, self.options.min_level_db)

    def _frame(self, frame: np.ndarray, start: int) -> list[Utterance]:
        voiced = self.is_voiced(frame_energy_db(frame))
        end = start + len(frame)
        if self.speech is None:
            if voiced:
                self._open(frame, start, end)
            else:
                self._remember(frame)
            return []
        done: list[Utterance] = []
        if self.speech_len + len(frame) > self.max_len:
            # The model sees at most `max_utterance_s`: hand this part on, go on from here afresh.
            done.extend(self._close(keep_until=start)[0])
            self.recent.clear()
            self.recent_len = 0
            if voiced:
                self._open(frame, start, end)
            else:
                self._remember(frame)
            return done
        self.speech.append(frame)
        self.speech_len += len(frame)
        if voiced:
            self.voiced_end = end
            self.unvoiced_run = 0
        else:
            self.unvoiced_run += 1
            if self.unvoiced_run >= self.hangover_frames:
                finished, rest = self._close(keep_until=self.voiced_end + self.post_roll)
                done.extend(finished)
                # What follows the kept post-roll is silence that may serve as the next pre-roll.
                if len(rest):
                    self._remember(rest[max(0, len(rest) - self.pre_roll):])
        return done

    def _remember(self, frame: np.ndarray) -> None:
        self.recent.append(frame)
        self.recent_len += len(frame)
        while self.recent and self.recent_len - len(self.recent[0]) >= self.pre_roll:
            self.recent_len -= len(self.recent.popleft())

    def _open(self, frame: np.ndarray, start: int, end: int) -> None:
        pre = np.concatenate(list(self.recent)) if self.recent else np.zeros(0, dtype=np.float32)
        pre = pre[max(0, len(pre) - self.pre_roll):]
        self.recent.clear()
        self.recent_len = 0
        self.speech = [pre, frame]
        self.speech_len = len(pre) + len(frame)
        self.audio_start = start - len(pre)
        self.voiced_start, self.voiced_end = start, end
        self.unvoiced_run = 0

    def _close(self, keep_until: int) -> tuple[list[Utterance], np.ndarray]:
        """End the open utterance at stream sample `keep_until`: returns it (none if too short) and the
        audio buffered after that point."""
        audio = np.concatenate(self.speech)
        keep = min(len(audio), keep_until - self.audio_start)
        rate = self.sample_rate
        utterance = Utterance(self.voiced_start / rate, self.voiced_end / rate,
                              self.audio_start / rate, audio[:keep])
        self.speech = None
        self.speech_len = 0
        rest = audio[keep:]
        if self.voiced_end - self.voiced_start < self.min_speech:
            return [], rest
        return [utterance], rest


def find_utterances(wave: np.ndarray, sample_rate: int = SAMPLE_RATE,
                    options: VadOptions | None = None) -> list[Utterance]:
    """Offline: all utterances of a whole recording."""
    vad = EnergyVad(options, sample_rate)
    return vad.push(wave) + vad.flush()
