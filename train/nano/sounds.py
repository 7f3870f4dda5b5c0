"""Every sound-event class salmonn-nano learns, and one renderer for all of them.

Two kinds of class: events.py's (freedesktop theme sounds and synthetic renderers) and the sound
library's (real recordings from Debian packages, `sound_library.py`). Six classes are both: their real
recordings are used for half of their clips. Training clips take the library's training recordings,
test clips its held-out ones, so a held-out clip is a recording the model never heard; a class with no
recording on a side falls back to its renderer there, and a library class with no training recording is
left out of training altogether (`train_classes`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from salmonn_cli.audio import resample
from train.nano import events, sound_library

SAMPLE_RATE = 16000
SPEED_RANGE = (0.92, 1.08)          # played faster or slower (pitch moves with it)
GAP_SECONDS = (0.1, 1.2)            # between repeats of a recording shorter than the clip
REAL_SHARE = 0.5                    # of an events.py class's clips, where it has real recordings

CLASSES = events.EVENT_CLASSES + tuple(c for c in sound_library.SOUND_CLASSES if c.name not in events.EVENTS_BY_NAME)
CLASS_NAMES = tuple(c.name for c in CLASSES)
BY_NAME = {c.name: c for c in CLASSES}


@lru_cache(maxsize=1)
def _recordings() -> dict[bool, dict[str, list[sound_library.SoundFile]]]:
    return {held_out: sound_library.split(held_out) for held_out in (False, True)}


def recordings(name: str, held_out: bool) -> list[sound_library.SoundFile]:
    return _recordings()[held_out].get(name, [])


def split_classes(held_out: bool) -> tuple[str, ...]:
    """The classes a split can render: events.py's always, the library's where it has recordings."""
    return tuple(n for n in CLASS_NAMES if n in events.EVENTS_BY_NAME or recordings(n, held_out))


@lru_cache(maxsize=64)
def _load(sound: sound_library.SoundFile) -> np.ndarray:
    return sound_library.load(sound, SAMPLE_RATE)


def _peak_normalized(x: np.ndarray) -> np.ndarray:
    peak = np.abs(x).max() if len(x) else 0.0
    return x / peak if peak > 0 else x


def _from_recording(sound: sound_library.SoundFile, n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of a recording: a random stretch of a long one, repeats with gaps of a short one."""
    speed = rng.uniform(*SPEED_RANGE)
    wave = resample(_load(sound), round(SAMPLE_RATE * speed), SAMPLE_RATE)
    if len(wave) >= n:
        start = int(rng.integers(len(wave) - n + 1))
        return wave[start:start + n]
    out = np.zeros(n)
    t = int(rng.uniform(0, 0.3) * SAMPLE_RATE)
    while t < n:
        m = min(len(wave), n - t)
        out[t:t + m] += wave[:m]
        t += len(wave) + int(rng.uniform(*GAP_SECONDS) * SAMPLE_RATE)
    return out


def render_sound(name: str, seconds: float, rng: np.random.Generator, held_out: bool) -> np.ndarray:
    """`seconds` of class `name` (float64, unit peak, 16 kHz), from the split's own recordings."""
    n = int(round(seconds * SAMPLE_RATE))
    files = recordings(name, held_out)
    synthetic = name in events.EVENTS_BY_NAME
    if files and (not synthetic or rng.random() < REAL_SHARE):
        return _peak_normalized(_from_recording(files[int(rng.integers(len(files)))], n, rng))
    if not synthetic:
        raise ValueError(f"sound class {name!r} has no {'held-out' if held_out else 'training'} recording")
    return events.render_event(name, seconds, rng)
