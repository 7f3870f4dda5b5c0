"""Audio loading and the numpy front end (Whisper log-mel, BEATs fbank) against the official outputs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile
import soxr

from conftest import AUDIO, OFFICIAL_TINY, REFERENCE_INPUTS, REPO
from salmonn_cli import audio, features
from salmonn_cli.errors import AudioError

# Fixture README's suggested tolerances for an independent implementation (float64 wave for BEATs).
MEL_ATOL = 2e-4
FBANK_ATOL = 2e-4
SPEECH_WAV = OFFICIAL_TINY / REFERENCE_INPUTS["speech"]
MP3 = AUDIO / "narration-moon-landing.mp3"
MP3_SECONDS = 17.44


def official_wave(name: str) -> tuple[np.ndarray, bool]:
    wave = audio.load_audio(OFFICIAL_TINY / REFERENCE_INPUTS[name])
    return audio.fit_to_chunk(wave, audio.SAMPLE_RATE, 1.0, 30.0)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return audio.load_audio(SPEECH_WAV)


# --- parity with the official preprocessing ---------------------------------------------------

@pytest.mark.parametrize("name", list(REFERENCE_INPUTS))
def test_features_match_official(name, reference):
    wave, truncated = official_wave(name)
    assert wave.dtype == np.float64
    assert truncated == (name == "long")

    mel = features.log_mel_spectrogram(wave)
    ref_mel = reference[f"{name}.mel"][0]
    assert mel.dtype == np.float32 and mel.shape == ref_mel.shape == (80, 3000)
    np.testing.assert_allclose(mel, ref_mel, rtol=0, atol=MEL_ATOL)

    fbank = features.beats_fbank(wave)
    ref_fbank = reference[f"{name}.beats_fbank"][0]
    assert fbank.dtype == np.float32 and fbank.shape == ref_fbank.shape
    np.testing.assert_allclose(fbank, ref_fbank, rtol=0, atol=FBANK_ATOL)


def test_mel_matches_transformers_numpy_path():
    from transformers import WhisperFeatureExtractor
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0,
                              max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                              mel_scale="slaney")
    np.testing.assert_allclose(features.whisper_mel_filters(80), filters.T, rtol=0, atol=1e-12)

    extractor = WhisperFeatureExtractor()
    wave, _ = official_wave("short")
    padded = np.pad(wave, (0, audio.N_SAMPLES - len(wave)))
    expected = extractor._np_extract_fbank_features(padded[None].astype(np.float32), "cpu")[0]
    # measured 1.2e-7 (one float32 ulp)
    np.testing.assert_allclose(features.log_mel_spectrogram(wave), expected, rtol=0, atol=1e-6)


def test_fbank_frame_count_and_short_input():
    for n in (400, 559, 560, 16000, 480000):
        assert features.beats_fbank(np.zeros(n)).shape == (1 + (n - 400) // 160, 128)
    with pytest.raises(AudioError):
        features.beats_fbank(np.zeros(399))


def test_mel_pads_and_trims_to_n_samples(speech):
    short = features.log_mel_spectrogram(speech[:8000], n_samples=16000)
    assert short.shape == (80, 100)
    long = features.log_mel_spectrogram(np.tile(speech, 20))
    np.testing.assert_array_equal(long, features.log_mel_spectrogram(np.tile(speech, 20)[:audio.N_SAMPLES]))


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, salmonn_cli.audio, salmonn_cli.features; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# --- fit_to_chunk ------------------------------------------------------------------------------

def test_fit_to_chunk_pads_and_truncates():
    wave, cut = audio.fit_to_chunk(np.ones(6400), 16000, 1.0, 30.0)
    assert not cut and len(wave) == 16000
    np.testing.assert_array_equal(wave[:6400], 1.0)
    np.testing.assert_array_equal(wave[6400:], 0.0)

    wave, cut = audio.fit_to_chunk(np.arange(640000.0), 16000, 1.0, 30.0)
    assert cut and len(wave) == 480000 and wave[-1] == 479999.0

    wave, cut = audio.fit_to_chunk(np.ones(480000), 16000, 1.0, 30.0)
    assert not cut and len(wave) == 480000


# --- reading formats ----------------------------------------------------------------------------

# Round trip 16 kHz -> rate -> 16 kHz; 8 kHz keeps only the band below 4 kHz (measured 0.99992 / 0.991).
@pytest.mark.parametrize("rate,min_correlation", [(48000, 0.9999), (8000, 0.98)])
def test_other_rates_are_resampled(tmp_path, speech, rate, min_correlation):
    path = tmp_path / f"speech_{rate}.wav"
    soundfile.write(path, soxr.resample(speech, 16000, rate, quality="VHQ"), rate, subtype="FLOAT")
    wave = audio.load_audio(path)
    assert wave.dtype == np.float64 and wave.ndim == 1
    n_file = soundfile.info(path).frames
    assert abs(len(wave) - n_file * 16000 / rate) <= 1
    n = min(len(wave), len(speech))
    assert np.corrcoef(wave[:n], speech[:n])[0, 1] > min_correlation


def test_stereo_keeps_channel_0(tmp_path, speech):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, len(speech))
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([speech, noise], axis=1), 16000, subtype="PCM_16")
    np.testing.assert_array_equal(audio.load_audio(path), speech)


@pytest.mark.parametrize("suffix,subtype", [("wav", "PCM_24"), ("wav", "FLOAT"), ("flac", "PCM_16"),
                                            ("flac", "PCM_24")])
def test_lossless_formats_read_exactly(tmp_path, speech, suffix, subtype):
    path = tmp_path / f"speech_{subtype}.{suffix}"
    soundfile.write(path, speech, 16000, subtype=subtype)
    np.testing.assert_array_equal(audio.load_audio(path), speech)  # 16-bit samples survive exactly


def test_ogg_vorbis_reads(tmp_path, speech):
    path = tmp_path / "speech.ogg"
    soundfile.write(path, speech, 16000, format="OGG", subtype="VORBIS")
    wave = audio.load_audio(path)
    assert len(wave) == len(speech)
    assert np.corrcoef(wave, speech)[0, 1] > 0.95  # lossy codec: shape, not samples


def test_mp3_reads():
    wave = audio.load_audio(MP3)
    assert wave.dtype == np.float64 and wave.ndim == 1
    assert abs(len(wave) / 16000 - MP3_SECONDS) < 0.05
    assert np.isfinite(wave).all() and 0.05 < np.abs(wave).max() <= 1.0


# --- bad inputs ---------------------------------------------------------------------------------

def _missing(tmp_path):
    return tmp_path / "nope.wav"


def _directory(tmp_path):
    (tmp_path / "dir.wav").mkdir()
    return tmp_path / "dir.wav"


def _text_as_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    return path


def _garbage_mp3(tmp_path):
    path = tmp_path / "noise.mp3"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _zero_length_wav(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0), 16000, subtype="PCM_16")
    return path


def _nan_wav(tmp_path):
    path = tmp_path / "nan.wav"
    soundfile.write(path, np.array([0.1, np.nan, -0.1] * 100), 16000, subtype="FLOAT")
    return path


def _inf_wav(tmp_path):
    path = tmp_path / "inf.wav"
    soundfile.write(path, np.array([0.1, np.inf, -0.1] * 100), 16000, subtype="DOUBLE")
    return path


@pytest.mark.parametrize("make,message", [
    (_missing, "not found"), (_directory, "directory"), (_text_as_wav, "cannot read"),
    (_garbage_mp3, "cannot read"), (_zero_length_wav, "no samples"), (_nan_wav, "NaN"),
    (_inf_wav, "infinite"),
])
def test_bad_inputs_raise_audio_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(AudioError, match=message) as info:
        audio.load_audio(path)
    text = str(info.value)
    assert "\n" not in text and path.name in text
