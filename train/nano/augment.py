"""Acoustic conditions for salmonn-nano's clips: rooms, noise, telephone band and lossy codecs.

Synthetic voices are clean studio signals; users record in rooms, over phones, through compressed
files. Each function takes and returns float64 audio at 16 kHz and draws only from the generator it is
given, so a clip stays a function of its seed.
"""
from __future__ import annotations

import io

import numpy as np
import soundfile

from salmonn_cli.audio import resample
from train.nano.events import colored_noise

SAMPLE_RATE = 16000
RT60_RANGE = (0.15, 0.9)            # reverberation time of the simulated room (s)
DIRECT_TO_REVERB_DB = (-3.0, 12.0)
PHONE_BAND_HZ = (300.0, 3400.0)
VORBIS_COMPRESSION = (0.6, 0.95)    # libsndfile's compression level: 0 is Vorbis's best quality, 1 its lowest bit rate


def _convolve(x: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Linear convolution by FFT, cut to the length of `x`."""
    n = len(x) + len(response) - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(response, size), size)[: len(x)]


def _band_pass(x: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    """Frequencies outside [low, high] removed, with 100 Hz cosine slopes at the edges."""
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    gain = np.clip(np.minimum((freqs - low_hz + 100) / 100, (high_hz + 100 - freqs) / 100), 0, 1)
    return np.fft.irfft(spectrum * (0.5 - 0.5 * np.cos(np.pi * gain)), len(x))


def room(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`x` in a simulated room: exponentially decaying noise as the impulse response, mixed under the
    direct sound at a random direct-to-reverberant ratio."""
    rt60 = rng.uniform(*RT60_RANGE)
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    response = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)     # -60 dB at rt60
    response[: int(0.002 * SAMPLE_RATE)] = 0.0                        # the first reflection arrives later
    wet = _convolve(x, response)
    wet *= np.sqrt(np.sum(x ** 2) / max(np.sum(wet ** 2), 1e-12))
    ratio = 10 ** (-rng.uniform(*DIRECT_TO_REVERB_DB) / 20)
    return x + ratio * wet


def noise(x: np.ndarray, rng: np.random.Generator, snr_db: float, level_of: float) -> np.ndarray:
    """White, pink or brown noise at `snr_db` below `level_of` (an RMS)."""
    n = colored_noise(len(x), rng, float(rng.choice([0.0, 1.0, 2.0])))
    rms = np.sqrt(np.mean(n ** 2))
    return x + n * (level_of / max(rms, 1e-12)) * 10 ** (-snr_db / 20)


def telephone(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A narrow-band phone line: band-passed, down to 8 kHz and back, sometimes mu-law companded."""
    y = resample(_band_pass(x, *PHONE_BAND_HZ), SAMPLE_RATE, 8000)
    if rng.random() < 0.5:
        mu = 255.0
        peak = max(np.abs(y).max(), 1e-12)
        companded = np.sign(y) * np.log1p(mu * np.abs(y / peak)) / np.log1p(mu)
        y = np.round(companded * 127) / 127
        y = np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu * peak
    return resample(y, 8000, SAMPLE_RATE)[: len(x)]


def lossy_codec(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`x` through Ogg Vorbis at a low bit rate and back (in memory)."""
    buffer = io.BytesIO()
    peak = max(np.abs(x).max(), 1e-12)
    scale = 0.9 / peak if peak > 0.9 else 1.0
    soundfile.write(buffer, x * scale, SAMPLE_RATE, format="OGG", subtype="VORBIS",
                    compression_level=float(rng.uniform(*VORBIS_COMPRESSION)))
    buffer.seek(0)
    y, _ = soundfile.read(buffer, dtype="float64")
    y = y[: len(x)] / scale
    return np.pad(y, (0, len(x) - len(y)))
