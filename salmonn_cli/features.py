"""Encoder inputs computed in numpy: Whisper's log-mel spectrogram and BEATs' kaldi fbank.

`log_mel_spectrogram` follows transformers' `WhisperFeatureExtractor` (numpy path) and
`beats_fbank` follows `torchaudio.compliance.kaldi.fbank` as BEATs calls it (spec sections 1.3, 1.4).
Both run in float64 and return float32.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from salmonn_cli.audio import HOP_LENGTH, N_FFT, N_SAMPLES, SAMPLE_RATE
from salmonn_cli.errors import AudioError

# --- Whisper log-mel ---------------------------------------------------------------------------
WHISPER_N_MELS = 80
WHISPER_MAX_HZ = 8000.0
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's maximum
# Slaney mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above
SLANEY_BREAK_HZ = 1000.0
SLANEY_BREAK_MEL = 15.0
SLANEY_LOG_STEP = np.log(6.4) / 27.0

# --- BEATs kaldi fbank -------------------------------------------------------------------------
FBANK_N_BINS = 128
FBANK_FRAME_LENGTH = 400  # 25 ms
FBANK_FRAME_SHIFT = 160  # 10 ms
FBANK_FFT = 512  # frame length rounded up to a power of two
FBANK_LOW_HZ = 20.0
FBANK_HIGH_HZ = SAMPLE_RATE / 2
PREEMPHASIS = 0.97
POVEY_POWER = 0.85
INT16_SCALE = 2.0 ** 15
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # kaldi's log floor, float32 eps even for float64
# BEATs' dataset statistics; the official code divides by twice the std
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582


# --- Whisper -----------------------------------------------------------------------------------

def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz * (3.0 / 200.0)
    log = SLANEY_BREAK_MEL + np.log(np.maximum(hz, SLANEY_BREAK_HZ) / SLANEY_BREAK_HZ) / SLANEY_LOG_STEP
    return np.where(hz >= SLANEY_BREAK_HZ, log, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3.0)
    log = SLANEY_BREAK_HZ * np.exp(SLANEY_LOG_STEP * (np.maximum(mel, SLANEY_BREAK_MEL) - SLANEY_BREAK_MEL))
    return np.where(mel >= SLANEY_BREAK_MEL, log, linear)


@lru_cache(maxsize=4)
def whisper_mel_filters(n_mels: int = WHISPER_N_MELS) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, (n_mels, N_FFT // 2 + 1) float64, read-only."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges_mel = np.linspace(_hz_to_slaney_mel(0.0), _hz_to_slaney_mel(WHISPER_MAX_HZ), n_mels + 2)
    edges_hz = _slaney_mel_to_hz(edges_mel)
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, n_bins)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # equal area per filter
    filters.setflags(write=False)
    return filters


@lru_cache(maxsize=1)
def _periodic_hann() -> np.ndarray:
    window = np.hanning(N_FFT + 1)[:-1]
    window.setflags(write=False)
    return window


def log_mel_spectrogram(wave: np.ndarray, n_mels: int = WHISPER_N_MELS,
                        n_samples: int = N_SAMPLES) -> np.ndarray:
    """Whisper encoder input, (n_mels, n_samples // HOP_LENGTH) float32."""
    # The extractor casts a float64 waveform to float32 before anything else.
    wave = np.asarray(wave, dtype=np.float32).astype(np.float64)
    if len(wave) >= n_samples:
        wave = wave[:n_samples]
    else:
        wave = np.pad(wave, (0, n_samples - len(wave)))
    padded = np.pad(wave, N_FFT // 2, mode="reflect")
    # Centred framing yields n_samples // HOP_LENGTH + 1 frames; the last one is dropped.
    frames = sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:-1]
    spectrum = np.fft.rfft(frames * _periodic_hann(), axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    mel = whisper_mel_filters(n_mels) @ power.T
    log_mel = np.log10(np.maximum(mel, LOG_FLOOR))
    log_mel = np.maximum(log_mel, log_mel.max() - DYNAMIC_RANGE)
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


# --- BEATs -------------------------------------------------------------------------------------

def _kaldi_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


@lru_cache(maxsize=1)
def kaldi_mel_banks() -> np.ndarray:
    """Kaldi's triangular mel filters, (FBANK_N_BINS, FBANK_FFT // 2 + 1) float64, read-only.

    Triangles are built in the mel domain (kaldi), not in Hz; the Nyquist bin gets weight 0.
    """
    n_fft_bins = FBANK_FFT // 2
    bin_hz = SAMPLE_RATE / FBANK_FFT
    mel_low, mel_high = _kaldi_mel(FBANK_LOW_HZ), _kaldi_mel(FBANK_HIGH_HZ)
    step = (mel_high - mel_low) / (FBANK_N_BINS + 1)
    left = mel_low + step * np.arange(FBANK_N_BINS)[:, None]
    center, right = left + step, left + 2 * step
    mel = _kaldi_mel(bin_hz * np.arange(n_fft_bins))[None, :]
    rising = (mel - left) / (center - left)
    falling = (right - mel) / (right - center)
    banks = np.zeros((FBANK_N_BINS, n_fft_bins + 1))
    banks[:, :n_fft_bins] = np.maximum(0.0, np.minimum(rising, falling))
    banks.setflags(write=False)
    return banks


@lru_cache(maxsize=1)
def _povey_window() -> np.ndarray:
    n = np.arange(FBANK_FRAME_LENGTH)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (FBANK_FRAME_LENGTH - 1))  # symmetric
    window = hann ** POVEY_POWER
    window.setflags(write=False)
    return window


def beats_fbank(wave: np.ndarray) -> np.ndarray:
    """BEATs input: normalised kaldi log-mel fbank, (F, 128) float32 with F = 1 + (N - 400) // 160."""
    samples = np.asarray(wave, dtype=np.float64) * INT16_SCALE
    if samples.ndim != 1 or len(samples) < FBANK_FRAME_LENGTH:
        raise AudioError(f"audio too short for one {FBANK_FRAME_LENGTH}-sample fbank frame "
                         f"({samples.shape[-1] if samples.ndim else 0} samples)")
    frames = sliding_window_view(samples, FBANK_FRAME_LENGTH)[::FBANK_FRAME_SHIFT]
    frames = frames - frames.mean(axis=1, keepdims=True)
    # Pre-emphasis; each frame's first sample uses itself as its predecessor (kaldi).
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * previous) * _povey_window()
    spectrum = np.fft.rfft(frames, n=FBANK_FFT, axis=1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    fbank = np.log(np.maximum(power @ kaldi_mel_banks().T, FLOAT32_EPS))
    return ((fbank - FBANK_MEAN) / (2.0 * FBANK_STD)).astype(np.float32)
